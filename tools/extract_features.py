"""Extract bottom-up-attention region features from raw images into the LMDBs InterBERT reads.

    python tools/extract_features.py --images flickr30k_images/ --weights frcnn.bin \\
        --output data/flickr30k/flickr30k_resnet101_faster_rcnn_genome.lmdb
    python tools/extract_features.py --images cc_train/ --weights frcnn.bin \\
        --captions data/conceptual_captions/caption_train.json \\
        --pretrain_output data/conceptual_captions/training_feat_all.lmdb

The image id is the file name's stem. A rerun of an interrupted command resumes: images already
extracted (staged in a hidden .NAME.extract/ folder beside the output) are skipped, and the LMDBs
appear only once every image is done. Needs the features extra: pip install '.[features]'.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from vilbert.datasets.captions import load_caption_json
from vilbert.detector.extraction import ExtractionJob, extract_to_lmdb, list_images
from vilbert.detector.flags import add_pipeline_arguments, pipeline_config
from vilbert.detector.weights import LAYOUTS, load_detector
from vilbert.errors import EXIT_BAD_INPUT, BadInputError

PROG = "extract_features"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument(
        "--images", required=True, help="a folder of images, or a text file listing one path a line"
    )
    io.add_argument(
        "--weights", required=True, help="detector checkpoint (.bin lxmert, .pkl detectron2, .pth bua)"
    )
    io.add_argument("--weights_layout", choices=LAYOUTS, help="checkpoint layout (default: from the suffix)")
    io.add_argument("--output", help="region-feature LMDB to write (Flickr30K / VCR layout, a directory)")
    io.add_argument(
        "--pretrain_output", help="pretraining LMDB to write (Conceptual Captions, tensorpack layout)"
    )
    io.add_argument("--captions", help="caption JSON (image_id -> caption); needed for --pretrain_output")
    io.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    io.add_argument("--skip_bad_images", action="store_true", help="skip (and count) unreadable images")
    io.add_argument(
        "--shard_size", type=int, default=256, help="images per staged shard (resume granularity)"
    )
    run = parser.add_argument_group("device")
    run.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)
    if args.output is None and args.pretrain_output is None:
        parser.error("give --output and/or --pretrain_output")
    if args.pretrain_output is not None and args.captions is None:
        parser.error("--pretrain_output needs --captions")
    if args.shard_size < 1:
        parser.error("--shard_size must be >= 1")
    return args


def resolve_device(name: str) -> str:
    """``auto`` is CUDA when PyTorch sees a GPU, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {name}: PyTorch sees no CUDA device")
    return name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        job = ExtractionJob(
            images=list_images(args.images),
            output=args.output,
            pretrain_output=args.pretrain_output,
            captions=(
                load_caption_json(args.captions, allow_empty=True, allow_blank=False)
                if args.captions
                else None
            ),
            captions_source=args.captions or "the captions",
            overwrite=args.overwrite,
            skip_bad_images=args.skip_bad_images,
            shard_size=args.shard_size,
        )
        device = resolve_device(args.device)
        detector = load_detector(args.weights, pipeline_config(args), args.weights_layout, device=device)
        stats = extract_to_lmdb(detector, job)
    except (BadInputError, OSError) as err:  # bad flags or files, an existing output, a full disk
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.info(
        "extracted %d images (%d already extracted), %d unreadable skipped, %d without caption; wrote %s",
        stats.extracted, stats.already_done, len(stats.bad_images), stats.without_caption,
        ", ".join(f"{path} ({count})" for path, count in stats.written.items()),
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
