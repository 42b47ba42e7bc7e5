"""The vectorised BertAdam equals the published per-parameter loop, step for step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vilbert.bert_adam import BertAdam, schedule_factor

SHAPES = [(7,), (3, 5), (2, 3, 4), (1,), (16, 16), (5, 1)]
STEPS = 50


def _reference_step(params, groups, states, t_total, warmup, schedule, max_grad_norm=1.0):
    """The published BertAdam update, one parameter at a time, as pytorch-pretrained-bert writes it."""
    beta1, beta2, eps = 0.9, 0.999, 1e-6
    for parameter, group in zip(params, groups):
        if parameter.grad is None:
            continue
        grad = parameter.grad
        state = states.setdefault(
            id(parameter), {"step": 0, "m": torch.zeros_like(parameter), "v": torch.zeros_like(parameter)}
        )
        norm = float(grad.norm())
        coefficient = max_grad_norm / (norm + 1e-6)
        if coefficient < 1:
            grad.mul_(coefficient)
        state["m"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        update = state["m"] / (state["v"].sqrt() + eps)
        if group["weight_decay"] > 0:
            update += group["weight_decay"] * parameter.data
        progress = state["step"] / t_total
        if schedule == "warmup_linear":
            factor = progress / warmup if progress < warmup else max((progress - 1.0) / (warmup - 1.0), 0.0)
        else:
            factor = progress / warmup if progress < warmup else 1.0
        parameter.data.add_(-(group["lr"] * factor) * update)
        state["step"] += 1


def _run(schedule: str) -> float:
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(shape, generator=generator) for shape in SHAPES]
    fast = [nn.Parameter(tensor.clone()) for tensor in initial]
    slow = [nn.Parameter(tensor.clone()) for tensor in initial]
    settings = [
        {"lr": 0.01 * (1 + i % 3), "weight_decay": 0.01 if i % 2 else 0.0} for i in range(len(SHAPES))
    ]
    optimizer = BertAdam(
        [{"params": [p], **s} for p, s in zip(fast, settings)],
        lr=0.01,
        warmup=0.2,
        t_total=40,
        schedule=schedule,
    )
    states: dict[int, dict] = {}
    for step in range(STEPS):
        for index, (a, b) in enumerate(zip(fast, slow)):
            if (step + index) % 7 == 3:  # some parameters get no gradient in some steps
                a.grad = b.grad = None
                continue
            scale = 10.0 if index % 2 else 0.05  # half of them are clipped
            grad = torch.randn(a.shape, generator=generator) * scale
            a.grad, b.grad = grad.clone(), grad.clone()
        optimizer.step()
        _reference_step(slow, settings, states, 40, 0.2, schedule)
    assert all(optimizer.state[p]["step"] == states[id(q)]["step"] for p, q in zip(fast, slow))
    return max(float((a - b).detach().abs().max()) for a, b in zip(fast, slow))


def test_foreach_bert_adam_equals_the_per_parameter_loop():
    for schedule in ("warmup_linear", "warmup_constant"):
        assert _run(schedule) <= 1e-6, schedule


def test_schedules_start_at_zero_and_follow_the_published_formulas():
    assert schedule_factor("warmup_linear", 0, 10, 0.1) == 0.0
    assert schedule_factor("warmup_linear", 5, 10, 0.1) == pytest.approx((0.5 - 1.0) / (0.1 - 1.0))
    assert schedule_factor("warmup_linear", 20, 10, 0.1) == 0.0
    assert schedule_factor("warmup_constant", 30, 10, 0.1) == 1.0
    assert schedule_factor("warmup_linear", 3, -1, 0.1) == 1.0  # t_total < 0: no schedule


def test_first_update_has_factor_zero_and_a_late_parameter_starts_its_own_count():
    early, late = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = BertAdam(
        [early, late], lr=0.1, warmup=0.5, t_total=4, schedule="warmup_constant", weight_decay=0
    )
    early.grad = torch.ones(2)
    optimizer.step()
    assert torch.equal(early.detach(), torch.ones(2)), "the first update runs at factor 0"
    early.grad, late.grad = torch.ones(2), torch.ones(2)
    optimizer.step()
    assert optimizer.state[early]["step"] == 2 and optimizer.state[late]["step"] == 1
    assert torch.equal(late.detach(), torch.ones(2)) and not torch.equal(early.detach(), torch.ones(2))


def _pair_of_optimisers(weight_decay: float) -> tuple[list, list, BertAdam, BertAdam]:
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    first = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    second = [nn.Parameter(p.detach().clone()) for p in first]
    options = dict(lr=0.05, warmup=0.1, t_total=20, weight_decay=weight_decay)
    return first, second, BertAdam(first, **options), BertAdam(second, **options)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_a_device_verdict_of_zero_changes_no_bit_and_of_one_changes_nothing(weight_decay: float) -> None:
    """``found_inf`` 0.0: bitwise the ungated step; 1.0 (with NaN gradients): weights and moments as
    they were, and the update counters still move (they live on the host)."""
    plain, gated, plain_opt, gated_opt = _pair_of_optimisers(weight_decay)
    for step in range(6):
        torch.manual_seed(step)
        grads = [torch.randn_like(p) * 3 for p in plain]
        for parameter, grad in zip(plain, grads):
            parameter.grad = grad.clone()
        for parameter, grad in zip(gated, grads):
            parameter.grad = grad.clone()
        plain_opt.step()
        gated_opt.found_inf = torch.tensor(0.0)
        gated_opt.step()
        for a, b in zip(plain, gated):
            assert torch.equal(a, b)
            assert torch.equal(plain_opt.state[a]["exp_avg_sq"], gated_opt.state[b]["exp_avg_sq"])

    before = [p.detach().clone() for p in gated]
    moments = [(gated_opt.state[p]["exp_avg"].clone(), gated_opt.state[p]["exp_avg_sq"].clone())
               for p in gated]  # fmt: skip
    for parameter in gated:
        parameter.grad = torch.full_like(parameter, float("nan"))
    gated_opt.found_inf = torch.tensor(1.0)
    gated_opt.step()
    for parameter, weight, (m, v) in zip(gated, before, moments):
        assert torch.equal(parameter, weight)
        assert torch.equal(gated_opt.state[parameter]["exp_avg"], m)
        assert torch.equal(gated_opt.state[parameter]["exp_avg_sq"], v)
        assert gated_opt.state[parameter]["step"] == 7
