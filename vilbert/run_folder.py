"""The run folder ``output_dir/<save_name>``: its files, its lock, its metadata, and resuming from it.

A new run never overwrites the checkpoints of another: a folder that already holds epoch weights
but no training state is refused, and one that holds a training state is resumed. While a run works
in the folder its main process holds an exclusive lock on it (``flock`` on ``.lock``, a file that
names the holder), so a second run on the same folder refuses to start instead of replacing the
first one's checkpoints and temporaries. The operating system drops a lock when its holder dies, so
the lock of a killed run is simply taken over by the next one.

``command.txt`` keeps the history of every run in the folder. ``run_info.json`` records the values
that shape the resumable state (batch size, learning rate, schedule, ...), so that resuming with
other values is refused unless the user accepts them (``--resume_anyway``).
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import math
import os
import random
import re
import shlex
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from vilbert.atomic import HOST, atomic_write_json, atomic_write_text, remove_stale_temporaries
from vilbert.distributed import is_initialized
from vilbert.errors import BadInputError

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
LOCK_FILE = ".lock"
COMMAND_FILE = "command.txt"
RUN_INFO_FILE = "run_info.json"
RESUME_ANYWAY_FLAG = "--resume_anyway"
# How often to look again at a lock whose holder has not written its name yet (it is between
# locking and writing), 50 ms apart.
_LOCK_ATTEMPTS = 40
_ABSENT = object()


class RunFolderInUseError(BadInputError):
    """Another live run holds the run folder."""


class ResumeMismatchError(BadInputError):
    """The state to resume was made with other values than this run's, or its record is unreadable."""


def _run_name(save_name: str) -> str:
    """``save_name``, or the published timestamp + random suffix, agreed by every rank."""
    name = (
        save_name or time.strftime("%d-%b-%y-%H-%M-%S", time.gmtime()) + f"_{random.randint(0, 999999):06d}"
    )
    if is_initialized():
        holder = [name]
        dist.broadcast_object_list(holder, src=0)
        name = holder[0]
    return name


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------


@dataclass
class _FolderLock:
    """This process's flock on one folder; the RunFolders of one process on one folder share it
    (a process does not lock itself out, e.g. a test that reruns a run in-process)."""

    key: str
    lock_path: str
    descriptor: int
    owner_pid: int
    users: int = 1


_HELD: dict[str, _FolderLock] = {}


def _read_holder(descriptor: int) -> dict[str, Any] | None:
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


def _is_the_file_at(descriptor: int, path: str) -> bool:
    """False when the holder removed the lock file between our open and our flock."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino)


def _take_lock(folder: str) -> _FolderLock | None:
    """Lock ``folder`` for this process, taking over the lock of a dead holder (logged). None where
    the file system cannot lock (some network mounts): the run goes on unlocked, with a warning."""
    key = os.path.realpath(folder)
    held = _HELD.get(key)
    if held is not None and held.owner_pid == os.getpid():  # not a forked child's copy
        held.users += 1
        return held
    lock_path = os.path.join(folder, LOCK_FILE)
    holder = None
    for _ in range(_LOCK_ATTEMPTS):
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            if holder is not None:
                break
            time.sleep(0.05)
            continue
        except OSError as error:
            os.close(descriptor)
            logger.warning("cannot lock %s (%s): this run goes on without the lock, so make sure that "
                           "no other run uses the folder", lock_path, error.strerror)  # fmt: skip
            return None
        if not _is_the_file_at(descriptor, lock_path):
            os.close(descriptor)
            continue
        previous = _read_holder(descriptor)
        mine = {"pid": os.getpid(), "host": HOST, "started": _now()}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(mine) + "\n").encode("utf-8"), 0)
        if previous is not None:
            logger.warning("%s: took over the lock of a run that ended without releasing it (%s)",
                           folder, _describe(previous))  # fmt: skip
        _HELD[key] = _FolderLock(key, lock_path, descriptor, os.getpid())
        return _HELD[key]
    who = _describe(holder) if holder is not None else f"pid unknown: {lock_path} names no holder"
    raise RunFolderInUseError(
        f"{folder}: in use by another run ({who}); wait for it to end, or choose another "
        "--save_name or --output_dir"
    )


def _release_lock(lock: _FolderLock) -> None:
    """Drop one user; the last one removes the lock file, then unlocks (in that order, so that no
    one can lock a file that is about to disappear). A forked child never releases its parent's."""
    lock.users -= 1
    if lock.users > 0 or os.getpid() != lock.owner_pid:
        return
    _HELD.pop(lock.key, None)
    try:
        os.unlink(lock.lock_path)
    except FileNotFoundError:
        logger.warning("%s disappeared while its run held it", lock.lock_path)
    os.close(lock.descriptor)


