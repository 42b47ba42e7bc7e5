"""Multi-task fine-tuning (``train_tasks.py``): Flickr30K retrieval and VCR Q→A / QA→R.

The published schedule: one optimisation step loops over the active tasks; the run lasts the
largest task's iterations × ``--num_train_epochs``; a task whose iterations × YAML ``num_epoch``
are fewer starts later, so all tasks end together; each task's loss is scaled by its YAML ``lr``
over the smallest one. Validation runs on the EMA weights when ``--use_ema`` is given.
The optimisation step, precision, run folder, resume and logging are the pretraining ones.
Each epoch's validation metrics and the best epoch so far go to ``metrics.json`` in the run folder.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from vilbert.atomic import atomic_torch_save, atomic_write_json
from vilbert.checkpoint import save_state_dict
from vilbert.cli import run_script
from vilbert.config import BertConfig
from vilbert.datasets.loader import make_loader
from vilbert.distributed import (
    DistContext,
    add_local_rank_args,
    all_reduce_sum,
)
from vilbert.ema import ExponentialMovingAverage
from vilbert.engine import Optimization
from vilbert.modeling import InterBertForVLTasks
from vilbert.optimization import (
    FINE_TUNE_SCHEDULES,
    OPTIMIZERS,
    FineTuneSchedule,
    build_optimizer,
    freeze_layers,
)
from vilbert.precision import Precision
from vilbert.run_folder import RunFolder
from vilbert.run_logging import RunLogger
from vilbert.tasks import (
    TASKS,
    FeatureStores,
    TaskConfig,
    TaskOutput,
    batch_to_device,
    load_task_configs,
    select_tasks,
)
from vilbert.tokenization import BertTokenizer
from vilbert.training_state import (
    GracefulStop,
    NonFiniteGuard,
    TrainingState,
    load_training_state,
    seed_everything,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune InterBERT on the tasks of a task YAML.")
    p.add_argument("--bert_model", default="bert-base-uncased", help="vocab.txt or a folder holding it")
    p.add_argument("--from_pretrained", default="bert-base-uncased", help="pretrained InterBERT weights")
    p.add_argument("--output_dir", default="save")
    p.add_argument("--config_file", default="config/bert_base_6layer_interbert.json")
    p.add_argument("--learning_rate", default=2e-5, type=float)
    p.add_argument("--num_train_epochs", default=20, type=int)
    p.add_argument("--warmup_proportion", default=0.1, type=float)
    p.add_argument("--no_cuda", action="store_true")
    p.add_argument("--do_lower_case", default=True, type=bool)
    add_local_rank_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--loss_scale", type=float, default=0)
    p.add_argument("--num_workers", type=int, default=16, help="in total; divided among the ranks")
    p.add_argument("--save_name", default="", type=str)
    p.add_argument("--in_memory", default=False, type=bool, help="cache region features in memory")
    p.add_argument("--optimizer", default="AdamW", choices=OPTIMIZERS)
    p.add_argument("--tasks", default="", type=str, help="task numbers of the YAML joined by '-', e.g. 1-2")
    p.add_argument("--freeze", default=-1, type=int)
    p.add_argument("--layer_wise_lr", action="store_true", help="not supported (rejected with a message)")
    p.add_argument("--lr_scheduler", default="mannul", choices=FINE_TUNE_SCHEDULES)
    p.add_argument("--use_ema", action="store_true")
    p.add_argument("--ema_decay_ratio", type=float, default=0.9999)
    new = p.add_argument_group("new in this implementation")
    new.add_argument("--task_config", default="interbert_tasks.yml", help="the task YAML")
    new.add_argument("--bf16", action="store_true")
    new.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    new.add_argument("--resume", nargs="?", const="auto", default=None)
    new.add_argument("--save_every_steps", type=int, default=1000)
    new.add_argument("--max_bad_steps", type=int, default=20)
    new.add_argument("--log_every", type=int, default=20)
    new.add_argument("--quiet", action="store_true")
    new.add_argument("--compile", action="store_true")
    new.add_argument("--deterministic", action="store_true")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.tasks:
        parser.error("--tasks is required (e.g. --tasks 3 for Flickr30K, --tasks 1-2 for VCR)")
    if args.layer_wise_lr:
        parser.error(
            "--layer_wise_lr (the published lr 1e-7 for weights listed in config/param.json) is not supported"
        )
    if args.gradient_accumulation_steps < 1:
        parser.error(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
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


def per_process_batch(task: TaskConfig, accumulation: int, world_size: int) -> int:
    """YAML batch / accumulation / world size, which must divide exactly."""
    if task.batch_size % (accumulation * world_size):
        raise ValueError(
            f"{task.key} batch_size {task.batch_size} is not divisible by gradient_accumulation_steps "
            f"{accumulation} x world size {world_size}"
        )
    return task.batch_size // (accumulation * world_size)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loader_workers(requested: int, world_size: int, num_tasks: int) -> int:
    """Workers of each task's training loader in this process.

    ``--num_workers`` is shared by all ranks and tasks, and capped by the CPUs here: the published
    ``--num_workers 16`` was sized for an 8-GPU node, and on a small machine it would fork more
    workers than cores (each holding a copy of the dataset) and only slow the run down.
    """
    cpus = available_cpus()
    if requested > cpus:
        logger.info("--num_workers %d capped at the %d CPUs available", requested, cpus)
    return min(requested, cpus) // max(world_size, 1) // num_tasks


def build_tasks(args, ctx: DistContext, tokenizer: BertTokenizer) -> list[TaskRun]:
    configs = select_tasks(load_task_configs(args.task_config), args.tasks, args.task_config)
    stores = FeatureStores(in_memory=args.in_memory)
    workers = loader_workers(args.num_workers, ctx.world_size, len(configs))
    smallest_lr = min(task.lr for task in configs)
    runs = []
    for task in configs:
        spec = TASKS[task.name]
        batch = per_process_batch(task, args.gradient_accumulation_steps, ctx.world_size)
        train = spec.build(task, task.train_split, tokenizer, stores, args.seed)
        val = spec.build(task, task.val_split, tokenizer, stores, args.seed)
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
    iterations = max(len(run.train_loader) for run in runs) * args.num_train_epochs
    for run in runs:
        run.start_iteration = max(0, iterations - run.config.num_epoch * len(run.train_loader))
    return runs


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
    """The entry point: bad input exits with status 2 and a one-line message (``vilbert.cli``)."""
    status = run_script(train, args)
    if status:
        raise SystemExit(status)


def train(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any]:
    """Run (or resume) the fine-tuning; returns the content of ``metrics.json``."""
    seed_everything(args.seed + ctx.rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    config = BertConfig.from_json_file(args.config_file)
    tokenizer = BertTokenizer(args.bert_model, do_lower_case=args.do_lower_case)
    runs = build_tasks(args, ctx, tokenizer)
    folder = RunFolder.create(args.output_dir, run_name(args, runs), ctx.is_main)
    resume = folder.resume_file(args.resume)

    model = InterBertForVLTasks.from_pretrained(args.from_pretrained, config, num_labels=1)
    freeze_layers(model, args.freeze)
    model.to(ctx.device)
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if p.requires_grad and not no_decay(n)],
            "weight_decay": 0.01,
        },
        {
            "params": [p for n, p in model.named_parameters() if p.requires_grad and no_decay(n)],
            "weight_decay": 0.0,
        },
    ]
    ema = ExponentialMovingAverage(model, args.ema_decay_ratio) if args.use_ema else None
    if args.compile:
        model = torch.compile(model)
    task_model: nn.Module = TaskModel(model)
    if ctx.world_size > 1:
        # Each task uses only some heads, so some parameters get no gradient in a step.
        task_model = DistributedDataParallel(
            task_model,
            device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    optimizer = build_optimizer(args.optimizer, [g for g in groups if g["params"]], args.learning_rate)
    accumulation = args.gradient_accumulation_steps
    iterations_per_epoch = max(len(r.train_loader) for r in runs)
    total_steps = iterations_per_epoch * args.num_train_epochs // accumulation
    schedule = FineTuneSchedule(optimizer, args.lr_scheduler, int(args.warmup_proportion * total_steps))
    precision = Precision.from_flags(args.fp16, args.bf16, ctx.device, args.loss_scale)
    scaler = precision.make_scaler()
    step = Optimization(
        task_model, optimizer, schedule, scaler, NonFiniteGuard(args.max_bad_steps), args.max_grad_norm, ema
    )

    state = TrainingState()
    history: list[dict[str, float]] = []  # one entry per validated epoch, for metrics.json
    if resume is not None:
        state = load_training_state(resume, model, optimizer, schedule, scaler, ema, rank=ctx.rank)
        for task_run in runs:
            task_run.restart_at(int(state.extra["consumed"][task_run.name]))
        history = list(state.extra.get("validation", []))
    step.guard.bad_steps, step.guard.skipped_steps = state.bad_steps, state.skipped_steps
    folder.write_run_info(args, config)
    log = RunLogger(folder.path, ctx.is_main, args.log_every, args.quiet)
    if ctx.is_main:
        for task_run in runs:
            logger.info(
                "%s: %d batches/epoch of %d per rank, starts at iteration %d, loss x %.3g",
                task_run.name,
                len(task_run.train_loader),
                task_run.train_loader.batch_sampler.batch_size,
                task_run.start_iteration,
                task_run.loss_scale,
            )
        logger.info("fine-tuning %d optimiser steps, run folder %s", total_steps, folder.path)

    def save_state() -> None:
        state.extra = {"consumed": {r.name: r.consumed for r in runs}, "validation": history}
        step.save_state(folder.state_path, state, ctx.is_main)

    def summary() -> dict[str, Any]:
        return {
            "validation": history,
            "best_epoch": state.best_epoch,
            "best_score": state.best_score,
            "weights": "ema" if ema is not None else "raw",
        }

    model.train()
    with GracefulStop() as stop:
        while state.epoch < args.num_train_epochs:
            log.start_epoch(
                state.epoch, iterations_per_epoch // accumulation, state.step_in_epoch // accumulation
            )
            while state.step_in_epoch < iterations_per_epoch:
                iteration = state.epoch * iterations_per_epoch + state.step_in_epoch
                active = [r for r in runs if iteration >= r.start_iteration]
                will_step = (state.step_in_epoch + 1) % accumulation == 0 or (
                    state.step_in_epoch + 1 == iterations_per_epoch
                )
                parts, samples = {}, 0
                for position, task_run in enumerate(active):
                    batch = batch_to_device(task_run.next_batch(), ctx.device)
                    with step.micro_step(will_step and position == len(active) - 1):
                        with precision.autocast():
                            out = task_model(task_run.name, batch)
                        step.backward(out.loss * task_run.loss_scale, 1.0 / accumulation)
                    parts[task_run.name] = out.loss.detach()
                    samples += out.count * ctx.world_size
                state.step_in_epoch += 1
                if not will_step:
                    continue
                step.step()
                state.global_step += 1
                log.step(state.global_step, parts, step.learning_rate(), samples)
                if stop.should_stop():
                    save_state()
                    logger.warning(
                        "stop requested: state saved to %s; rerun the same command to resume",
                        folder.state_path,
                    )
                    log.close()
                    return summary()
                if args.save_every_steps and state.global_step % args.save_every_steps == 0:
                    save_state()
            log.end_epoch()
            if ema is not None:
                with ema.apply_to(model):
                    metrics = validate(model, runs, ctx, precision)
            else:
                metrics = validate(model, runs, ctx, precision)
            schedule.epoch_end(state.epoch, metrics["score"])
            if state.best_score is None or metrics["score"] > state.best_score:
                state.best_score, state.best_epoch = metrics["score"], state.epoch
            history.append({"epoch": state.epoch, **metrics})
            if ctx.is_main:
                logger.info(
                    "epoch %d validation%s: %s (best: epoch %d, %.2f)",
                    state.epoch,
                    " (EMA weights)" if ema else "",
                    " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                    state.best_epoch,
                    state.best_score,
                )
                log.scalars("val", metrics, state.epoch)
                save_state_dict(model, folder.weights_path(state.epoch))
                if ema is not None:
                    atomic_torch_save(ema.ema_state_dict(), folder.weights_path(state.epoch, ema=True))
                # After the weights, so every epoch it lists has its checkpoint on disk.
                atomic_write_json(os.path.join(folder.path, METRICS_FILE), summary())
            state.epoch += 1
            state.step_in_epoch = 0
            save_state()
    log.close()
    if ctx.is_main:
        logger.info(
            "fine-tuning finished: best epoch %d (score %.2f), %s",
            state.best_epoch,
            state.best_score,
            folder.path,
        )
    return summary()


def no_decay(name: str) -> bool:
    return "bias" in name or "LayerNorm" in name
