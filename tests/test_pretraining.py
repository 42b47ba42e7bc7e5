"""End-to-end pretraining with ``train_concap.py`` on the synthetic world, run as users run it.

Training runs are real subprocesses on CPU: the published README command, two processes under both
launchers, kill/SIGTERM and resume, learning, the NaN guard and mixed precision; a checkpoint writer
killed mid-write; bad input (the messages through the script's entry point in this process, the
script itself once). Independent runs start together so both cores work while each imports torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboardX.proto import event_pb2

from vilbert.checkpoint import read_state_dict, save_state_dict
from vilbert.config import BertConfig
from vilbert.datasets.features import PretrainingLMDB, write_pretraining_lmdb
from vilbert.datasets.synthetic import SyntheticWorldConfig, generate_synthetic_world, replace_sizes
from vilbert.modeling import InterBertForMultiModalPreTraining
from vilbert.pretraining import parse_args, run

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = str(REPO_ROOT / "train_concap.py")
TINY_CONFIG = str(REPO_ROOT / "config" / "interbert_tiny.json")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
RUN_FILES = {
    "command.txt",
    "run_info.json",
    "config.json",
    "history.jsonl",
    "logs",
    "pytorch_model_0.bin",
    "training_state.pt",
}
TIMEOUT = 300

# The short world: 48 training images, so one epoch of batch 8 is 6 steps (3 per rank on 2 ranks).
SHORT_TRAIN_IMAGES, SHORT_VAL_IMAGES = 48, 16


# Helpers


def _env() -> dict[str, str]:
    """No launcher variables leak in from outside; one thread per process keeps 2-core runs stable."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train(*args: str) -> list[str]:
    return [sys.executable, TRAIN_SCRIPT, *args]


def _start(command: Sequence[str], log: Path, cwd: Path) -> subprocess.Popen:
    """Output to a file, not a pipe: a run that logs a lot must never block on a full pipe."""
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=cwd, env=_env(), stdout=handle, stderr=subprocess.STDOUT)


