"""What the two evaluation commands share: flags, task YAML and split resolution, model loading,
the results folder, sharding and progress. The commands: ``vilbert.retrieval_eval``
(``eval_retrieval.py``, Flickr30K) and ``vilbert.vcr_eval`` (``eval_tasks.py``, VCR).

Flags are the published ones plus a few marked "new" in ``--help``. The task YAML comes from
``--task_config`` (relative to the working directory, as the published scripts read theirs).

Which annotation file a split reads: the YAML's ``train_annotations_jsonpath`` for its
``train_split``, its ``val_annotations_jsonpath`` for its ``val_split``, and for any other split the
val file with the split's name in place of the val split's name (``VCR/val.jsonl`` →
``VCR/test.jsonl``); a split without such a file is an error that names the file looked for.

Results go to ``--output_dir/RUN``, RUN being ``--save_name`` or named after the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from tqdm import tqdm

from vilbert.checkpoint import CheckpointError, check_backbone_loaded, load_pretrained
from vilbert.cli import first_line, run_script
from vilbert.config import BertConfig
from vilbert.datasets.rules import DATA_RULES
from vilbert.distributed import (
    DistContext,
    add_local_rank_args,
)
from vilbert.errors import BadInputError
from vilbert.tasks import TaskConfig
from vilbert.tokenization import BertTokenizer
from vilbert.training_args import positive_int, str_to_bool

logger = logging.getLogger(__name__)

EVAL_YAML, TASKS_YAML = "interbert_tasks_eval.yml", "interbert_tasks.yml"
ITM_HEAD, VCR_HEAD = "cls.bi_seq_relationship.weight", "vil_logit.weight"


class EvaluationError(BadInputError):
    """A request the evaluation cannot serve: an unknown split, a wrong task, an unusable checkpoint."""


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def base_parser(
    prog: str, description: str, tasks: str, batch_size: int | None, batch_help: str
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--bert_model", default="bert-base-uncased", help="vocab.txt or a folder holding it")
    p.add_argument("--from_pretrained", required=True, help="checkpoint to evaluate (file or folder)")
    p.add_argument("--config_file", default="config/bert_base_6layer_interbert.json")
    # ``--task`` is spelled out: with --task_config present it would be an ambiguous abbreviation.
    p.add_argument(
        "--tasks", "--task", dest="tasks", default=tasks, help="task numbers of the YAML, e.g. 3 or 1-2"
    )
    p.add_argument("--split", default="", help="split to evaluate (default: each task's val_split)")
    p.add_argument("--batch_size", type=positive_int, default=batch_size, help=batch_help)
    p.add_argument("--output_dir", default="results", help="results go to OUTPUT_DIR/RUN")
    p.add_argument("--save_name", default="", help="RUN (default: named after the checkpoint)")
    p.add_argument("--num_workers", type=int, default=4, help="data-loading processes")
    p.add_argument("--fp16", action="store_true", help="autocast float16")
    p.add_argument("--no_cuda", action="store_true")
    add_local_rank_args(p)
    p.add_argument("--seed", type=int, default=42, help="seeds VCR's person names (scoring is deterministic)")
    p.add_argument(
        "--in_memory",
        type=str_to_bool,
        nargs="?",
        const=True,
        default=False,
        help="cache decoded features",
    )
    p.add_argument("--do_lower_case", type=str_to_bool, default=True)
    return p


def add_new_flags(p: argparse.ArgumentParser, default_yaml: str) -> argparse._ArgumentGroup:
    new = p.add_argument_group("new in this implementation")
    new.add_argument(
        "--task_config", default=None, help=f"task YAML (default: {default_yaml} in the working dir)"
    )
    new.add_argument("--bf16", action="store_true", help="autocast bfloat16")
    new.add_argument(
        "--tf32", action="store_true", help="fp32 matrix products in TF32 on a GPU (faster, 10-bit mantissa)"
    )
    new.add_argument("--quiet", action="store_true", help="no progress bar")
    new.add_argument(
        "--recipe",
        default="published",
        choices=DATA_RULES,
        help="data rules of the text: published (long Flickr30K captions lose [SEP]; VCR questions "
        "truncated across options, names may repeat) or modern (corrected); see the README",
    )
    return new


# ---------------------------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------------------------


def resolve_task_config(given: str | None, defaults: Sequence[str]) -> str:
    """``--task_config``, or the first default present in the working directory.

    The retrieval defaults are the eval YAML, then the fine-tuning one: the published README tells
    users to copy the eval YAML over ``interbert_tasks.yml``, and that keeps working.
    """
    if given:
        return given
    for name in defaults:
        if os.path.isfile(name):
            return name
    raise EvaluationError(f"no task YAML: none of {', '.join(defaults)} in {os.getcwd()}; pass --task_config")


def split_annotations(task: TaskConfig, split: str, source: str) -> str:
    """The annotation file of ``split`` (see the module docstring); missing files are errors."""
    if split == task.train_split:
        path = task.train_annotations_jsonpath
    elif split == task.val_split:
        path = task.val_annotations_jsonpath
    else:
        folder, name = os.path.split(task.val_annotations_jsonpath)
        pattern = rf"(?<![A-Za-z0-9]){re.escape(task.val_split)}(?![A-Za-z0-9])"
        derived = re.sub(pattern, split, name)
        path = os.path.join(folder, derived)
        if derived == name or not os.path.isfile(path):
            raise EvaluationError(
                f"{source}: {task.key} has no split {split!r}: it lists {task.train_split!r} and "
                f"{task.val_split!r}, and {path if derived != name else 'no file named after it'} "
                "does not exist"
            )
        logger.info("%s split %r: %s", task.key, split, path)
    if not os.path.isfile(path):
        raise EvaluationError(f"{source}: {task.key} split {split!r}: annotation file not found: {path}")
    return path


def run_name(args: argparse.Namespace, suffix: str = "") -> str:
    """``--save_name``, else ``<folder>-<file stem>`` of the checkpoint (or the folder's name)."""
    if args.save_name:
        return args.save_name
    path = os.path.abspath(args.from_pretrained)
    if os.path.isdir(path):
        name = os.path.basename(path)
    else:
        name = f"{os.path.basename(os.path.dirname(path))}-{os.path.splitext(os.path.basename(path))[0]}"
    return name + suffix


def config_and_tokenizer(args: argparse.Namespace) -> tuple[BertConfig, BertTokenizer]:
    config = BertConfig.from_json_file(args.config_file)
    tokenizer = BertTokenizer(args.bert_model, do_lower_case=args.do_lower_case)
    if tokenizer.vocab_size > config.vocab_size:
        raise EvaluationError(
            f"{args.bert_model}: vocabulary of {tokenizer.vocab_size} tokens exceeds vocab_size "
            f"{config.vocab_size} of {args.config_file}"
        )
    return config, tokenizer


def run_folder_checkpoint(path: str) -> str:
    """``--from_pretrained RUN_FOLDER`` of a fine-tuning run: its best epoch's EMA weights (else raw),
    by the folder's ``metrics.json``; any other path as it is."""
    metrics_path = os.path.join(path, "metrics.json")
    if not os.path.isdir(path) or not os.path.isfile(metrics_path):
        return path
    try:
        with open(metrics_path, encoding="utf-8") as f:
            best = int(json.load(f)["best_epoch"])
    except (ValueError, KeyError, TypeError) as error:
        raise EvaluationError(f"{metrics_path}: no usable best_epoch ({first_line(error)})") from None
    for name in (f"pytorch_model_{best}_ema.bin", f"pytorch_model_{best}.bin"):
        if os.path.isfile(os.path.join(path, name)):
            logger.info("%s is a fine-tuning run: evaluating %s (best epoch %d)", path, name, best)
            return os.path.join(path, name)
    raise EvaluationError(f"{path}: metrics.json names best epoch {best}, but its weights are not there")


def trained_tasks(checkpoint: str) -> list[str] | None:
    """What the run that wrote ``checkpoint`` trained, from the ``run_info.json`` beside it: the task
    names of a fine-tuning run, [] for pretraining, None when unknown (e.g. a released file)."""
    info_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "run_info.json")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    tasks = info.get("tasks")
    return [str(task.get("name")) for task in tasks.values()] if isinstance(tasks, dict) else []


