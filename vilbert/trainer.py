"""The training skeleton both trainers share: set-up, and the epoch loop around their step bodies.

Set-up: freezing, device, optimiser from the recipe, ``--compile``, DDP, precision, the run
folder, resume, the logger. The loop: the stop signal, the periodic resumable state, end-of-epoch
validation (on the EMA weights when there are some), checkpoints. A trainer supplies only what
differs (see :class:`TrainerHooks`): its batches and step body, its validation and what it
records at the end of an epoch.

Units: ``TrainingState.step_in_epoch`` counts the epoch's loop iterations done, as the published
loops' ``step`` does (pretraining: micro-batches; fine-tuning: iterations over the active tasks,
one micro-batch per task); the state is saved only where an iteration ended an optimiser step.
``global_step`` counts those iterations.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vilbert.checkpoint import save_state_dict
from vilbert.config import BertConfig
from vilbert.distributed import DistContext
from vilbert.ema import ExponentialMovingAverage
from vilbert.engine import Optimization
from vilbert.errors import BadInputError, exit_status_for_signal
from vilbert.flops import peak_flops
from vilbert.optimization import freeze_layers
from vilbert.precision import Precision
from vilbert.recipe import OptimizerPlan
from vilbert.run_folder import RunFolder
from vilbert.run_logging import RunLogger
from vilbert.training_args import compile_mode
from vilbert.training_state import GracefulStop, NonFiniteGuard, TrainingState, seed_everything

logger = logging.getLogger(__name__)


def check_text_fits(
    config: BertConfig, config_file: str, vocab_size: int, vocab: str, lengths: dict[str, int]
) -> None:
    """The model's embeddings must hold the tokenizer's vocabulary and every sequence length the run
    will feed (``lengths``: where each comes from → its value), checked before the model is built."""
    if vocab_size > config.vocab_size:
        raise BadInputError(
            f"{vocab}: vocabulary of {vocab_size} tokens exceeds vocab_size {config.vocab_size} "
            f"of {config_file}"
        )
    for source, length in lengths.items():
        if length > config.max_position_embeddings:
            raise BadInputError(
                f"{source} {length} exceeds max_position_embeddings {config.max_position_embeddings} "
                f"of {config_file}"
            )


def start_run(args: argparse.Namespace, ctx: DistContext) -> None:
    """Seed every generator (per rank) and pick the kernels, before any data or weights are made."""
    seed_everything(args.seed + ctx.rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)


@dataclass
class StepReport:
    """What one loop iteration tells the logger: losses (may stay on the device) and samples."""

    losses: dict[str, torch.Tensor]
    samples: int
    stepped: bool = True
    flops: float | None = None  # model FLOPs of the optimiser step, all ranks (for MFU)


@dataclass
class TrainerHooks:
    """What a trainer supplies to the loop.

    iterations: the epoch's iterations from ``state.step_in_epoch`` on, each yielding a StepReport
    after its work (the loop advances the counters); validate: metrics of the epoch (the EMA
    weights are already swapped in); end_epoch: after validation and the weights are saved (e.g.
    the lr decay, metrics.json); extra_state: what else the resumable state must carry.
    """

    iterations: Callable[[TrainingState], Iterator[StepReport]]
    iterations_per_epoch: int
    validate: Callable[[], dict[str, float]]
    end_epoch: Callable[[TrainingState, dict[str, float]], None] = lambda state, metrics: None
    extra_state: Callable[[], dict[str, Any]] = dict


class Trainer:
    """Everything both trainers build the same way; :meth:`run` is the epoch loop."""

    def __init__(
        self,
        args: argparse.Namespace,
        ctx: DistContext,
        config: BertConfig,
        folder: RunFolder,
        model: nn.Module,
        make_plan: Callable[[nn.Module], OptimizerPlan],
        task_wrapper: Callable[[nn.Module], nn.Module] | None = None,
        ema_decay: float | None = None,
        find_unused_parameters: bool = False,
    ) -> None:
        self.args, self.ctx, self.config, self.folder = args, ctx, config, folder
        freeze_layers(model, args.freeze)
        self.model = model.to(ctx.device)
        self.plan = make_plan(self.model)
        self.ema = ExponentialMovingAverage(self.model, ema_decay) if ema_decay is not None else None
        if args.compile and getattr(self.model, "gather_heads", False):
            # Gathering the masked positions has data-dependent shapes (a graph break per loss);
            # the heads on every position give the same losses with static shapes.
            self.model.gather_heads = False
            logger.info("--compile: MSM/MRM heads run on every position (static shapes, one graph)")
        forward = torch.compile(self.model, mode=compile_mode(args.compile)) if args.compile else self.model
        forward = task_wrapper(forward) if task_wrapper is not None else forward
        if ctx.world_size > 1:
            forward = DistributedDataParallel(
                forward,
                device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )
        self.forward_model = forward
        self.precision = Precision.from_flags(args.fp16, args.bf16, ctx.device, args.loss_scale)
        self.step = Optimization(
            forward,
            self.plan.optimizer,
            self.plan.scheduler,
            self.precision.make_scaler(),
            NonFiniteGuard(args.max_bad_steps),
            self.plan.max_grad_norm,
            self.ema,
        )
        self.state = TrainingState()
        self.log: RunLogger | None = None

    def record(self, **extra: Any) -> dict[str, Any]:
        """The values that shape the resumable state (``run_info.json``); a resume must match them."""
        args = self.args
        return {
            "recipe": args.recipe,
            "world_size": self.ctx.world_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "learning_rate": args.learning_rate,
            "warmup_proportion": args.warmup_proportion,
            "num_train_epochs": args.num_train_epochs,
            "precision": self.precision.mode,
            "freeze": args.freeze,
            **extra,
            "config": self.config.to_dict(),
        }

    def resume(
        self, path: str | None, record: dict[str, Any], fresh: TrainingState | None = None
    ) -> TrainingState:
        """Load ``path`` when given (its run information must match ``record``, unless
        ``--resume_anyway``), else start from ``fresh``; then write the run information."""
        if path is not None:
            self.folder.check_resume(record, self.args.resume_anyway, resume_from=path)
            self.state = self.step.load_state(path, rank=self.ctx.rank)
        elif fresh is not None:
            self.state = fresh
        self.folder.write_run_info(self.args, self.config, record)
        peak = peak_flops(self.precision.mode, override_tflops=self.args.peak_tflops)
        self.log = RunLogger(
            self.folder.path, self.ctx.is_main, self.args.log_every, self.args.quiet, peak_flops=peak
        )
        if self.ctx.is_main:
            logger.info(
                "recipe %s: %s%s", self.plan.recipe, type(self.plan.optimizer).__name__,
                ", one optimiser step per task" if self.plan.per_task_steps else "",
            )  # fmt: skip
        return self.state

    def save_state(self, hooks: TrainerHooks) -> None:
        self.state.extra = hooks.extra_state()
        self.step.save_state(self.folder.state_path, self.state, self.ctx.is_main)

    def save_weights(self, epoch: int) -> None:
        if self.ctx.is_main:
            save_state_dict(self.model, self.folder.weights_path(epoch))

    def _validate(self, hooks: TrainerHooks) -> dict[str, float]:
        if self.ema is None:
            return hooks.validate()
        with self.ema.apply_to(self.model):
            return hooks.validate()

    def run(self, epochs: int, hooks: TrainerHooks) -> int:
        """The epoch loop; returns the exit status: 0 when finished, 128 + N when stopped by signal N."""
        assert self.log is not None, "call resume() first"
        state, args = self.state, self.args
        self.forward_model.train()
        with GracefulStop() as stop:
            while state.epoch < epochs:
                self.log.start_epoch(state.epoch, hooks.iterations_per_epoch, state.step_in_epoch)
                for report in hooks.iterations(state):
                    state.step_in_epoch += 1
                    if not report.stepped:
                        continue
                    state.global_step += 1
                    if state.global_step % self.log.log_every == 0:
                        self.step.settle()  # the host's one look at the guard, before the log line
                    self.log.step(
                        state.global_step, report.losses, self.step.learning_rate(), report.samples,
                        flops=report.flops,
                    )  # fmt: skip
                    if stop.should_stop():
                        return self._stopped(stop, hooks)
                    if args.save_every_steps and state.global_step % args.save_every_steps == 0:
                        self.save_state(hooks)
                self.step.settle()
                self.log.end_epoch()
                metrics = self._validate(hooks)
                if self.ctx.is_main:
                    self.log.scalars("val", metrics, state.epoch)
                self.save_weights(state.epoch)
                hooks.end_epoch(state, metrics)
                state.epoch += 1
                state.step_in_epoch = 0
                self.save_state(hooks)
        self.log.close()
        self.folder.close()
        return 0

    def _stopped(self, stop: GracefulStop, hooks: TrainerHooks) -> int:
        self.save_state(hooks)
        logger.warning(
            "stop requested (signal %s): state saved to %s; rerun the same command to resume",
            stop.signal_number,
            self.folder.state_path,
        )
        self.log.close()
        self.folder.close()
        return exit_status_for_signal(stop.signal_number or signal.SIGTERM)
