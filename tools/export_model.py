"""Convert an InterBERT checkpoint (a published or trained ``.bin``, raw or EMA) into a model folder.

    python tools/export_model.py save/RUN/pytorch_model_19_ema.bin \\
        --config_file config/bert_base_6layer_interbert.json --bert_model bert-base-uncased \\
        --output models/interbert-flickr30k --task vl

The folder holds config.json, model.safetensors, vocab.txt and a README.md model card; load it
with ``InterBertForVLTasks.from_pretrained(FOLDER)`` (or the pretraining class).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vilbert.cli import run_script
from vilbert.config import BertConfig
from vilbert.distributed import DistContext
from vilbert.model_export import export_checkpoint
from vilbert.model_folder import ModelFolderError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export_model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="state-dict file (.bin/.pt/.safetensors) or a folder holding one")
    parser.add_argument(
        "--config_file", required=True, help="the model config the checkpoint was trained with"
    )
    parser.add_argument(
        "--bert_model", required=True, help="vocab.txt, a folder holding it, or bert-base-uncased"
    )
    parser.add_argument("--output", required=True, help="the model folder to write")
    parser.add_argument(
        "--task",
        choices=("pretraining", "vl"),
        help="model class (default: vl when the task heads are present)",
    )
    parser.add_argument("--recipe", default="", help="how the model was trained, for the model card")
    parser.add_argument(
        "--metrics", help="JSON file of validation metrics (name -> value) for the model card"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(local_rank=-1, no_cuda=True)
    return parser


def _card(args: argparse.Namespace) -> dict:
    card: dict = {"recipe": args.recipe} if args.recipe else {}
    if args.metrics:
        try:
            with open(args.metrics, encoding="utf-8") as f:
                metrics = json.load(f)
        except json.JSONDecodeError as err:
            raise ModelFolderError(f"--metrics {args.metrics}: invalid JSON at line {err.lineno}") from None
        if not isinstance(metrics, dict):
            raise ModelFolderError(f"--metrics {args.metrics}: expected a JSON object of name -> value")
        card["metrics"] = metrics
    return card


def export(args: argparse.Namespace, ctx: DistContext) -> None:
    config = BertConfig.from_json_file(args.config_file)
    export_checkpoint(
        args.checkpoint, config, args.bert_model, args.output, args.task, args.overwrite, _card(args)
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_script(export, args, "export_model")


if __name__ == "__main__":
    sys.exit(main())
