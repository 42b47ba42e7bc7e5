"""Build Flickr30K's hard_negative.pkl: each training image's nearest images by global-feature cosine.

    python tools/build_hard_negatives.py --features flickr30k_resnet101_faster_rcnn_genome.lmdb \\
        --annotations all_data_final_train_2014.jsonline --output hard_negative.pkl --pool_size 100
"""

from __future__ import annotations

import argparse
import logging
import sys

from vilbert.datasets.hard_negatives import hard_negatives_from_annotations
from vilbert.errors import EXIT_BAD_INPUT, BadInputError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", required=True, help="region-feature LMDB holding the training images")
    parser.add_argument("--annotations", required=True, help="training .jsonline (one image per line)")
    parser.add_argument("--output", required=True, help="where to write hard_negative.pkl")
    parser.add_argument(
        "--pool_size", type=int, default=100, help="images per pool row, the image itself included"
    )
    parser.add_argument("--chunk", type=int, default=1024, help="rows of the similarity matrix held at once")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    for flag, minimum in (("pool_size", 2), ("chunk", 1)):  # the image itself and one negative
        if getattr(args, flag) < minimum:
            parser.error(f"--{flag} must be at least {minimum}, got {getattr(args, flag)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        hard_negatives_from_annotations(
            args.features, args.annotations, args.output, args.pool_size, args.chunk, args.overwrite
        )
    except (BadInputError, OSError) as err:  # bad or damaged input, an existing output, a full disk
        print(f"build_hard_negatives: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
