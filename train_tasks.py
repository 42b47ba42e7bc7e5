"""Fine-tune InterBERT on Flickr30K retrieval and VCR; see ``python train_tasks.py --help`` and the README."""

import logging

from vilbert.finetuning import parse_args, run

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run(parse_args())
