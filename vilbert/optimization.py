"""Parameter groups, optimisers, learning-rate schedules, step counting and `--freeze`.

Facts kept from the published code:
- weight decay 0.01 on weights and 0 on biases and LayerNorm parameters. (The published
  fine-tuning script swapped the two groups by mistake; here they are the right way round.)
- `BertAdam`: Adam without bias correction, eps 1e-6, decoupled weight decay added to the update.
  Unlike pytorch-pretrained-bert's, it has no built-in schedule and no built-in gradient
  clipping: the LR scheduler below owns the schedule and the trainer clips.
- schedules are multipliers of each group's base lr, indexed by the number of optimiser steps
  already taken, so the first step of a warm-up runs at lr 0 (as published and as in HF).
- fine-tuning: warm-up constant, then ×0.1 at epochs 12, 16, 20, 22, 26 (`--lr_scheduler
  mannul`, spelling kept), or reduce-on-plateau of the validation score (`automatic`: mode max,
  factor 0.2, patience 1, cooldown 1, relative threshold 1e-3, as published).
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vilbert.distributed import unwrap_model

logger = logging.getLogger(__name__)

OPTIMIZERS = ("AdamW", "BertAdam")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-6
MANUAL_MILESTONES = (12, 16, 20, 22, 26)
FINE_TUNE_SCHEDULES = ("mannul", "manual", "automatic")


def _no_decay(name: str) -> bool:
    lowered = name.lower()
    return "bias" in lowered or "norm" in lowered  # covers LayerNorm, layer_norm, norm


def param_groups(model: nn.Module, weight_decay: float = 0.01) -> list[dict[str, Any]]:
    """Two groups: weights decay, biases and norm parameters do not. Frozen parameters are left out.

    named_parameters() yields a tied parameter once, so it is never optimised twice.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, parameter in unwrap_model(model).named_parameters():
        if parameter.requires_grad:
            (no_decay if _no_decay(name) else decay).append(parameter)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class BertAdam(Optimizer):
    """The published BERT optimiser: Adam without bias correction and with decoupled weight decay.

    p <- p - lr * (m / (sqrt(v) + eps) + weight_decay * p), with m, v the raw moment averages.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float] = ADAM_BETAS,
        eps: float = ADAM_EPS,
        weight_decay: float = 0.01,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"BertAdam: learning rate must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"BertAdam: betas must be in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"BertAdam: eps must be >= 0, got {eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad
                if grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[parameter]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
                if group["weight_decay"] > 0.0:
                    update.add_(parameter, alpha=group["weight_decay"])
                parameter.add_(update, alpha=-group["lr"])
                state["step"] += 1
        return loss


def _fused_fits(groups: Sequence[dict[str, Any]]) -> bool:
    """Torch's fused AdamW runs when all parameters sit on CUDA, or (torch >= 2.4) all on the CPU."""
    parameters = [parameter for group in groups for parameter in group["params"]]
    if not parameters:
        return False
    if all(parameter.is_cuda for parameter in parameters):
        return True
    cpu_fused = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4)
    return cpu_fused and all(parameter.device.type == "cpu" for parameter in parameters)


