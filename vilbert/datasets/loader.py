"""DataLoaders that every rank agrees on and that can restart in the middle of an epoch.

The order of an epoch is a pure function of (seed, epoch), so a resumed run skips exactly the
batches it had consumed; worker seeds come from a private generator, never from the global RNG,
so building a loader does not perturb dropout.

Batches built in a worker live in shared memory, and allocating it is the dearest part of a large
batch: every fresh page is faulted in and zeroed by the kernel, which costs several times the copy
of the data itself. :class:`SharedBatchBuffers` therefore keeps a few buffers per worker and reuses
one only once the consumer has dropped every tensor of the batch it held: the consumer's side of
the buffer carries a finaliser that marks it free in a flag array the worker shares.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from vilbert.distributed import DistContext, min_across_ranks

logger = logging.getLogger(__name__)

BUFFER_SLOTS = 8  # prefetched batches (4 per worker in make_loader) + those the consumer holds + slack


class SharedBatchBuffers:
    """Shared-memory buffers that one process (a DataLoader worker) reuses for its batches.

    A slot is taken by the worker (flag 1) and released by the process that receives the batch,
    when the last tensor using the buffer there is freed (flag 0). When every slot is taken, a fresh
    buffer outside the pool is used: slower, never wrong.
    """

    def __init__(self, slots: int = BUFFER_SLOTS) -> None:
        self.flags = torch.zeros(slots, dtype=torch.uint8).share_memory_()
        self._storages: list[torch.UntypedStorage | None] = [None] * slots

    def take(self, nbytes: int, capacity: int) -> tuple[torch.UntypedStorage, int]:
        """A shared storage of at least ``nbytes`` and its slot (-1: outside the pool).

        A slot's storage is allocated with ``capacity`` bytes (the largest batch expected), so
        batches of varying shapes reuse it; only the pages a batch writes are ever touched.
        """
        flags = self.flags.numpy()
        free = np.flatnonzero(flags == 0)
        if not len(free):
            return torch.UntypedStorage._new_shared(nbytes), -1
        slot = int(free[0])
        storage = self._storages[slot]
        if storage is None or storage.nbytes() < nbytes:
            storage = torch.UntypedStorage._new_shared(max(nbytes, capacity))
            self._storages[slot] = storage
        flags[slot] = 1
        return storage, slot


_BUFFERS: dict[int, SharedBatchBuffers] = {}


def worker_buffers() -> SharedBatchBuffers:
    """This process's pool (a forked worker must not reuse the pool of the process it came from)."""
    pool = _BUFFERS.get(os.getpid())
    if pool is None:
        _BUFFERS.clear()
        pool = _BUFFERS[os.getpid()] = SharedBatchBuffers()
    return pool


