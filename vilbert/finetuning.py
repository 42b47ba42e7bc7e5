"""Multi-task fine-tuning (``train_tasks.py``): Flickr30K retrieval and VCR Q→A / QA→R.

The published schedule: each iteration loops over the active tasks; under ``--recipe published``
every active task makes its own forward, backward, optimiser step and EMA update (``modern``: one
joint step over the summed losses). The run lasts the largest task's iterations ×
``--num_train_epochs``; a task whose iterations × YAML ``num_epoch`` are fewer starts later, so all
tasks end together (``published`` takes ``num_epoch`` of the last task of ``--tasks`` for every task,
as the published script does; ``modern`` each task's own). Each task's loss is scaled by its YAML
``lr`` over the smallest one. Validation runs on the EMA weights with ``--use_ema``; each epoch's
validation metrics and the best epoch so far go to ``metrics.json`` in the run folder.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vilbert.atomic import atomic_torch_save, atomic_write_json
from vilbert.cli import run_script
from vilbert.config import BertConfig
from vilbert.data_checks import require_task_data
from vilbert.datasets.loader import loader_workers, make_loader
from vilbert.distributed import DistContext, all_reduce_sum
from vilbert.engine import Optimization
from vilbert.modeling import InterBertForVLTasks
from vilbert.optimization import FINE_TUNE_SCHEDULES
from vilbert.precision import Precision
from vilbert.recipe import OptimizerPlan, check_recipe, finetuning_plan
from vilbert.run_folder import RunFolder
from vilbert.tasks import (
    TASKS,
    FeatureStores,
    TaskConfig,
    TaskOutput,
    batch_to_device,
    load_task_configs,
    per_process_batch,
    select_tasks,
)
from vilbert.tokenization import BertTokenizer
from vilbert.trainer import StepReport, Trainer, TrainerHooks, check_text_fits, start_run
from vilbert.training_args import (
    TrainingDefaults,
    add_new_flags,
    add_published_flags,
    positive_int,
    str_to_bool,
)
from vilbert.training_state import TrainingState

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
DEFAULTS = TrainingDefaults(
    learning_rate=2e-5, seed=0, num_workers=16, workers_help="DataLoader workers in total, shared by ranks"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune InterBERT on the tasks of a task YAML.")
    p.add_argument("--from_pretrained", default="bert-base-uncased", help="pretrained InterBERT weights")
    add_published_flags(p, DEFAULTS)
    p.add_argument("--num_train_epochs", default=20, type=positive_int, help="epochs of the largest task")
    p.add_argument(
        "--in_memory", type=str_to_bool, nargs="?", const=True, default=False, help="cache region features"
    )
    p.add_argument("--tasks", default="", type=str, help="task numbers of the YAML joined by '-', e.g. 1-2")
    p.add_argument("--layer_wise_lr", action="store_true", help="not supported (rejected with a message)")
    p.add_argument(
        "--lr_scheduler", default="mannul", choices=FINE_TUNE_SCHEDULES, help="epoch decay of the lr"
    )
    p.add_argument("--use_ema", action="store_true", help="keep an EMA of the weights; validate on it")
    p.add_argument("--ema_decay_ratio", type=float, default=0.9999, help="EMA decay per optimiser step")
    new = add_new_flags(p)
    new.add_argument("--task_config", default="interbert_tasks.yml", help="the task YAML")
    new.add_argument(
        "--skip_bad_records",
        action="store_true",
        help="skip damaged region records (non-finite values, boxes outside the image) with a counted "
        "warning, instead of stopping with an error naming the file and key",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.tasks:
        parser.error("--tasks is required (e.g. --tasks 3 for Flickr30K, --tasks 1-2 for VCR)")
    numbers = [number for number in args.tasks.split("-") if number]
    if len(set(numbers)) != len(numbers):
        parser.error(f"--tasks {args.tasks} names a task twice")
    if args.layer_wise_lr:
        parser.error(
            "--layer_wise_lr (the published lr 1e-7 for weights listed in config/param.json) is not supported"
        )
    if not 0.0 <= args.ema_decay_ratio <= 1.0:
        parser.error(f"--ema_decay_ratio must be in [0, 1], got {args.ema_decay_ratio}")
    return args


@dataclass
class TaskRun:
    """One task's data and its place in the multi-task schedule."""

    config: TaskConfig
    train_loader: DataLoader
    val_loader: DataLoader
    loss_scale: float
    start_iteration: int
    consumed: int = 0
    _iterator: Iterator | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def next_batch(self) -> dict:
        """The task's next batch; its data restarts (next epoch of its own) when exhausted."""
        per_epoch = len(self.train_loader)
        if self._iterator is None or self.consumed % per_epoch == 0:
            self._start_epoch(*divmod(self.consumed, per_epoch))
            self._iterator = iter(self.train_loader)
        self.consumed += 1
        return next(self._iterator)

    def restart_at(self, consumed: int) -> None:
        """Resume: continue the task's data where it stopped."""
        self.consumed = consumed
        epoch, done = divmod(consumed, len(self.train_loader))
        self._start_epoch(epoch, done)
        self._iterator = iter(self.train_loader) if done else None

    def _start_epoch(self, epoch: int, skip: int) -> None:
        """Order (and, for datasets that draw per epoch, samples) of the task's ``epoch``, ``skip``
        batches in. VCR draws nothing per epoch (its names are fixed per question), so it has no
        ``set_epoch``; retrieval redraws its negatives every epoch."""
        if hasattr(self.train_loader.dataset, "set_epoch"):
            self.train_loader.dataset.set_epoch(epoch)
        self.train_loader.batch_sampler.set_epoch(epoch, skip=skip)


