"""What a training run tells its user: a progress bar, periodic log lines, TensorBoard events,
and ``history.jsonl`` (one JSON object per log line or validation, for plots and scripts).

Only the main process logs; every method is a no-op elsewhere, so loops need no rank checks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)


class RunLogger:
    """Rank-0 reporting; ``log_every`` optimiser steps a line with losses, lr and samples/s."""

    def __init__(
        self,
        run_dir: str | None,
        enabled: bool,
        log_every: int = 20,
        quiet: bool = False,
        peak_flops: float | None = None,
    ) -> None:
        """``peak_flops``: the device's peak FLOP/s (:func:`vilbert.flops.peak_flops`); with it and
        the ``flops`` of each step, every log line shows the model FLOPs utilisation (MFU)."""
        self.enabled = enabled
        self.peak_flops = peak_flops
        self.log_every = max(1, log_every)
        self.show_bar = enabled and not quiet and sys.stderr.isatty()
        self.writer = None
        self.history_path = None
        if enabled and run_dir is not None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "logs"))
            self.history_path = os.path.join(run_dir, "history.jsonl")
        self._sums: dict[str, torch.Tensor | float] = {}
        self._count = 0
        self._samples = 0
        self._flops = 0.0
        # The clock of the rates runs during epochs only (validation and saving are not training):
        # seconds of the current log interval in finished epochs, and when the running part began.
        self._finished_seconds = 0.0
        self._since = time.perf_counter()
        self.bar: tqdm | None = None

    def start_epoch(self, epoch: int, total: int, done: int = 0) -> None:
        if self.show_bar:
            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", dynamic_ncols=True)
        self._since = time.perf_counter()

    def end_epoch(self) -> None:
        self._finished_seconds += time.perf_counter() - self._since
        self._since = time.perf_counter()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def step(
        self,
        global_step: int,
        losses: Mapping[str, torch.Tensor | float],
        lr: float,
        samples: int,
        flops: float | None = None,
    ) -> None:
        """Record one optimiser step; every ``log_every`` steps print and plot the running means.

        Losses may stay on the device: they are summed there and read once per log line.
        ``flops``: the model FLOPs of this optimiser step (:func:`vilbert.flops.batch_flops`, all
        its micro-batches and ranks), for the achieved TFLOP/s and MFU of the log line.
        """
        if not self.enabled:
            return
        for name, value in losses.items():
            value = value.detach() if isinstance(value, torch.Tensor) else value
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._count += 1
        self._samples += samples
        self._flops += flops or 0.0
        if self.bar is not None:
            self.bar.update(1)
        if global_step % self.log_every:
            return
        elapsed = max(self._finished_seconds + time.perf_counter() - self._since, 1e-9)
        means = {name: float(total) / self._count for name, total in self._sums.items()}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()}, refresh=False)
        rate = self._samples / elapsed
        values = {**means, "lr": lr, "samples_per_s": rate}
        throughput = ""
        if self._flops:
            values["tflops_per_s"] = self._flops / elapsed / 1e12
            throughput = f" | {values['tflops_per_s']:.1f} TFLOP/s"
            if self.peak_flops:
                values["mfu"] = self._flops / elapsed / self.peak_flops
                throughput += f" | MFU {values['mfu']:.1%}"
        logger.info(
            "step %d | %s | lr %.3g | %.1f samples/s%s",
            global_step,
            " ".join(f"{k} {v:.4f}" for k, v in means.items()),
            lr,
            rate,
            throughput,
        )
        self.scalars("train", values, global_step)
        self._sums, self._count, self._samples, self._flops = {}, 0, 0, 0.0
        self._finished_seconds, self._since = 0.0, time.perf_counter()

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", float(value), step)
        if self.history_path is not None:
            record = {"split": prefix, "step": step, **{name: float(value) for name, value in values.items()}}
            with open(self.history_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.end_epoch()
        if self.writer is not None:
            self.writer.close()
