"""Write the grounded synthetic world (Conceptual Captions, Flickr30K and VCR look-alikes + task YAMLs).

python tools/make_synthetic_data.py --output_dir data/synthetic --seed 0 --small
"""

from __future__ import annotations

import argparse
import logging
import sys

from vilbert.datasets.synthetic import (
    SyntheticWorldConfig,
    check_vocabulary,
    generate_synthetic_world,
    replace_sizes,
)
from vilbert.tokenization import default_vocab_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--small", action="store_true", help="tiny preset matching config/interbert_tiny.json"
    )
    parser.add_argument("--feature_dim", type=int, help="region feature width (default 2048, --small 64)")
    parser.add_argument(
        "--num_classes", type=int, help="detector classes incl. background (1601, --small 41)"
    )
    parser.add_argument("--max_boxes", type=int, help="detected boxes per image at most (36, --small 10)")
    parser.add_argument("--num_images", type=int, help="pretraining training images")
    parser.add_argument("--flickr_train_images", type=int, help="Flickr30K training images")
    parser.add_argument("--vcr_train_questions", type=int, help="VCR training questions")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing synthetic world")
    parser.add_argument(
        "--vocab", help="check the world's words against this vocab.txt (default: the shipped one)"
    )
    return parser.parse_args(argv)


def _default_vocab() -> str | None:
    try:
        return default_vocab_path()
    except FileNotFoundError as err:
        logging.warning("not checking the synthetic words against a vocabulary: %s", err)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    base = SyntheticWorldConfig.small(args.seed) if args.small else SyntheticWorldConfig(seed=args.seed)
    config = replace_sizes(
        base,
        feature_dim=args.feature_dim,
        num_classes=args.num_classes,
        max_boxes=args.max_boxes,
        pretrain_train_images=args.num_images,
        flickr_train_images=args.flickr_train_images,
        vcr_train_questions=args.vcr_train_questions,
    )
    try:
        vocab = args.vocab or _default_vocab()
        if vocab is not None:
            check_vocabulary(vocab)
        generate_synthetic_world(args.output_dir, config, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"make_synthetic_data: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
