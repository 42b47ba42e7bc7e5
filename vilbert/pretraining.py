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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from vilbert.checkpoint import save_state_dict
from vilbert.cli import run_script
from vilbert.config import BertConfig
from vilbert.datasets.concept_cap import ConceptCapDataset, pretraining_files
from vilbert.datasets.loader import make_loader
from vilbert.distributed import (
    DistContext,
    add_local_rank_args,
    all_reduce_sum,
)
from vilbert.engine import Optimization
from vilbert.modeling import InterBertForMultiModalPreTraining
from vilbert.optimization import (
    OPTIMIZERS,
    build_optimizer,
    freeze_layers,
    num_optimization_steps,
    warmup_linear,
)
from vilbert.precision import Precision
from vilbert.run_folder import RunFolder
from vilbert.run_logging import RunLogger
from vilbert.tokenization import BertTokenizer
from vilbert.training_state import (
    GracefulStop,
    NonFiniteGuard,
    TrainingState,
    load_training_state,
    seed_everything,
)

logger = logging.getLogger(__name__)

# Parameters a BERT checkpoint initialises; the published script trains them at lr x 0.1.
BERT_PREFIXES = ("bert.embeddings.", "bert.encoder.layer.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain InterBERT on Conceptual Captions (MSM + MRM + ITM).")
    p.add_argument(
        "--train_data_dir", default="", help="folder with training_feat_all.lmdb + caption_train.json"
    )
    p.add_argument("--val_data_dir", default="", help="folder with validation_all.lmdb + caption_val.json")
    p.add_argument(
        "--from_pretrained", default="", help="weights to start from (BERT or InterBERT); empty = random"
    )
    p.add_argument("--bert_model", default="bert-base-uncased", help="vocab.txt or a folder holding it")
    p.add_argument("--output_dir", default="save", help="runs go to OUTPUT_DIR/SAVE_NAME")
    p.add_argument("--config_file", default="config/bert_base_6layer_interbert.json")
    p.add_argument("--max_seq_length", default=36, type=int)
    p.add_argument(
        "--predict_feature", action="store_true", help="regress region features instead of classes"
    )
    p.add_argument("--train_batch_size", default=512, type=int, help="per process, per optimiser step")
    p.add_argument("--learning_rate", default=1e-4, type=float)
    p.add_argument("--num_train_epochs", default=10.0, type=float)
    p.add_argument(
        "--start_epoch", default=0, type=float, help="with --continue_training: first epoch to run"
    )
    p.add_argument(
        "--continue_training", action="store_true", help="load FROM_PRETRAINED/pytorch_model_{K-1}.bin"
    )
    p.add_argument("--warmup_proportion", default=0.1, type=float)
    p.add_argument("--img_weight", default=1, type=float)
    p.add_argument("--itm_weight", default=1, type=float)
    p.add_argument("--text_weight", default=1, type=float)
    p.add_argument("--no_cuda", action="store_true")
    p.add_argument("--do_lower_case", type=bool, default=True)
    add_local_rank_args(p)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--fp16", action="store_true", help="autocast float16 + GradScaler")
    p.add_argument("--loss_scale", type=float, default=0, help="fp16 static loss scale; 0 = dynamic")
    p.add_argument("--num_workers", type=int, default=3)
    p.add_argument("--save_name", default="", type=str)
    p.add_argument("--freeze", default=-1, type=int, help="freeze embeddings and encoder layers <= K")
    p.add_argument(
        "--distributed", action="store_true", help="use training_feat_part_{rank}.lmdb when present"
    )
    p.add_argument("--without_coattention", action="store_true", help="zero the ITM loss (published meaning)")
    p.add_argument("--span_mask", action="store_true", help="span masking (MSM) and group masking (MRM)")
    p.add_argument("--cond_mask", action="store_true", help="not supported (rejected with a message)")
    p.add_argument("--dynamic_masking", action="store_true", help="accepted: masks are redrawn every epoch")
    new = p.add_argument_group("new in this implementation")
    new.add_argument("--bf16", action="store_true", help="autocast bfloat16")
    new.add_argument("--optimizer", default="AdamW", choices=OPTIMIZERS)
    new.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    new.add_argument(
        "--bert_lr_factor",
        type=float,
        default=0.1,
        help="lr factor of BERT-initialised layers when --from_pretrained is given (published 0.1)",
    )
    new.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="resume from the run folder's training state (default when it exists) or PATH",
    )
    new.add_argument("--save_every_steps", type=int, default=1000, help="resumable state every N steps")
    new.add_argument("--max_bad_steps", type=int, default=20, help="abort after N non-finite steps in a row")
    new.add_argument("--log_every", type=int, default=20)
    new.add_argument("--quiet", action="store_true", help="no progress bar")
    new.add_argument("--region_len", type=int, default=36, help="regions per image (plus the global one)")
    new.add_argument("--no_dynamic_padding", action="store_true", help="pad every batch to the maxima")
    new.add_argument("--compile", action="store_true", help="torch.compile the model")
    new.add_argument(
        "--deterministic", action="store_true", help="deterministic kernels (for exact resume tests)"
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cond_mask:
        parser.error(
            "--cond_mask (each sample emitted twice, text-only and region-only masking) is not supported; "
            "drop the flag"
        )
    if args.gradient_accumulation_steps < 1:
        parser.error(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
    if args.train_batch_size % args.gradient_accumulation_steps:
        parser.error(
            f"--train_batch_size {args.train_batch_size} is not divisible by "
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps}"
        )
    if args.continue_training and (args.start_epoch < 1 or not args.from_pretrained):
        parser.error("--continue_training needs --start_epoch >= 1 and --from_pretrained RUN_FOLDER")
    for flag in ("train_data_dir", "val_data_dir"):
        if not getattr(args, flag):
            parser.error(f"--{flag} is required")
    return args


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
        )
        return data, distributed and not files.is_rank_part

    train, shard_train = dataset("train", args.train_data_dir)
    val, shard_val = dataset("val", args.val_data_dir)
    dynamic = not args.no_dynamic_padding
    train_loader = make_loader(
        train, micro_batch, train.collate_fn(dynamic), ctx, shard_train, True, args.num_workers, args.seed
    )
    val_loader = make_loader(
        val, micro_batch, val.collate_fn(dynamic), ctx, shard_val, False, min(args.num_workers, 2), args.seed
    )
    return PretrainData(train, val, train_loader, val_loader)