class TaskModel(nn.Module):
    """The model with a task's forward, loss included, as its ``forward``: what DDP wraps.

    With ``find_unused_parameters`` DDP follows the autograd graph back from the tensors ``forward``
    returns. The bare model returns every head, also those the task's loss ignores (retrieval leaves
    ``vil_logit`` unused, VCR the ITM head), and DDP would then wait for their gradients forever.
    The model sits in ``module``, so ``unwrap_model`` finds it under this wrapper as under DDP.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, task: str, batch: dict[str, Any]) -> TaskOutput:
        return TASKS[task].forward(self.module, batch)


def build_tasks(args, ctx: DistContext, tokenizer: BertTokenizer) -> list[TaskRun]:
    configs = select_tasks(load_task_configs(args.task_config), args.tasks, args.task_config)
    stores = FeatureStores(args.in_memory, "skip" if args.skip_bad_records else "error")
    workers = loader_workers(args.num_workers, ctx.world_size, len(configs))
    smallest_lr = min(task.lr for task in configs)
    runs = []
    for task in configs:
        spec = TASKS[task.name]
        batch = per_process_batch(task, args.gradient_accumulation_steps, ctx.world_size)
        train = spec.build(task, task.train_split, tokenizer, stores, args.seed, args.recipe)
        val = spec.build(task, task.val_split, tokenizer, stores, args.seed, args.recipe)
        runs.append(
            TaskRun(
                config=task,
                train_loader=make_loader(train, batch, spec.collate, ctx, True, True, workers, args.seed),
                val_loader=make_loader(
                    val, batch, spec.collate, ctx, True, False, min(workers, 2), args.seed
                ),
                loss_scale=task.lr / smallest_lr,
                start_iteration=0,
            )
        )
    set_start_iterations(runs, args.num_train_epochs, args.recipe)
    return runs


def set_start_iterations(runs: list[TaskRun], epochs: int, recipe: str) -> None:
    """A task starts at (run iterations - its iterations x num_epoch), so that all tasks end together.

    ``published`` uses the ``num_epoch`` of the last task of ``--tasks`` for every task (the published
    script reads it from a loop variable left over from an earlier loop); ``modern`` each task's own.
    They differ only when the YAML gives the chosen tasks different ``num_epoch``.
    """
    iterations = max(len(run.train_loader) for run in runs) * epochs
    for run in runs:
        num_epoch = runs[-1].config.num_epoch if recipe == "published" else run.config.num_epoch
        run.start_iteration = max(0, iterations - num_epoch * len(run.train_loader))


def active_tasks(runs: list[TaskRun], iteration: int) -> list[TaskRun]:
    """The tasks that run at ``iteration``, in ``--tasks`` order."""
    return [run for run in runs if iteration >= run.start_iteration]


def task_iteration(
    step: Optimization,
    task_model: nn.Module,
    active: list[TaskRun],
    precision: Precision,
    device: torch.device,
    accumulation: int,
    will_step: bool,
    per_task_steps: bool,
) -> tuple[dict[str, torch.Tensor], int]:
    """One iteration over the active tasks: each one's forward and backward (its loss x its loss
    scale / accumulation); the optimiser steps (with its EMA update) after **each** task when
    ``per_task_steps`` (published), else once after all of them, and only when ``will_step``.
    Returns the losses by task and the samples seen on this rank."""
    parts, samples = {}, 0
    for position, task_run in enumerate(active):
        batch = batch_to_device(task_run.next_batch(), device)
        stepping = will_step and (per_task_steps or position == len(active) - 1)
        with step.micro_step(stepping):
            with precision.autocast():
                out = task_model(task_run.name, batch)
            step.backward(out.loss * task_run.loss_scale, 1.0 / accumulation)
        if stepping:
            step.step()
        parts[task_run.name] = out.loss.detach()
        samples += out.count
    return parts, samples


@torch.no_grad()
def validate(model, runs: list[TaskRun], ctx: DistContext, precision: Precision) -> dict[str, float]:
    """Per task: mean loss and score (% of questions / captions ranked right), exact over all ranks."""
    model.eval()
    metrics = {}
    for run in runs:
        sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        for batch in run.val_loader:
            with precision.autocast():
                out = TASKS[run.name].forward(model, batch_to_device(batch, ctx.device))
            sums["loss"] += float(out.loss) * out.count
            sums["correct"] += float(out.correct)
            sums["count"] += out.count
        sums = all_reduce_sum(sums)
        count = max(sums["count"], 1.0)
        metrics[f"{run.name}/loss"] = sums["loss"] / count
        metrics[f"{run.name}/score"] = 100.0 * sums["correct"] / count
    model.train()
    scores = [metrics[f"{run.name}/score"] for run in runs]
    metrics["score"] = sum(scores) / len(scores)
    return metrics


def run_name(args, runs: list[TaskRun]) -> str:
    """Published naming: task names, config stem, and the save name."""
    stem = os.path.splitext(os.path.basename(args.config_file))[0]
    return "-".join(r.name for r in runs) + "_" + stem + (f"-{args.save_name}" if args.save_name else "")


def run(args: argparse.Namespace) -> None:
    """The entry point; exit statuses as ``vilbert.errors`` states them."""
    status = run_script(train, args)
    if status:
        raise SystemExit(status)


def make_plan(args: argparse.Namespace, t_total: int) -> Callable[[nn.Module], OptimizerPlan]:
    def plan(model: nn.Module) -> OptimizerPlan:
        return finetuning_plan(
            args.recipe, model, args.learning_rate, args.warmup_proportion, t_total, args.lr_scheduler,
            args.max_grad_norm,
        )  # fmt: skip

    return plan


def _iterations(trainer: Trainer, runs: list[TaskRun], iterations_per_epoch: int):
    """The epoch's iterations from ``state.step_in_epoch`` on (the loop's step body)."""
    args, ctx = trainer.args, trainer.ctx
    accumulation = args.gradient_accumulation_steps

    def iterations(state: TrainingState) -> Iterator[StepReport]:
        for position in range(state.step_in_epoch, iterations_per_epoch):
            iteration = state.epoch * iterations_per_epoch + position
            will_step = (position + 1) % accumulation == 0 or position + 1 == iterations_per_epoch
            parts, samples = task_iteration(
                trainer.step, trainer.forward_model, active_tasks(runs, iteration), trainer.precision,
                ctx.device, accumulation, will_step, trainer.plan.per_task_steps,
            )  # fmt: skip
            yield StepReport(parts, samples * ctx.world_size, stepped=will_step)

    return iterations


@dataclass
class History:
    """Each validated epoch's metrics and the best so far: the content of ``metrics.json``."""

    validation: list[dict[str, float]]
    weights: str

    def summary(self, state: TrainingState) -> dict[str, Any]:
        return {
            "validation": self.validation,
            "best_epoch": state.best_epoch,
            "best_score": state.best_score,
            "weights": self.weights,
        }


