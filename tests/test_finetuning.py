"""Multi-task fine-tuning (``train_tasks.py``) on a tiny synthetic world: the published schedule, EMA,
the published command lines, two processes, and resuming after a SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import task_world
from vilbert import finetuning
from vilbert.checkpoint import save_state_dict
from vilbert.config import BertConfig
from vilbert.datasets import loader
from vilbert.datasets.synthetic import SyntheticWorldConfig, generate_synthetic_world
from vilbert.distributed import DistContext, init_distributed
from vilbert.engine import Optimization
from vilbert.modeling import InterBertForVLTasks
from vilbert.precision import Precision
from vilbert.tasks import TASKS
from vilbert.tokenization import BertTokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "config" / "interbert_tiny.json")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
FLICKR_RUN = "RetrievalFlickr30k_interbert_tiny"
# Batch 8 (divisible by 2 ranks); Flickr30K: 8 images x 5 captions = 5 batches per epoch, 3 to
# validate; VCR: 16 questions = 2 batches per epoch, 1 to validate.
FLICKR_BATCHES, VCR_BATCHES = 5, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _environment() -> dict[str, str]:
    """This environment without a launcher's variables, one intra-op thread per process."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    """The synthetic world's task YAML (paths relative to it)."""
    return task_world(
        str(tmp_path_factory.mktemp("finetuning") / "world"), 0, flickr=(8, 4, 2), vcr=(16, 8, 2)
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A randomly initialised tiny model in the published weights format."""
    path = str(tmp_path_factory.mktemp("checkpoint") / "pytorch_model_random.bin")
    torch.manual_seed(0)
    save_state_dict(InterBertForVLTasks(BertConfig.from_json_file(TINY_CONFIG)), path)
    return path


