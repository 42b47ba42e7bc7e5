"""The project's own errors of bad input, and the exit statuses every script and tool uses.

A ``BadInputError`` is a mistake the user can fix (a flag, a file, a YAML key, a damaged record):
the scripts report it as one line naming the culprit and exit with ``EXIT_BAD_INPUT``. Anything
else is a bug and keeps its traceback (exit 1, Python's own status for an uncaught exception).

Exit statuses:
- 0 ``EXIT_OK``: the job finished;
- 1: an unexpected error (a traceback was printed);
- 2 ``EXIT_BAD_INPUT``: bad input, one line on stderr (as argparse does for a bad flag);
- 128 + N: stopped by signal N (143 for SIGTERM, 130 for SIGINT) after saving the resumable state,
  so ``train && eval`` never evaluates an unfinished run; rerun the same command to resume.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2


class BadInputError(ValueError):
    """Base of every error the user can fix; the message is one line that names the file, key or flag.

    It derives from ValueError so that callers catching ValueError keep working.
    """


def exit_status_for_signal(signal_number: int) -> int:
    """The shell's convention for a process ended by a signal."""
    return 128 + int(signal_number)
