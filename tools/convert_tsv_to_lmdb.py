"""Convert bottom-up-attention TSV feature files to the region-feature LMDB and/or the pretraining LMDB.

    python tools/convert_tsv_to_lmdb.py --input a.tsv b.tsv --output flickr30k_features.lmdb
    python tools/convert_tsv_to_lmdb.py --input train.tsv --captions caption_train.json \\
        --pretrain_output training_feat_all.lmdb
"""

from __future__ import annotations

import argparse
import logging
import sys

from vilbert.datasets.captions import load_caption_json
from vilbert.datasets.tsv import convert_tsv_to_lmdb
from vilbert.errors import EXIT_BAD_INPUT, BadInputError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="one or more bottom-up-attention TSV files")
    parser.add_argument("--output", help="region-feature LMDB to write (a directory; docs/data.md §1)")
    parser.add_argument(
        "--pretrain_output", help="pretraining LMDB to write (single file, tensorpack layout)"
    )
    parser.add_argument("--captions", help="JSON dict image_id -> caption; needed for --pretrain_output")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--feature_dim", type=int, default=2048, help="width of each region feature")
    parser.add_argument(
        "--serializer", choices=("msgpack", "pickle"), default="msgpack", help="pretraining value encoding"
    )
    args = parser.parse_args(argv)
    if args.output is None and args.pretrain_output is None:
        parser.error("give --output and/or --pretrain_output")
    if args.pretrain_output is not None and args.captions is None:
        parser.error("--pretrain_output needs --captions")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        captions = None
        if args.captions:
            captions = load_caption_json(args.captions, allow_empty=True, allow_blank=False)
        stats = convert_tsv_to_lmdb(
            args.input,
            output=args.output,
            pretrain_output=args.pretrain_output,
            captions=captions,
            overwrite=args.overwrite,
            feature_dim=args.feature_dim,
            serializer=args.serializer,
            progress=sys.stderr.isatty(),  # a bar in a log file is noise before the error line
            captions_source=args.captions or "the captions",
        )
    except (BadInputError, OSError) as err:  # bad or damaged input, an existing output, a full disk
        print(f"convert_tsv_to_lmdb: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.info(
        "converted %d images (%d region-feature, %d pretraining)",
        stats.images,
        stats.region_images,
        stats.pretrain_datapoints,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
