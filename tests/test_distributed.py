"""Single-process behaviour of vilbert.distributed, and a real 2-process gloo run through torchrun."""

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from vilbert import distributed

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_single_process_context(no_launcher):
    ctx = distributed.init_distributed(-1, no_cuda=True)
    assert (ctx.rank, ctx.local_rank, ctx.world_size) == (0, -1, 1)
    assert ctx.device == torch.device("cpu")
    assert ctx.is_main and not ctx.is_distributed
    assert distributed.is_main()
    distributed.barrier()
    distributed.cleanup()


def test_local_rank_without_launcher_is_a_clear_error(no_launcher):
    with pytest.raises(ValueError, match="torchrun"):
        distributed.init_distributed(0, no_cuda=True)


def test_single_process_collectives_are_identity(no_launcher):
    assert distributed.all_reduce_mean({"loss": 2.0, "mrm": torch.tensor(3.0)}) == {"loss": 2.0, "mrm": 3.0}
    assert distributed.all_reduce_mean(1.5) == 1.5
    assert distributed.all_reduce_sum(torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0]
    assert distributed.any_across_ranks(True) and not distributed.any_across_ranks(False)
    gathered = distributed.gather_to_main(np.arange(3))
    assert len(gathered) == 1 and gathered[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("flag", ["--local_rank=3", "--local-rank=3", "--local_rank", "--local-rank"])
def test_both_local_rank_spellings_parse(flag):
    parser = distributed.add_local_rank_args(argparse.ArgumentParser())
    argv = [flag] if "=" in flag else [flag, "3"]
    assert parser.parse_args(argv).local_rank == 3
    assert parser.parse_args([]).local_rank == -1


def test_unwrap_model_strips_wrappers():
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert distributed.unwrap_model(Wrapper(Wrapper(inner))) is inner
    assert distributed.unwrap_model(inner) is inner


WORKER = textwrap.dedent(
    """
    import argparse, json, os, sys
    import numpy as np
    import torch
    from vilbert import distributed

    parser = distributed.add_local_rank_args(argparse.ArgumentParser())
    parser.add_argument("--out")
    args = parser.parse_args()
    ctx = distributed.init_distributed(args.local_rank, no_cuda=True)
    rank = ctx.rank
    mean = distributed.all_reduce_mean({"loss": float(rank + 1), "acc": 10.0 * rank})
    tensor_mean = distributed.all_reduce_mean(torch.tensor([float(rank), 2.0 * rank]))
    total = distributed.all_reduce_sum(rank + 1)
    anyone = distributed.any_across_ranks(rank == 1)
    gathered = distributed.gather_to_main(np.full((rank + 1, 2), rank))
    distributed.barrier()
    if ctx.is_main:
        result = {
            "world_size": ctx.world_size,
            "local_rank": ctx.local_rank,
            "is_distributed": ctx.is_distributed,
            "mean": mean,
            "tensor_mean": tensor_mean.tolist(),
            "total": total,
            "anyone": anyone,
            "gathered": [part.tolist() for part in gathered],
        }
        with open(args.out, "w") as handle:
            json.dump(result, handle)
    else:
        assert gathered is None
    distributed.cleanup()
    """
)


def _run_two_ranks(tmp_path: Path, launcher: list[str]) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result.json"
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", *launcher, "--nproc_per_node=2", str(script), "--out", str(out)]
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(out.read_text())


def _check_two_rank_result(result: dict) -> None:
    assert result["world_size"] == 2
    assert result["local_rank"] == 0 and result["is_distributed"]
    assert result["mean"] == {"acc": 5.0, "loss": 1.5}
    assert result["tensor_mean"] == [0.5, 1.0]
    assert result["total"] == 3.0
    assert result["anyone"] is True
    assert result["gathered"] == [[[0, 0]], [[1, 1], [1, 1]]]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    _check_two_rank_result(_run_two_ranks(tmp_path, ["torch.distributed.run", "--standalone"]))


@pytest.mark.slow
def test_legacy_launch_passes_local_rank_flag(tmp_path):
    pytest.importorskip("torch.distributed.launch")
    port = 29500 + os.getpid() % 1000
    result = _run_two_ranks(tmp_path, ["torch.distributed.launch", f"--master_port={port}"])
    _check_two_rank_result(result)
