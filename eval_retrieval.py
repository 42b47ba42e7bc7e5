"""Evaluate Flickr30K retrieval (fine-tuned or --zero_shot); see ``python eval_retrieval.py --help``."""

import logging
import sys

from vilbert.retrieval_eval import retrieval_main

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sys.exit(retrieval_main())