def build_optimizer(
    name: str, groups: Sequence[dict[str, Any]], lr: float, fused: bool | None = None
) -> Optimizer:
    """`AdamW` (torch's fused kernel when the parameters' device has one, unless fused=False) or `BertAdam`.

    Both use betas (0.9, 0.999) and eps 1e-6, the published BERT values; weight decay comes from
    the groups (see param_groups).
    """
    groups = list(groups)
    if name == "AdamW":
        supports_fused = "fused" in inspect.signature(torch.optim.AdamW).parameters
        if fused is None:
            fused = supports_fused and _fused_fits(groups)
        options = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, **options)
    if name == "BertAdam":
        if fused:
            raise ValueError("--optimizer BertAdam has no fused implementation; use AdamW for fused=True")
        return BertAdam(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _warmup_factor(step: int, warmup_steps: int) -> float:
    return step / warmup_steps if step < warmup_steps else 1.0


def warmup_linear(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Pretraining: lr rises linearly to its base over warmup_steps, then falls linearly to 0."""
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}), total > 0")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)


def warmup_constant(optimizer: Optimizer, warmup_steps: int) -> LambdaLR:
    """lr rises linearly to its base over warmup_steps, then stays there."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return LambdaLR(optimizer, lambda step: _warmup_factor(step, warmup_steps))


def step_decay_factor(
    epochs_done: int, milestones: Sequence[int] = MANUAL_MILESTONES, gamma: float = 0.1
) -> float:
    """The published `mannul` decay: gamma per milestone reached after `epochs_done` whole epochs."""
    return gamma ** sum(1 for milestone in milestones if milestone <= epochs_done)


class FineTuneSchedule:
    """Warm-up (per optimiser step) times an epoch-level decay (`mannul` or `automatic`).

    lr of group g = base_lr[g] * warmup_factor(steps taken) * decay. Call step() after every
    optimiser step and epoch_end(epoch, score) after each epoch's validation.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        kind: str,
        warmup_steps: int,
        milestones: Sequence[int] = MANUAL_MILESTONES,
        gamma: float = 0.1,
        plateau_factor: float = 0.2,
        plateau_patience: int = 1,
        plateau_cooldown: int = 1,
        plateau_threshold: float = 1e-3,
    ) -> None:
        if kind not in FINE_TUNE_SCHEDULES:
            raise ValueError(
                f"unknown --lr_scheduler {kind!r}; choose one of {', '.join(FINE_TUNE_SCHEDULES)}"
            )
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.optimizer = optimizer
        self.kind = "mannul" if kind == "manual" else kind
        self.warmup_steps = warmup_steps
        self.milestones = tuple(milestones)
        self.gamma = gamma
        self.plateau_factor = plateau_factor
        self.plateau_patience = plateau_patience
        self.plateau_cooldown = plateau_cooldown
        self.plateau_threshold = plateau_threshold
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.steps = 0
        self.decay = 1.0
        self.best = -math.inf
        self.bad_epochs = 0
        self.cooldown_left = 0
        self._apply()

    def _apply(self) -> None:
        factor = _warmup_factor(self.steps, self.warmup_steps) * self.decay
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def epoch_end(self, epoch: int, score: float | None = None) -> None:
        """epoch: 0-based index of the epoch just finished; score: its validation score (`automatic`)."""
        if self.kind == "mannul":
            self.decay = step_decay_factor(epoch + 1, self.milestones, self.gamma)
        else:
            if score is None or not math.isfinite(score):
                raise ValueError(f"--lr_scheduler automatic needs a finite validation score, got {score}")
            self._plateau(score)
        self._apply()

    def _plateau(self, score: float) -> None:
        """torch's ReduceLROnPlateau rules (mode max, relative threshold) applied to the decay factor."""
        if score > self.best * (1.0 + self.plateau_threshold):
            self.best = score
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.plateau_patience:
            self.decay *= self.plateau_factor
            self.cooldown_left = self.plateau_cooldown
            self.bad_epochs = 0
            logger.info("validation score plateaued at %.4f: lr decay now %.4g", self.best, self.decay)

    def get_last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base_lrs": list(self.base_lrs),
            "steps": self.steps,
            "decay": self.decay,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "cooldown_left": self.cooldown_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"saved lr schedule is {state.get('kind')!r} but this run uses {self.kind!r}")
        if len(state["base_lrs"]) != len(self.base_lrs):
            raise ValueError(
                f"saved lr schedule has {len(state['base_lrs'])} parameter groups, "
                f"optimizer has {len(self.base_lrs)}"
            )
        self.base_lrs = [float(lr) for lr in state["base_lrs"]]
        self.steps = int(state["steps"])
        self.decay = float(state["decay"])
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self.cooldown_left = int(state["cooldown_left"])
        self._apply()


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Batches one rank sees per epoch under DistributedSampler (which pads to equal shards).

    shard = ceil(num_samples / world_size); batches = shard // batch_size with drop_last,
    else ceil(shard / batch_size). This equals len(DataLoader) on every rank.
    """
    if num_samples < 0 or batch_size < 1 or world_size < 1:
        raise ValueError(
            f"bad sizes: num_samples={num_samples}, batch_size={batch_size}, world_size={world_size}"
        )
    shard = math.ceil(num_samples / world_size)
    return shard // batch_size if drop_last else math.ceil(shard / batch_size)


def num_optimization_steps(
    batches_per_epoch: int, epochs: float, gradient_accumulation_steps: int = 1
) -> int:
    """Optimiser steps the whole run takes, the same number on every rank.

    The optimiser steps after every `gradient_accumulation_steps` batches and once more at the end
    of an epoch for a leftover partial accumulation, so
        steps = ceil(batches_per_epoch / gradient_accumulation_steps) * epochs
    with batches_per_epoch counted per rank (len(DataLoader), or batches_per_epoch() above), which
    is where the world size enters. A fractional `epochs` (the published flag is a float) rounds down.
    """
    if gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    if batches_per_epoch < 0 or epochs < 0:
        raise ValueError(f"bad sizes: batches_per_epoch={batches_per_epoch}, epochs={epochs}")
    return int(math.ceil(batches_per_epoch / gradient_accumulation_steps) * epochs)


_FROZEN = re.compile(r"(?:^|\.)(?:embeddings\.|encoder\.layer\.(\d+)\.)")


def freeze_layers(model: nn.Module, k: int) -> list[str]:
    """`--freeze K`: stop training the text embeddings and encoder layers 0..K (K = -1: nothing).

    As published: `bert.embeddings.*` and `bert.encoder.layer.{i}.*` for i <= K; the image
    embeddings (`v_embeddings`) and image layers (`v_layer`) stay trainable. Call it before
    param_groups so frozen parameters get no optimiser state. Returns the frozen names.
    """
    if k < -1:
        raise ValueError(f"--freeze must be >= -1, got {k}")
    if k == -1:
        return []
    frozen = []
    for name, parameter in unwrap_model(model).named_parameters():
        match = _FROZEN.search(name)
        if match and (match.group(1) is None or int(match.group(1)) <= k):
            parameter.requires_grad_(False)
            frozen.append(name)
    if not frozen:
        raise ValueError(
            f"--freeze {k} matched no parameter: the model has no 'embeddings' or 'encoder.layer.N'"
        )
    logger.info(
        "--freeze %d: froze %d parameter tensors (embeddings and encoder layers <= %d)", k, len(frozen), k
    )
    return frozen