def check_head_trained(checkpoint: str, task_name: str, zero_shot: bool = False) -> bool:
    """Warn loudly when the head that scores ``task_name`` was not trained by the checkpoint's run;
    True when the checkpoint comes from pretraining (its scores are zero-shot, whatever the flags)."""
    trained = trained_tasks(checkpoint)
    if trained is None or (zero_shot and trained == []):
        return trained == []
    if trained == []:
        logger.warning(
            "%s was written by pretraining: %s was never fine-tuned; the results are ZERO-SHOT",
            checkpoint, task_name,
        )  # fmt: skip
        return True
    if task_name not in trained:
        logger.warning(
            "%s was fine-tuned on %s, not %s: the head that scores %s was NOT TRAINED",
            checkpoint, ", ".join(trained), task_name, task_name,
        )  # fmt: skip
    return False


def load_model(
    model_class: type[nn.Module], args: argparse.Namespace, config: BertConfig, head: str
) -> nn.Module:
    """The model with ``--from_pretrained`` loaded; the whole backbone and ``head`` must come from it.

    A missing or extra ``bert.`` weight means the checkpoint and ``--config_file`` disagree (e.g. in
    layer count), which would otherwise evaluate a partly random model.
    """
    model = model_class(config)
    args.from_pretrained = run_folder_checkpoint(args.from_pretrained)
    missing, unexpected = load_pretrained(model, args.from_pretrained)
    check_backbone_loaded(args.from_pretrained, f"--config_file {args.config_file}", missing, unexpected)
    if head in missing:
        raise CheckpointError(
            f"{args.from_pretrained}: has no {head.rsplit('.', 1)[0]} weights to score with"
        )
    return model


def make_run_folder(args: argparse.Namespace, ctx: DistContext, suffix: str = "") -> str:
    folder = os.path.join(args.output_dir, run_name(args, suffix))
    if ctx.is_main:
        os.makedirs(folder, exist_ok=True)
    return folder


def shard(count: int, ctx: DistContext) -> range:
    """This rank's contiguous share of ``count`` items (rank order = item order)."""
    return range(ctx.rank * count // ctx.world_size, (ctx.rank + 1) * count // ctx.world_size)


def progress(total: int, per_unit: int, unit: str, ctx: DistContext, quiet: bool) -> tqdm:
    """Rank 0's bar over the whole split (ranks advance together), counting ``per_unit`` items as one
    ``unit`` (pairs shown as captions); off when quiet or not on a terminal."""
    return tqdm(
        total=total,
        unit=unit,
        unit_scale=1 / per_unit if per_unit > 1 else False,
        dynamic_ncols=True,
        disable=quiet or not ctx.is_main or not sys.stderr.isatty(),
    )


def command_main(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace, DistContext], Any],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse, check the precision flags, run ``body``; the exit status (``vilbert.errors``)."""
    args = parser.parse_args(argv)
    if args.fp16 and args.bf16:
        parser.error("--fp16 and --bf16 exclude each other")
    return run_script(body, args, parser.prog)
