"""How the entry scripts end: bad input is one line on stderr; a bug keeps its traceback.

Exit statuses (``vilbert.errors``): 0 finished, 1 an unexpected error (traceback), 2 bad input,
128 + N stopped by signal N after saving the resumable state.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from vilbert.distributed import DistContext, cleanup, init_distributed
from vilbert.errors import EXIT_BAD_INPUT, BadInputError
from vilbert.training_state import NonFiniteLossError

# The project's own bad-input errors, plus the library errors that are bad input too: a missing,
# existing or unreadable file or a full disk (OSError), a run that kept producing NaN losses, and
# running out of GPU memory.
USER_ERRORS = (BadInputError, OSError, NonFiniteLossError, torch.cuda.OutOfMemoryError)


def first_line(error: BaseException) -> str:
    """The message's first line; for an error re-raised from a DataLoader worker (whose message is
    the worker's traceback), its last line, which holds the original message."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1].split(": ", 1)[-1] if "DataLoader worker process" in lines[0] else lines[0]


def run_script(
    body: Callable[[argparse.Namespace, DistContext], Any], args: argparse.Namespace, prog: str | None = None
) -> int:
    """Join the process group, run ``body``, leave it. Returns ``body``'s status when it gives one
    (an int), else 0; ``USER_ERRORS`` become ``PROG: error: MESSAGE`` and status 2, as argparse does
    for a bad flag. PROG defaults to the script's name."""
    try:
        ctx = init_distributed(args.local_rank, args.no_cuda)
        try:
            status = body(args, ctx)
        finally:
            cleanup()
    except USER_ERRORS as error:
        sys.stderr.write(f"{prog or os.path.basename(sys.argv[0])}: error: {first_line(error)}\n")
        return EXIT_BAD_INPUT
    return status if isinstance(status, int) else 0
