"""Resume round trip (weights, optimiser, schedule, scaler, EMA, RNG), the NaN guard, GracefulStop."""

import logging
import math
import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

from vilbert.ema import ExponentialMovingAverage
from vilbert.optimization import FineTuneSchedule, build_optimizer, param_groups, warmup_linear
from vilbert.training_state import (
    GracefulStop,
    NonFiniteGuard,
    TrainingState,
    capture_rng_state,
    load_training_state,
    save_training_state,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.LayerNorm(self.dense(x))))


def _build(seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny()
    optimizer = build_optimizer("AdamW", param_groups(model), lr=0.01)
    schedule = FineTuneSchedule(optimizer, "automatic", warmup_steps=3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ema = ExponentialMovingAverage(model, 0.9)
    return model, optimizer, schedule, scaler, ema


def _train(model, optimizer, schedule, ema, steps: int) -> None:
    """Each step draws from every RNG a real loop uses: python, numpy (masking), torch (dropout)."""
    model.train()
    for _ in range(steps):
        batch = torch.tensor(np.random.rand(8, 4), dtype=torch.float32) * random.random()
        loss = model(batch + torch.randn(8, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update(model)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    random.seed(1), np.random.seed(1)
    straight = _build()
    _train(straight[0], straight[1], straight[2], straight[4], steps=6)

    random.seed(1), np.random.seed(1)
    model, optimizer, schedule, scaler, ema = _build()
    _train(model, optimizer, schedule, ema, steps=3)
    schedule.epoch_end(0, 0.5)
    state = TrainingState(epoch=1, global_step=3, step_in_epoch=0, best_score=0.5, best_epoch=0)
    path = tmp_path / "training_state.pt"
    save_training_state(path, model, optimizer, schedule, scaler, ema, state, extra={"task_count": [3, 4]})
    del model, optimizer, schedule, ema

    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # a fresh process would differ
    model, optimizer, schedule, scaler, ema = _build(seed=99)
    restored = load_training_state(path, model, optimizer, schedule, scaler, ema)
    assert restored.global_step == 3 and restored.epoch == 1 and restored.best_score == 0.5
    assert restored.extra == {"task_count": [3, 4]}

    straight_schedule = straight[2]
    straight_schedule.epoch_end(0, 0.5)  # same schedule events as the interrupted run
    _train(model, optimizer, schedule, ema, steps=3)
    for (name, expected), actual in zip(straight[0].state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)
    for name, expected in straight[4].shadow.items():
        torch.testing.assert_close(ema.shadow[name], expected, msg=name)
    assert schedule.get_last_lr() == straight_schedule.get_last_lr()


def test_next_random_draws_are_equal_after_resume(tmp_path):
    model, optimizer, schedule, scaler, ema = _build()
    path = tmp_path / "state.pt"
    save_training_state(path, model, optimizer, schedule, scaler, None, TrainingState())
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.random(), np.random.rand(7), torch.rand(5)
    load_training_state(path, model, optimizer, schedule, scaler)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_file_loads_with_weights_only_and_holds_no_numpy(tmp_path):
    model, optimizer, _, _, ema = _build()
    scheduler = warmup_linear(optimizer, 2, 10)
    path = tmp_path / "state.pt"
    save_training_state(path, model, optimizer, scheduler, None, ema, TrainingState(global_step=5))
    payload = torch.load(path, weights_only=True)
    assert payload["state"]["global_step"] == 5
    assert load_training_state(path, model, optimizer, scheduler, None, ema).global_step == 5


def test_rng_of_the_own_rank_is_restored(tmp_path):
    model, optimizer, schedule, scaler, _ = _build()
    torch.manual_seed(10)
    rank0 = capture_rng_state()
    torch.manual_seed(11)
    rank1 = capture_rng_state()
    expected_rank1 = torch.rand(2).tolist()
    path = tmp_path / "state.pt"
    save_training_state(
        path, model, optimizer, schedule, scaler, None, TrainingState(), rng_states=[rank0, rank1]
    )
    load_training_state(path, model, optimizer, schedule, scaler, rank=1)
    assert torch.rand(2).tolist() == expected_rank1


def test_bad_resume_files_are_clear_errors(tmp_path):
    model, optimizer, schedule, scaler, ema = _build()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_training_state(tmp_path / "absent.pt", model, optimizer)
    weights_only = tmp_path / "pytorch_model_0.bin"
    torch.save(model.state_dict(), weights_only)
    with pytest.raises(ValueError, match="not a training-state file"):
        load_training_state(weights_only, model, optimizer)

    path = tmp_path / "state.pt"
    save_training_state(path, model, optimizer, schedule, scaler, None, TrainingState())
    with pytest.raises(ValueError, match="has no EMA state"):
        load_training_state(path, model, optimizer, schedule, scaler, ema)
    other = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"state.pt: saved model does not match this model"):
        load_training_state(path, other, build_optimizer("AdamW", param_groups(other), lr=0.1))


def test_non_finite_guard_decides_on_the_device_and_tells_the_host_when_settled(caplog):
    guard = NonFiniteGuard(max_bad_steps=3)
    verdicts = [guard.verdict(loss) for loss in (torch.tensor(1.0), torch.tensor(math.nan), math.inf, 0.5)]
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in verdicts)
    assert [float(v) for v in verdicts] == [0.0, 1.0, 1.0, 0.0]
    assert guard.skipped_steps == 0  # nothing reaches the host before settle
    with caplog.at_level(logging.WARNING, logger="vilbert.training_state"):
        guard.settle()
    assert "2 step(s) skipped since the last report (0 in a row now, 2 in total)" in caplog.text
    assert guard.bad_steps == 0 and guard.skipped_steps == 2  # a good step ended the run of bad ones

    assert float(guard.verdict(torch.tensor([1.0, math.nan]))) == 1.0  # any element
    guard.settle()
    assert (guard.bad_steps, guard.skipped_steps) == (1, 3)
    guard.verdict(torch.tensor(math.inf))  # the run goes on across a settle: 2 in a row
    guard.settle()
    guard.verdict(torch.tensor(-math.inf))
    guard.verdict(torch.tensor(1.0))  # the run of 3 ended before the host looked: still an abort
    with pytest.raises(RuntimeError, match=r"NaN/inf for 3 optimiser steps in a row \(limit 3\)"):
        guard.settle()
    with pytest.raises(ValueError):
        NonFiniteGuard(0)


def test_graceful_stop_on_sigterm_and_restores_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested and not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_number == signal.SIGTERM
        assert stop.should_stop()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_second_sigint_interrupts_at_once():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