def _end_epoch(trainer: Trainer, history: History) -> Callable[[TrainingState, dict[str, float]], None]:
    def end_epoch(state: TrainingState, metrics: dict[str, float]) -> None:
        trainer.plan.scheduler.epoch_end(state.epoch, metrics["score"])
        if state.best_score is None or metrics["score"] > state.best_score:
            state.best_score, state.best_epoch = metrics["score"], state.epoch
        history.validation.append({"epoch": state.epoch, **metrics})
        if not trainer.ctx.is_main:
            return
        logger.info(
            "epoch %d validation%s: %s (best: epoch %d, %.2f)", state.epoch,
            " (EMA weights)" if trainer.ema else "", " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
            state.best_epoch, state.best_score,
        )  # fmt: skip
        if trainer.ema is not None:
            atomic_torch_save(
                trainer.ema.ema_state_dict(), trainer.folder.weights_path(state.epoch, ema=True)
            )
        # After the weights, so every epoch it lists has its checkpoint on disk.
        atomic_write_json(os.path.join(trainer.folder.path, METRICS_FILE), history.summary(state))

    return end_epoch


def train(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any] | int:
    """Run (or resume) the fine-tuning; returns the content of ``metrics.json`` when it finished, or
    the exit status when a signal stopped it."""
    start_run(args, ctx)
    check_recipe(args.recipe, args.optimizer)
    config = BertConfig.from_json_file(args.config_file)
    tokenizer = BertTokenizer(args.bert_model, do_lower_case=args.do_lower_case)
    runs = build_tasks(args, ctx, tokenizer)
    lengths = {f"{args.task_config}: {r.config.key} max_seq_length": r.config.max_seq_length for r in runs}
    check_text_fits(config, args.config_file, tokenizer.vocab_size, args.bert_model, lengths)
    require_task_data(
        args.task_config,
        args.tasks,
        config,
        args.config_file,
        ctx.world_size,
        args.gradient_accumulation_steps,
    )
    folder = RunFolder.create(args.output_dir, run_name(args, runs), ctx.is_main)
    resume = folder.resume_file(args.resume)
    iterations_per_epoch = max(len(r.train_loader) for r in runs)
    t_total = iterations_per_epoch * args.num_train_epochs // args.gradient_accumulation_steps
    model = InterBertForVLTasks.from_pretrained(args.from_pretrained, config, num_labels=1)
    # Each task uses only some heads, so DDP must expect parameters without a gradient in a step.
    trainer = Trainer(
        args, ctx, config, folder, model, make_plan(args, t_total), task_wrapper=TaskModel,
        ema_decay=args.ema_decay_ratio if args.use_ema else None, find_unused_parameters=True,
    )  # fmt: skip
    record = trainer.record(
        tasks={
            r.config.key: {"name": r.name, "batch_size": r.config.batch_size, "lr": r.config.lr} for r in runs
        },
        lr_scheduler=args.lr_scheduler,
        ema_decay_ratio=args.ema_decay_ratio if args.use_ema else None,
    )
    state = trainer.resume(resume, record)
    history = History(list(state.extra.get("validation", [])), "ema" if args.use_ema else "raw")
    if resume is not None:
        for task_run in runs:
            task_run.restart_at(int(state.extra["consumed"][task_run.name]))
    if ctx.is_main:
        for task_run in runs:
            logger.info(
                "%s: %d batches/epoch of %d per rank, starts at iteration %d, loss x %.3g",
                task_run.name, len(task_run.train_loader), task_run.train_loader.batch_sampler.batch_size,
                task_run.start_iteration, task_run.loss_scale,
            )  # fmt: skip
        logger.info("fine-tuning: t_total %d optimiser steps, run folder %s", t_total, folder.path)
    hooks = TrainerHooks(
        iterations=_iterations(trainer, runs, iterations_per_epoch),
        iterations_per_epoch=iterations_per_epoch,
        validate=lambda: validate(trainer.model, runs, ctx, trainer.precision),
        end_epoch=_end_epoch(trainer, history),
        extra_state=lambda: {
            "consumed": {r.name: r.consumed for r in runs},
            "validation": history.validation,
        },
    )
    status = trainer.run(args.num_train_epochs, hooks)
    if status:
        return status
    if ctx.is_main:
        logger.info(
            "fine-tuning finished: best epoch %d (score %.2f), %s",
            state.best_epoch,
            state.best_score,
            folder.path,
        )
    return history.summary(state)
