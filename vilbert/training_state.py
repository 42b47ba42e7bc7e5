"""Resumable training state, the NaN/inf loss guard, and a graceful stop on SIGTERM/SIGINT.

The resume file holds the model, optimiser, scheduler, GradScaler, EMA, the loop position
(`TrainingState`) and every RNG state, so a killed run resumes where its last checkpoint was.
Everything in it is a tensor or a plain Python value, so it loads with `torch.load(weights_only=True)`:
a resume file never needs to execute pickled code.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import signal
from dataclasses import asdict, dataclass, field, fields
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn

from vilbert.atomic import atomic_torch_save
from vilbert.distributed import any_across_ranks, max_across_ranks_, unwrap_model
from vilbert.errors import BadInputError

logger = logging.getLogger(__name__)

FORMAT = "vilbert-training-state"
FORMAT_VERSION = 2  # 2: step_in_epoch counts loop iterations (micro-batches) in both trainers


@dataclass
class TrainingState:
    """Where the loop is. epoch is the epoch in progress (0-based); step_in_epoch counts the epoch's
    loop iterations already done (pretraining: micro-batches; fine-tuning: iterations, one
    micro-batch per active task), so a resumed run skips exactly those; global_step counts the
    iterations that ended in an optimiser step. `extra` carries anything else a script needs back
    (tensors and plain values only)."""

    epoch: int = 0
    global_step: int = 0
    step_in_epoch: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    best_score: float | None = None
    best_epoch: int = -1
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (per rank: pass seed + rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if present) CUDA generator states, as tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "resume file has CUDA RNG states for %d devices, this machine has %d: CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )


def save_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    scaler: torch.amp.GradScaler | None,
    ema: Any | None,
    state: TrainingState,
    extra: dict[str, Any] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> None:
    """Write everything needed to resume, atomically.

    rng_states: one capture_rng_state() per rank, in rank order (gather_to_main them under DDP);
    by default this process's own. `extra`, when given, replaces state.extra.
    """
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "state": {key: value for key, value in asdict(state).items() if key != "extra"},
        "rng": rng_states if rng_states is not None else [capture_rng_state()],
        "extra": extra if extra is not None else state.extra,
    }
    atomic_torch_save(payload, path)


def _load_component(path: str, what: str, target: Any, saved: Any) -> None:
    """load_state_dict with the file named in the error, instead of a bare traceback."""
    if target is None:
        if saved:
            logger.info("%s: %s state present but not used by this run", path, what)
        return
    if saved is None:
        raise BadInputError(
            f"{path}: has no {what} state, but this run uses one (was it saved with other flags?)"
        )
    try:
        target.load_state_dict(saved)
    except (KeyError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInputError(f"{path}: {what} state does not fit this run: {first_line}") from error


def load_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    ema: Any | None = None,
    rank: int = 0,
) -> TrainingState:
    """Restore a save_training_state file into the given objects; returns the loop state (with `extra`).

    Weights go onto the devices the objects already live on. The RNG state of `rank` is restored
    (none if the file was written by fewer ranks, with a warning).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as error:
        # Truncated (a copy cut short), damaged, or holding objects that are not plain data.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInputError(f"{path}: not a readable training state ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BadInputError(f"{path} is not a training-state file (expected format {FORMAT!r})")
    if payload.get("version") != FORMAT_VERSION:
        raise BadInputError(
            f"{path}: training-state version {payload.get('version')}, expected {FORMAT_VERSION}"
        )

    result = unwrap_model(model).load_state_dict(payload["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        example = (result.missing_keys or result.unexpected_keys)[0]
        raise BadInputError(
            f"{path}: saved model does not match this model ({len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys, e.g. {example!r}); same --config_file?"
        )
    _load_component(path, "optimizer", optimizer, payload["optimizer"])
    _load_component(path, "lr scheduler", scheduler, payload["scheduler"])
    if scaler is not None and payload["scaler"] == {}:
        logger.info("%s: GradScaler was disabled when saved; starting a fresh one", path)
    else:
        _load_component(path, "GradScaler", scaler, payload["scaler"])
    _load_component(path, "EMA", ema, payload["ema"])

    rng_states = payload["rng"]
    if rank < len(rng_states):
        restore_rng_state(rng_states[rank])
    else:
        logger.warning(
            "%s holds RNG states for %d rank(s); rank %d keeps its own", path, len(rng_states), rank
        )

    known = {entry.name for entry in fields(TrainingState)} - {"extra"}
    state = TrainingState(**{key: value for key, value in payload["state"].items() if key in known})
    state.extra = payload["extra"]
    return state


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for ``max_bad_steps`` optimiser steps in a row."""


class NonFiniteGuard:
    """Skip optimiser steps whose loss is NaN/inf; abort after ``max_bad_steps`` of them in a row.

    The verdict is made on the device, as GradScaler's found-inf is: :meth:`verdict` returns a 0-d
    tensor (1.0: skip this step) that the optimiser applies without the host looking at it, and
    keeps the counts on the device too. The host learns of skipped steps in :meth:`settle`, which
    the loop calls on logging steps and before anything is validated or saved; it warns, and it
    raises once a run of bad steps reached the limit. Under DDP the verdict is the maximum over
    ranks, so every rank skips together and the ranks keep agreeing on the step count.
    """

    def __init__(self, max_bad_steps: int) -> None:
        if max_bad_steps < 1:
            raise BadInputError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0  # the current run of bad steps, as of the last settle
        self.skipped_steps = 0
        self._counts: torch.Tensor | None = None  # [skipped, current run, longest run] since settle

    def verdict(self, loss: torch.Tensor | float) -> torch.Tensor:
        """1.0 when this step must be skipped (any element of ``loss`` non-finite on any rank), else 0.0."""
        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        found = max_across_ranks_((~torch.isfinite(loss)).any().float())
        if self._counts is None:
            self._counts = torch.full((3,), float(self.bad_steps), device=found.device)  # no copy
            self._counts[0] = 0.0
        skipped, run, longest = self._counts.unbind()
        run = (run + found) * found
        self._counts = torch.stack([skipped + found, run, torch.maximum(longest, run)])
        return found

    def settle(self) -> None:
        """Bring the device's counts to the host (one sync): warn about skipped steps, abort at the limit."""
        if self._counts is None:
            return
        skipped, run, longest = (int(value) for value in self._counts.tolist())
        self._counts = None
        self.skipped_steps += skipped
        self.bad_steps = run
        if longest >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"loss was NaN/inf for {longest} optimiser steps in a row "
                f"(limit {self.max_bad_steps}); stopping. Lower the learning rate, check the data, "
                "or resume from the last checkpoint"
            )
        if skipped:
            logger.warning(
                "non-finite loss: %d step(s) skipped since the last report (%d in a row now, %d in total)",
                skipped,
                run,
                self.skipped_steps,
            )


class GracefulStop:
    """Turn SIGTERM/SIGINT into a flag the training loop polls, so it can save and exit cleanly.

    A second SIGINT raises KeyboardInterrupt at once, for a user who really wants out. Use as a
    context manager (the previous handlers come back on exit); handlers can only be installed
    from the main thread.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.requested = False
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        # No logging here: a handler that takes the logging lock can deadlock the thread it interrupts.
        if self.requested and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_number = signal_number

    def install(self) -> GracefulStop:
        for signal_number in self.signals:
            self._previous[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def restore(self) -> None:
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)
        self._previous.clear()

    def __enter__(self) -> GracefulStop:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def should_stop(self) -> bool:
        """The stop request, agreed by all ranks (a collective: call it at the same point on every rank)."""
        return any_across_ranks(self.requested)
