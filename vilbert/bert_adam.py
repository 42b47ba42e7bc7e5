"""BertAdam, the optimiser of the published recipe, vectorised over parameters.

The published optimiser (pytorch-pretrained-bert's BertAdam) differs from Adam(W) in four ways
that change the trajectory, so the paper's numbers need all four:
- no bias correction of the moments;
- each parameter's gradient is clipped **on its own** to L2 norm ``max_grad_norm`` (1.0), before
  the moments are updated; there is no global clip;
- decoupled weight decay added to the update: ``update = m / (sqrt(v) + eps) + weight_decay * p``;
- the learning-rate schedule lives inside the optimiser and runs on each parameter's own update
  counter, read **before** the update (so the first update has progress 0 and factor 0):
  ``p <- p - lr * schedule(step / t_total, warmup) * update``. A parameter whose gradient is None is
  skipped and its counter does not move.

A step can be skipped on the device, with no host sync, the way torch's fused optimisers take
GradScaler's verdict: set ``optimizer.found_inf`` (a 0-d tensor, 1.0 to skip) before ``step()``.
A skipped step leaves every weight and moment exactly as it was (the gradients, which may be NaN,
are zeroed and the moments' decay is 1); the update counters still move, because they live on the
host, so a skipped step still uses up one step of the schedule.

One implementation, with ``torch._foreach_*`` kernels (per-parameter norms through
``torch._foreach_norm``): a few fused launches per step instead of a dozen per tensor.
See ``docs/training.md`` for the whole recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-6
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coefficient = max_norm / (norm + 1e-6)


def warmup_linear(progress: float, warmup: float) -> float:
    """Linear rise over the first ``warmup`` of training, then linear fall to 0 at progress 1."""
    if progress < warmup:
        return progress / warmup
    return max((progress - 1.0) / (warmup - 1.0), 0.0)


def warmup_constant(progress: float, warmup: float) -> float:
    """Linear rise over the first ``warmup`` of training, then 1."""
    if progress < warmup:
        return progress / warmup
    return 1.0


def constant(progress: float, warmup: float) -> float:
    return 1.0


SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "warmup_linear": warmup_linear,
    "warmup_constant": warmup_constant,
    "none": constant,
}


def schedule_factor(schedule: str, step: int, t_total: float, warmup: float) -> float:
    """The multiplier of the published schedules at a parameter's update counter (1 when t_total < 0)."""
    if t_total < 0:
        return 1.0
    return SCHEDULES[schedule](float(step) / t_total, max(warmup, 0.0))


class BertAdam(Optimizer):
    """The published BERT optimiser; see the module docstring. Defaults are the published ones.

    ``t_total = -1`` (the default) disables the schedule; ``max_grad_norm <= 0`` disables the clip.
    Every hyper-parameter can be set per parameter group (the published recipes use one group per
    parameter, each with its own lr and weight decay).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        warmup: float = -1.0,
        t_total: float = -1,
        schedule: str = "warmup_linear",
        betas: tuple[float, float] = ADAM_BETAS,
        eps: float = ADAM_EPS,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"BertAdam: learning rate must be >= 0, got {lr}")
        if schedule not in SCHEDULES:
            raise ValueError(f"BertAdam: unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not (warmup == -1 or 0.0 <= warmup < 1.0):
            raise ValueError(f"BertAdam: warmup must be in [0, 1) or -1, got {warmup}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"BertAdam: betas must be in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"BertAdam: eps must be >= 0, got {eps}")
        defaults = {
            "lr": lr,
            "warmup": warmup,
            "t_total": t_total,
            "schedule": schedule,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
        }
        super().__init__(params, defaults)
        self._scratch: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}

    def scheduled_lr(self) -> float:
        """The learning rate the next update of the first trained parameter will use (for logging)."""
        for group in self.param_groups:
            for parameter in group["params"]:
                state = self.state.get(parameter)
                if state:
                    return group["lr"] * self._factor(group, state["step"])
        return 0.0

    def _scratch_of(self, parameter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two work buffers shaped like ``parameter``, made once (not part of the saved state)."""
        pair = self._scratch.get(parameter)
        if pair is None:
            pair = self._scratch[parameter] = (torch.empty_like(parameter), torch.empty_like(parameter))
        return pair

    def start_at(self, step: int) -> None:
        """Every parameter's update counter at ``step``, moments zero: a schedule resumed without the
        optimiser state it was saved with (``--continue_training`` from a weights file)."""
        for group in self.param_groups:
            for parameter in group["params"]:
                self.state[parameter] = {
                    "step": step,
                    "exp_avg": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                }

    @staticmethod
    def _factor(group: dict[str, Any], step: int) -> float:
        return schedule_factor(group["schedule"], step, group["t_total"], group["warmup"])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets: dict[tuple, dict[str, list]] = {}
        for group in self.param_groups:
            key = (group["betas"], group["eps"], group["max_grad_norm"])
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                if parameter.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[parameter]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                bucket = buckets.setdefault(key, {n: [] for n in ("p", "g", "m", "v", "lr", "wd", "state")})
                bucket["p"].append(parameter)
                bucket["g"].append(parameter.grad)
                bucket["m"].append(state["exp_avg"])
                bucket["v"].append(state["exp_avg_sq"])
                bucket["lr"].append(group["lr"] * self._factor(group, state["step"]))
                bucket["wd"].append(group["weight_decay"])
                bucket["state"].append(state)
        skip = getattr(self, "found_inf", None)
        for (betas, eps, max_grad_norm), bucket in buckets.items():
            scratch = [self._scratch_of(p) for p in bucket["p"]]
            _update(bucket, betas, eps, max_grad_norm, scratch, skip)
            for state in bucket["state"]:
                state["step"] += 1
        return loss


