"""The run folder ``output_dir/<save_name>``: its files, its metadata, and resuming from it.

A new run never overwrites the checkpoints of another: a folder that already holds epoch weights
but no training state is refused, and one that holds a training state is resumed.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from vilbert.atomic import atomic_write_json, atomic_write_text, remove_stale_temporaries
from vilbert.distributed import is_initialized

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"


def _run_name(save_name: str) -> str:
    """``save_name``, or the published timestamp + random suffix, agreed by every rank."""
    name = (
        save_name or time.strftime("%d-%b-%y-%H-%M-%S", time.gmtime()) + f"_{random.randint(0, 999999):06d}"
    )
    if is_initialized():
        holder = [name]
        dist.broadcast_object_list(holder, src=0)
        name = holder[0]
    return name


@dataclass
class RunFolder:
    path: str
    is_main: bool

    @classmethod
    def create(cls, output_dir: str, save_name: str, is_main: bool) -> RunFolder:
        folder = cls(os.path.join(output_dir, _run_name(save_name)), is_main)
        if is_main:
            os.makedirs(folder.path, exist_ok=True)
            removed = remove_stale_temporaries(folder.path)
            if removed:
                logger.info("removed %d temporary file(s) an interrupted write left in %s: %s",
                            len(removed), folder.path, ", ".join(removed))  # fmt: skip
        return folder

    @property
    def state_path(self) -> str:
        return os.path.join(self.path, STATE_FILE)

    def weights_path(self, epoch: int, ema: bool = False) -> str:
        return os.path.join(self.path, f"pytorch_model_{epoch}{'_ema' if ema else ''}.bin")

    def write_run_info(self, args: Any, config: Any) -> None:
        """``command.txt`` (the command line and every argument) and ``config.json`` beside the weights."""
        if not self.is_main:
            return
        command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        arguments = json.dumps(vars(args), indent=2, sort_keys=True, default=str)
        atomic_write_text(os.path.join(self.path, "command.txt"), f"{command}\n\n{arguments}\n")
        atomic_write_json(os.path.join(self.path, "config.json"), config.to_dict())

    def resume_file(self, resume: str | None, allow_existing_weights: bool = False) -> str | None:
        """The training state to resume from, or None for a fresh run.

        ``resume``: a path, ``"auto"`` (this folder's state, which must exist) or None (this
        folder's state when present).
        """
        if resume not in (None, "auto"):
            if not os.path.isfile(resume):
                raise FileNotFoundError(f"--resume: training state not found: {resume}")
            return resume
        if os.path.isfile(self.state_path):
            logger.info("resuming from %s", self.state_path)
            return self.state_path
        if resume == "auto":
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {self.path}")
        existing = sorted(glob.glob(os.path.join(self.path, "pytorch_model_*.bin")))
        if existing and not allow_existing_weights:
            raise FileExistsError(
                f"{self.path} already holds checkpoints ({os.path.basename(existing[0])}, ...) but no "
                f"{STATE_FILE} to resume from; choose another --save_name or --output_dir"
            )
        return None
