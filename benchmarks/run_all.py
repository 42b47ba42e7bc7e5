"""Run every benchmark (``make bench``) and write ``benchmarks/RESULTS.md``.

Each benchmark runs as its own process (a clean allocator and thread pool, and one crash does not
take the others down) and compares against its baseline inside that one run; this script only
collects the ``ratio=`` line each one ends with, its baseline and our figures, and the machine they
ran on. A benchmark that is not there yet is listed as skipped; one that fails is listed as failed
and makes the exit status non-zero (the table is still written, atomically).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import torch

from vilbert.atomic import atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
RATIO = re.compile(r"^ratio=([0-9.]+|inf|nan)\s*$")
TIMEOUT_S = 1200


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script; ``baseline`` / ``ours`` are the prefixes of its two result lines."""

    title: str
    script: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]
    baseline: str
    ours: str
    device_args: bool = True  # pass --device where the script has it
    cuda_args: tuple[str, ...] = ()  # added on CUDA (a GPU's realistic batch and precision)


@dataclass
class Outcome:
    benchmark: Benchmark
    command: list[str]
    status: str  # "ok", "skipped", "failed"
    output: str = ""
    ratio: str = ""
    baseline: str = ""
    ours: str = ""


TINY = ("--config", "config/interbert_tiny.json")
BENCHMARKS = (
    Benchmark(
        "pretraining step, base config",
        "benchmarks/bench_train_step.py",
        (),
        ("--steps", "2", "--warmup", "1"),
        "plain:",
        "fast:",
        cuda_args=("--batch_size", "64", "--precision", "bf16"),
    ),
    Benchmark(
        "pretraining step, base config, --recipe modern (baseline) vs published",
        "benchmarks/bench_train_step.py",
        ("--compare", "recipes", "--steps", "7"),
        ("--compare", "recipes", "--steps", "2", "--warmup", "1"),
        "plain:",
        "fast:",
        cuda_args=("--batch_size", "64", "--precision", "bf16"),
    ),
    Benchmark(
        "pretraining step, tiny config, eager vs --compile",
        "benchmarks/bench_train_step.py",
        (*TINY, "--compare", "compile", "--steps", "20", "--warmup", "6"),
        (*TINY, "--compare", "compile", "--steps", "5", "--warmup", "4"),
        "plain:",
        "fast:",
        cuda_args=("--precision", "bf16"),
    ),
    Benchmark(
        "pretraining step, tiny config",
        "benchmarks/bench_train_step.py",
        (*TINY, "--steps", "20", "--warmup", "3"),
        (*TINY, "--steps", "5", "--warmup", "1"),
        "plain:",
        "fast:",
        cuda_args=("--precision", "bf16"),
    ),
    Benchmark(
        "pretraining preprocessing (tokenise, mask, collate)",
        "benchmarks/bench_preprocess.py",
        (),
        ("--num_samples", "128"),
        "published per-sample algorithm:",
        "this project (vectorised):",
        device_args=False,
    ),
    Benchmark(
        "pretraining data path (LMDB, masking, collate; one worker)",
        "benchmarks/bench_loader.py",
        (),
        ("--num_samples", "256", "--passes", "2"),
        "baseline",
        "ours:",
        device_args=False,
    ),
    Benchmark(
        "Flickr30K retrieval evaluation",
        "benchmarks/bench_eval_retrieval.py",
        (),
        ("--quick",),
        "baseline",
        "ours",
    ),
)


def script_flags(script: str) -> str:
    """The script's ``--help`` text, to pass only the flags it has (some scripts are written by others)."""
    result = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return result.stdout


def supported(args: list[str], flags: str) -> list[str]:
    """``args`` without the flags (and their values) that ``--help`` does not list."""
    kept: list[str] = []
    skipping = False
    for arg in args:
        if arg.startswith("--"):
            skipping = re.search(rf"{re.escape(arg)}\b", flags) is None
            if not skipping:
                kept.append(arg)
        elif not skipping:
            kept.append(arg)
    return kept


def command_for(benchmark: Benchmark, quick: bool, device: str) -> list[str]:
    args = list(benchmark.quick_args if quick else benchmark.args)
    if benchmark.device_args:
        args += ["--device", device]
    if device == "cuda":
        args += benchmark.cuda_args
    return [sys.executable, benchmark.script, *supported(args, script_flags(benchmark.script))]


def figure(output: str, prefix: str) -> str:
    """The figures on the first output line starting with ``prefix``, without a leading "(description):"."""
    for line in output.splitlines():
        stripped = line.strip()
        if stripped.lower().startswith(prefix.lower()):
            rest = stripped[len(prefix) :].strip(" :=")
            if rest.startswith("(") and "):" in rest:
                rest = rest.split("):", 1)[1].strip()
            return rest
    return "see output"


def run(benchmark: Benchmark, quick: bool, device: str) -> Outcome:
    if not os.path.isfile(os.path.join(ROOT, benchmark.script)):
        return Outcome(benchmark, [], "skipped", output=f"{benchmark.script} does not exist (yet)")
    command = command_for(benchmark, quick, device)
    print("$", display(command), flush=True)
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        return Outcome(benchmark, command, "failed", output=f"timed out after {error.timeout} s")
    output = result.stdout + (f"\n[stderr]\n{result.stderr}" if result.returncode else "")
    print(output, flush=True)
    lines = result.stdout.strip().splitlines()
    match = RATIO.match(lines[-1]) if lines else None
    if result.returncode or match is None:
        reason = f"exit status {result.returncode}" if result.returncode else "no final ratio= line"
        return Outcome(benchmark, command, "failed", output=f"{reason}\n{output}")
    return Outcome(
        benchmark,
        command,
        "ok",
        output=result.stdout,
        ratio=match.group(1),
        baseline=figure(result.stdout, benchmark.baseline),
        ours=figure(result.stdout, benchmark.ours),
    )


def display(command: list[str]) -> str:
    """The command as a reader would type it (``python``, not this interpreter's path)."""
    return shlex.join(["python", *command[1:]]) if command else ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform's answer below
    return platform.processor() or platform.machine()


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(outcomes: list[Outcome], quick: bool, device: str, loads: tuple[float, float]) -> str:
    """``loads``: the 1-minute load average before and after the runs (other work skews CPU timings)."""
    gpu = torch.cuda.get_device_name() if device == "cuda" else "not used"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/run_all.py` (`make bench`); do not edit by hand. Each benchmark",
        "times its baseline and this project's code in the same run; ratio = baseline time / our time.",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {cell(cpu_model())}, {os.cpu_count()} cores (torch threads: {torch.get_num_threads()}) |",
        f"| GPU | {cell(gpu)} |",
        f"| torch | {torch.__version__} (Python {platform.python_version()}) |",
        f"| date | {now} |",
        f"| load average (1 min) | {loads[0]:.1f} before, {loads[1]:.1f} after the runs |",
        f"| run | `{'--quick' if quick else 'full'}`, device {device} |",
        "",
        "| benchmark | command | baseline | ours | ratio |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        if o.status == "ok":
            row = [o.benchmark.title, f"`{display(o.command)}`", o.baseline, o.ours, f"**{o.ratio}**"]
        else:
            command = f"`{display(o.command)}`" if o.command else o.benchmark.script
            row = [o.benchmark.title, command, o.status, o.output.splitlines()[0], "–"]
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    lines += ["", "## Outputs", ""]
    for o in outcomes:
        lines += [f"### {o.benchmark.title} ({o.status})", "", "```", o.output.rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output", default=RESULTS, help="markdown file to write")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    load_before = os.getloadavg()[0]
    outcomes = [run(benchmark, args.quick, args.device) for benchmark in BENCHMARKS]
    loads = (load_before, os.getloadavg()[0])
    atomic_write_text(args.output, render(outcomes, args.quick, args.device, loads))
    print(f"wrote {os.path.relpath(args.output, ROOT)}")
    for o in outcomes:
        print(f"{o.status:8s} {o.benchmark.title}: {o.ratio or o.output.splitlines()[0]}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