def _update(
    bucket: dict[str, list],
    betas: tuple[float, float],
    eps: float,
    max_grad_norm: float,
    scratch: list,
    skip: torch.Tensor | None = None,
) -> None:
    """One BertAdam update of a list of parameters sharing betas, eps and the clip norm.

    Operation for operation the published arithmetic (so the result is the same to the last bit on
    the same hardware), done in place: ``scratch`` holds two buffers per parameter, kept between steps,
    because allocating (and faulting in) fresh parameter-sized tensors every step cost more than the
    arithmetic itself. ``skip`` (0-d, 1.0 to skip) gates the step on the device; at 0.0 every result is
    bitwise the ungated one (the gates multiply by exactly 1 and add exactly 0).
    """
    params, grads, exp_avg, exp_avg_sq = bucket["p"], bucket["g"], bucket["m"], bucket["v"]
    beta1, beta2 = betas
    decay1: torch.Tensor | float = beta1
    decay2: torch.Tensor | float = beta2
    if skip is not None:
        skipped = skip.bool()
        for grad in grads:
            grad.masked_fill_(skipped, 0.0)  # NaN-safe: a product with 0 would keep the NaN
        decay1, decay2 = torch.where(skipped, 1.0, beta1), torch.where(skipped, 1.0, beta2)
    if max_grad_norm > 0:
        _clip_each(grads, max_grad_norm)
    torch._foreach_mul_(exp_avg, decay1)
    torch._foreach_add_(exp_avg, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sq, decay2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
    denominator, updates = [pair[0] for pair in scratch], [pair[1] for pair in scratch]
    torch._foreach_copy_(denominator, exp_avg_sq)
    torch._foreach_sqrt_(denominator)
    torch._foreach_add_(denominator, eps)
    torch._foreach_copy_(updates, exp_avg)
    torch._foreach_div_(updates, denominator)  # m / (sqrt(v) + eps)
    decayed = [index for index, decay in enumerate(bucket["wd"]) if decay > 0.0]
    if decayed:
        terms = [denominator[i] for i in decayed]  # free again: reused for weight_decay * p
        torch._foreach_copy_(terms, [params[i] for i in decayed])
        torch._foreach_mul_(terms, [bucket["wd"][i] for i in decayed])
        torch._foreach_add_([updates[i] for i in decayed], terms)
    torch._foreach_mul_(updates, bucket["lr"])
    if skip is not None:
        torch._foreach_mul_(updates, 1.0 - skip)
    torch._foreach_sub_(params, updates)


def _clip_each(grads: list[torch.Tensor], max_grad_norm: float) -> None:
    """Each gradient scaled to norm ``max_grad_norm`` when above it (torch's clip_grad_norm_ rule).

    On the CPU only the gradients that need it are touched (reading the norms costs nothing there);
    on a GPU every gradient is scaled by its clamped coefficient on the device, with no host sync."""
    norms = torch.stack(torch._foreach_norm(grads))
    coefficients = (max_grad_norm / (norms + CLIP_EPS)).clamp_(max=1.0)
    if norms.device.type != "cpu":
        torch._foreach_mul_(grads, list(coefficients.unbind()))
        return
    clipped = [(grad, float(c)) for grad, c in zip(grads, coefficients.tolist()) if c < 1.0]
    if clipped:
        torch._foreach_mul_([grad for grad, _ in clipped], [c for _, c in clipped])
