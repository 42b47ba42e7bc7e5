"""The embedded default: ``demo.py --quick`` runs the whole pipeline and prints the results table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = re.compile(r"^demo \(synthetic\)\s+(.*)$", re.MULTILINE)


@pytest.mark.slow
def test_quick_demo_prints_the_table(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "demo.py"), "--quick", "--output_dir", str(out)],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "InterBERT (paper)" in result.stdout and re.search(r"^chance \(\d+ images\)", result.stdout, re.M)
    row = ROW.search(result.stdout)
    assert row, result.stdout
    values = [float(v) for v in re.findall(r"\d+\.\d", row.group(1))]
    assert len(values) == 9 and all(0.0 <= v <= 100.0 for v in values)
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["q_a"] == pytest.approx(values[6], abs=0.05)
    assert results["results"]["q_a"] > 25.0, "VCR Q->A must beat chance after fine-tuning"
    assert (out / "demo.png").stat().st_size > 10_000
