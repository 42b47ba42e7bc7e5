"""The command-line flags both training scripts share, declared once, with the published spellings.

Published flags keep their names and defaults (each script passes its own defaults where the two
published scripts differ); the additions are grouped under "new in this implementation".
Booleans that the published scripts declared with ``type=bool`` (where ``--do_lower_case False``
meant True) parse as booleans here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from vilbert.distributed import add_local_rank_args
from vilbert.optimization import OPTIMIZERS
from vilbert.recipe import RECIPES
from vilbert.run_folder import RESUME_ANYWAY_FLAG

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def add_compile_flag(group: argparse._ArgumentGroup, what: str) -> None:
    """``--compile [MODE]``: torch.compile ``what``; ``reduce-overhead`` adds CUDA graphs on a GPU."""
    group.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        metavar="MODE",
        help=f"torch.compile {what}; MODE: {', '.join(COMPILE_MODES)} (reduce-overhead: CUDA graphs)",
    )


def compile_mode(mode: str) -> str | None:
    """The ``mode`` argument of torch.compile for a ``--compile`` value (None is torch's default)."""
    return None if mode == "default" else mode


def str_to_bool(value: str) -> bool:
    """``--do_lower_case False`` is False; ``true/false``, ``yes/no``, ``1/0`` in any case."""
    lowered = value.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def proportion(value: str) -> float:
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return number


@dataclass(frozen=True)
class TrainingDefaults:
    """Where the two published scripts' defaults differ."""

    learning_rate: float
    seed: int
    num_workers: int
    workers_help: str


def add_published_flags(p: argparse.ArgumentParser, defaults: TrainingDefaults) -> None:
    """The flags of both published scripts, in their order."""
    p.add_argument("--bert_model", default="bert-base-uncased", help="vocab.txt or a folder holding it")
    p.add_argument("--output_dir", default="save", help="runs go to OUTPUT_DIR/<run name>")
    p.add_argument(
        "--config_file", default="config/bert_base_6layer_interbert.json", help="model configuration JSON"
    )
    p.add_argument("--learning_rate", default=defaults.learning_rate, type=non_negative_float, help="peak lr")
    p.add_argument(
        "--warmup_proportion", default=0.1, type=proportion, help="fraction of the steps spent warming up"
    )
    p.add_argument("--no_cuda", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument(
        "--do_lower_case", type=str_to_bool, default=True, help="lower-case text (True for uncased vocabs)"
    )
    add_local_rank_args(p)
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (each rank adds its rank)")
    p.add_argument(
        "--gradient_accumulation_steps",
        type=positive_int,
        default=1,
        help="micro-batches per optimiser step (the batch is divided among them)",
    )
    p.add_argument("--fp16", action="store_true", help="autocast float16 + GradScaler")
    p.add_argument(
        "--loss_scale", type=non_negative_float, default=0, help="fp16 static loss scale; 0 = dynamic"
    )
    p.add_argument(
        "--num_workers", type=non_negative_int, default=defaults.num_workers, help=defaults.workers_help
    )
    p.add_argument("--save_name", default="", type=str, help="name of the run folder")
    p.add_argument(
        "--freeze", default=-1, type=int, help="freeze the text embeddings and encoder layers <= K (-1: none)"
    )


def add_new_flags(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Additions of this implementation, common to both scripts."""
    new = p.add_argument_group("new in this implementation")
    new.add_argument(
        "--recipe",
        default="published",
        choices=RECIPES,
        help="published: the published optimiser, schedules, groups and multi-task stepping (the paper's "
        "numbers need it); modern: fused AdamW, global clipping, corrected decay, one joint step",
    )
    new.add_argument(
        "--optimizer",
        default=None,
        choices=OPTIMIZERS,
        help="kept for the published spelling: must name the recipe's optimiser (BertAdam / AdamW)",
    )
    new.add_argument("--bf16", action="store_true", help="autocast bfloat16")
    new.add_argument(
        "--max_grad_norm",
        type=non_negative_float,
        default=1.0,
        help="modern recipe: global gradient clip (0 disables); published clips each parameter at 1.0",
    )
    new.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="resume from the run folder's training state (the default when it exists) or from PATH",
    )
    new.add_argument(
        RESUME_ANYWAY_FLAG,
        action="store_true",
        help="resume even though flags that shape the saved state changed (the changes are logged)",
    )
    new.add_argument(
        "--save_every_steps",
        type=non_negative_int,
        default=1000,
        help="write the resumable state every N optimiser steps (0: only at epoch ends)",
    )
    new.add_argument(
        "--max_bad_steps",
        type=positive_int,
        default=20,
        help="abort after N optimiser steps in a row with a non-finite loss",
    )
    new.add_argument("--log_every", type=positive_int, default=20, help="a log line every N steps")
    new.add_argument("--quiet", action="store_true", help="no progress bar")
    add_compile_flag(new, "the training forward and loss")
    new.add_argument(
        "--peak_tflops",
        type=non_negative_float,
        default=None,
        help="the device's dense peak TFLOP/s for the MFU in the log (known: A100, H100, H200)",
    )
    new.add_argument(
        "--deterministic", action="store_true", help="deterministic kernels (for exact resume tests)"
    )
    return new