class PooledBatch(dict):
    """A batch whose tensors are views of one pooled buffer; the receiver releases the slot.

    It arrives in the receiving process as a plain ``dict`` (what ``pin_memory`` and the trainer
    expect); nothing of the pool is visible there except the finaliser.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], flags: torch.Tensor, slot: int) -> None:
        super().__init__(tensors)
        self.flags = flags
        self.slot = slot

    def __reduce__(self) -> tuple[Callable, tuple[Any, ...]]:
        return _adopt_batch, (dict(self), self.flags, self.slot)


def _release(flags: torch.Tensor, slot: int) -> None:
    flags[slot] = 0


def _adopt_batch(tensors: dict[str, torch.Tensor], flags: torch.Tensor, slot: int) -> dict[str, torch.Tensor]:
    """Runs where the batch is received: free the slot once its buffer is no longer used there."""
    if slot >= 0 and tensors:
        weakref.finalize(next(iter(tensors.values())).untyped_storage(), _release, flags, slot)
    return tensors


def padded_length(longest: int, pad_to_multiple: int, limit: int) -> int:
    """``longest`` rounded up to a multiple of ``pad_to_multiple``, but never past ``limit`` (the fixed
    padding) unless ``longest`` itself is: a run then sees a handful of shapes, not one per batch."""
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    rounded = -(-longest // pad_to_multiple) * pad_to_multiple
    return max(longest, min(rounded, limit))


TEXT_KEYS = ("input_ids", "input_mask", "segment_ids")  # [..., T]
REGION_KEYS = ("image_feat", "image_loc")  # [..., R, D]


def trim_padding(arrays: dict[str, Any], pad_to_multiple: int) -> dict[str, Any]:
    """Stacked fixed-padding arrays cut to the batch's longest caption and region list, rounded up to
    ``pad_to_multiple`` positions (dynamic padding for the fine-tuning batches).

    Text is cut by ``input_mask``, regions by ``image_mask`` (both prefix masks); ``multimodal_mask``
    (``[image ; text]``) keeps the same positions of both. Other arrays pass through.
    """
    out = dict(arrays)
    text_limit, region_limit = arrays["input_mask"].shape[-1], arrays["image_mask"].shape[-1]
    tokens = padded_length(int(arrays["input_mask"].sum(-1).max()), pad_to_multiple, text_limit)
    regions = padded_length(int(arrays["image_mask"].sum(-1).max()), pad_to_multiple, region_limit)
    for key in TEXT_KEYS:
        out[key] = np.ascontiguousarray(arrays[key][..., :tokens])
    for key in REGION_KEYS:
        out[key] = np.ascontiguousarray(arrays[key][..., :regions, :])
    out["image_mask"] = np.ascontiguousarray(arrays["image_mask"][..., :regions])
    if "multimodal_mask" in arrays:
        joint = arrays["multimodal_mask"]
        out["multimodal_mask"] = np.concatenate(
            [joint[..., :regions], joint[..., region_limit : region_limit + tokens]], axis=-1
        )
    return out


def batch_tensors(
    fields: list[tuple[str, torch.dtype, tuple[int, ...]]], capacity: int = 0
) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of the given names, dtypes and shapes, views of one buffer.

    In a DataLoader worker the buffer is a reused shared-memory one (see :class:`SharedBatchBuffers`)
    and the result a :class:`PooledBatch`; elsewhere it is ordinary memory. ``capacity``: bytes of
    the largest batch expected, so that a pooled buffer fits every later one.
    """
    offsets, total = [], 0
    for _, dtype, shape in fields:
        offsets.append(total)
        nbytes = math.prod(shape) * dtype.itemsize
        total += -(-nbytes // 64) * 64  # 64-byte aligned views
    in_worker = torch.utils.data.get_worker_info() is not None
    if in_worker:
        pool = worker_buffers()
        storage, slot = pool.take(total, capacity)
    else:
        storage = torch.empty(total, dtype=torch.uint8).untyped_storage()
    tensors = {}
    for (name, dtype, shape), offset in zip(fields, offsets):
        tensors[name] = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
    return PooledBatch(tensors, pool.flags, slot) if in_worker else tensors


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of a (distributed) sampler, starting ``skip`` batches in, at most ``limit`` per epoch."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, limit: int | None = None) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.limit = limit
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __len__(self) -> int:
        full = math.ceil(len(self.sampler) / self.batch_size)
        return full if self.limit is None else min(full, self.limit)

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        for number in range(self.skip, len(self)):
            yield indices[number * self.batch_size : (number + 1) * self.batch_size]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable,
    ctx: DistContext,
    shard: bool,
    shuffle: bool,
    num_workers: int,
    seed: int,
) -> DataLoader:
    """``shard``: split the dataset over ranks; otherwise each rank reads all of its own dataset
    (per-rank part files), trimmed to the shortest rank so every rank takes the same steps."""
    replicas, rank = (ctx.world_size, ctx.rank) if shard else (1, 0)
    sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed)
    limit = None
    if not shard and ctx.world_size > 1:
        limit = min_across_ranks(math.ceil(len(sampler) / batch_size))
    batches = ResumableBatchSampler(sampler, batch_size, limit)
    cuda = ctx.device.type == "cuda"
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=cuda,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed + ctx.rank),
    )


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loader_workers(requested: int, world_size: int, num_tasks: int) -> int:
    """Workers of each of ``num_tasks`` loaders in this process, out of ``requested`` in total for
    ``world_size`` ranks; every script caps ``--num_workers`` here.

    Capped by the CPUs available: the published ``--num_workers 16`` was sized for an 8-GPU node,
    and on a small machine it would fork more workers than cores (each holding a copy of the
    dataset) and only slow the run down.
    """
    cpus = available_cpus()
    if requested > cpus:
        logger.info("--num_workers %d capped at the %d CPUs available", requested, cpus)
    return min(requested, cpus) // max(world_size, 1) // num_tasks
