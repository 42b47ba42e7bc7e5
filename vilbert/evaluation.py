"""The evaluation commands: ``eval_retrieval.py`` (Flickr30K) and ``eval_tasks.py`` (VCR).

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
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from vilbert.atomic import atomic_write, atomic_write_json
from vilbert.checkpoint import CheckpointError, load_pretrained
from vilbert.cli import run_script
from vilbert.config import BertConfig
from vilbert.datasets.features import RegionFeatureStore
from vilbert.datasets.retrieval import RetrievalEvalDataset, collate_retrieval, pad_regions
from vilbert.datasets.vcr import VCR_TASKS
from vilbert.distributed import (
    DistContext,
    add_local_rank_args,
    gather_to_main,
    min_across_ranks,
)
from vilbert.modeling import InterBertForMultiModalPreTraining, InterBertForVLTasks
from vilbert.precision import Precision
from vilbert.retrieval_eval import RetrievalScorer, block_size, default_memory_budget, retrieval_report
from vilbert.tasks import TASKS, FeatureStores, TaskConfig, load_task_configs, select_tasks
from vilbert.tokenization import BertTokenizer
from vilbert.vcr_eval import (
    answer_accuracy,
    format_q_ar,
    leaderboard_from_files,
    predict,
    q_ar_from_files,
    results_file_name,
)

logger = logging.getLogger(__name__)

EVAL_YAML, TASKS_YAML = "interbert_tasks_eval.yml", "interbert_tasks.yml"
RETRIEVAL_TASK = "RetrievalFlickr30k"
TEST_SPLIT = "test"  # the VCR split without labels
ITM_HEAD, VCR_HEAD = "cls.bi_seq_relationship.weight", "vil_logit.weight"
IMAGE_CHUNK = 32


class EvaluationError(ValueError):
    """A request the evaluation cannot serve: an unknown split, a wrong task, an unusable checkpoint."""


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def _bool(value: str) -> bool:
    """``--in_memory True`` (published spelling) as well as a bare ``--in_memory``."""
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _base_parser(
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
    p.add_argument("--batch_size", type=_positive, default=batch_size, help=batch_help)
    p.add_argument("--output_dir", default="results", help="results go to OUTPUT_DIR/RUN")
    p.add_argument("--save_name", default="", help="RUN (default: named after the checkpoint)")
    p.add_argument("--num_workers", type=int, default=4, help="data-loading processes")
    p.add_argument("--fp16", action="store_true", help="autocast float16")
    p.add_argument("--no_cuda", action="store_true")
    add_local_rank_args(p)
    p.add_argument("--seed", type=int, default=42, help="seeds VCR's person names (scoring is deterministic)")
    p.add_argument(
        "--in_memory", type=_bool, nargs="?", const=True, default=False, help="cache decoded features"
    )
    p.add_argument("--do_lower_case", type=_bool, default=True)
    return p


def _add_new_flags(p: argparse.ArgumentParser, default_yaml: str) -> argparse._ArgumentGroup:
    new = p.add_argument_group("new in this implementation")
    new.add_argument(
        "--task_config", default=None, help=f"task YAML (default: {default_yaml} in the working dir)"
    )
    new.add_argument("--bf16", action="store_true", help="autocast bfloat16")
    new.add_argument("--quiet", action="store_true", help="no progress bar")
    return new


def retrieval_parser() -> argparse.ArgumentParser:
    p = _base_parser(
        "eval_retrieval.py",
        "Flickr30K caption-based image retrieval (and text retrieval): every caption against every image.",
        tasks="3",
        batch_size=1,
        batch_help="published flag, accepted: forwards hold --pairs_per_forward (caption, image) pairs "
        "spanning captions, so neither speed nor scores depend on it",
    )
    p.add_argument("--zero_shot", action="store_true", help="score with the pretraining model's ITM head")
    new = _add_new_flags(p, f"{EVAL_YAML}, else {TASKS_YAML}")
    new.add_argument(
        "--max_captions", type=_positive, help="evaluate the first N captions (against all images)"
    )
    new.add_argument(
        "--pairs_per_forward",
        type=_positive,
        help="(caption, image) pairs per forward (default: what fits 2 GiB on CPU, 1/4 of a GPU)",
    )
    return p


def vcr_parser() -> argparse.ArgumentParser:
    p = _base_parser(
        "eval_tasks.py",
        "VCR evaluation: per-question option probabilities, Q->A / QA->R / Q->AR, leaderboard file.",
        tasks="1-2",
        batch_size=None,
        batch_help="questions per batch (default: the task's batch_size in the YAML)",
    )
    new = _add_new_flags(p, TASKS_YAML)
    new.add_argument(
        "--compute_q_ar", action="store_true", help="join Q->A and QA->R results with the labels"
    )
    return p


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


def _config_and_tokenizer(args: argparse.Namespace) -> tuple[BertConfig, BertTokenizer]:
    config = BertConfig.from_json_file(args.config_file)
    tokenizer = BertTokenizer(args.bert_model, do_lower_case=args.do_lower_case)
    if tokenizer.vocab_size > config.vocab_size:
        raise EvaluationError(
            f"{args.bert_model}: vocabulary of {tokenizer.vocab_size} tokens exceeds vocab_size "
            f"{config.vocab_size} of {args.config_file}"
        )
    return config, tokenizer


def load_model(
    model_class: type[nn.Module], args: argparse.Namespace, config: BertConfig, head: str
) -> nn.Module:
    """The model with ``--from_pretrained`` loaded; the whole backbone and ``head`` must come from it.

    A missing or extra ``bert.`` weight means the checkpoint and ``--config_file`` disagree (e.g. in
    layer count), which would otherwise evaluate a partly random model.
    """
    model = model_class(config)
    missing, unexpected = load_pretrained(model, args.from_pretrained)
    backbone = [key for key in missing + unexpected if key.startswith("bert.")]
    if backbone:
        raise CheckpointError(
            f"{args.from_pretrained}: does not match --config_file {args.config_file}: "
            f"{len(backbone)} backbone weight(s) missing or extra, e.g. {backbone[0]}"
        )
    if head in missing:
        raise CheckpointError(
            f"{args.from_pretrained}: has no {head.rsplit('.', 1)[0]} weights to score with"
        )
    return model


def _make_run_folder(args: argparse.Namespace, ctx: DistContext, suffix: str = "") -> str:
    folder = os.path.join(args.output_dir, run_name(args, suffix))
    if ctx.is_main:
        os.makedirs(folder, exist_ok=True)
    return folder


def _shard(count: int, ctx: DistContext) -> range:
    """This rank's contiguous share of ``count`` items (rank order = item order)."""
    return range(ctx.rank * count // ctx.world_size, (ctx.rank + 1) * count // ctx.world_size)


def _progress(total: int, per_unit: int, unit: str, ctx: DistContext, quiet: bool) -> tqdm:
    """Rank 0's bar over the whole split (ranks advance together), counting ``per_unit`` items as one
    ``unit`` (pairs shown as captions); off when quiet or not on a terminal."""
    return tqdm(
        total=total,
        unit=unit,
        unit_scale=1 / per_unit if per_unit > 1 else False,
        dynamic_ncols=True,
        disable=quiet or not ctx.is_main or not sys.stderr.isatty(),
    )


# ---------------------------------------------------------------------------------------------
# eval_retrieval.py
# ---------------------------------------------------------------------------------------------


class _PaddedImages(Dataset):
    """The split's images in annotation order, padded like the training samples."""

    def __init__(self, features: RegionFeatureStore, image_ids: Sequence[int], max_region_num: int) -> None:
        self.features = features
        self.image_ids = list(image_ids)
        self.max_region_num = max_region_num

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return pad_regions(self.features[self.image_ids[index]], self.max_region_num)


def _retrieval_task(yaml_path: str, tasks: str) -> TaskConfig:
    selected = select_tasks(load_task_configs(yaml_path), tasks, yaml_path)
    if len(selected) != 1 or selected[0].name != RETRIEVAL_TASK:
        names = ", ".join(f"{task.key} ({task.name})" for task in selected)
        raise EvaluationError(
            f"--tasks {tasks} selects {names}; eval_retrieval.py evaluates one {RETRIEVAL_TASK} task"
        )
    return selected[0]


def format_retrieval_table(report: dict[str, Any]) -> str:
    """The paper's columns, R@1 R@5 R@10 medr meanr, for both directions."""
    lines = [
        f"InterBERT {report['task']} {report['split']} ({report['mode']}): "
        f"{report['num_captions']} captions x {report['num_images']} images",
        f"{'':<17}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}{'meanr':>9}",
    ]
    for name in ("image_retrieval", "text_retrieval"):
        m = report[name]
        label = name.replace("_", " ")
        lines.append(
            f"{label:<17}{m['r1']:>8.2f}{m['r5']:>8.2f}{m['r10']:>8.2f}{m['medr']:>8.0f}{m['meanr']:>9.2f}"
        )
    return "\n".join(lines)


def evaluate_retrieval(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any] | None:
    """Score the split, gather the matrix on rank 0, write the results; the report on rank 0."""
    yaml_path = resolve_task_config(args.task_config, (EVAL_YAML, TASKS_YAML))
    task = _retrieval_task(yaml_path, args.tasks)
    split = args.split or task.val_split
    annotations = split_annotations(task, split, yaml_path)
    config, tokenizer = _config_and_tokenizer(args)
    features = FeatureStores(args.in_memory)(task.features_h5path1)
    dataset = RetrievalEvalDataset(annotations, features, tokenizer, task.max_seq_length, task.max_region_num)
    num_captions = min(args.max_captions or len(dataset), len(dataset))

    model_class = InterBertForMultiModalPreTraining if args.zero_shot else InterBertForVLTasks
    model = load_model(model_class, args, config, ITM_HEAD).to(ctx.device)
    precision = Precision.from_flags(args.fp16, args.bf16, ctx.device)
    folder = _make_run_folder(args, ctx, "-zero_shot" if args.zero_shot else "")

    images = DataLoader(
        _PaddedImages(features, dataset.image_ids, task.max_region_num),
        batch_size=IMAGE_CHUNK,
        collate_fn=collate_retrieval,
        num_workers=args.num_workers,
        pin_memory=ctx.device.type == "cuda",
    )
    pairs = args.pairs_per_forward or block_size(
        config,
        task.max_region_num,
        task.max_seq_length,
        num_captions * dataset.num_images,
        default_memory_budget(ctx.device),
    )
    scorer = RetrievalScorer(model, precision, min_across_ranks(pairs))
    bank = scorer.embed_images(images, dataset.num_images)
    stream = scorer.stream(
        {key: torch.from_numpy(value[:num_captions]) for key, value in dataset.captions.items()}, bank
    )
    logger.info(
        "%s %s: %d captions x %d images, %d pairs per forward, %d rank(s)",
        task.name, split, num_captions, dataset.num_images, scorer.pairs_per_forward, ctx.world_size,
    )  # fmt: skip
    with _progress(stream.total, dataset.num_images, "caption", ctx, args.quiet) as bar:
        flat = scorer.score(
            stream,
            stream.shard(ctx.rank, ctx.world_size),
            lambda done: bar.update(min(done * ctx.world_size, bar.total - bar.n)),
        )
    gathered = gather_to_main(flat)
    if gathered is None:
        return None

    scores = stream.matrix(np.concatenate(gathered))
    report = {
        "task": task.name,
        "split": split,
        "mode": "zero-shot" if args.zero_shot else "fine-tuned",
        "checkpoint": args.from_pretrained,
        "config_file": args.config_file,
        "annotations": annotations,
        **retrieval_report(scores, dataset.caption_image_index[:num_captions], dataset.image_ids),
    }
    atomic_write(os.path.join(folder, f"scores_{split}.npy"), lambda handle: np.save(handle, scores))
    atomic_write_json(os.path.join(folder, f"retrieval_{split}.json"), report)
    print(format_retrieval_table(report))
    print(f"results: {folder}")
    return report


def retrieval_main(argv: Sequence[str] | None = None) -> int:
    parser = retrieval_parser()
    args = parser.parse_args(argv)
    if args.fp16 and args.bf16:
        parser.error("--fp16 and --bf16 exclude each other")
    return run_script(evaluate_retrieval, args, parser.prog)


# ---------------------------------------------------------------------------------------------
# eval_tasks.py (VCR)
# ---------------------------------------------------------------------------------------------


def _vcr_results(
    task: TaskConfig,
    split: str,
    annotations: str,
    args: argparse.Namespace,
    ctx: DistContext,
    model: nn.Module,
    tokenizer: BertTokenizer,
    stores: FeatureStores,
) -> list[dict[str, Any]] | None:
    """Every sample of ``split`` scored, gathered on rank 0 in dataset order (None elsewhere)."""
    spec = TASKS[task.name]
    dataset = spec.build(
        dataclasses.replace(task, val_annotations_jsonpath=annotations), split, tokenizer, stores, args.seed
    )
    loader = DataLoader(
        Subset(dataset, _shard(len(dataset), ctx)),
        batch_size=args.batch_size or task.batch_size,
        collate_fn=spec.collate,
        num_workers=args.num_workers,
        pin_memory=ctx.device.type == "cuda",
    )
    precision = Precision.from_flags(args.fp16, args.bf16, ctx.device)
    conditioned = task.name == "VCR_QA-R" and not dataset.labelled
    with _progress(len(dataset), 1, "sample", ctx, args.quiet) as bar:
        results = predict(
            model,
            loader,
            spec.forward,
            precision,
            conditioned,
            lambda done: bar.update(min(done * ctx.world_size, bar.total - bar.n)),
        )
    gathered = gather_to_main(results)
    return None if gathered is None else [entry for part in gathered for entry in part]


def _vcr_split(args: argparse.Namespace, tasks: Sequence[TaskConfig]) -> str:
    """One split for every task: the Q->AR join and the leaderboard file pair their results."""
    if args.split:
        return args.split
    splits = sorted({task.val_split for task in tasks})
    if len(splits) > 1:
        raise EvaluationError(f"the tasks' val_split differ ({', '.join(splits)}); pass --split")
    return splits[0]


def evaluate_vcr(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any] | None:
    """Write each task's results file; then per-task accuracy, Q->AR or the leaderboard file (rank 0)."""
    yaml_path = resolve_task_config(args.task_config, (TASKS_YAML,))
    tasks = select_tasks(load_task_configs(yaml_path), args.tasks, yaml_path)
    for task in tasks:
        if task.name not in VCR_TASKS:
            raise EvaluationError(
                f"{yaml_path}: {task.key} is {task.name}; eval_tasks.py evaluates VCR tasks "
                "(use eval_retrieval.py for retrieval)"
            )
    split = _vcr_split(args, tasks)
    labelled = split != TEST_SPLIT
    if args.compute_q_ar and not labelled:
        raise EvaluationError(
            "--compute_q_ar needs labels; the test split has none (its leaderboard file is written instead)"
        )
    annotations = {task.key: split_annotations(task, split, yaml_path) for task in tasks}
    config, tokenizer = _config_and_tokenizer(args)
    model = load_model(InterBertForVLTasks, args, config, VCR_HEAD).to(ctx.device)
    folder = _make_run_folder(args, ctx)
    stores = FeatureStores(args.in_memory)

    summary: dict[str, Any] = {}
    for task in tasks:
        results = _vcr_results(task, split, annotations[task.key], args, ctx, model, tokenizer, stores)
        if results is None:
            continue
        path = os.path.join(folder, results_file_name(task.name, split))
        atomic_write_json(path, results)
        print(f"{task.name} {split}: {len(results)} results -> {path}")
        if labelled:
            label = "answer" if task.name == "VCR_Q-A" else "rationale"
            summary[task.name] = answer_accuracy(path, annotations[task.key], label)
            print(f"{task.name} {split}: accuracy {summary[task.name]:.2f}")
    if not ctx.is_main:
        return None

    qa_path = os.path.join(folder, results_file_name("VCR_Q-A", split))
    qar_path = os.path.join(folder, results_file_name("VCR_QA-R", split))
    annotation_file = annotations[tasks[0].key]
    if args.compute_q_ar:
        for path in (qa_path, qar_path):
            if not os.path.isfile(path):
                raise EvaluationError(f"--compute_q_ar: {path} not found; evaluate --tasks 1-2 on {split}")
        summary["q_ar"] = metrics = q_ar_from_files(qa_path, qar_path, annotation_file)
        print(f"VCR {split}: " + format_q_ar(metrics))
    if not labelled:
        if os.path.isfile(qa_path) and os.path.isfile(qar_path):
            csv_path = os.path.join(folder, f"VCR_{split}_submission.csv")
            count = leaderboard_from_files(qa_path, qar_path, annotation_file, csv_path)
            print(f"leaderboard submission: {count} questions -> {csv_path}")
        else:
            logger.warning(
                "the leaderboard file needs VCR_Q-A and VCR_QA-R results on %s: run --tasks 1-2", split
            )
    if summary:
        atomic_write_json(os.path.join(folder, f"VCR_{split}_metrics.json"), summary)
    return summary


def vcr_main(argv: Sequence[str] | None = None) -> int:
    parser = vcr_parser()
    args = parser.parse_args(argv)
    if args.fp16 and args.bf16:
        parser.error("--fp16 and --bf16 exclude each other")
    return run_script(evaluate_vcr, args, parser.prog)
