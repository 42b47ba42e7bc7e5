"""One optimiser step out of several micro-batches, shared by pretraining and fine-tuning.

It owns what every training loop must get right: loss scaling, DDP ``no_sync`` on accumulation
steps, gradient clipping, skipping non-finite steps in agreement across ranks, the LR schedule
and the EMA update.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vilbert.bert_adam import BertAdam
from vilbert.distributed import barrier, gather_to_main
from vilbert.ema import ExponentialMovingAverage
from vilbert.training_state import (
    NonFiniteGuard,
    TrainingState,
    capture_rng_state,
    load_training_state,
    save_training_state,
)


class Optimization:
    """Accumulate ``backward`` calls, then ``step`` once; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
        guard: NonFiniteGuard,
        max_grad_norm: float = 1.0,
        ema: ExponentialMovingAverage | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.guard = guard
        self.max_grad_norm = max_grad_norm
        self.ema = ema
        self._loss_sum: torch.Tensor | float = 0.0

    def micro_step(self, will_step: bool) -> contextlib.AbstractContextManager:
        """Wrap forward + backward of a micro-batch; gradients sync across ranks only before a step."""
        if isinstance(self.model, DistributedDataParallel) and not will_step:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scale: float = 1.0) -> None:
        """``scale`` divides the loss among the micro-batches of one step (1 / accumulation).

        Losses are summed on the device (a NaN/inf anywhere makes the sum non-finite), so one
        verdict per optimiser step covers every micro-batch of it.
        """
        self._loss_sum = self._loss_sum + loss.detach().float()
        self.scaler.scale(loss * scale).backward()

    def step(self) -> torch.Tensor:
        """Apply the accumulated gradients, or skip them on the device when the loss was not finite.

        No host round trip: the verdict (returned, 0-d, 1.0 for a skipped step) goes to the optimiser
        as ``found_inf``, the protocol of torch's fused optimisers, which BertAdam shares; the guard
        tells the host in :meth:`settle`. An optimiser that cannot skip on the device (a non-fused
        AdamW) is skipped from the host, at the cost of one sync. With fp16, GradScaler checks the
        gradients (which a non-finite loss makes non-finite) in its own way.
        """
        found = self.guard.verdict(self._loss_sum)
        self._loss_sum = 0.0
        on_device = _skips_on_device(self.optimizer)
        if not on_device and bool(found):
            self.optimizer.zero_grad(set_to_none=True)
            return found
        if self.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if on_device:
            self.optimizer.found_inf = found
        try:
            self.scaler.step(self.optimizer)
        finally:
            self.optimizer.__dict__.pop("found_inf", None)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, skip=found)
        return found

    def settle(self) -> None:
        """Let the host learn of skipped steps (one sync); the loop calls it when it logs or saves."""
        self.guard.settle()

    def save_state(self, path: str, state: TrainingState, is_main: bool) -> None:
        """Write the resumable state of everything this step owns, with every rank's RNG (a collective).

        The guard's counters travel in ``state``; :meth:`load_state` puts them back."""
        self.settle()
        state.bad_steps, state.skipped_steps = self.guard.bad_steps, self.guard.skipped_steps
        rng = gather_to_main(capture_rng_state())
        if is_main:
            save_training_state(
                path, self.model, self.optimizer, self.scheduler, self.scaler, self.ema, state, rng_states=rng
            )
        barrier()

    def load_state(self, path: str, rank: int) -> TrainingState:
        """Restore what :meth:`save_state` wrote; returns the loop position."""
        state = load_training_state(
            path, self.model, self.optimizer, self.scheduler, self.scaler, self.ema, rank=rank
        )
        self.guard.bad_steps, self.guard.skipped_steps = state.bad_steps, state.skipped_steps
        return state

    def learning_rate(self) -> float:
        """The learning rate of the first group's next update (BertAdam schedules inside itself)."""
        if isinstance(self.optimizer, BertAdam):
            return self.optimizer.scheduled_lr()
        return float(self.optimizer.param_groups[0]["lr"])


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """BertAdam and torch's fused optimisers apply a ``found_inf`` verdict without the host."""
    return isinstance(optimizer, BertAdam) or bool(optimizer.defaults.get("fused"))
