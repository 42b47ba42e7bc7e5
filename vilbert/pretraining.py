"""Pretraining on Conceptual Captions (``train_concap.py``): MSM + MRM + ITM.

Runs on one CPU, one GPU, or many processes (torchrun / torch.distributed.launch), with
fp16/bf16 autocast, gradient accumulation, resumable state saved atomically, SIGTERM handling and
a non-finite-loss guard. Flags and their defaults are the published ones plus a few additions
(marked "new" in ``--help``).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from vilbert.cli import run_script
from vilbert.config import BertConfig
from vilbert.data_checks import PretrainingData, require_pretraining_data
from vilbert.datasets.concept_cap import ConceptCapDataset, pretraining_files
from vilbert.datasets.loader import loader_workers, make_loader
from vilbert.device_prefetch import prefetch_to_device, to_device
from vilbert.distributed import DistContext, all_reduce_sum
from vilbert.engine import Optimization
from vilbert.flops import batch_flops
from vilbert.modeling import InterBertForMultiModalPreTraining
from vilbert.optimization import num_optimization_steps
from vilbert.precision import Precision
from vilbert.recipe import OptimizerPlan, check_recipe, pretraining_plan
from vilbert.run_folder import RunFolder
from vilbert.tokenization import BertTokenizer
from vilbert.trainer import StepReport, Trainer, TrainerHooks, check_text_fits, start_run
from vilbert.training_args import TrainingDefaults, add_new_flags, add_published_flags
from vilbert.training_state import TrainingState

logger = logging.getLogger(__name__)

DEFAULTS = TrainingDefaults(learning_rate=1e-4, seed=42, num_workers=3, workers_help="DataLoader workers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain InterBERT on Conceptual Captions (MSM + MRM + ITM).")
    p.add_argument(
        "--train_data_dir", default="", help="folder with training_feat_all.lmdb + caption_train.json"
    )
    p.add_argument("--val_data_dir", default="", help="folder with validation_all.lmdb + caption_val.json")
    p.add_argument(
        "--from_pretrained", default="", help="weights to start from (BERT or InterBERT); empty = random"
    )
    add_published_flags(p, DEFAULTS)
    p.add_argument("--max_seq_length", default=36, type=int, help="caption tokens, [CLS] and [SEP] included")
    p.add_argument(
        "--predict_feature", action="store_true", help="regress region features instead of classes"
    )
    p.add_argument("--train_batch_size", default=512, type=int, help="per process, per optimiser step")
    p.add_argument("--num_train_epochs", default=10.0, type=float, help="epochs (a whole number)")
    p.add_argument(
        "--start_epoch", default=0, type=float, help="with --continue_training: first epoch to run"
    )
    p.add_argument(
        "--continue_training", action="store_true", help="load FROM_PRETRAINED/pytorch_model_{K-1}.bin"
    )
    p.add_argument("--img_weight", default=1, type=float, help="weight of the masked-region loss")
    p.add_argument("--itm_weight", default=1, type=float, help="weight of the image-text matching loss")
    p.add_argument("--text_weight", default=1, type=float, help="weight of the masked-segment loss")
    p.add_argument(
        "--distributed", action="store_true", help="use training_feat_part_{rank}.lmdb when present"
    )
    p.add_argument("--without_coattention", action="store_true", help="zero the ITM loss (published meaning)")
    p.add_argument("--span_mask", action="store_true", help="span masking (MSM) and group masking (MRM)")
    p.add_argument("--cond_mask", action="store_true", help="not supported (rejected with a message)")
    p.add_argument("--dynamic_masking", action="store_true", help="accepted: masks are redrawn every epoch")
    new = add_new_flags(p)
    new.add_argument(
        "--bert_lr_factor",
        type=float,
        default=0.1,
        help="lr factor of BERT-initialised layers when --from_pretrained is given (published 0.1)",
    )
    new.add_argument("--region_len", type=int, default=36, help="regions per image (plus the global one)")
    new.add_argument("--no_dynamic_padding", action="store_true", help="pad every batch to the maxima")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cond_mask:
        parser.error(
            "--cond_mask (each sample emitted twice, text-only and region-only masking) is not supported; "
            "drop the flag"
        )
    if args.train_batch_size < 1:
        parser.error(f"--train_batch_size must be >= 1, got {args.train_batch_size}")
    if args.train_batch_size % args.gradient_accumulation_steps:
        parser.error(
            f"--train_batch_size {args.train_batch_size} is not divisible by "
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps}"
        )
    if args.num_train_epochs < 1 or args.num_train_epochs != int(args.num_train_epochs):
        parser.error(f"--num_train_epochs must be a whole number >= 1, got {args.num_train_epochs}")
    if args.continue_training and (args.start_epoch < 1 or not args.from_pretrained):
        parser.error("--continue_training needs --start_epoch >= 1 and --from_pretrained RUN_FOLDER")
    for flag in ("train_data_dir", "val_data_dir"):
        if not getattr(args, flag):
            parser.error(f"--{flag} is required")
    return args


@dataclass(frozen=True)
class LossWeights:
    """``loss = text * MSM + image * MRM + itm * ITM``; ``without_coattention`` zeroes ITM (published)."""

    text: float = 1.0
    image: float = 1.0
    itm: float = 1.0
    without_coattention: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LossWeights:
        return cls(args.text_weight, args.img_weight, args.itm_weight, args.without_coattention)


@dataclass
class PretrainData:
    train: ConceptCapDataset
    val: ConceptCapDataset
    train_loader: DataLoader
    val_loader: DataLoader


def build_data(args: argparse.Namespace, ctx: DistContext, tokenizer: BertTokenizer, micro_batch: int):
    distributed = ctx.world_size > 1

    def dataset(split: str, data_dir: str) -> tuple[ConceptCapDataset, bool]:
        files = pretraining_files(
            data_dir, split, rank=ctx.rank, distributed=distributed and args.distributed
        )
        data = ConceptCapDataset(
            files.lmdb_path,
            files.caption_json,
            tokenizer,
            max_seq_length=args.max_seq_length,
            region_len=args.region_len,
            span_mask=args.span_mask,
            predict_feature=args.predict_feature,
            seed=args.seed,
            rank=ctx.rank,
            rules=args.recipe,
        )
        return data, distributed and not files.is_rank_part

    train, shard_train = dataset("train", args.train_data_dir)
    val, shard_val = dataset("val", args.val_data_dir)
    dynamic = not args.no_dynamic_padding
    # --num_workers is per process here (as published), capped by the CPUs like every script's.
    workers = loader_workers(args.num_workers * ctx.world_size, ctx.world_size, 1)
    train_loader = make_loader(
        train, micro_batch, train.collate_fn(dynamic), ctx, shard_train, True, workers, args.seed
    )
    val_loader = make_loader(
        val, micro_batch, val.collate_fn(dynamic), ctx, shard_val, False, min(workers, 2), args.seed
    )
    return PretrainData(train, val, train_loader, val_loader)


def build_model(args: argparse.Namespace, config: BertConfig) -> InterBertForMultiModalPreTraining:
    if args.continue_training:
        path = os.path.join(args.from_pretrained, f"pytorch_model_{int(args.start_epoch) - 1}.bin")
        return InterBertForMultiModalPreTraining.from_pretrained(path, config)
    if args.from_pretrained:
        return InterBertForMultiModalPreTraining.from_pretrained(args.from_pretrained, config)
    return InterBertForMultiModalPreTraining(config)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated pretraining batch as the model's keyword arguments (the one renaming there is)."""
    return dict(
        input_ids=batch["input_ids"],
        image_feat=batch["image_feat"],
        image_loc=batch["image_loc"],
        token_type_ids=batch["segment_ids"],
        attention_mask=batch["input_mask"],
        image_attention_mask=batch["image_mask"],
        multimodal_mask=batch["multimodal_mask"],
        masked_lm_labels=batch["lm_label_ids"],
        image_label=batch["image_label"],
        image_target=batch.get("image_target"),
        next_sentence_label=batch["is_next"],
        msm_positions=batch.get("msm_positions"),
        mrm_positions=batch.get("mrm_positions"),
        mrm_targets=batch.get("mrm_targets"),
    )


