"""Parameter groups, optimisers, learning-rate schedules, step counting and `--freeze`.

Facts kept from the published code (``docs/training.md`` has the whole recipe):
- one no-decay rule: a parameter whose name holds ``bias`` or a norm (``LayerNorm``) gets no weight
  decay; on this model's names it is the published list ``bias``, ``LayerNorm.bias``,
  ``LayerNorm.weight``. The published ``--from_pretrained`` pretraining and the published
  fine-tuning **swap** the two (decay on biases and norms only); ``--recipe published`` keeps that,
  ``--recipe modern`` corrects it.
- ``--from_pretrained`` pretraining trains the BERT-initialised parameters at 0.1 x lr.
- the modern schedules are multipliers of each group's base lr, indexed by the optimiser steps
  already taken, so the first step of a warm-up runs at lr 0, as BertAdam's own schedule does.
- fine-tuning: ×0.1 at epochs 12, 16, 20, 22, 26 (`--lr_scheduler mannul`, spelling kept), or
  reduce-on-plateau of the validation score (`automatic`: mode max, factor 0.2, patience 1,
  cooldown 1, relative threshold 1e-3, as published), on top of the warm-up.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vilbert.bert_adam import ADAM_BETAS, ADAM_EPS, BertAdam
from vilbert.distributed import unwrap_model
from vilbert.errors import BadInputError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("AdamW", "BertAdam")
MANUAL_MILESTONES = (12, 16, 20, 22, 26)
FINE_TUNE_SCHEDULES = ("mannul", "manual", "automatic")
PLATEAU_EPS = 1e-8  # torch ReduceLROnPlateau's eps: a smaller lr change is not made
WEIGHT_DECAY = 0.01
BERT_BASE_LAYERS = 12  # the published 0.1x list holds bert-base's encoder.layer.0-11
_BERT_INITIALISED = re.compile(
    r"^bert\.(?:embeddings\.(?:word_embeddings|position_embeddings|token_type_embeddings)\.weight$"
    r"|embeddings\.LayerNorm\.|encoder\.layer\.(\d+)\.)"
)


def no_decay(name: str) -> bool:
    """The one no-decay rule: biases and norm parameters."""
    return "bias" in name or "norm" in name.lower()


def is_bert_initialised(name: str) -> bool:
    """A parameter that a bert-base checkpoint initialises: the text embeddings and ``encoder.layer.N``
    (N < 12: the interaction and text layers), not ``v_embeddings``, ``v_layer``, poolers or heads."""
    match = _BERT_INITIALISED.match(name)
    return bool(match) and (match.group(1) is None or int(match.group(1)) < BERT_BASE_LAYERS)


def param_groups(
    model: nn.Module,
    weight_decay: float = WEIGHT_DECAY,
    lr: float | None = None,
    bert_lr_factor: float = 1.0,
    swap_decay: bool = False,
    per_parameter: bool = False,
) -> list[dict[str, Any]]:
    """The optimiser's parameter groups, frozen parameters left out; the one builder of them.

    Default: two groups, decay on weights, none on biases and norms. ``bert_lr_factor`` scales the
    lr of BERT-initialised parameters (needs ``lr``); ``swap_decay`` gives the published swapped
    decay; ``per_parameter`` makes one group per parameter, in ``named_parameters`` order, as the
    published scripts build them. named_parameters() yields a tied parameter once.
    """
    groups: dict[Any, dict[str, Any]] = {}
    for index, (name, parameter) in enumerate(unwrap_model(model).named_parameters()):
        if not parameter.requires_grad:
            continue
        decays = no_decay(name) == swap_decay
        scaled = bert_lr_factor != 1.0 and is_bert_initialised(name)
        key = index if per_parameter else (not decays, scaled)
        group = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decays else 0.0})
        if lr is not None:
            group["lr"] = lr * (bert_lr_factor if scaled else 1.0)
        group["params"].append(parameter)
    if not groups:
        raise BadInputError("the model has no trainable parameters (is everything frozen?)")
    return list(groups.values()) if per_parameter else [groups[key] for key in sorted(groups)]


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
            raise BadInputError("--optimizer BertAdam has no fused implementation; use AdamW for fused=True")
        return BertAdam(groups, lr=lr)
    raise BadInputError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _warmup_factor(step: int, warmup_steps: int) -> float:
    return step / warmup_steps if step < warmup_steps else 1.0


def warmup_linear(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Pretraining: lr rises linearly to its base over warmup_steps, then falls linearly to 0."""
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise BadInputError(
            f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}), total > 0"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)


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
            raise BadInputError(
                f"unknown --lr_scheduler {kind!r}; choose one of {', '.join(FINE_TUNE_SCHEDULES)}"
            )
        if warmup_steps < 0:
            raise BadInputError(f"warmup_steps must be >= 0, got {warmup_steps}")
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
        self.decays = [1.0] * len(self.base_lrs)  # per group: torch's plateau rule is per group
        self.best = -math.inf
        self.bad_epochs = 0
        self.cooldown_left = 0
        self._apply()

    def _apply(self) -> None:
        warmup = _warmup_factor(self.steps, self.warmup_steps)
        for group, base_lr, decay in zip(self.optimizer.param_groups, self.base_lrs, self.decays):
            group["lr"] = base_lr * warmup * decay

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def epoch_end(self, epoch: int, score: float | None = None) -> None:
        """epoch: 0-based index of the epoch just finished; score: its validation score (`automatic`)."""
        if self.kind == "mannul":
            self.decays = [step_decay_factor(epoch + 1, self.milestones, self.gamma)] * len(self.base_lrs)
        else:
            if score is None or not math.isfinite(score):
                raise BadInputError(f"--lr_scheduler automatic needs a finite validation score, got {score}")
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
            for index, base_lr in enumerate(self.base_lrs):
                old = base_lr * self.decays[index]
                if old - old * self.plateau_factor > PLATEAU_EPS:  # torch skips changes below its eps
                    self.decays[index] *= self.plateau_factor
            self.cooldown_left = self.plateau_cooldown
            self.bad_epochs = 0
            logger.info("validation score plateaued at %.4f: lr decay now %.4g", self.best, self.decays[0])

    def get_last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base_lrs": list(self.base_lrs),
            "steps": self.steps,
            "decays": list(self.decays),
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "cooldown_left": self.cooldown_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise BadInputError(f"saved lr schedule is {state.get('kind')!r} but this run uses {self.kind!r}")
        if len(state["base_lrs"]) != len(self.base_lrs):
            raise BadInputError(
                f"saved lr schedule has {len(state['base_lrs'])} parameter groups, "
                f"optimizer has {len(self.base_lrs)}"
            )
        self.base_lrs = [float(lr) for lr in state["base_lrs"]]
        self.steps = int(state["steps"])
        saved = state["decays"] if "decays" in state else [state["decay"]] * len(self.base_lrs)
        self.decays = [float(decay) for decay in saved]
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self.cooldown_left = int(state["cooldown_left"])
        self._apply()