def _yaml_variant(world: str, folder: Path, **changes: dict) -> str:
    """The world's task YAML with some values changed per task, written beside it (paths stay valid)."""
    with open(world, encoding="utf-8") as f:
        tasks = yaml.safe_load(f)
    for key, values in changes.items():
        tasks[key].update(values)
    path = os.path.join(os.path.dirname(world), f"tasks_{folder.name}.yml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(tasks, f, sort_keys=False)
    return path


def _args(task_config: str, checkpoint: str, output_dir: Path, *extra: str):
    return finetuning.parse_args(
        [
            "--from_pretrained", checkpoint, "--config_file", TINY_CONFIG, "--task_config", task_config,
            "--output_dir", str(output_dir), "--no_cuda", "--num_workers", "0", "--quiet", *extra,
        ]
    )  # fmt: skip


def _train_in_process(args) -> dict:
    return finetuning.train(args, init_distributed(-1, no_cuda=True))


def _cli(*arguments: str, launcher: tuple[str, ...] = (), timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, *launcher, str(ROOT / "train_tasks.py"), *arguments]
    return subprocess.run(
        command, cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=timeout
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# The multi-task schedule
# ---------------------------------------------------------------------------------------------


def test_start_offsets_and_loss_scales(world, checkpoint, tmp_path):
    # VCR (2 batches/epoch) runs 2 epochs of its own, Flickr (5 batches/epoch) 30: over a run of
    # 2 x 5 = 10 iterations, VCR starts at 10 - 2 x 2 = 6 so that both end together.
    task_config = _yaml_variant(
        world, tmp_path, TASK1={"num_epoch": 2, "lr": 4e-5}, TASK3={"num_epoch": 30, "lr": 2e-5}
    )
    # Each task's own num_epoch: the modern rule (published takes the last task's for all, tested below).
    args = _args(
        task_config, checkpoint, tmp_path, "--tasks", "1-3", "--num_train_epochs", "2", "--recipe", "modern"
    )
    ctx = init_distributed(-1, no_cuda=True)
    runs = finetuning.build_tasks(args, ctx, BertTokenizer(args.bert_model))
    assert [(r.name, len(r.train_loader)) for r in runs] == [
        ("VCR_Q-A", VCR_BATCHES),
        ("RetrievalFlickr30k", FLICKR_BATCHES),
    ]
    assert [r.start_iteration for r in runs] == [6, 0]
    assert [r.loss_scale for r in runs] == [2.0, 1.0]  # YAML lr / the smallest YAML lr

    # Flickr with fewer iterations x epochs than the run starts late as well; equal lrs scale by 1.
    task_config = _yaml_variant(world, tmp_path, TASK1={"num_epoch": 5}, TASK3={"num_epoch": 1})
    args = _args(
        task_config, checkpoint, tmp_path, "--tasks", "3-1", "--num_train_epochs", "3", "--recipe", "modern"
    )
    runs = finetuning.build_tasks(args, ctx, BertTokenizer(args.bert_model))
    assert [(r.name, r.start_iteration, r.loss_scale) for r in runs] == [
        ("RetrievalFlickr30k", 15 - 5, 1.0),
        ("VCR_Q-A", 15 - 10, 1.0),
    ]


def test_published_start_rule_takes_the_last_tasks_num_epoch(world, checkpoint, tmp_path):
    """The published script reads num_epoch of the last task of --tasks for every task."""
    task_config = _yaml_variant(
        world, tmp_path, TASK1={"num_epoch": 2, "lr": 4e-5}, TASK3={"num_epoch": 1, "lr": 2e-5}
    )
    args = _args(task_config, checkpoint, tmp_path, "--tasks", "1-3", "--num_train_epochs", "2")
    assert args.recipe == "published"
    runs = finetuning.build_tasks(args, init_distributed(-1, no_cuda=True), BertTokenizer(args.bert_model))
    # 2 x 5 = 10 iterations; with TASK3's num_epoch 1 for both: VCR 10 - 1 x 2, Flickr 10 - 1 x 5.
    assert [r.start_iteration for r in runs] == [8, 5]


def test_training_loop_follows_the_schedule(world, checkpoint, tmp_path, monkeypatch):
    """Which task runs at each iteration, the loss each one backpropagates, and where each ends."""
    task_config = _yaml_variant(
        world, tmp_path, TASK1={"num_epoch": 2, "lr": 4e-5}, TASK3={"num_epoch": 30, "lr": 2e-5}
    )
    forwards: list[tuple[str, float]] = []
    backwards: list[float] = []

    def recording(name: str, spec):
        def forward(model, batch):
            out = spec.forward(model, batch)
            if model.training:
                forwards.append((name, float(out.loss.detach())))
            return out

        return dataclasses.replace(spec, forward=forward)

    monkeypatch.setattr(finetuning, "TASKS", {name: recording(name, spec) for name, spec in TASKS.items()})
    original_backward = Optimization.backward

    def backward(self, loss, scale=1.0):
        backwards.append(float(loss.detach()))
        original_backward(self, loss, scale)

    monkeypatch.setattr(Optimization, "backward", backward)
    args = _args(
        task_config, checkpoint, tmp_path, "--tasks", "1-3", "--num_train_epochs", "2", "--recipe", "modern"
    )
    summary = _train_in_process(args)

    # Iterations 0-5: Flickr alone; 6-9: VCR (first, in --tasks order), then Flickr.
    names = [name for name, _ in forwards]
    assert names == ["RetrievalFlickr30k"] * 6 + ["VCR_Q-A", "RetrievalFlickr30k"] * 4
    scales = [b / f for (_, f), b in zip(forwards, backwards)]
    assert len(backwards) == len(forwards)
    for (name, _), scale in zip(forwards, scales):
        assert scale == pytest.approx(2.0 if name == "VCR_Q-A" else 1.0, rel=1e-5)

    run = tmp_path / "VCR_Q-A-RetrievalFlickr30k_interbert_tiny"
    state = torch.load(run / "training_state.pt", map_location="cpu", weights_only=True)
    assert state["state"]["global_step"] == 10 and state["state"]["epoch"] == 2
    assert state["extra"]["consumed"] == {
        "VCR_Q-A": 2 * VCR_BATCHES,
        "RetrievalFlickr30k": 2 * FLICKR_BATCHES,
    }

    # metrics.json: both tasks validated each epoch, and the best epoch.
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == summary
    assert [entry["epoch"] for entry in metrics["validation"]] == [0, 1]
    for entry in metrics["validation"]:
        assert set(entry) == {
            "epoch", "score", "VCR_Q-A/loss", "VCR_Q-A/score",
            "RetrievalFlickr30k/loss", "RetrievalFlickr30k/score",
        }  # fmt: skip
        assert entry["score"] == pytest.approx(
            (entry["VCR_Q-A/score"] + entry["RetrievalFlickr30k/score"]) / 2
        )
    scores = [entry["score"] for entry in metrics["validation"]]
    assert metrics["best_epoch"] == scores.index(max(scores)) and metrics["best_score"] == max(scores)
    assert metrics["weights"] == "raw"
    assert {p.name for p in run.iterdir()} >= {"pytorch_model_0.bin", "pytorch_model_1.bin", "command.txt"}


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------


def _validation_of(weights: Path, args) -> dict[str, float]:
    """Validate saved weights the way the training loop does."""
    ctx = init_distributed(-1, no_cuda=True)
    model = InterBertForVLTasks.from_pretrained(str(weights), BertConfig.from_json_file(TINY_CONFIG))
    runs = finetuning.build_tasks(args, ctx, BertTokenizer(args.bert_model))
    return finetuning.validate(model, runs, ctx, Precision.from_flags(False, False, ctx.device, 0))


def test_validation_uses_the_ema_weights_and_training_continues_from_the_raw_ones(
    world, checkpoint, tmp_path
):
    common = ("--tasks", "3", "--num_train_epochs", "2", "--learning_rate", "1e-3")
    ema_args = _args(world, checkpoint, tmp_path / "ema", *common, "--use_ema", "--ema_decay_ratio", "0.5")
    ema_metrics = _train_in_process(ema_args)
    raw_args = _args(world, checkpoint, tmp_path / "raw", *common)
    raw_metrics = _train_in_process(raw_args)
    ema_run, raw_run = tmp_path / "ema" / FLICKR_RUN, tmp_path / "raw" / FLICKR_RUN

    # The averaged weights are saved beside the raw ones, and differ from them.
    for epoch in (0, 1):
        averaged = _weights(ema_run / f"pytorch_model_{epoch}_ema.bin")
        assert averaged.keys() == _weights(ema_run / f"pytorch_model_{epoch}.bin").keys()
        assert not _same_weights(averaged, _weights(ema_run / f"pytorch_model_{epoch}.bin"))
    assert not (raw_run / "pytorch_model_0_ema.bin").exists()
    # Swapping the averages in for validation left the trained weights alone: the raw weights of
    # both epochs are those of the same run without EMA, bit for bit.
    for epoch in (0, 1):
        assert _same_weights(
            _weights(ema_run / f"pytorch_model_{epoch}.bin"), _weights(raw_run / f"pytorch_model_{epoch}.bin")
        )

    # Each run reported the validation of the weights it says it validated.
    assert ema_metrics["weights"] == "ema" and raw_metrics["weights"] == "raw"
    for epoch in (0, 1):
        reported = ema_metrics["validation"][epoch]["RetrievalFlickr30k/loss"]
        averaged = _validation_of(ema_run / f"pytorch_model_{epoch}_ema.bin", ema_args)[
            "RetrievalFlickr30k/loss"
        ]
        raw = _validation_of(ema_run / f"pytorch_model_{epoch}.bin", ema_args)["RetrievalFlickr30k/loss"]
        assert reported == pytest.approx(averaged, rel=1e-6)
        assert reported != pytest.approx(raw, rel=1e-6)
        assert raw_metrics["validation"][epoch]["RetrievalFlickr30k/loss"] == pytest.approx(raw, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The published command lines, on CPU
# ---------------------------------------------------------------------------------------------


def _check_run_folder(run: Path, checkpoint: str, command_flags: tuple[str, ...]) -> None:
    for name in ("pytorch_model_0.bin", "pytorch_model_0_ema.bin", "training_state.pt", "command.txt"):
        assert (run / name).is_file(), f"{name} missing from {run}: {sorted(os.listdir(run))}"
    start, trained = _weights(Path(checkpoint)), _weights(run / "pytorch_model_0.bin")
    assert start.keys() == trained.keys() and not _same_weights(start, trained)
    command = (run / "command.txt").read_text()
    assert all(flag in command for flag in command_flags)
    # The README commands run the published recipe: BertAdam, one step per task.
    assert '"recipe": "published"' in command
    assert json.loads((run / "run_info.json").read_text())["recipe"] == "published"
    metrics = json.loads((run / "metrics.json").read_text())
    assert [entry["epoch"] for entry in metrics["validation"]] == [0] and metrics["weights"] == "ema"


@pytest.mark.slow
def test_published_flickr30k_command(world, checkpoint, tmp_path):
    published = (
        "--bert_model", "bert-base-uncased", "--from_pretrained", checkpoint, "--config_file",
        "config/interbert_tiny.json", "--learning_rate", "4e-5", "--num_workers", "9", "--tasks", "3",
        "--save_name", "model_name", "--use_ema", "--ema_decay_ratio", "0.9999", "--num_train_epochs", "1",
    )  # fmt: skip
    result = _cli(*published, "--task_config", world, "--output_dir", str(tmp_path), "--no_cuda")
    assert result.returncode == 0, result.stderr[-4000:]
    # Workers are capped by the CPUs: PyTorch warns when a loader forks more than the machine has.
    assert "worker processes in total" not in result.stderr
    _check_run_folder(tmp_path / f"{FLICKR_RUN}-model_name", checkpoint, ("--use_ema", "--num_workers"))


@pytest.mark.slow
def test_published_vcr_command(world, checkpoint, tmp_path):
    published = (
        "--bert_model", "bert-base-uncased", "--from_pretrained", checkpoint, "--config_file",
        "config/interbert_tiny.json", "--learning_rate", "2e-5", "--num_workers", "16", "--tasks", "1-2",
        "--save_name", "model_name", "--use_ema", "--ema_decay_ratio", "0.9999", "--num_train_epochs", "1",
    )  # fmt: skip
    result = _cli(*published, "--task_config", world, "--output_dir", str(tmp_path), "--no_cuda")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "worker processes in total" not in result.stderr
    run = tmp_path / "VCR_Q-A-VCR_QA-R_interbert_tiny-model_name"
    _check_run_folder(run, checkpoint, ("--tasks 1-2",))
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"VCR_Q-A/score", "VCR_QA-R/score"} <= set(metrics["validation"][0])


def test_worker_count_is_shared_and_capped_by_the_cpus(monkeypatch):
    monkeypatch.setattr(loader, "available_cpus", lambda: 2)
    assert loader.loader_workers(16, world_size=1, num_tasks=2) == 1
    assert loader.loader_workers(9, world_size=1, num_tasks=1) == 2
    assert loader.loader_workers(16, world_size=2, num_tasks=2) == 0  # in the main processes
    monkeypatch.setattr(loader, "available_cpus", lambda: 64)
    assert loader.loader_workers(16, world_size=8, num_tasks=1) == 2  # the published split
    assert loader.loader_workers(0, world_size=1, num_tasks=1) == 0


# ---------------------------------------------------------------------------------------------
# Two processes, and the batch-size check
# ---------------------------------------------------------------------------------------------

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


@pytest.mark.slow
def test_two_processes_with_torchrun(world, checkpoint, tmp_path):
    result = _cli(
        "--from_pretrained", checkpoint, "--config_file", TINY_CONFIG, "--task_config", world,
        "--output_dir", str(tmp_path), "--tasks", "3", "--num_train_epochs", "1", "--num_workers", "0",
        "--no_cuda", "--quiet", "--save_name", "ddp",
        launcher=TORCHRUN,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    # 40 captions: 20 per rank, in batches of 8 / 2 ranks.
    assert f"RetrievalFlickr30k: {FLICKR_BATCHES} batches/epoch of 4 per rank" in result.stderr
    run = tmp_path / f"{FLICKR_RUN}-ddp"
    assert (run / "pytorch_model_0.bin").is_file() and (run / "training_state.pt").is_file()
    assert not any(key.startswith("module.") for key in _weights(run / "pytorch_model_0.bin"))
    state = torch.load(run / "training_state.pt", map_location="cpu", weights_only=True)
    assert len(state["rng"]) == 2  # both ranks' RNG states, to resume each where it was


def test_batch_not_divisible_by_world_size_times_accumulation(world, checkpoint, tmp_path):
    """Checked before any collective, so a process of a would-be 2-rank run shows it (no launch needed)."""
    task_config = _yaml_variant(world, tmp_path, TASK3={"batch_size": 6})
    args = _args(task_config, checkpoint, tmp_path, "--tasks", "3", "--gradient_accumulation_steps", "2")
    two_ranks = DistContext(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    tokenizer = BertTokenizer(args.bert_model)
    with pytest.raises(
        ValueError,
        match="TASK3 batch_size 6 is not divisible by gradient_accumulation_steps 2 x world size 2",
    ):
        finetuning.build_tasks(args, two_ranks, tokenizer)
    # 6 = 3 per rank without accumulation: fine.
    args.gradient_accumulation_steps = 1
    [run] = finetuning.build_tasks(args, two_ranks, tokenizer)
    assert run.train_loader.batch_sampler.batch_size == 3


def test_batch_not_divisible_by_accumulation_in_one_process(world, checkpoint, tmp_path, capsys):
    args = _args(world, checkpoint, tmp_path, "--tasks", "3", "--gradient_accumulation_steps", "3")
    with pytest.raises(SystemExit) as stopped:
        finetuning.run(args)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert (
        "error: TASK3 batch_size 8 is not divisible by gradient_accumulation_steps 3 x world size 1" in error
    )
    assert not (tmp_path / FLICKR_RUN).exists()  # nothing written by a run that could not start


# ---------------------------------------------------------------------------------------------
# Kill and resume
# ---------------------------------------------------------------------------------------------


def _resumable_command(
    world: str, checkpoint: str, output_dir: Path, tasks: str = "3", workers: str = "0"
) -> list[str]:
    return [
        sys.executable, str(ROOT / "train_tasks.py"), "--from_pretrained", checkpoint, "--config_file",
        TINY_CONFIG, "--task_config", world, "--output_dir", str(output_dir), "--tasks", tasks,
        "--num_train_epochs", "3", "--save_every_steps", "2", "--deterministic", "--num_workers", workers,
        "--no_cuda", "--quiet", "--use_ema", "--ema_decay_ratio", "0.5", "--learning_rate", "1e-3",
    ]  # fmt: skip


def _kill_after_step(command: list[str], state_path: Path, step: int, log: Path, timeout: float = 300) -> int:
    """Start ``command``, SIGKILL it once its training state reached ``step``; the step it reached."""
    with open(log, "wb") as stderr:  # a file, not a pipe nobody reads while the run goes on
        process = subprocess.Popen(
            command, cwd=ROOT, env=_environment(), stdout=subprocess.DEVNULL, stderr=stderr
        )
        deadline, seen = time.monotonic() + timeout, None
        try:
            while time.monotonic() < deadline and process.poll() is None:
                stamp = state_path.stat().st_mtime_ns if state_path.exists() else None
                if stamp is not None and stamp != seen:
                    seen = stamp
                    state = torch.load(state_path, map_location="cpu", weights_only=True)
                    if state["state"]["global_step"] >= step:
                        process.send_signal(signal.SIGKILL)
                        break
                time.sleep(0.01)
        finally:
            if process.poll() is None:  # killed above, timed out, or the check itself failed
                process.kill()
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"run was not killed mid-way: {log.read_text()[-3000:]}"
    return torch.load(state_path, map_location="cpu", weights_only=True)["state"]["global_step"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "tasks, workers, run_name",
    [("3", "0", FLICKR_RUN), ("1-3", "2", f"VCR_Q-A-{FLICKR_RUN}")],
    ids=["flickr-no-workers", "multi-task-with-workers"],
)
def test_killed_run_resumes_to_the_same_weights(world, checkpoint, tmp_path, tasks, workers, run_name):
    """Under the default (published) recipe: one optimiser step and EMA update per task; with two
    tasks and DataLoader workers the resumed run still lands on the uninterrupted one's weights."""
    steps = 3 * FLICKR_BATCHES
    # The uninterrupted reference runs alongside the one that gets killed.
    with open(tmp_path / "whole.log", "wb") as log:
        whole = subprocess.Popen(
            _resumable_command(world, checkpoint, tmp_path / "whole", tasks, workers),
            cwd=ROOT, env=_environment(), stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            command = _resumable_command(world, checkpoint, tmp_path / "killed", tasks, workers)
            run = tmp_path / "killed" / run_name
            reached = _kill_after_step(
                command, run / "training_state.pt", FLICKR_BATCHES + 1, tmp_path / "killed.log"
            )
        finally:
            whole.wait(timeout=300)
    assert whole.returncode == 0, (tmp_path / "whole.log").read_text()[-4000:]
    assert FLICKR_BATCHES < reached < steps  # killed in the middle of epoch 1
    assert not (run / "pytorch_model_2.bin").exists()
    resumed = subprocess.run(
        command, cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr

    reference = tmp_path / "whole" / run_name
    for name in ("pytorch_model_2.bin", "pytorch_model_2_ema.bin"):
        assert _same_weights(_weights(run / name), _weights(reference / name)), name
    # The validation history survived the kill too.
    assert json.loads((run / "metrics.json").read_text()) == json.loads(
        (reference / "metrics.json").read_text()
    )


# ---------------------------------------------------------------------------------------------
# Learning: pretrained on the synthetic world, fine-tuned retrieval beats chance
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fine_tuning_a_pretrained_checkpoint_beats_chance_at_retrieval(tmp_path):
    """Chance is 25% (the true pair first among 4 candidates); the grounded captions allow far more.

    Tiny-model settings that get there in about a minute of CPU: weights initialised with std 0.1
    and no dropout (with the tiny config's 0.02 and dropout 0.1, the matching only emerges after
    several hundred more steps), lr 1e-3, batch 16, 10 epochs (320 steps), no EMA.
    """
    world = generate_synthetic_world(str(tmp_path / "world"), SyntheticWorldConfig.small(seed=0))
    with open(TINY_CONFIG, encoding="utf-8") as f:
        config = json.load(f)
    config.update(initializer_range=0.1, v_initializer_range=0.1)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        config[key] = config["v_" + key] = 0.0
    config_file = tmp_path / "interbert_tiny_fast.json"
    config_file.write_text(json.dumps(config, indent=2))

    pretraining = subprocess.run(
        [
            sys.executable, str(ROOT / "train_concap.py"), "--bert_model", "bert-base-uncased",
            "--from_pretrained", "", "--train_data_dir", world.conceptual_captions,
            "--val_data_dir", world.conceptual_captions, "--config_file", str(config_file),
            "--train_batch_size", "16", "--output_dir", str(tmp_path), "--save_name", "pre",
            "--num_train_epochs", "3", "--span_mask", "--num_workers", "0", "--learning_rate", "1e-3",
            "--no_cuda", "--quiet", "--save_every_steps", "0", "--recipe", "modern",
        ],
        cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pretraining.returncode == 0, pretraining.stderr[-4000:]

    pretrained = str(tmp_path / "pre" / "pytorch_model_2.bin")
    task_config = _yaml_variant(world.tasks_yaml, tmp_path, TASK3={"batch_size": 16, "max_seq_length": 20})
    result = _cli(
        "--bert_model", "bert-base-uncased", "--from_pretrained", pretrained, "--config_file",
        str(config_file), "--task_config", task_config, "--tasks", "3",
        "--learning_rate", "1e-3", "--num_train_epochs", "10", "--num_workers", "0", "--no_cuda", "--quiet",
        "--save_every_steps", "0", "--output_dir", str(tmp_path), "--save_name", "learned",
        "--recipe", "modern",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads(
        (tmp_path / "RetrievalFlickr30k_interbert_tiny_fast-learned" / "metrics.json").read_text()
    )
    scores = [entry["RetrievalFlickr30k/score"] for entry in metrics["validation"]]
    assert len(scores) == 10 and metrics["best_score"] == max(scores)
    assert max(scores) >= 45.0, f"retrieval validation scores per epoch: {scores} (chance: 25)"
