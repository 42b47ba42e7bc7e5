"""``python -m vilbert.rank``: the best images for each caption, and the best captions for each image.

The model is a model folder (``--from_pretrained FOLDER``) or a checkpoint with its
``--config_file``; images come from a region-feature LMDB (``--features``), all of them unless
``--image_ids`` names some; captions from ``--caption`` (repeatable) and/or ``--captions_file`` (one
per line, blank lines skipped). Every caption is scored against every image by the ITM head, as
``eval_retrieval.py`` scores them. The terminal gets a table: each caption's top images, and, when
``--image_ids`` is given, each of those images' top captions; ``--output`` gets the same as JSON.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from tqdm import tqdm

from vilbert.atomic import atomic_write_json
from vilbert.cli import run_script
from vilbert.distributed import DistContext
from vilbert.inference import (
    CaptionRanking,
    ImageRanking,
    InferenceError,
    LoadedModel,
    Ranker,
    RankSettings,
    checked_captions,
    load_model,
    open_features,
)
from vilbert.training_args import positive_int

logger = logging.getLogger(__name__)

PROG = "python -m vilbert.rank"
CAPTION_WIDTH = 60


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model and feature flags shared by ``vilbert.rank`` and ``vilbert.attention_maps``."""
    p.add_argument(
        "--from_pretrained", required=True, help="a model folder, or a checkpoint (.bin) with --config_file"
    )
    p.add_argument("--config_file", help="the checkpoint's config (not needed for a model folder)")
    p.add_argument(
        "--bert_model", help="vocab.txt or a folder holding it (default: the model folder's, else bert-base)"
    )
    p.add_argument("--features", required=True, help="region-feature LMDB of the images")
    p.add_argument(
        "--max_seq_length", type=positive_int, default=30, help="tokens per caption, [CLS] and [SEP] in"
    )
    p.add_argument(
        "--max_region_num", type=positive_int, default=102, help="regions per image, global one in"
    )
    p.add_argument("--no_cuda", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(local_rank=-1)


def loaded_model(args: argparse.Namespace, ctx: DistContext) -> LoadedModel:
    return load_model(args.from_pretrained, args.config_file, args.bert_model, ctx.device)


def check_output(path: str | None, overwrite: bool) -> None:
    """Refuse, before any work, to replace an existing output unless asked to."""
    if path and os.path.lexists(path) and not overwrite:
        raise InferenceError(f"{path} already exists; pass --overwrite to replace it")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--caption", action="append", default=[], help="a caption to rank images for (repeatable)")
    p.add_argument("--captions_file", help="captions, one per line (blank lines skipped)")
    p.add_argument("--image_ids", nargs="+", help="the images to rank (default: every image of --features)")
    p.add_argument(
        "--top_k", type=positive_int, default=5, help="best images per caption / captions per image"
    )
    p.add_argument("--output", help="write the rankings as JSON here")
    p.add_argument("--pairs_per_forward", type=positive_int, help="(caption, image) pairs per forward")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="autocast float16 (GPU)")
    precision.add_argument("--bf16", action="store_true", help="autocast bfloat16")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def read_captions(inline: Sequence[str], captions_file: str | None) -> list[str]:
    """``--caption`` values, then the lines of ``--captions_file``; at least one caption in all."""
    captions = checked_captions(inline) if inline else []
    if captions_file is not None:
        if not os.path.isfile(captions_file):
            raise InferenceError(f"--captions_file {captions_file}: no such file")
        with open(captions_file, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        from_file = [line for line in lines if line]
        if not from_file:
            raise InferenceError(f"--captions_file {captions_file}: no captions in it (one per line)")
        captions += from_file
    if not captions:
        raise InferenceError("no captions: give --caption TEXT or --captions_file FILE")
    return captions


def _clip(text: str, width: int = CAPTION_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_rankings(by_caption: Sequence[CaptionRanking], by_image: Sequence[ImageRanking]) -> str:
    """The terminal table: per caption its best images, per image its best captions."""
    lines: list[str] = []
    for number, ranking in enumerate(by_caption, 1):
        lines += [f"caption {number}: {_clip(ranking.caption)}", f"  {'rank':>4}  {'score':>7}  image"]
        lines += [f"  {hit.rank:>4}  {hit.score:>7.4f}  {hit.image_id}" for hit in ranking.hits]
    for ranking in by_image:
        lines += [f"image {ranking.image_id}", f"  {'rank':>4}  {'score':>7}  caption"]
        lines += [
            f"  {hit.rank:>4}  {hit.score:>7.4f}  {hit.caption_index + 1}: {_clip(hit.caption)}"
            for hit in ranking.hits
        ]
    return "\n".join(lines)


def rank(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any]:
    """Load, score every caption against every image, print the table, write the JSON."""
    check_output(args.output, args.overwrite)
    captions = read_captions(args.caption, args.captions_file)
    features = open_features(args.features)
    settings = RankSettings(
        max_seq_length=args.max_seq_length,
        max_region_num=args.max_region_num,
        precision="fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
        pairs_per_forward=args.pairs_per_forward,
    )
    ranker = Ranker(loaded_model(args, ctx), features, settings)
    image_ids = ranker.checked_image_ids(args.image_ids)
    total = len(captions) * len(image_ids)
    with tqdm(total=total, unit="pair", disable=args.quiet or not sys.stderr.isatty()) as bar:
        matrix = ranker.score(captions, image_ids, bar.update)
    by_caption = matrix.images_per_caption(args.top_k)
    by_image = matrix.captions_per_image(args.top_k) if args.image_ids else []
    print(format_rankings(by_caption, by_image))
    report = {
        "model": args.from_pretrained,
        "config_file": args.config_file,
        "features": args.features,
        "top_k": args.top_k,
        "num_captions": len(captions),
        "num_images": len(image_ids),
        "images_per_caption": [asdict(ranking) for ranking in by_caption],
        "captions_per_image": [asdict(ranking) for ranking in by_image],
    }
    if args.output:
        atomic_write_json(args.output, report)
        logger.info("wrote %s", args.output)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(rank, parse_args(argv), PROG)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sys.exit(main())
