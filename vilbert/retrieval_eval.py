"""Flickr30K retrieval evaluation (``eval_retrieval.py``): fine-tuned or ``--zero_shot``.

Every caption of the split is scored against every image by :class:`RetrievalScorer`; the report
gives image retrieval (the paper's R@1/5/10) and text retrieval from the same score matrix, each
caption's best images, and the matrix itself (``scores_<split>.npy``).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vilbert.atomic import atomic_write, atomic_write_json
from vilbert.datasets.features import RegionFeatureStore
from vilbert.datasets.loader import loader_workers
from vilbert.datasets.retrieval import RetrievalEvalDataset, collate_retrieval, pad_regions
from vilbert.distributed import DistContext, gather_to_main, min_across_ranks
from vilbert.evaluation import (
    EVAL_YAML,
    ITM_HEAD,
    TASKS_YAML,
    EvaluationError,
    add_new_flags,
    base_parser,
    check_head_trained,
    command_main,
    config_and_tokenizer,
    load_model,
    make_run_folder,
    progress,
    resolve_task_config,
    split_annotations,
)
from vilbert.metrics import image_retrieval_metrics, text_retrieval_metrics, top_k_images
from vilbert.modeling import InterBertForMultiModalPreTraining, InterBertForVLTasks
from vilbert.precision import Precision, use_tf32
from vilbert.retrieval_scorer import TOP_K, RetrievalScorer, block_size, default_memory_budget
from vilbert.tasks import FeatureStores, TaskConfig, load_task_configs, select_tasks
from vilbert.training_args import add_compile_flag, compile_mode, positive_int

logger = logging.getLogger(__name__)

RETRIEVAL_TASK = "RetrievalFlickr30k"
IMAGE_CHUNK = 32


def retrieval_report(
    scores: np.ndarray, caption_image_index: np.ndarray, image_ids: Sequence[int], top_k: int = TOP_K
) -> dict[str, Any]:
    """Both directions' metrics and each caption's best ``top_k`` image ids, from the matrix alone
    (so a saved ``scores_<split>.npy`` can be re-evaluated without the model)."""
    image_metrics = image_retrieval_metrics(scores, caption_image_index)
    text_metrics = text_retrieval_metrics(scores, caption_image_index)
    ids = np.asarray(image_ids)
    return {
        "num_captions": int(scores.shape[0]),
        "num_images": int(scores.shape[1]),
        "image_retrieval": image_metrics,
        "text_retrieval": text_metrics,
        "image_ids": ids.tolist(),
        "caption_image_ids": ids[np.asarray(caption_image_index)].tolist(),
        "top_k": top_k,
        "top_image_ids": ids[top_k_images(scores, top_k)].tolist(),
    }


def retrieval_parser() -> argparse.ArgumentParser:
    p = base_parser(
        "eval_retrieval.py",
        "Flickr30K caption-based image retrieval (and text retrieval): every caption against every image.",
        tasks="3",
        batch_size=1,
        batch_help="published flag, accepted: forwards hold --pairs_per_forward (caption, image) pairs "
        "spanning captions, so neither speed nor scores depend on it",
    )
    p.add_argument("--zero_shot", action="store_true", help="score with the pretraining model's ITM head")
    new = add_new_flags(p, f"{EVAL_YAML}, else {TASKS_YAML}")
    new.add_argument(
        "--max_captions", type=positive_int, help="evaluate the first N captions (against all images)"
    )
    new.add_argument(
        "--pairs_per_forward",
        type=positive_int,
        help="(caption, image) pairs per forward (default: what fits 2 GiB on CPU, 1/4 of a GPU)",
    )
    add_compile_flag(new, "the scorer's encoder and ITM head (dynamic shapes: blocks differ in width)")
    return p


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
    config, tokenizer = config_and_tokenizer(args)
    features = FeatureStores(args.in_memory)(task.features_h5path1)
    dataset = RetrievalEvalDataset(
        annotations, features, tokenizer, task.max_seq_length, task.max_region_num, rules=args.recipe
    )
    num_captions = min(args.max_captions or len(dataset), len(dataset))

    model_class = InterBertForMultiModalPreTraining if args.zero_shot else InterBertForVLTasks
    model = load_model(model_class, args, config, ITM_HEAD).to(ctx.device)
    zero_shot = check_head_trained(args.from_pretrained, task.name, args.zero_shot) or args.zero_shot
    precision = Precision.from_flags(args.fp16, args.bf16, ctx.device)
    use_tf32(args.tf32)
    folder = make_run_folder(args, ctx, "-zero_shot" if args.zero_shot else "")

    images = DataLoader(
        _PaddedImages(features, dataset.image_ids, task.max_region_num),
        batch_size=IMAGE_CHUNK,
        collate_fn=collate_retrieval,
        num_workers=loader_workers(args.num_workers * ctx.world_size, ctx.world_size, 1),
        pin_memory=ctx.device.type == "cuda",
    )
    pairs = args.pairs_per_forward or block_size(
        config,
        task.max_region_num,
        task.max_seq_length,
        num_captions * dataset.num_images,
        default_memory_budget(ctx.device),
    )
    compiled = None if args.compile is None else {"mode": compile_mode(args.compile)}
    scorer = RetrievalScorer(model, precision, min_across_ranks(pairs), compile_options=compiled)
    bank = scorer.embed_images(images, dataset.num_images)
    stream = scorer.stream(
        {key: torch.from_numpy(value[:num_captions]) for key, value in dataset.captions.items()}, bank
    )
    logger.info(
        "%s %s: %d captions x %d images, %d pairs per forward, %d rank(s); %s",
        task.name, split, num_captions, dataset.num_images, scorer.pairs_per_forward, ctx.world_size,
        stream.padding(),
    )  # fmt: skip
    with progress(stream.total, dataset.num_images, "caption", ctx, args.quiet) as bar:
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
        "mode": "zero-shot" if zero_shot else "fine-tuned",
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
    return command_main(retrieval_parser(), evaluate_retrieval, argv)
