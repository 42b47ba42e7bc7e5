"""How the entry scripts end: a mistake the user can fix is one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from vilbert.datasets.features import MissingImageError
from vilbert.distributed import DistContext, cleanup, init_distributed
from vilbert.training_state import NonFiniteLossError

# Missing or existing files, bad values (configs, checkpoints, YAML, data), absent images, a run
# that kept producing NaN losses, and running out of GPU memory.
USER_ERRORS = (OSError, ValueError, MissingImageError, NonFiniteLossError, torch.cuda.OutOfMemoryError)


def run_script(
    body: Callable[[argparse.Namespace, DistContext], Any], args: argparse.Namespace, prog: str | None = None
) -> int:
    """Join the process group, run ``body``, leave it; ``USER_ERRORS`` become ``PROG: error: MESSAGE``
    on stderr and exit status 2 (as argparse does for a bad flag). PROG defaults to the script's name."""
    try:
        ctx = init_distributed(args.local_rank, args.no_cuda)
        try:
            body(args, ctx)
        finally:
            cleanup()
    except USER_ERRORS as error:
        sys.stderr.write(f"{prog or os.path.basename(sys.argv[0])}: error: {error}\n")
        return 2
    return 0