def pretraining_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], weights: LossWeights):
    """The weighted total and its parts (MSM, MRM, ITM), as tensors on the device."""
    out = model(**model_inputs(batch))
    itm = out.itm * 0 if weights.without_coattention else out.itm
    total = weights.text * out.msm + weights.image * out.mrm + weights.itm * itm
    return total, {"loss": total, "msm": out.msm, "mrm": out.mrm, "itm": itm}


def train_step(
    step: Optimization,
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    weights: LossWeights,
    precision: Precision,
    accumulation: int,
    will_step: bool,
) -> dict[str, torch.Tensor]:
    """One micro-batch: forward, backward (1/accumulation of the loss), and the optimiser step when
    ``will_step``. The published step: the loss weights' sum, backward, one BertAdam step."""
    with step.micro_step(will_step):
        with precision.autocast():
            loss, parts = pretraining_losses(model, batch, weights)
        step.backward(loss, 1.0 / accumulation)
    if will_step:
        step.step()
    return parts


@torch.no_grad()
def validate(model, loader, weights: LossWeights, ctx: DistContext, precision: Precision) -> dict[str, float]:
    """Mean MSM, MRM, ITM and total loss over the validation set, summed over every rank."""
    model.eval()
    sums: dict[str, float] = {"batches": 0.0}
    for batch in loader:
        with precision.autocast():
            _, parts = pretraining_losses(model, to_device(batch, ctx.device), weights)
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        sums["batches"] += 1
    model.train()
    totals = all_reduce_sum(sums)
    count = max(totals.pop("batches"), 1.0)
    return {name: value / count for name, value in totals.items()}


