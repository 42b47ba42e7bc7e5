"""Pretrain InterBERT on Conceptual Captions; see ``python train_concap.py --help`` and the README."""

import logging

from vilbert.pretraining import parse_args, run

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run(parse_args())
