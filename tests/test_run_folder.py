"""The run folder: its lock (a second live run refuses, a dead one's lock is taken over), the history
in ``command.txt`` and the resume check against ``run_info.json``."""

import argparse
import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch.distributed as dist

from tests.conftest import ROOT
from vilbert.config import BertConfig
from vilbert.errors import BadInputError
from vilbert.run_folder import LOCK_FILE, ResumeMismatchError, RunFolder, RunFolderInUseError

TINY_CONFIG = os.path.join(ROOT, "config", "interbert_tiny.json")

HOLDER = """import sys, time
from vilbert.run_folder import RunFolder
folder = RunFolder.create(sys.argv[1], "run", is_main=True)
print("locked", flush=True)
time.sleep(120)
"""

# A second run, through the scripts' own ending (bad input: one line, exit status 2).
SECOND_RUN = """import argparse, sys
from vilbert.cli import run_script
from vilbert.run_folder import RunFolder
args = argparse.Namespace(local_rank=-1, no_cuda=True)
body = lambda args, ctx: RunFolder.create(sys.argv[1], "run", ctx.is_main)
sys.exit(run_script(body, args, "train_tasks.py"))
"""


def _python(script: str, *arguments: str, **kwargs) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen([sys.executable, "-c", script, *arguments], env=env, text=True, **kwargs)


def _refused_in_process_group(output_dir: str) -> str:
    """Every rank refuses together: rank 0's refusal goes through the process group (of one rank here)."""
    dist.init_process_group("gloo", init_method=f"file://{output_dir}/rendezvous", rank=0, world_size=1)
    try:
        with pytest.raises(RunFolderInUseError) as refusal:
            RunFolder.create(output_dir, "run", is_main=True)
    finally:
        dist.destroy_process_group()
    return str(refusal.value)


@pytest.mark.slow
def test_a_live_runs_folder_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    holder = _python(HOLDER, str(tmp_path), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "locked\n"
        second = _python(SECOND_RUN, str(tmp_path), stderr=subprocess.PIPE)
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == 2, stderr
        assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
        [line] = stderr.splitlines()
        assert line.startswith(
            f"train_tasks.py: error: {folder}: in use by another run (pid {holder.pid} "
        ), line
        assert "--save_name" in line
        assert f"(pid {holder.pid} " in _refused_in_process_group(str(tmp_path))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == holder.pid  # a dead holder's lock

    with caplog.at_level(logging.WARNING, logger="vilbert.run_folder"):
        with RunFolder.create(str(tmp_path), "run", is_main=True):
            assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (
        f"{folder}: took over the lock of a run that ended without releasing it (pid {holder.pid} "
        in caplog.text
    )
    assert not (folder / LOCK_FILE).exists(), "the lock file outlived its run"


def test_one_process_shares_its_own_lock_until_the_last_holder_closes(tmp_path):
    lock = tmp_path / "run" / LOCK_FILE
    first = RunFolder.create(str(tmp_path), "run", is_main=True)
    second = RunFolder.create(str(tmp_path), "run", is_main=True)
    first.close()
    first.close()  # idempotent: does not release the second one's share
    assert lock.exists()
    second.close()
    assert not lock.exists()
    RunFolder.create(str(tmp_path), "run", is_main=True)  # dropped at once: collected, released
    assert not lock.exists()
    RunFolder.create(str(tmp_path), "other", is_main=False)
    assert not (tmp_path / "other").exists()  # only the main process makes and locks the folder


def _args(**values) -> argparse.Namespace:
    return argparse.Namespace(train_batch_size=64, learning_rate=1e-4, **values)


RECORD = {"train_batch_size": 64, "learning_rate": 1e-4, "tasks": [1, 2], "config": {"hidden_size": 64}}


def test_command_history_is_appended_and_the_resume_record_written(tmp_path):
    config = BertConfig.from_json_file(TINY_CONFIG)
    with RunFolder.create(str(tmp_path), "run", is_main=True) as folder:
        folder.write_run_info(_args(seed=1), config, RECORD)
    with RunFolder.create(str(tmp_path), "run", is_main=True) as folder:
        folder.write_run_info(_args(seed=2), config)  # the two-argument call: no record

    history = (tmp_path / "run" / "command.txt").read_text()
    entries = history.split("\n# ")
    assert len(entries) == 2 and history.startswith("# ")
    assert '"seed": 1' in entries[0] and '"seed": 2' in entries[1]
    assert all(f"pid {os.getpid()}" in entry and sys.executable in entry for entry in entries)
    assert json.loads((tmp_path / "run" / "run_info.json").read_text()) == RECORD
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config.to_dict()


def test_resume_with_changed_values_refuses_unless_accepted(tmp_path, caplog):
    folder = RunFolder(str(tmp_path), is_main=True)
    assert folder.check_resume(RECORD, accept_changes=False) == []  # no record saved: nothing to compare
    folder.write_run_info(_args(), BertConfig.from_json_file(TINY_CONFIG), RECORD)
    assert (
        folder.check_resume({**RECORD, "tasks": (1, 2), "learning_rate": 0.0001}, accept_changes=False) == []
    )

    changed = {**RECORD, "learning_rate": 2e-4, "train_batch_size": 32, "config": {"hidden_size": 128}}
    expected = ["train_batch_size 64 -> 32", "learning_rate 1e-4 -> 2e-4", "config.hidden_size 64 -> 128"]
    with pytest.raises(ResumeMismatchError) as refusal:
        folder.check_resume(changed, accept_changes=False)
    message = str(refusal.value)
    assert isinstance(refusal.value, BadInputError) and "\n" not in message
    assert message.startswith(f"{tmp_path / 'run_info.json'}: ") and ", ".join(expected) in message
    assert "--resume_anyway" in message

    with caplog.at_level(logging.WARNING, logger="vilbert.run_folder"):
        assert folder.check_resume(changed, accept_changes=True) == expected
    assert "--resume_anyway" in caplog.text and "learning_rate 1e-4 -> 2e-4" in caplog.text

    elsewhere = RunFolder(str(tmp_path / "new"), is_main=True)  # resuming another folder's state
    state = str(tmp_path / "training_state.pt")
    assert elsewhere.check_resume(changed, accept_changes=True, resume_from=state) == expected


def test_damaged_resume_record_is_named(tmp_path):
    folder = RunFolder(str(tmp_path), is_main=True)
    (tmp_path / "run_info.json").write_text('{"train_batch_size": 6')
    with pytest.raises(
        ResumeMismatchError, match=r"run_info.json: not valid JSON .*--resume_anyway"
    ) as refusal:
        folder.check_resume(RECORD, accept_changes=False)
    assert "\n" not in str(refusal.value)
    assert folder.check_resume(RECORD, accept_changes=True) == [f"{tmp_path / 'run_info.json'} unreadable"]


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="vilbert.run_folder"):
        with RunFolder.create(str(tmp_path), "run", is_main=True) as folder:
            folder.write_run_info(_args(), BertConfig.from_json_file(TINY_CONFIG))
    assert f"cannot lock {tmp_path / 'run' / LOCK_FILE} ({os.strerror(errno.ENOLCK)})" in caplog.text
    assert (tmp_path / "run" / "command.txt").is_file()
