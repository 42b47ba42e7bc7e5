"""The data doctor: check a data set before spending GPU hours on it.

    python -m vilbert.check_data --task_config interbert_tasks.yml --tasks 1-2-3
    python -m vilbert.check_data --train_data_dir data/conceptual_captions \
        --val_data_dir data/conceptual_captions --train_batch_size 64

It reads the task YAML (or the pretraining folders) through the training code's own readers, checks
paths, image ids, feature dimensions, box layout, region counts, hard negatives, caption coverage,
VCR object references and batch sizes, prints a table, and estimates the data-loading time of an
epoch from a short probe of the real dataset. Exit status 0 when everything holds, 2 otherwise;
every problem is one line naming the file and the key.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from vilbert.cli import run_script
from vilbert.config import BertConfig
from vilbert.data_checks import (
    DATA_ERRORS,
    CheckResult,
    DataProblemError,
    PretrainingData,
    RunShape,
    check_pretraining_data,
    check_task_data,
    problems_of,
)
from vilbert.datasets.concept_cap import ConceptCapDataset, pretraining_files
from vilbert.distributed import DistContext
from vilbert.finetuning import per_process_batch
from vilbert.tasks import TASKS, FeatureStores, TaskConfig, load_task_configs, select_tasks
from vilbert.tokenization import BertTokenizer

PROG = "check_data"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task_config", default="interbert_tasks.yml", help="the task YAML")
    p.add_argument("--tasks", default="", help="task numbers of the YAML joined by '-', e.g. 1-2-3")
    p.add_argument(
        "--train_data_dir", default="", help="pretraining: training_feat_all.lmdb + caption_train.json"
    )
    p.add_argument("--val_data_dir", default="", help="pretraining: validation_all.lmdb + caption_val.json")
    p.add_argument("--config_file", default="config/bert_base_6layer_interbert.json", help="the model config")
    p.add_argument("--bert_model", default="bert-base-uncased", help="vocab.txt or a folder holding it")
    p.add_argument("--world_size", type=int, default=1, help="processes the run will use")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--train_batch_size", type=int, default=512, help="pretraining batch per process")
    p.add_argument("--max_seq_length", type=int, default=36, help="pretraining caption length")
    p.add_argument("--region_len", type=int, default=36, help="pretraining regions per image")
    p.add_argument("--predict_feature", action="store_true", help="pretraining regresses features")
    p.add_argument(
        "--sample_images",
        type=int,
        default=500,
        help="images per feature file whose contents are read (0: all)",
    )
    p.add_argument("--probe_batches", type=int, default=3, help="batches timed per dataset (0: no probe)")
    p.set_defaults(local_rank=-1, no_cuda=True)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.tasks and not (args.train_data_dir or args.val_data_dir):
        parser.error("nothing to check: give --tasks and/or --train_data_dir and --val_data_dir")
    if bool(args.train_data_dir) != bool(args.val_data_dir):
        parser.error("pretraining needs both --train_data_dir and --val_data_dir")
    for flag in ("world_size", "gradient_accumulation_steps", "train_batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    return args


def seconds_per_batch(dataset: Dataset, collate: Callable, batch_size: int, batches: int) -> float:
    """Mean time of reading a random batch (``__getitems__`` where the dataset has it, else
    ``__getitem__`` per index) plus its collate, as one loader worker does it."""
    rng = np.random.default_rng(0)
    size = min(batch_size, len(dataset))
    read = getattr(dataset, "__getitems__", None) or (lambda indices: [dataset[i] for i in indices])
    start = time.perf_counter()
    for _ in range(batches):
        collate(read([int(i) for i in rng.choice(len(dataset), size=size, replace=False)]))
    return (time.perf_counter() - start) / batches


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _estimate(result: CheckResult, dataset: Dataset, collate: Callable, batch: int, args) -> CheckResult:
    per_batch = seconds_per_batch(dataset, collate, batch, args.probe_batches)
    steps = math.ceil(len(dataset) / args.world_size / batch)
    result.count = len(dataset)
    result.note = (
        f"~{format_duration(per_batch * steps)} per epoch and process on one loader worker "
        f"({steps} batches of {batch} at {per_batch * 1000:.3g} ms, {args.probe_batches} timed)"
    )
    return result


def probe_task(task: TaskConfig, tokenizer: BertTokenizer, args: argparse.Namespace) -> CheckResult:
    result = CheckResult(f"{task.key} {task.name}: data loading time (probe of {task.train_split})")
    spec = TASKS[task.name]
    try:
        dataset = spec.build(task, task.train_split, tokenizer, FeatureStores(), 0)
        batch = per_process_batch(task, args.gradient_accumulation_steps, args.world_size)
        return _estimate(result, dataset, spec.collate, batch, args)
    except DATA_ERRORS as err:
        result.problems.append(str(err))
        return result


def probe_pretraining(tokenizer: BertTokenizer, args: argparse.Namespace) -> CheckResult:
    result = CheckResult("pretraining: data loading time (probe of train)")
    try:
        files = pretraining_files(args.train_data_dir, "train")
        dataset = ConceptCapDataset(
            files.lmdb_path,
            files.caption_json,
            tokenizer,
            max_seq_length=args.max_seq_length,
            region_len=args.region_len,
            predict_feature=args.predict_feature,
        )
        batch = args.train_batch_size // args.gradient_accumulation_steps
        return _estimate(result, dataset, dataset.collate_fn(), batch, args)
    except DATA_ERRORS as err:
        result.problems.append(str(err))
        return result


def run_probes(args: argparse.Namespace, healthy: bool) -> list[CheckResult]:
    """Time the datasets only when the checks hold: a broken data set would fail half-way."""
    if args.probe_batches < 1:
        return []
    if not healthy:
        return [CheckResult("data loading time (probe)", note="fix the problems first", skipped=True)]
    tokenizer = BertTokenizer(args.bert_model)
    results = []
    if args.tasks:
        configs = select_tasks(load_task_configs(args.task_config), args.tasks, args.task_config)
        results += [probe_task(task, tokenizer, args) for task in configs]
    if args.train_data_dir:
        results.append(probe_pretraining(tokenizer, args))
    return results


def format_report(results: Sequence[CheckResult]) -> str:
    """The table (what, count, status, note), then every problem and warning on its own line."""
    width = max(len(r.what) for r in results)
    rows = [f"{'what':<{width}}  {'count':>7}  status"]
    for r in results:
        count = "" if r.count is None else str(r.count)
        rows.append(f"{r.what:<{width}}  {count:>7}  {r.status}" + (f"  {r.note}" if r.note else ""))
    rows += [f"problem: {line}" for r in results for line in r.problems]
    rows += [f"warning: {line}" for r in results for line in r.warnings]
    return "\n".join(rows)


def check(args: argparse.Namespace, ctx: DistContext) -> None:
    config = BertConfig.from_json_file(args.config_file)
    shape = RunShape(
        config, args.config_file, args.world_size, args.gradient_accumulation_steps, args.sample_images
    )
    results: list[CheckResult] = []
    if args.tasks:
        results += check_task_data(args.task_config, args.tasks, shape)
    if args.train_data_dir:
        data = PretrainingData(
            args.train_data_dir,
            args.val_data_dir,
            args.train_batch_size,
            args.region_len,
            args.predict_feature,
        )
        results += check_pretraining_data(data, shape)
    results += run_probes(args, not problems_of(results))
    print(format_report(results), flush=True)
    problems = problems_of(results)
    if problems:
        raise DataProblemError(f"{len(problems)} problem(s) in the data; each is listed above")
    print("all checks hold")


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(check, parse_args(argv), PROG)


if __name__ == "__main__":
    sys.exit(main())
