"""DataLoaders that every rank agrees on and that can restart in the middle of an epoch.

The order of an epoch is a pure function of (seed, epoch), so a resumed run skips exactly the
batches it had consumed; worker seeds come from a private generator, never from the global RNG,
so building a loader does not perturb dropout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from vilbert.distributed import DistContext, min_across_ranks


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
