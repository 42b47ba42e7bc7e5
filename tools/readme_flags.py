"""Rewrite the README's "Every script's flags" section from each script's own ``--help``.

Run after changing a flag: ``python tools/readme_flags.py`` (``--check`` exits 1 when the README is
stale, without writing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = (
    "train_concap.py",
    "train_tasks.py",
    "eval_retrieval.py",
    "eval_tasks.py",
    "demo.py",
    "tools/make_synthetic_data.py",
    "tools/convert_tsv_to_lmdb.py",
    "tools/build_hard_negatives.py",
    "tools/compute_q_ar.py",
    "tools/export_model.py",
    "tools/extract_features.py",
    "tools/verify_features.py",
    "-m vilbert.check_data",
    "-m vilbert.rank",
    "-m vilbert.attention_maps",
    "benchmarks/bench_train_step.py",
    "benchmarks/bench_eval_retrieval.py",
    "benchmarks/bench_preprocess.py",
    "benchmarks/bench_loader.py",
    "benchmarks/run_all.py",
)
HEADING = "## Every script's flags"
INTRO = (
    "Generated from each script's `--help` by `python tools/readme_flags.py` (published flags first; "
    'additions are marked "new" in the scripts\' help groups).'
)


def help_text(script: str) -> str | None:
    command = [sys.executable, *script.split(), "--help"]
    if not script.startswith("-m"):
        command[1] = os.path.join(ROOT, script)
        if not os.path.isfile(command[1]):
            return None
    env = {**os.environ, "COLUMNS": "100"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return None
    return result.stdout.rstrip()


def section() -> str:
    parts = [HEADING, "", INTRO, ""]
    for script in SCRIPTS:
        text = help_text(script)
        if text is None:
            continue
        name = script.replace("-m ", "python -m ")
        summary = f"<details><summary><code>{name}</code></summary>"
        parts += [summary, "", "```", text, "```", "", "</details>", ""]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the README is stale")
    args = parser.parse_args()
    path = os.path.join(ROOT, "README.md")
    with open(path, encoding="utf-8") as f:
        readme = f.read()
    start = readme.index(HEADING)
    end = readme.index("\n## ", start + len(HEADING)) + 1
    updated = readme[:start] + section() + "\n" + readme[end:]
    if args.check:
        return int(updated != readme)
    with open(path, "w", encoding="utf-8") as f:
        f.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
