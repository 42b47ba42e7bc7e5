"""An epoch number that DataLoader workers share with the main process.

Persistent workers (``persistent_workers=True``) keep the copy of the dataset they received when
they started, so a plain attribute set by ``set_epoch`` in the main process never reaches them and
every epoch would draw the samples of the first one. The number lives in a shared-memory tensor
instead: workers forked or spawned from the main process read the value it holds now.
"""

from __future__ import annotations

import torch


class SharedEpoch:
    """A shared-memory integer: set in the main process, read by every worker of every epoch."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = torch.full((), int(epoch), dtype=torch.int64).share_memory_()

    def get(self) -> int:
        """The epoch most recently set, as seen by whichever process asks."""
        return int(self._value)

    def set(self, epoch: int) -> None:
        """Set the epoch for this process and every worker that shares this object."""
        self._value.fill_(int(epoch))
