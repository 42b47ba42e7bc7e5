"""Atomic writes: a failure mid-write keeps the previous file and leaves no temporary file."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT
from vilbert.atomic import atomic_torch_save, atomic_write_json, atomic_write_text, remove_stale_temporaries
from vilbert.datasets.lmdb_writer import AtomicLMDBWriter
from vilbert.run_folder import RunFolder


class ExplodesWhenPickled:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def _only(folder):
    return sorted(os.listdir(folder))


def test_torch_save_round_trip(tmp_path):
    path = tmp_path / "model.bin"
    atomic_torch_save({"w": torch.arange(4.0)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4.0))
    assert _only(tmp_path) == ["model.bin"]


def test_failing_pickle_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "model.bin"
    atomic_torch_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom while pickling"):
        atomic_torch_save({"w": torch.zeros(1000), "bad": ExplodesWhenPickled()}, path)
    assert path.read_bytes() == before
    assert _only(tmp_path) == ["model.bin"]


def test_partial_write_then_crash_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.bin"
    atomic_torch_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def half_save(obj, handle):
        handle.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert _only(tmp_path) == ["model.bin"]


def test_keyboard_interrupt_mid_write_also_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "model.bin"

    def interrupted(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({}, path)
    assert _only(tmp_path) == []


def test_text_and_json(tmp_path):
    atomic_write_text(tmp_path / "command.txt", "python train_tasks.py --tasks 1-2\n")
    assert (tmp_path / "command.txt").read_text() == "python train_tasks.py --tasks 1-2\n"
    atomic_write_json(tmp_path / "metrics.json", {"r1": 61.9})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"r1": 61.9}


def test_unserialisable_json_leaves_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"r1": 1.0})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"r1": object()})
    assert json.loads(path.read_text()) == {"r1": 1.0}
    assert _only(tmp_path) == ["metrics.json"]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_text(tmp_path / "absent" / "x.txt", "x")


def test_file_mode_follows_umask(tmp_path):
    path = tmp_path / "model.bin"
    atomic_torch_save({}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _wait_for(pattern: str, folder, process: subprocess.Popen) -> list:
    deadline = time.monotonic() + 60
    while not list(folder.glob(pattern)) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(folder.glob(pattern))


def test_temporary_of_a_killed_writer_is_removed_when_its_run_folder_opens(tmp_path):
    """SIGKILL skips atomic_write's cleanup; the next run in that folder removes the leftover (and
    only files named as atomic_write names them), but never the temporary of a writer still alive."""
    writer = (
        "import sys, time\n"
        "from vilbert.atomic import atomic_write\n"
        "atomic_write(sys.argv[1], lambda handle: (handle.write(b'x'), handle.flush(), time.sleep(60)))\n"
    )
    target = tmp_path / "run" / "training_state.pt"
    target.parent.mkdir()
    process = subprocess.Popen([sys.executable, "-c", writer, str(target)], env=_env())
    [in_flight] = _wait_for(".training_state.pt.*.tmp", target.parent, process)
    assert in_flight.name.startswith(f".training_state.pt.{process.pid}@")
    with RunFolder.create(str(tmp_path), "run", is_main=True):
        assert in_flight.exists(), "the temporary of a live writer was removed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    [leftover] = target.parent.glob(".training_state.pt.*.tmp")
    older_version = target.parent / ".training_state.pt.0123abcd.tmp"  # named before pids were
    older_version.write_text("left by an older version")
    another_hosts = f".training_state.pt.{process.pid}@elsewhere.0123abcd.tmp"  # its pid means nothing here
    keep = [".hidden", "notes.tmp", ".training_state.pt.tmp", another_hosts]
    for name in keep:
        (target.parent / name).write_text("mine")

    RunFolder.create(str(tmp_path), "run", is_main=True)

    assert not leftover.exists() and not target.exists() and not older_version.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(keep)
    assert remove_stale_temporaries(target.parent) == []


LMDB_WRITER = """import sys, time
from vilbert.datasets.lmdb_writer import AtomicLMDBWriter
writer = AtomicLMDBWriter(sys.argv[1], subdir=False, batch_size=1)
writer.put(b"00000000", bytes(100_000))
print("staged", flush=True)
time.sleep(120)
"""


def test_lmdb_staging_of_a_killed_writer_is_removed_when_the_next_writer_opens(tmp_path, caplog):
    """A killed converter leaves its hidden staging folder (as big as the output); the next writer of
    that output removes it and the ones older versions left, but not a live writer's, nor another
    output's."""
    output = tmp_path / "train.lmdb"
    writers = [
        subprocess.Popen([sys.executable, "-c", LMDB_WRITER, str(output)], env=_env(), stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    try:
        assert [writer.stdout.readline() for writer in writers] == [b"staged\n"] * 2
        killed, live = writers
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        [dead_staging] = tmp_path.glob(f".train.lmdb.{killed.pid}@*.tmp")
        [live_staging] = tmp_path.glob(f".train.lmdb.{live.pid}@*.tmp")
        older_version = tmp_path / ".train.lmdb.k2_9xq0a.tmp"  # tempfile.mkdtemp's names, before pids
        older_version.mkdir()
        other_output = tmp_path / dead_staging.name.replace(".train.lmdb.", ".val.lmdb.")
        other_output.mkdir()

        with caplog.at_level(logging.INFO, logger="vilbert.datasets.lmdb_writer"):
            with AtomicLMDBWriter(str(output), subdir=False) as writer:
                writer.put(b"00000000", b"value")

        assert not dead_staging.exists() and not older_version.exists()
        assert live_staging.is_dir() and other_output.is_dir()
        [line] = [r.getMessage() for r in caplog.records if "staging folder" in r.getMessage()]
        assert "removed 2 staging folder(s) (0.1 MB)" in line and dead_staging.name in line, line
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [live_staging.name, other_output.name, "train.lmdb", "train.lmdb-lock"]
        )
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()


def test_a_full_disk_while_saving_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """torch's zip writer reports ENOSPC as a RuntimeError; the scripts must print one line, not a
    C++ traceback, and the previous checkpoint must survive."""
    path = tmp_path / "training_state.pt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(obj, handle):
        handle.write(b"PK\x03\x04 partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . "
            "PytorchStreamWriter failed writing file data/0: file write failed"
        )

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(
        OSError, match=r"training_state.pt: could not be written .*the previous file is intact"
    ):
        atomic_torch_save({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert _only(tmp_path) == ["training_state.pt"]