def _run(command: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    return _run_together({"run": command}, cwd)["run"]


def _run_together(commands: Mapping[str, Sequence[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run independent commands concurrently; each result holds its combined output as ``stderr``."""
    logs = {name: cwd / f"{name}.log" for name in commands}
    processes = {name: _start(command, logs[name], cwd) for name, command in commands.items()}
    try:
        for process in processes.values():
            process.wait(timeout=TIMEOUT)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return {
        name: subprocess.CompletedProcess(commands[name], process.returncode, "", logs[name].read_text())
        for name, process in processes.items()
    }


def _check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)}\n{result.stderr[-6000:]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files under ``log_dir`` (TFRecord framing: length, crc, data, crc)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _assert_same_weights(expected: Path, actual: Path) -> None:
    want, got = read_state_dict(str(expected)), read_state_dict(str(actual))
    assert want.keys() == got.keys()
    different = [key for key in want if not torch.equal(want[key], got[key])]
    assert not different, f"{actual} differs from {expected} in {len(different)} tensors, e.g. {different[0]}"


def _make_world(root: Path, **sizes: int) -> Path:
    """The Conceptual Captions folder of a ``--small`` synthetic world, written by the project's generator."""
    config = replace_sizes(SyntheticWorldConfig.small(0), **sizes)
    return Path(generate_synthetic_world(str(root), config).conceptual_captions)


# Fixtures


@pytest.fixture(scope="module")
def short_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Few images: one epoch is a handful of steps."""
    return _make_world(
        tmp_path_factory.mktemp("short_world"),
        pretrain_train_images=SHORT_TRAIN_IMAGES,
        pretrain_val_images=SHORT_VAL_IMAGES,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``--small`` world as the tool writes it: 200 training, 50 validation images."""
    return _make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny InterBERT, saved as training would save it (for --from_pretrained)."""
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny_init.bin"
    save_state_dict(InterBertForMultiModalPreTraining(BertConfig.from_json_file(TINY_CONFIG)), str(path))
    return path


def _readme_command(data: Path, checkpoint: Path, output_dir: Path) -> list[str]:
    """The published pretraining command (README), pointed at the synthetic world and the tiny config.

    Kept as published: --from_pretrained twice, --distributed, --span_mask; only paths, the config,
    the epoch count and the batch size differ, plus --no_cuda.
    """
    return [
        "--bert_model", "bert-base-uncased",
        "--from_pretrained", str(checkpoint),
        "--train_data_dir", str(data),
        "--val_data_dir", str(data),
        "--config_file", TINY_CONFIG,
        "--learning_rate", "1e-4",
        "--train_batch_size", "8",
        "--save_name", "pretrained",
        "--output_dir", str(output_dir),
        "--distributed",
        "--num_train_epochs", "1",
        "--span_mask",
        "--from_pretrained", str(checkpoint),
        "--no_cuda",
    ]  # fmt: skip


def _short_run(train: Path, output_dir: Path, *extra: str, val: Path | None = None) -> list[str]:
    """One epoch of batch 8, no weights to start from; validation on ``val`` (default: ``train``)."""
    return [
        "--bert_model", "bert-base-uncased", "--train_data_dir", str(train),
        "--val_data_dir", str(val or train), "--config_file", TINY_CONFIG, "--train_batch_size", "8",
        "--save_name", "pretrained", "--output_dir", str(output_dir), "--num_train_epochs", "1",
        "--num_workers", "0", "--no_cuda", "--span_mask", *extra,
    ]  # fmt: skip


# 1. The published command


def test_published_readme_command_runs_one_epoch_on_cpu(short_world, tiny_checkpoint, tmp_path):
    output_dir = tmp_path / "save"
    result = _run(_train(*_readme_command(short_world, tiny_checkpoint, output_dir)), tmp_path)
    _check_ok(result)
    run = output_dir / "pretrained"
    assert {p.name for p in run.iterdir()} == RUN_FILES

    config = BertConfig.from_json_file(TINY_CONFIG)
    trained = run / "pytorch_model_0.bin"
    model = InterBertForMultiModalPreTraining.from_pretrained(str(trained), config, strict=True)
    # Started from --from_pretrained, not from a fresh init: 6 small Adam steps stay within 5e-3 of it.
    start = read_state_dict(str(tiny_checkpoint))
    final = model.state_dict()
    assert all(torch.allclose(final[key], start[key], atol=5e-3) for key in start)
    assert any(not torch.equal(final[key], start[key]) for key in start), "no parameter was trained"

    state = _load_state(run / "training_state.pt")
    assert (state["state"]["epoch"], state["state"]["global_step"]) == (1, SHORT_TRAIN_IMAGES // 8)
    command = (run / "command.txt").read_text()
    assert "--from_pretrained" in command and '"span_mask": true' in command
    assert '"recipe": "published"' in command  # the README command runs the published recipe
    assert json.loads((run / "run_info.json").read_text())["recipe"] == "published"
    assert json.loads((run / "config.json").read_text())["v_feature_size"] == config.v_feature_size
    scalars = _read_scalars(run / "logs")
    assert {"val/loss", "val/msm", "val/mrm", "val/itm"} <= scalars.keys()
    assert [step for step, _ in scalars["val/loss"]] == [0]
    assert np.isfinite(scalars["val/loss"][0][1])


# 2. Two processes


def _launcher(name: str) -> list[str]:
    if name == "launch":
        return ["-m", "torch.distributed.launch", "--nproc_per_node=2", "--nnodes=1", "--node_rank=0",
                f"--master_port={_free_port()}"]  # fmt: skip
    return ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["launch", "torchrun"])
def test_two_processes_shard_the_data_and_only_rank0_writes(short_world, tiny_checkpoint, tmp_path, launcher):
    output_dir = tmp_path / "save"
    arguments = _readme_command(short_world, tiny_checkpoint, output_dir)
    result = _run([sys.executable, *_launcher(launcher), TRAIN_SCRIPT, *arguments], tmp_path)
    _check_ok(result)
    assert f"{SHORT_TRAIN_IMAGES // 2} samples/rank/epoch, 2 ranks" in result.stderr
    assert result.stderr.count("pretraining finished") == 1, "only rank 0 logs"

    # One set of files, written by rank 0; nothing beside the run folder, no stray temporaries.
    assert [p.name for p in output_dir.iterdir()] == ["pretrained"]
    run = output_dir / "pretrained"
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert len(list((run / "logs").iterdir())) == 1
    state = _load_state(run / "training_state.pt")
    assert state["state"]["global_step"] == SHORT_TRAIN_IMAGES // 2 // 8
    assert len(state["rng"]) == 2, "the RNG state of each rank is saved"
    model = InterBertForMultiModalPreTraining.from_pretrained(
        str(run / "pytorch_model_0.bin"), BertConfig.from_json_file(TINY_CONFIG), strict=True
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())


DDP_WORKER = textwrap.dedent(
    """
    import argparse, hashlib, json, sys
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from vilbert.config import BertConfig
    from vilbert.datasets.concept_cap import ConceptCapDataset, pretraining_files
    from vilbert.datasets.loader import make_loader
    from vilbert.distributed import cleanup, gather_to_main, init_distributed
    from vilbert.engine import Optimization
    from vilbert.modeling import InterBertForMultiModalPreTraining
    from vilbert.pretraining import LossWeights, pretraining_losses
    from vilbert.tokenization import BertTokenizer
    from vilbert.training_state import NonFiniteGuard

    data_dir, config_file, out = sys.argv[1:4]
    ctx = init_distributed(-1, no_cuda=True)
    tokenizer = BertTokenizer("bert-base-uncased")
    dataset = ConceptCapDataset(*pretraining_files(data_dir, "train"), tokenizer, seed=5, rank=ctx.rank)
    loader = make_loader(dataset, 4, dataset.collate_fn(), ctx, True, True, 0, 5)
    loader.batch_sampler.set_epoch(0)
    epoch_ids = [int(i) for batch in loader for i in batch["image_id"]]

    def digest(model):
        return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()

    torch.manual_seed(100 + ctx.rank)  # different initial weights: DDP must make rank 0's everyone's
    model = DistributedDataParallel(InterBertForMultiModalPreTraining(BertConfig.from_json_file(config_file)))
    initial = digest(model.module)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = Optimization(model, optimizer, None, scaler, NonFiniteGuard(3), max_grad_norm=1.0)
    weights = LossWeights()
    batches, losses = iter(loader), []
    for _ in range(2):  # two optimiser steps of two micro-batches (no_sync on the first)
        for micro in range(2):
            with step.micro_step(will_step=micro == 1):
                loss, _ = pretraining_losses(model, next(batches), weights)
                step.backward(loss, 0.5)
            losses.append(float(loss))
        assert not step.step()  # 0.0: not skipped
    gathered = gather_to_main(
        {"ids": epoch_ids, "initial": initial, "final": digest(model.module), "losses": losses}
    )
    if ctx.is_main:
        with open(out, "w") as handle:
            json.dump(gathered, handle)
    cleanup()
    """
)


@pytest.mark.slow
def test_ddp_ranks_read_disjoint_shards_and_keep_identical_weights(short_world, tmp_path):
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    out = tmp_path / "ranks.json"
    command = [sys.executable, *_launcher("torchrun"), str(script), str(short_world), TINY_CONFIG, str(out)]
    _check_ok(_run(command, tmp_path))
    rank0, rank1 = json.loads(out.read_text())

    all_ids = {int(p.image_id) for p in PretrainingLMDB(str(short_world / "training_feat_all.lmdb"))}
    assert len(rank0["ids"]) == len(rank1["ids"]) == len(all_ids) // 2
    assert not set(rank0["ids"]) & set(rank1["ids"]), "ranks read overlapping samples"
    assert set(rank0["ids"]) | set(rank1["ids"]) == all_ids
    assert rank0["losses"] != rank1["losses"], "equal gradients on both ranks would make this test vacuous"
    assert rank0["initial"] == rank1["initial"], "DDP did not broadcast rank 0's initial weights"
    assert rank0["final"] == rank1["final"], "weights diverged across ranks"
    assert rank0["final"] != rank0["initial"]


# 3. Kill and resume

RESUME_EPOCHS, RESUME_BATCH = 3, 4
STEPS_PER_EPOCH = SHORT_TRAIN_IMAGES // RESUME_BATCH
LAST_STEP = RESUME_EPOCHS * STEPS_PER_EPOCH
KILL_AT_STEP = STEPS_PER_EPOCH + 2  # early in the second epoch: the rest of the run is the margin to stop it


def _resume_command(data: Path, output_dir: Path, num_workers: int) -> list[str]:
    return _train(
        "--bert_model", "bert-base-uncased", "--train_data_dir", str(data), "--val_data_dir", str(data),
        "--config_file", TINY_CONFIG, "--train_batch_size", str(RESUME_BATCH), "--learning_rate", "5e-4",
        "--num_train_epochs", str(RESUME_EPOCHS), "--save_every_steps", "3", "--deterministic",
        "--seed", "7", "--span_mask", "--num_workers", str(num_workers), "--save_name", "pretrained",
        "--output_dir", str(output_dir), "--log_every", "5", "--quiet", "--no_cuda",
    )  # fmt: skip


class BackgroundRun:
    """A run started at once and awaited only when its result is needed, so it overlaps other runs."""

    def __init__(self, command: Sequence[str], root: Path) -> None:
        self.log = root / "background.log"
        self.folder = root / "save" / "pretrained"
        self.process = _start(command, self.log, root)

    def result(self) -> Path:
        returncode = self.process.wait(timeout=TIMEOUT)
        assert returncode == 0, self.log.read_text()[-6000:]
        return self.folder

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def reference_run(short_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundRun]:
    """The uninterrupted run (no workers) that every interrupted one must reproduce exactly."""
    root = tmp_path_factory.mktemp("reference")
    background = BackgroundRun(_resume_command(short_world, root / "save", 0), root)
    yield background
    background.stop()


def _wait_for_step(process: subprocess.Popen, state_path: Path, step: int) -> int:
    """Poll the resumable state until it records ``step`` or more; returns the step it records."""
    deadline = time.monotonic() + TIMEOUT
    seen = None
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before step {step}"
        try:
            mtime = state_path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime is not None and mtime != seen:
            seen = mtime
            reached = _load_state(state_path)["state"]["global_step"]
            if reached >= step:
                return reached
        time.sleep(0.02)
    raise AssertionError(f"{state_path} did not reach step {step} in {TIMEOUT} s")


def _resume_and_compare(command: list[str], run: Path, cwd: Path, reference: Path) -> None:
    """Rerun the interrupted command: it resumes where the saved state left off (no step is redone),
    finishes, and every epoch's weights equal the reference."""
    saved_step = _load_state(run / "training_state.pt")["state"]["global_step"]
    resumed = _run(command, cwd)
    _check_ok(resumed)
    assert f"resuming from {run / 'training_state.pt'}" in resumed.stderr
    logged_steps = [int(step) for step in re.findall(r"\bstep (\d+) \|", resumed.stderr)]
    assert logged_steps and min(logged_steps) > saved_step, (saved_step, logged_steps)
    assert _load_state(run / "training_state.pt")["state"]["global_step"] == LAST_STEP
    for epoch in range(RESUME_EPOCHS):
        _assert_same_weights(reference / f"pytorch_model_{epoch}.bin", run / f"pytorch_model_{epoch}.bin")
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(short_world, reference_run, tmp_path):
    """SIGKILL in the second epoch, rerun the same command: bit-identical weights to the uninterrupted run."""
    command = _resume_command(short_world, tmp_path / "save", 0)
    run = tmp_path / "save" / "pretrained"
    process = _start(command, tmp_path / "killed.log", tmp_path)
    try:
        _wait_for_step(process, run / "training_state.pt", KILL_AT_STEP)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=TIMEOUT)
    killed_at = _load_state(run / "training_state.pt")["state"]["global_step"]
    assert (run / "pytorch_model_0.bin").exists()
    assert not (run / f"pytorch_model_{RESUME_EPOCHS - 1}.bin").exists() and killed_at < LAST_STEP, (
        "the run finished before it was killed; make it longer"
    )
    _resume_and_compare(command, run, tmp_path, reference_run.result())


@pytest.mark.slow
def test_sigterm_saves_a_resumable_state_with_workers(short_world, reference_run, tmp_path):
    """SIGTERM mid-run: exit 143 (128 + SIGTERM), state saved; resuming with 2 DataLoader workers gives
    the weights of the uninterrupted run without workers (masks do not depend on the worker count)."""
    command = _resume_command(short_world, tmp_path / "save", 2)
    run = tmp_path / "save" / "pretrained"
    log = tmp_path / "stopped.log"
    process = _start(command, log, tmp_path)
    try:
        _wait_for_step(process, run / "training_state.pt", KILL_AT_STEP)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
    stopped = log.read_text()
    assert "stop requested" in stopped and "rerun the same command to resume" in stopped
    stopped_at = _load_state(run / "training_state.pt")["state"]["global_step"]
    assert KILL_AT_STEP <= stopped_at < LAST_STEP, "the run finished before it was stopped; make it longer"
    assert not (run / f"pytorch_model_{RESUME_EPOCHS - 1}.bin").exists()
    _resume_and_compare(command, run, tmp_path, reference_run.result())


# 4. A checkpoint interrupted mid-write

DYING_WRITER = textwrap.dedent(
    """
    import os, sys
    import torch
    from vilbert.checkpoint import save_state_dict

    class Bomb:
        '''Passes for a tensor until it is serialised, then kills the process like SIGKILL would.'''
        def detach(self):
            return self
        def cpu(self):
            return self
        def __reduce_ex__(self, protocol):
            os._exit(17)

    class Doomed(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return {"weight": torch.full((4096,), 2.0), "bomb": Bomb(), "bias": torch.zeros(3)}

    save_state_dict(Doomed(), sys.argv[1])
    """
)


def test_checkpoint_interrupted_mid_write_keeps_the_previous_file(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    target = folder / "pytorch_model_0.bin"
    good = torch.nn.Linear(4, 3)
    save_state_dict(good, str(target))
    before = target.read_bytes()
    script = tmp_path / "dying_writer.py"
    script.write_text(DYING_WRITER)

    result = subprocess.run([sys.executable, str(script), str(target)], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert result.returncode == 17, f"the writer did not die inside the save:\n{result.stderr[-3000:]}"
    assert target.read_bytes() == before
    reloaded = read_state_dict(str(target))
    assert all(torch.equal(reloaded[k], v) for k, v in good.state_dict().items())
    leftovers = [p.name for p in folder.iterdir() if p != target]
    assert all(name.startswith(f".{target.name}.") and name.endswith(".tmp") for name in leftovers), leftovers


# 5. Learning


@pytest.mark.slow
def test_loss_goes_down_on_the_synthetic_world(world, tmp_path):
    """78 steps at lr 2e-3 (about 0.55x in trials): the validation loss ends far below where it began."""
    command = _train(
        "--bert_model", "bert-base-uncased", "--train_data_dir", str(world), "--val_data_dir", str(world),
        "--config_file", TINY_CONFIG, "--train_batch_size", "16", "--learning_rate", "2e-3",
        "--num_train_epochs", "6", "--span_mask", "--num_workers", "0", "--save_name", "pretrained",
        "--output_dir", str(tmp_path / "save"), "--log_every", "5", "--quiet", "--no_cuda",
        "--recipe", "modern",
    )  # fmt: skip
    _check_ok(_run(command, tmp_path))
    scalars = _read_scalars(tmp_path / "save" / "pretrained" / "logs")
    first_train = scalars["train/loss"][0][1]
    val = [value for _, value in scalars["val/loss"]]
    assert len(val) == 6 and all(np.isfinite(val))
    assert val[-1] < 0.8 * first_train, (first_train, val)
    assert val[-1] < 0.8 * val[0], val
    assert scalars["val/msm"][-1][1] < 0.8 * scalars["val/msm"][0][1]


# 6. Bad input: one clear line, exit code 2, nothing saved is touched


@pytest.fixture(scope="module")
def bad_inputs(short_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """The arguments of every bad-input case; each case writes its run under its own output folder."""
    root = tmp_path_factory.mktemp("bad_input")
    lmdb = short_world / "training_feat_all.lmdb"
    no_lmdb, empty_captions, broken_captions = (
        root / "no_lmdb",
        root / "empty_captions",
        root / "broken_captions",
    )
    for folder in (no_lmdb, empty_captions, broken_captions):
        folder.mkdir()
    shutil.copy(short_world / "caption_train.json", no_lmdb)
    for folder in (empty_captions, broken_captions):
        shutil.copy(lmdb, folder)
    (empty_captions / "caption_train.json").write_text("{}")
    (broken_captions / "caption_train.json").write_text('{"0": "a red dog"')

    other_config = root / "other_config.json"
    other_config.write_text(json.dumps({**json.loads(Path(TINY_CONFIG).read_text()), "v_feature_size": 32}))
    other = InterBertForMultiModalPreTraining(BertConfig.from_json_file(other_config))
    save_state_dict(other, str(root / "other.bin"))

    taken = root / "existing_weights" / "pretrained"
    taken.mkdir(parents=True)
    (taken / "pytorch_model_0.bin").write_bytes(b"weights of an earlier run")

    short_positions = root / "short_positions.json"
    short_positions.write_text(
        json.dumps({**json.loads(Path(TINY_CONFIG).read_text()), "max_position_embeddings": 16})
    )
    damaged_state = root / "damaged_state" / "pretrained"
    damaged_state.mkdir(parents=True)
    (damaged_state / "training_state.pt").write_bytes(b"PK\x03\x04 cut short by a full disk")

    def case(name: str, train: Path = short_world, *extra: str) -> list[str]:
        return _short_run(train, root / name, *extra, val=short_world)

    return {
        "missing_data_dir": case("missing_data_dir", root / "nowhere"),
        "missing_lmdb": case("missing_lmdb", no_lmdb),
        "empty_caption_json": case("empty_caption_json", empty_captions),
        "malformed_caption_json": case("malformed_caption_json", broken_captions),
        "config_mismatch": case("config_mismatch", short_world, "--from_pretrained", str(root / "other.bin")),
        "cond_mask": case("cond_mask", short_world, "--cond_mask"),
        "batch_not_divisible": case("batch_not_divisible", short_world, "--gradient_accumulation_steps", "3"),
        "existing_weights": case("existing_weights"),
        "positions_too_short": case(
            "positions_too_short", short_world, "--config_file", str(short_positions)
        ),
        "damaged_training_state": case("damaged_state"),
        "zero_batch": case("zero_batch", short_world, "--train_batch_size", "0"),
        "fractional_epochs": case("fractional_epochs", short_world, "--num_train_epochs", "1.5"),
    }


BAD_INPUT_MESSAGES = {
    "missing_data_dir": ["pretraining data directory not found", "nowhere"],
    "missing_lmdb": ["pretraining LMDB not found", "no_lmdb/training_feat_all.lmdb"],
    "empty_caption_json": ["empty_captions/caption_train.json", "caption json is empty"],
    "malformed_caption_json": ["broken_captions/caption_train.json", "not valid JSON", "line 1"],
    "config_mismatch": [
        "shape mismatch for bert.v_embeddings.image_embeddings.weight",
        "(64, 32)",
        "(64, 64)",
    ],
    "cond_mask": ["--cond_mask", "not supported"],
    "batch_not_divisible": ["--train_batch_size 8 is not divisible by --gradient_accumulation_steps 3"],
    "existing_weights": ["already holds checkpoints", "pytorch_model_0.bin", "no training_state.pt"],
    "positions_too_short": ["--max_seq_length 36 exceeds max_position_embeddings 16", "short_positions.json"],
    "damaged_training_state": ["damaged_state/pretrained/training_state.pt", "not a readable training state"],
    "zero_batch": ["--train_batch_size must be >= 1, got 0"],
    "fractional_epochs": ["--num_train_epochs must be a whole number >= 1, got 1.5"],
}


def _check_one_error_line(stderr: str, fragments: Sequence[str]) -> None:
    assert "Traceback" not in stderr, stderr[-4000:]
    errors = [line for line in stderr.splitlines() if line.startswith("train_concap.py: error: ")]
    assert len(errors) == 1, stderr[-4000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def _check_untouched(output_dir: Path) -> None:
    """The earlier run's weights are still there, unchanged, and nothing was added beside them."""
    run = output_dir / "pretrained"
    assert [p.name for p in run.iterdir()] == ["pytorch_model_0.bin"]
    assert (run / "pytorch_model_0.bin").read_bytes() == b"weights of an earlier run"


@pytest.mark.parametrize("case", sorted(BAD_INPUT_MESSAGES))
def test_bad_input_is_one_clear_line(bad_inputs, case, monkeypatch, capsys):
    """Through the script's entry point in this process (torch is already imported here: fast)."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", [TRAIN_SCRIPT, *bad_inputs[case]])
    with pytest.raises(SystemExit) as exit_info:
        run(parse_args(bad_inputs[case]))
    assert exit_info.value.code == 2
    _check_one_error_line(capsys.readouterr().err, BAD_INPUT_MESSAGES[case])
    if case == "existing_weights":
        _check_untouched(Path(bad_inputs[case][bad_inputs[case].index("--output_dir") + 1]))


def test_script_reports_bad_input_in_one_line(short_world, tmp_path):
    """The same, through ``python train_concap.py``: a run folder with weights but no training state."""
    taken = tmp_path / "save" / "pretrained"
    taken.mkdir(parents=True)
    (taken / "pytorch_model_0.bin").write_bytes(b"weights of an earlier run")
    result = _run(_train(*_short_run(short_world, tmp_path / "save")), tmp_path)
    assert result.returncode == 2, result.stderr[-4000:]
    _check_one_error_line(result.stderr, BAD_INPUT_MESSAGES["existing_weights"])
    _check_untouched(tmp_path / "save")


@pytest.mark.slow
def test_resume_with_changed_flags_refuses_unless_told_to(short_world, tmp_path):
    """A rerun with another batch size would resume the old state at the wrong place: it refuses,
    naming what changed, and --resume_anyway proceeds (logged); command.txt keeps both runs."""
    first = _run(_train(*_short_run(short_world, tmp_path / "save")), tmp_path)
    _check_ok(first)
    changed = _short_run(short_world, tmp_path / "save", "--num_train_epochs", "2")
    changed[changed.index("--train_batch_size") + 1] = "4"
    refused = _run(_train(*changed), tmp_path)
    assert refused.returncode == 2, refused.stderr[-4000:]
    _check_one_error_line(
        refused.stderr, ["train_batch_size 8 -> 4", "num_train_epochs 1", "--resume_anyway"]
    )
    accepted = _run(_train(*changed, "--resume_anyway"), tmp_path)
    _check_ok(accepted)
    assert "accepted by --resume_anyway" in accepted.stderr
    assert (tmp_path / "save" / "pretrained" / "command.txt").read_text().count("train_concap.py") >= 2


# 7. Non-finite losses


OVERFLOWING_FEATURE = 1e36  # 36 regions still average finitely; squared in LayerNorm: inf


def _poisoned_copy(world: Path, folder: Path, poisoned: set[int] | None) -> Path:
    """The training split of ``world`` with region features that overflow the model (finite, so the
    data check lets them through; the image embedding's LayerNorm turns them into NaN) in the images at
    ``poisoned`` (None: all). NaN features are refused by the data check, see test_damaged_data.py."""
    folder.mkdir()
    shutil.copy(world / "caption_train.json", folder)
    points = list(PretrainingLMDB(str(world / "training_feat_all.lmdb")))
    for index, point in enumerate(points):
        if poisoned is None or index in poisoned:
            point.features = np.full_like(point.features, OVERFLOWING_FEATURE)
    write_pretraining_lmdb(str(folder / "training_feat_all.lmdb"), points)
    return folder


@pytest.mark.slow
def test_non_finite_steps_are_skipped_counted_and_abort_after_a_limit(short_world, tmp_path):
    one_bad = _poisoned_copy(short_world, tmp_path / "one_bad", {0})
    all_bad = _poisoned_copy(short_world, tmp_path / "all_bad", None)

    commands = {
        name: _train(*_short_run(train, tmp_path / name, "--max_bad_steps", "3", val=short_world))
        for name, train in (("one", one_bad), ("all", all_bad))
    }
    results = _run_together(commands, tmp_path)

    # One image with NaN features spoils exactly one batch: skipped, counted, the run completes.
    _check_ok(results["one"])
    reported = "non-finite loss: 1 step(s) skipped since the last report (0 in a row now, 1 in total)"
    assert reported in results["one"].stderr
    run = tmp_path / "one" / "pretrained"
    state = _load_state(run / "training_state.pt")["state"]
    assert (state["skipped_steps"], state["global_step"]) == (1, SHORT_TRAIN_IMAGES // 8)
    assert all(torch.isfinite(v).all() for v in read_state_dict(str(run / "pytorch_model_0.bin")).values())

    # Every batch bad: abort after --max_bad_steps in a row, with the reason, and write no weights.
    aborted = results["all"]
    assert aborted.returncode != 0
    assert re.search(r"loss was NaN/inf for \d+ optimiser steps in a row \(limit 3\)", aborted.stderr)
    assert not (tmp_path / "all" / "pretrained" / "pytorch_model_0.bin").exists()


# 8. Mixed precision on CPU


@pytest.mark.slow
def test_fp16_and_bf16_autocast_run_on_cpu(short_world, tmp_path):
    results = _run_together(
        {mode: _train(*_short_run(short_world, tmp_path / mode, f"--{mode}")) for mode in ("fp16", "bf16")},
        tmp_path,
    )
    for mode, result in results.items():
        _check_ok(result)
        run = tmp_path / mode / "pretrained"
        weights = read_state_dict(str(run / "pytorch_model_0.bin"))
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
        scaler = _load_state(run / "training_state.pt")["scaler"]
        assert ("scale" in scaler) == (mode == "fp16"), "GradScaler on for fp16 only"
        assert np.isfinite(_read_scalars(run / "logs")["val/loss"][0][1])