# ---------------------------------------------------------------------------------------------
# Resume compatibility
# ---------------------------------------------------------------------------------------------


def _plain(record: Any) -> Any:
    """The record as ``run_info.json`` holds it (tuples become lists, paths strings)."""
    return json.loads(json.dumps(record, default=str))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (a config file's contents) as ``outer.inner`` keys, so a difference names its leaf."""
    if not isinstance(value, dict) or (prefix and not value):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(saved: Any, new: Any) -> bool:
    """64 and 64.0 are the same value; True and 1 are not."""
    if _is_number(saved) and _is_number(new):
        return saved == new or (math.isnan(saved) and math.isnan(new))
    return json.dumps(saved, sort_keys=True) == json.dumps(new, sort_keys=True)


def _short_float(value: float) -> str:
    """The shorter exact spelling: ``1e-4`` rather than ``0.0001``, ``64.0`` rather than ``6.4e1``."""
    if not math.isfinite(value):
        return repr(value)
    mantissa, exponent = f"{value:.15e}".split("e")
    scientific = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return scientific if float(scientific) == value and len(scientific) < len(repr(value)) else repr(value)


def _show(value: Any) -> str:
    """A value on one short line; a long one (a file's contents) is cut."""
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, float):
        text = _short_float(value)
    elif isinstance(value, str) and re.fullmatch(r"[\w./:+-]+", value):
        text = value
    else:
        text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def record_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key saved -> new`` for every value that differs, in the new record's order."""
    saved_flat, new_flat = _flatten(_plain(saved)), _flatten(_plain(new))
    keys = list(new_flat) + [key for key in saved_flat if key not in new_flat]
    return [
        f"{key} {_show(saved_flat.get(key, _ABSENT))} -> {_show(new_flat.get(key, _ABSENT))}"
        for key in keys
        if key not in saved_flat or key not in new_flat or not _same(saved_flat[key], new_flat[key])
    ]


