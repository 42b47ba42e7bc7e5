"""Measure how closely this extractor reproduces released bottom-up-attention features.

For a user with the public detector weights and the released Flickr30K feature LMDB:

    # 1. the checkpoint's key/shape inventory (and whether it loads strictly)
    python tools/verify_features.py --weights frcnn.bin --inventory
    # 2. re-extract K released images: given boxes (cosine, class argmax) and full (IoU matching)
    python tools/verify_features.py --weights frcnn.bin --images flickr30k_images/ \\
        --released data/flickr30k/flickr30k_test_resnet101_faster_rcnn_genome.lmdb --num_images 100
    # 3. retrieval R@1 of a released checkpoint on re-extracted vs released features
    python tools/extract_features.py --images test_images.txt --weights frcnn.bin --output ours_test.lmdb
    python tools/verify_features.py --weights frcnn.bin --retrieval_checkpoint flickr30k_finetuned.bin \
        --config_file config/bert_base_6layer_interbert.json --task_config interbert_tasks_eval.yml \
        --reextracted ours_test.lmdb

Targets: median cosine >= 0.99 with the released boxes given; the class argmax should agree on
nearly every box. Needs the features extra: pip install '.[features]'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile

import yaml

from vilbert.datasets.features import MissingImageError, RegionFeatureStore
from vilbert.detector.extraction import image_id_of, list_images
from vilbert.detector.flags import add_pipeline_arguments, pipeline_config
from vilbert.detector.preprocess import read_image_bgr
from vilbert.detector.verification import AgreementReport, compare_image
from vilbert.detector.weights import LAYOUTS, inventory, load_detector
from vilbert.distributed import init_distributed
from vilbert.errors import EXIT_BAD_INPUT, BadInputError
from vilbert.retrieval_eval import evaluate_retrieval, retrieval_parser
from vilbert.tasks import TaskConfig, load_task_configs

PROG = "verify_features"
PUBLISHED_TASK_FIELDS = [f.name for f in dataclasses.fields(TaskConfig) if f.name != "key"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--weights", required=True, help="detector checkpoint (.bin, .pkl, .pth or canonical .pt)"
    )
    parser.add_argument(
        "--weights_layout", choices=LAYOUTS, help="checkpoint layout (default: from the suffix)"
    )
    parser.add_argument(
        "--inventory", action="store_true", help="print every key and shape, then load strictly"
    )
    parser.add_argument("--images", help="folder or list of the released images (file stem = image id)")
    parser.add_argument("--released", help="released region-feature LMDB to compare with")
    parser.add_argument("--num_images", type=int, default=100, help="how many images to re-extract (K)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--report", help="also write the summary as JSON here")
    retrieval = parser.add_argument_group("retrieval R@1 on re-extracted vs released features")
    retrieval.add_argument("--retrieval_checkpoint", help="a fine-tuned Flickr30K checkpoint to evaluate")
    retrieval.add_argument("--reextracted", help="the re-extracted region-feature LMDB of the split")
    retrieval.add_argument("--task_config", default="interbert_tasks_eval.yml", help="the eval task YAML")
    retrieval.add_argument("--config_file", default="config/bert_base_6layer_interbert.json")
    retrieval.add_argument("--bert_model", default="bert-base-uncased", help="vocab.txt or its folder")
    retrieval.add_argument("--split", default="test", help="the split to evaluate")
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)
    comparing = args.images is not None and args.released is not None
    if not (args.inventory or comparing or args.retrieval_checkpoint):
        parser.error("give --inventory, --images and --released, or --retrieval_checkpoint")
    if args.retrieval_checkpoint and not args.reextracted:
        parser.error("--retrieval_checkpoint needs --reextracted (the re-extracted LMDB of the split)")
    if args.num_images < 1:
        parser.error("--num_images must be >= 1")
    return args


def _print_inventory(path: str) -> None:
    for key, shape in inventory(path):
        print(f"{key}\t{list(shape)}")


def _compare(args: argparse.Namespace) -> dict[str, float]:
    detector = load_detector(args.weights, pipeline_config(args), args.weights_layout, device=args.device)
    store = RegionFeatureStore(args.released)
    report = AgreementReport()
    chosen = [p for p in list_images(args.images) if image_id_of(p) in store or str(image_id_of(p)) in store]
    if not chosen:
        raise MissingImageError(f"none of the images of {args.images} is in {args.released}")
    for path in chosen[: args.num_images]:
        compare_image(detector, read_image_bgr(path), store[image_id_of(path)], report)
    return report.summary()


def _retrieval_r1(args: argparse.Namespace) -> dict[str, float]:
    """R@1 (image retrieval) of the checkpoint on the YAML's released features and on the re-extracted
    ones, through ``eval_retrieval.py``'s own evaluation (a copy of the YAML pointing at each LMDB)."""
    configs = load_task_configs(args.task_config)
    key, task = next((k, t) for k, t in configs.items() if t.name == "RetrievalFlickr30k")
    ctx = init_distributed(-1, no_cuda=not str(args.device).startswith("cuda"))
    summary = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, features in (("released", task.features_h5path1), ("reextracted", args.reextracted)):
            entry = {name: getattr(task, name) for name in PUBLISHED_TASK_FIELDS}
            entry["features_h5path1"] = os.path.abspath(features)
            task_yaml = os.path.join(scratch, f"{label}.yml")
            with open(task_yaml, "w", encoding="utf-8") as handle:
                yaml.safe_dump({key: entry}, handle)
            argv = [
                "--bert_model", args.bert_model, "--from_pretrained", args.retrieval_checkpoint,
                "--config_file", args.config_file, "--task", key.removeprefix("TASK"), "--split", args.split,
                "--task_config", task_yaml, "--output_dir", os.path.join(scratch, "results"),
                "--save_name", label, "--quiet",
            ]  # fmt: skip
            report = evaluate_retrieval(retrieval_parser().parse_args(argv), ctx)
            summary[f"r1_{label}"] = float(report["image_retrieval"]["r1"])
    summary["r1_difference"] = summary["r1_reextracted"] - summary["r1_released"]
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.inventory:
            _print_inventory(args.weights)
            load_detector(args.weights, pipeline_config(args), args.weights_layout)
            print(f"{args.weights}: loads with no missing or unexpected keys")
        summary: dict[str, float] = {}
        if args.images is not None and args.released is not None:
            summary.update(_compare(args))
        if args.retrieval_checkpoint:
            summary.update(_retrieval_r1(args))
        for name, value in summary.items():
            print(f"{name}\t{value:.4f}")
        if summary and args.report:
            with open(args.report, "w", encoding="utf-8") as handle:
                json.dump(summary, handle, indent=2)
    except (BadInputError, OSError, MissingImageError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
