"""Q->A, QA->R and Q->AR of two VCR results files, joined with the split's labels by question id.

python tools/compute_q_ar.py --qa VCR_Q-A_val_result.json --qar VCR_QA-R_val_result.json \
    --annotations data/VCR/val.jsonl
With --submission OUT.csv (test split, no labels): write the leaderboard file instead.
"""

from __future__ import annotations

import argparse
import sys

from vilbert.errors import EXIT_BAD_INPUT, BadInputError
from vilbert.vcr_eval import format_q_ar, leaderboard_from_files, load_results_pair, q_ar_from_files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--qa", required=True, help="Q->A results (VCR_Q-A_<split>_result.json)")
    parser.add_argument("--qar", required=True, help="QA->R results (VCR_QA-R_<split>_result.json)")
    parser.add_argument("--annotations", required=True, help="the split's annotation .jsonl")
    parser.add_argument("--submission", help="write the leaderboard CSV here instead of computing accuracies")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.submission:
            load_results_pair(args.qa, args.qar)  # refuse swapped files before writing anything
            count = leaderboard_from_files(args.qa, args.qar, args.annotations, args.submission)
            print(f"leaderboard submission: {count} questions -> {args.submission}")
        else:
            print(format_q_ar(q_ar_from_files(args.qa, args.qar, args.annotations)))
    except (BadInputError, ValueError, OSError) as err:
        print(f"compute_q_ar: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
