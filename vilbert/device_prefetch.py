"""Batches moved to the device one step ahead, so the copy of the next batch overlaps this step.

A ``non_blocking`` copy from pinned memory frees the host, but on the compute stream it still waits
for the step queued before it, and the step after waits for it. On CUDA the next batch is copied on
a side stream while the current step computes; the compute stream waits for that copy only when it
takes the batch, and each device tensor is marked as used there, so its memory is not reused
early. Elsewhere (CPU) a batch is simply moved when it is taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of ``batch`` on ``device`` (asynchronous from pinned memory)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def prefetch_to_device(
    batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """(host batch, device batch) pairs; on CUDA the next pair's copy is already running."""
    if device.type != "cuda":
        for batch in batches:
            yield batch, to_device(batch, device)
        return
    side = torch.cuda.Stream(device)
    upcoming = iter(batches)

    def start_copy() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        host = next(upcoming, None)
        if host is None:
            return None
        with torch.cuda.stream(side):
            return host, to_device(host, device)

    ahead = start_copy()
    while ahead is not None:
        host, moved = ahead
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(side)
        for tensor in moved.values():
            tensor.record_stream(compute)
        ahead = start_copy()
        yield host, moved