def run(args: argparse.Namespace) -> None:
    """The entry point; exit statuses as ``vilbert.errors`` states them."""
    status = run_script(train, args)
    if status:
        raise SystemExit(status)


def optimizer_steps(args: argparse.Namespace, data: PretrainData) -> tuple[int, int]:
    """(t_total, steps already done): steps per epoch x epochs, the first ``start_epoch`` epochs done
    with ``--continue_training``. Steps per epoch as the recipe counts them: published, samples per
    rank // ``--train_batch_size``; modern, the steps the loop takes (a last partial batch is one more).
    """
    start = int(args.start_epoch) if args.continue_training else 0
    if args.recipe == "published":
        per_epoch = len(data.train_loader.batch_sampler.sampler) // args.train_batch_size
    else:
        per_epoch = num_optimization_steps(len(data.train_loader), 1, args.gradient_accumulation_steps)
    return per_epoch * int(args.num_train_epochs), per_epoch * start


def make_plan(args: argparse.Namespace, t_total: int) -> Callable[[torch.nn.Module], OptimizerPlan]:
    def plan(model: torch.nn.Module) -> OptimizerPlan:
        return pretraining_plan(
            args.recipe,
            model,
            args.learning_rate,
            args.warmup_proportion,
            t_total,
            from_pretrained=bool(args.from_pretrained),
            bert_lr_factor=args.bert_lr_factor,
            max_grad_norm=args.max_grad_norm,
        )

    return plan


