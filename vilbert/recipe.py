"""Training recipes: ``published`` (the default, what produced the paper's numbers) and ``modern``.

A recipe fixes the optimiser, its parameter groups, the schedules, the clipping and the
multi-task stepping; the trainers ask it for an :class:`OptimizerPlan` and do what it says.

``published`` (``docs/training.md`` states it step by step):
- BertAdam: no bias correction, each parameter's gradient clipped on its own to norm 1.0, its own
  ``warmup_linear`` (pretraining) / ``warmup_constant`` (fine-tuning) schedule on each parameter's
  update counter; no global clip;
- groups: pretraining from scratch, decay 0.01 on weights; pretraining with ``--from_pretrained``,
  one group per parameter, 0.1x lr on the BERT-initialised ones and the decay swapped onto biases
  and norms; fine-tuning, one group per parameter with the swapped decay;
- fine-tuning makes one optimiser step and one EMA update per active task per iteration.

``modern``: fused AdamW, one global clip at ``--max_grad_norm``, decay on weights only, the
schedules outside the optimiser, one joint step over the summed task losses. Faster and corrected,
but not the published algorithm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vilbert.bert_adam import BertAdam
from vilbert.errors import BadInputError
from vilbert.optimization import FineTuneSchedule, build_optimizer, param_groups, warmup_linear

logger = logging.getLogger(__name__)

RECIPES = ("published", "modern")
PUBLISHED_CLIP = 1.0  # BertAdam's per-parameter max_grad_norm
PUBLISHED_BERT_LR_FACTOR = 0.1
RECIPE_OPTIMIZER = {"published": "BertAdam", "modern": "AdamW"}


class RecipeError(BadInputError):
    """A flag that contradicts the chosen recipe."""


@dataclass
class OptimizerPlan:
    """What a recipe builds for a run.

    scheduler: a warm-up LambdaLR (modern pretraining), a FineTuneSchedule (fine-tuning, both
    recipes) or None (published pretraining: BertAdam schedules itself); stepped after every
    optimiser step. max_grad_norm: the global clip (0 under ``published``, which clips per parameter).
    per_task_steps: fine-tuning steps the optimiser after each task instead of once per iteration.
    """

    recipe: str
    optimizer: torch.optim.Optimizer
    scheduler: Any
    max_grad_norm: float
    per_task_steps: bool

    def fast_forward(self, steps: int) -> None:
        """``--continue_training``: start the schedule ``steps`` optimiser steps in (fresh moments)."""
        if isinstance(self.optimizer, BertAdam):
            self.optimizer.start_at(steps)
            return
        for _ in range(steps):
            self.scheduler.step()


def check_recipe(recipe: str, optimizer: str | None) -> str:
    """``--optimizer`` may only restate the recipe's optimiser (it is kept for the published spelling)."""
    if recipe not in RECIPES:
        raise RecipeError(f"--recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    expected = RECIPE_OPTIMIZER[recipe]
    if optimizer not in (None, expected):
        raise RecipeError(
            f"--optimizer {optimizer} contradicts --recipe {recipe} (which uses {expected}); "
            f"use --recipe {'modern' if optimizer == 'AdamW' else 'published'} or drop --optimizer"
        )
    return expected


def _adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    return build_optimizer("AdamW", groups, lr)


def pretraining_plan(
    recipe: str,
    model: nn.Module,
    lr: float,
    warmup_proportion: float,
    t_total: int,
    from_pretrained: bool,
    bert_lr_factor: float = PUBLISHED_BERT_LR_FACTOR,
    max_grad_norm: float = 1.0,
) -> OptimizerPlan:
    """The optimiser of ``train_concap.py``; ``t_total``: optimiser steps of the whole run."""
    factor = bert_lr_factor if from_pretrained else 1.0
    if recipe == "published":
        groups = param_groups(
            model, lr=lr, bert_lr_factor=factor, swap_decay=from_pretrained, per_parameter=from_pretrained
        )
        optimizer = BertAdam(
            groups, lr, warmup_proportion, t_total, "warmup_linear", max_grad_norm=PUBLISHED_CLIP
        )
        return OptimizerPlan(recipe, optimizer, None, 0.0, per_task_steps=False)
    optimizer = _adamw(param_groups(model, lr=lr, bert_lr_factor=factor), lr)
    scheduler = warmup_linear(optimizer, int(warmup_proportion * t_total), t_total)
    return OptimizerPlan(recipe, optimizer, scheduler, max_grad_norm, per_task_steps=False)


def finetuning_plan(
    recipe: str,
    model: nn.Module,
    lr: float,
    warmup_proportion: float,
    t_total: int,
    lr_scheduler: str,
    max_grad_norm: float = 1.0,
) -> OptimizerPlan:
    """The optimiser of ``train_tasks.py``; ``t_total``: the largest task's iterations x epochs."""
    if recipe == "published":
        groups = param_groups(model, lr=lr, swap_decay=True, per_parameter=True)
        optimizer = BertAdam(
            groups, lr, warmup_proportion, t_total, "warmup_constant", max_grad_norm=PUBLISHED_CLIP
        )
        schedule = FineTuneSchedule(optimizer, lr_scheduler, warmup_steps=0)
        return OptimizerPlan(recipe, optimizer, schedule, 0.0, per_task_steps=True)
    optimizer = _adamw(param_groups(model), lr)
    schedule = FineTuneSchedule(optimizer, lr_scheduler, int(warmup_proportion * t_total))
    return OptimizerPlan(recipe, optimizer, schedule, max_grad_norm, per_task_steps=False)