def num_optimization_steps(
    batches_per_epoch: int, epochs: float, gradient_accumulation_steps: int = 1
) -> int:
    """Optimiser steps the whole run takes, the same number on every rank.

    The optimiser steps after every `gradient_accumulation_steps` batches and once more at the end
    of an epoch for a leftover partial accumulation, so
        steps = ceil(batches_per_epoch / gradient_accumulation_steps) * epochs
    with batches_per_epoch counted per rank (len(DataLoader)), which is where the world size
    enters. A fractional `epochs` rounds down.
    """
    if gradient_accumulation_steps < 1:
        raise BadInputError(f"--gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    if batches_per_epoch < 0 or epochs < 0:
        raise BadInputError(f"bad sizes: batches_per_epoch={batches_per_epoch}, epochs={epochs}")
    return int(math.ceil(batches_per_epoch / gradient_accumulation_steps) * epochs)


_FROZEN = re.compile(r"(?:^|\.)(?:embeddings\.|encoder\.layer\.(\d+)\.)")


def freeze_layers(model: nn.Module, k: int) -> list[str]:
    """`--freeze K`: stop training the text embeddings and encoder layers 0..K (K = -1: nothing).

    As published: `bert.embeddings.*` and `bert.encoder.layer.{i}.*` for i <= K; the image
    embeddings (`v_embeddings`) and image layers (`v_layer`) stay trainable. Call it before
    param_groups so frozen parameters get no optimiser state. Returns the frozen names.
    """
    if k < -1:
        raise BadInputError(f"--freeze must be >= -1, got {k}")
    if k == -1:
        return []
    frozen = []
    for name, parameter in unwrap_model(model).named_parameters():
        match = _FROZEN.search(name)
        if match and (match.group(1) is None or int(match.group(1)) <= k):
            parameter.requires_grad_(False)
            frozen.append(name)
    if not frozen:
        raise BadInputError(
            f"--freeze {k} matched no parameter: the model has no 'embeddings' or 'encoder.layer.N'"
        )
    logger.info(
        "--freeze %d: froze %d parameter tensors (embeddings and encoder layers <= %d)", k, len(frozen), k
    )
    return frozen