def _iterations(trainer: Trainer, data: PretrainData, weights: LossWeights):
    """The epoch's micro-batches from ``state.step_in_epoch`` on (the loop's step body)."""
    args, ctx = trainer.args, trainer.ctx
    accumulation = args.gradient_accumulation_steps

    def iterations(state: TrainingState):
        data.train.set_epoch(state.epoch)
        data.train_loader.batch_sampler.set_epoch(state.epoch, skip=state.step_in_epoch)
        batches = len(data.train_loader)
        flops = 0.0
        on_device = prefetch_to_device(data.train_loader, ctx.device)
        for index, (batch, moved) in enumerate(on_device, start=state.step_in_epoch):
            will_step = (index + 1) % accumulation == 0 or index + 1 == batches
            # Counted on the host copy: on a GPU the label counts would cost a synchronisation.
            flops += batch_flops(trainer.config, batch, trainer.model.gather_heads).training_step
            parts = train_step(
                trainer.step, trainer.forward_model, moved, weights, trainer.precision, accumulation,
                will_step,
            )  # fmt: skip
            samples = batch["input_ids"].shape[0] * ctx.world_size * accumulation
            yield StepReport(parts, samples, will_step, flops * ctx.world_size if will_step else None)
            flops = 0.0 if will_step else flops

    return iterations


def train(args: argparse.Namespace, ctx: DistContext) -> int:
    """Run (or resume) pretraining; returns the exit status."""
    start_run(args, ctx)
    check_recipe(args.recipe, args.optimizer)
    config = BertConfig.from_json_file(args.config_file)
    config.predict_feature = args.predict_feature
    folder = RunFolder.create(args.output_dir, args.save_name, ctx.is_main)
    resume = folder.resume_file(args.resume, allow_existing_weights=args.continue_training)
    tokenizer = BertTokenizer(args.bert_model, do_lower_case=args.do_lower_case)
    check_text_fits(
        config,
        args.config_file,
        tokenizer.vocab_size,
        args.bert_model,
        {"--max_seq_length": args.max_seq_length},
    )
    micro_batch = args.train_batch_size // args.gradient_accumulation_steps
    data = build_data(args, ctx, tokenizer, micro_batch)
    shape = PretrainingData(
        args.train_data_dir, args.val_data_dir, args.train_batch_size, args.region_len, args.predict_feature
    )
    if not (args.distributed and ctx.world_size > 1):  # the check reads the whole-set files, not parts
        require_pretraining_data(shape, config, args.config_file, args.gradient_accumulation_steps)
    t_total, done = optimizer_steps(args, data)
    trainer = Trainer(args, ctx, config, folder, build_model(args, config), make_plan(args, t_total))
    fresh = TrainingState(epoch=int(args.start_epoch) if args.continue_training else 0)
    if resume is None and args.continue_training:
        trainer.plan.fast_forward(done)
        logger.info("--continue_training: epoch %d, schedule at step %d (fresh moments)", fresh.epoch, done)
    record = trainer.record(train_batch_size=args.train_batch_size, from_pretrained=args.from_pretrained)
    trainer.resume(resume, record, fresh)
    weights = LossWeights.from_args(args)
    if ctx.is_main:
        logger.info(
            "pretraining: %d samples/rank/epoch, %d ranks, batch %d x %d accumulation, t_total %d, run %s",
            len(data.train_loader.batch_sampler.sampler), ctx.world_size, micro_batch,
            args.gradient_accumulation_steps, t_total, folder.path,
        )  # fmt: skip

    def end_epoch(state: TrainingState, metrics: dict[str, float]) -> None:
        if ctx.is_main:
            values = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            logger.info("epoch %d validation: %s", state.epoch, values)

    hooks = TrainerHooks(
        iterations=_iterations(trainer, data, weights),
        iterations_per_epoch=len(data.train_loader),
        validate=lambda: validate(trainer.forward_model, data.val_loader, weights, ctx, trainer.precision),
        end_epoch=end_epoch,
    )
    status = trainer.run(int(args.num_train_epochs), hooks)
    if ctx.is_main and status == 0:
        logger.info("pretraining finished: %s", folder.path)
    return status
