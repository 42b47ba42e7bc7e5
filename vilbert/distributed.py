"""Process-group set-up and the few collectives the scripts need, nanoGPT-style.

Works the same on one process, under `torchrun` (which sets LOCAL_RANK, RANK, WORLD_SIZE) and under
the legacy `python -m torch.distributed.launch`, which passes `--local-rank=K` (current PyTorch)
or `--local_rank=K` (old PyTorch). Every helper is a no-op on a single process.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vilbert.errors import BadInputError

logger = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process runs. local_rank is -1 when not distributed (the published convention)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.local_rank != -1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def add_local_rank_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept both spellings that torch.distributed.launch has used over the years."""
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        dest="local_rank",
        type=int,
        default=-1,
        help="set by torch.distributed.launch; torchrun uses the LOCAL_RANK variable instead",
    )
    return parser


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise BadInputError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(local_rank_arg: int = -1, no_cuda: bool = False) -> DistContext:
    """Join the process group when launched by torchrun/launch; otherwise describe a single process.

    A launcher is recognised by the RANK variable (both launchers set it). NCCL on CUDA, gloo on CPU.
    """
    use_cuda = torch.cuda.is_available() and not no_cuda
    rank = _env_int("RANK")
    if rank is None:
        if local_rank_arg != -1:
            raise BadInputError(
                f"--local_rank {local_rank_arg} was given but RANK/WORLD_SIZE are not set: "
                "launch with torchrun or python -m torch.distributed.launch"
            )
        device = torch.device("cuda" if use_cuda else "cpu")
        return DistContext(rank=0, local_rank=-1, world_size=1, device=device)

    world_size = _env_int("WORLD_SIZE")
    if world_size is None:
        raise BadInputError(f"RANK={rank} is set but WORLD_SIZE is not: launch with torchrun")
    env_local_rank = _env_int("LOCAL_RANK")
    if env_local_rank is not None and local_rank_arg not in (-1, env_local_rank):
        logger.warning(
            "--local_rank %d differs from LOCAL_RANK=%d; using LOCAL_RANK", local_rank_arg, env_local_rank
        )
    local_rank = env_local_rank if env_local_rank is not None else local_rank_arg
    if local_rank == -1:
        raise BadInputError("RANK is set but neither LOCAL_RANK nor --local_rank is: launch with torchrun")

    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise BadInputError(
                f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible "
                "(use --nproc_per_node <= the number of GPUs, or --no_cuda)"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    logger.info("rank %d/%d (local %d) on %s, backend %s", rank, world_size, local_rank, device, backend)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 writes logs and checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo works on CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(value: Any, average: bool) -> Any:
    """Sum (or average) a tensor, a number, or a dict of numbers/tensors over ranks in one collective."""
    if isinstance(value, dict):
        keys = sorted(value)
        numbers = [float(value[key]) for key in keys]
        if not is_initialized():
            return dict(zip(keys, numbers))
        packed = torch.tensor(numbers, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(packed)
        if average:
            packed /= dist.get_world_size()
        return dict(zip(keys, packed.tolist()))
    if isinstance(value, torch.Tensor):
        if not is_initialized():
            return value.clone()
        reduced = value.detach().to(_comm_device(), copy=True)
        dist.all_reduce(reduced)
        if average:
            reduced = reduced / dist.get_world_size()
        return reduced.to(value.device)
    return _all_reduce({"value": value}, average)["value"]


def all_reduce_mean(value: Any) -> Any:
    """Mean over ranks of a tensor, a float, or a dict of floats (e.g. loss components before logging)."""
    return _all_reduce(value, average=True)


def all_reduce_sum(value: Any) -> Any:
    """Sum over ranks; use it for counts (correct, total) so accuracies are exact, not means of means."""
    return _all_reduce(value, average=False)


def any_across_ranks(flag: bool) -> bool:
    """True on every rank when it is True on any rank, so all ranks take the same branch."""
    if not is_initialized():
        return bool(flag)
    packed = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return bool(packed.item() > 0)


def max_across_ranks_(value: torch.Tensor) -> torch.Tensor:
    """``value`` replaced in place by its maximum over ranks, on the device: no host sync under NCCL."""
    if not is_initialized():
        return value
    if value.device == _comm_device():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value
    packed = value.to(_comm_device())
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return value.copy_(packed)


def min_across_ranks(value: int) -> int:
    """The smallest ``value`` of any rank (e.g. batches per epoch, so no rank waits forever)."""
    if not is_initialized():
        return int(value)
    packed = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(packed, op=dist.ReduceOp.MIN)
    return int(packed.item())


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    return value


def gather_to_main(value: Any) -> list[Any] | None:
    """Collect one picklable object per rank (arrays, tensors, lists) on rank 0, in rank order.

    Returns the list on rank 0 and None elsewhere; on a single process, [value]. Tensors travel
    through the CPU so ranks on different GPUs never unpickle onto a device they do not own.
    """
    value = _to_cpu(value)
    if not is_initialized():
        return [value]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered
