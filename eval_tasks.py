"""Evaluate VCR (Q->A, QA->R, Q->AR, leaderboard file); see ``python eval_tasks.py --help``."""

import logging
import sys

from vilbert.vcr_eval import vcr_main

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sys.exit(vcr_main())