def build_model(args: argparse.Namespace, config: BertConfig) -> InterBertForMultiModalPreTraining:
    if args.continue_training:
        path = os.path.join(args.from_pretrained, f"pytorch_model_{int(args.start_epoch) - 1}.bin")
        return InterBertForMultiModalPreTraining.from_pretrained(path, config)
    if args.from_pretrained:
        return InterBertForMultiModalPreTraining.from_pretrained(args.from_pretrained, config)
    return InterBertForMultiModalPreTraining(config)


def optimizer_groups(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """Decay on weights only; BERT-initialised layers at ``bert_lr_factor`` x lr when loading weights."""
    factor = args.bert_lr_factor if args.from_pretrained else 1.0
    groups: dict[tuple[bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = "bias" in name or "LayerNorm" in name
        is_bert = name.startswith(BERT_PREFIXES) and factor != 1.0
        group = groups.setdefault(
            (no_decay, is_bert),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else 0.01,
                "lr": args.learning_rate * (factor if is_bert else 1),
            },
        )
        group["params"].append(param)
    return list(groups.values())


def pretraining_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace):
    out = model(
        input_ids=batch["input_ids"],
        image_feat=batch["image_feat"],
        image_loc=batch["image_loc"],
        token_type_ids=batch["segment_ids"],
        attention_mask=batch["input_mask"],
        image_attention_mask=batch["image_mask"],
        multimodal_mask=batch["multimodal_mask"],
        masked_lm_labels=batch["lm_label_ids"],
        image_label=batch["image_label"],
        image_target=batch["image_target"],
        next_sentence_label=batch["is_next"],
    )
    itm = out.itm * 0 if args.without_coattention else out.itm
    total = args.text_weight * out.msm + args.img_weight * out.mrm + args.itm_weight * itm
    return total, {"loss": total, "msm": out.msm, "mrm": out.mrm, "itm": itm}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def validate(model, loader, args, ctx: DistContext, precision: Precision) -> dict[str, float]:
    """Mean MSM, MRM, ITM and total loss over the validation set, summed over every rank."""
    model.eval()
    sums: dict[str, float] = {"batches": 0.0}
    for batch in loader:
        with precision.autocast():
            _, parts = pretraining_losses(model, to_device(batch, ctx.device), args)
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        sums["batches"] += 1
    model.train()
    totals = all_reduce_sum(sums)
    count = max(totals.pop("batches"), 1.0)
    return {name: value / count for name, value in totals.items()}


# Bad input the user can fix (paths, run folders, configs, checkpoints, data files): reported in one
# line, like an argparse error, instead of a traceback from wherever it was detected.
def run(args: argparse.Namespace) -> None:
    """The entry point: bad input exits with status 2 and a one-line message (``vilbert.cli``)."""
    status = run_script(train, args)
    if status:
        raise SystemExit(status)


def train(args: argparse.Namespace, ctx: DistContext) -> None:
    seed_everything(args.seed + ctx.rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    config = BertConfig.from_json_file(args.config_file)
    config.predict_feature = args.predict_feature
    folder = RunFolder.create(args.output_dir, args.save_name, ctx.is_main)
    resume = folder.resume_file(args.resume, allow_existing_weights=args.continue_training)
    tokenizer = BertTokenizer(args.bert_model, do_lower_case=args.do_lower_case)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{args.bert_model}: vocabulary of {tokenizer.vocab_size} tokens exceeds vocab_size "
            f"{config.vocab_size} of {args.config_file}"
        )
    micro_batch = args.train_batch_size // args.gradient_accumulation_steps
    data = build_data(args, ctx, tokenizer, micro_batch)

    model = build_model(args, config)
    freeze_layers(model, args.freeze)
    model.to(ctx.device)
    groups = optimizer_groups(model, args)
    if args.compile:
        model = torch.compile(model)
    if ctx.world_size > 1:
        model = DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
        )
    optimizer = build_optimizer(args.optimizer, groups, args.learning_rate)
    epochs = int(args.num_train_epochs)
    steps_per_epoch = num_optimization_steps(len(data.train_loader), 1, args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * epochs
    scheduler = warmup_linear(optimizer, int(args.warmup_proportion * total_steps), total_steps)
    precision = Precision.from_flags(args.fp16, args.bf16, ctx.device, args.loss_scale)
    scaler = precision.make_scaler()
    step = Optimization(
        model, optimizer, scheduler, scaler, NonFiniteGuard(args.max_bad_steps), args.max_grad_norm
    )

    state = TrainingState(epoch=int(args.start_epoch) if args.continue_training else 0)
    if resume is not None:
        state = load_training_state(resume, model, optimizer, scheduler, scaler, None, rank=ctx.rank)
    elif args.continue_training:
        for _ in range(state.epoch * steps_per_epoch):
            scheduler.step()
        logger.info(
            "--continue_training: epoch %d, schedule at step %d (fresh optimiser moments)",
            state.epoch,
            state.epoch * steps_per_epoch,
        )
    step.guard.bad_steps, step.guard.skipped_steps = state.bad_steps, state.skipped_steps
    folder.write_run_info(args, config)
    log = RunLogger(folder.path, ctx.is_main, args.log_every, args.quiet)
    if ctx.is_main:
        logger.info(
            "pretraining: %d samples/rank/epoch, %d ranks, batch %d x %d accumulation, %d steps, run %s",
            len(data.train_loader.batch_sampler.sampler),
            ctx.world_size,
            micro_batch,
            args.gradient_accumulation_steps,
            total_steps,
            folder.path,
        )

    def save_state() -> None:
        step.save_state(folder.state_path, state, ctx.is_main)

    model.train()
    with GracefulStop() as stop:
        while state.epoch < epochs:
            data.train.set_epoch(state.epoch)
            data.train_loader.batch_sampler.set_epoch(
                state.epoch, skip=state.step_in_epoch * args.gradient_accumulation_steps
            )
            batches = len(data.train_loader)
            log.start_epoch(state.epoch, steps_per_epoch, state.step_in_epoch)
            for index, batch in enumerate(
                data.train_loader, start=state.step_in_epoch * args.gradient_accumulation_steps
            ):
                will_step = (index + 1) % args.gradient_accumulation_steps == 0 or index + 1 == batches
                with step.micro_step(will_step):
                    with precision.autocast():
                        loss, parts = pretraining_losses(model, to_device(batch, ctx.device), args)
                    step.backward(loss, 1.0 / args.gradient_accumulation_steps)
                if not will_step:
                    continue
                step.step()
                state.global_step += 1
                state.step_in_epoch += 1
                log.step(
                    state.global_step,
                    parts,
                    step.learning_rate(),
                    batch["input_ids"].shape[0] * ctx.world_size * args.gradient_accumulation_steps,
                )
                if stop.should_stop():
                    save_state()
                    logger.warning(
                        "stop requested (signal %s): state saved to %s; rerun the same command to resume",
                        stop.signal_number,
                        folder.state_path,
                    )
                    log.close()
                    return
                if args.save_every_steps and state.global_step % args.save_every_steps == 0:
                    save_state()
            log.end_epoch()
            metrics = validate(model, data.val_loader, args, ctx, precision)
            if ctx.is_main:
                logger.info(
                    "epoch %d validation: %s",
                    state.epoch,
                    " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                )
                log.scalars("val", metrics, state.epoch)
                save_state_dict(model, folder.weights_path(state.epoch))
            state.epoch += 1
            state.step_in_epoch = 0
            save_state()
    log.close()
    if ctx.is_main:
        logger.info("pretraining finished: %s", folder.path)