def _read_run_info(path: str) -> dict[str, Any]:
    """The saved record; ValueError says what is wrong with the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"not valid JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"holds a {type(saved).__name__}, not a JSON object")
    return saved


# ---------------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------------


@dataclass
class RunFolder:
    """The folder of one run. On the main process it holds the folder's lock from ``create`` until
    ``close()`` (or the end of a ``with`` block, or the object's collection, or process exit)."""

    path: str
    is_main: bool
    _release: weakref.finalize | None = field(default=None, repr=False, compare=False)

    @classmethod
    def create(cls, output_dir: str, save_name: str, is_main: bool) -> RunFolder:
        """Make the folder; on the main process lock it, then remove the temporaries that killed
        writers left. A folder another live run holds raises ``RunFolderInUseError`` on every rank."""
        folder = cls(os.path.join(output_dir, _run_name(save_name)), is_main)
        refusal = None
        if is_main:
            os.makedirs(folder.path, exist_ok=True)
            try:
                lock = _take_lock(folder.path)
            except RunFolderInUseError as error:
                refusal = str(error)
            else:
                if lock is not None:
                    folder._release = weakref.finalize(folder, _release_lock, lock)
        if is_initialized():
            holder = [refusal]
            dist.broadcast_object_list(holder, src=0)
            refusal = holder[0]
        if refusal is not None:
            raise RunFolderInUseError(refusal)
        if is_main:
            removed = remove_stale_temporaries(folder.path)
            if removed:
                logger.info("removed %d temporary file(s) an interrupted write left in %s: %s",
                            len(removed), folder.path, ", ".join(removed))  # fmt: skip
        return folder

    def close(self) -> None:
        """Release the lock (idempotent); the run's last write into the folder must precede it."""
        if self._release is not None:
            self._release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def state_path(self) -> str:
        return os.path.join(self.path, STATE_FILE)

    @property
    def run_info_path(self) -> str:
        return os.path.join(self.path, RUN_INFO_FILE)

    def weights_path(self, epoch: int, ema: bool = False) -> str:
        return os.path.join(self.path, f"pytorch_model_{epoch}{'_ema' if ema else ''}.bin")

    def write_run_info(self, args: Any, config: Any, record: dict[str, Any] | None = None) -> None:
        """Append this run (time, command line, every argument) to ``command.txt``, write
        ``config.json`` and, given a ``record`` of the values that shape the resumable state,
        ``run_info.json``. Call it once per run, after ``check_resume``."""
        if not self.is_main:
            return
        command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        arguments = json.dumps(vars(args), indent=2, sort_keys=True, default=str)
        entry = f"# {_now()}, pid {os.getpid()} on {HOST}\n{command}\n\n{arguments}\n"
        history_path = os.path.join(self.path, COMMAND_FILE)
        history = ""
        if os.path.isfile(history_path):
            with open(history_path, encoding="utf-8", errors="replace") as handle:
                history = handle.read()
        atomic_write_text(history_path, f"{history.rstrip()}\n\n{entry}" if history.strip() else entry)
        atomic_write_json(os.path.join(self.path, "config.json"), config.to_dict())
        if record is not None:
            atomic_write_text(self.run_info_path, json.dumps(record, indent=2, default=str) + "\n")

    def check_resume(
        self, record: dict[str, Any], accept_changes: bool, resume_from: str | None = None
    ) -> list[str]:
        """Compare ``record`` with the ``run_info.json`` beside the state to resume (``resume_from``,
        default this folder's): differences raise ``ResumeMismatchError`` naming them and
        ``--resume_anyway``, or, with ``accept_changes``, are logged and returned. Runs on every rank
        (so that all refuse together); without a saved record there is nothing to compare."""
        folder = os.path.dirname(os.path.abspath(resume_from)) if resume_from else self.path
        info_path = os.path.join(folder, RUN_INFO_FILE)
        if not os.path.isfile(info_path):
            return []
        try:
            saved = _read_run_info(info_path)
        except ValueError as error:
            reason = f"{info_path}: {error}, so the state to resume cannot be checked against this run"
            if not accept_changes:
                message = f"{reason}; pass {RESUME_ANYWAY_FLAG} to resume unchecked"
                raise ResumeMismatchError(message) from None
            logger.warning("%s (accepted by %s)", reason, RESUME_ANYWAY_FLAG)
            return [f"{info_path} unreadable"]
        changes = record_differences(saved, record)
        if changes and not accept_changes:
            raise ResumeMismatchError(
                f"{info_path}: the state to resume was made with other values: {', '.join(changes)}; "
                f"pass {RESUME_ANYWAY_FLAG} to resume with the new values, or choose another --save_name"
            )
        if changes and self.is_main:
            logger.warning("resuming with values that differ from %s (accepted by %s): %s",
                           info_path, RESUME_ANYWAY_FLAG, ", ".join(changes))  # fmt: skip
        return changes

    def resume_file(self, resume: str | None, allow_existing_weights: bool = False) -> str | None:
        """The training state to resume from, or None for a fresh run.

        ``resume``: a path, or ``"auto"`` / None (this folder's state when present). A bare
        ``--resume`` on a folder without state starts fresh (logged), so the same command can be the
        first job of a chain and every requeue after it.
        """
        if resume not in (None, "auto"):
            if not os.path.isfile(resume):
                raise FileNotFoundError(f"--resume: training state not found: {resume}")
            return resume
        if os.path.isfile(self.state_path):
            logger.info("resuming from %s", self.state_path)
            return self.state_path
        if resume == "auto" and self.is_main:
            logger.info("--resume: no %s in %s yet, starting a fresh run", STATE_FILE, self.path)
        existing = sorted(glob.glob(os.path.join(self.path, "pytorch_model_*.bin")))
        if existing and not allow_existing_weights:
            raise FileExistsError(
                f"{self.path} already holds checkpoints ({os.path.basename(existing[0])}, ...) but no "
                f"{STATE_FILE} to resume from; choose another --save_name or --output_dir"
            )
        return None
