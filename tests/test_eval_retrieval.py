"""eval_retrieval.py and its scoring engine on the synthetic world: the engine agrees with the model,
the published command lines run, results do not depend on batch size or world size, bad input gets
one clear line, and a trained model beats chance (zero-shot) and beats zero-shot (fine-tuned)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT
from vilbert.checkpoint import save_state_dict
from vilbert.config import BertConfig
from vilbert.datasets.jsonl import read_jsonl, write_jsonl
from vilbert.datasets.synthetic import SyntheticWorldConfig, generate_synthetic_world
from vilbert.modeling import InterBertForMultiModalPreTraining, InterBertForVLTasks
from vilbert.precision import Precision
from vilbert.retrieval_eval import format_retrieval_table, retrieval_main, retrieval_report
from vilbert.retrieval_scorer import ImageBank, PairStream, RetrievalScorer, block_size, pairs_for_budget

TINY = os.path.join(ROOT, "config", "interbert_tiny.json")
DEMO = os.path.join(ROOT, "config", "interbert_demo.json")
SCRIPT = os.path.join(ROOT, "eval_retrieval.py")
TIMEOUT = 600
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The engine


def _random_inputs(config: BertConfig, captions: int, images: int, regions: int = 12, tokens: int = 30):
    g = torch.Generator().manual_seed(1)
    input_mask = (
        torch.arange(tokens)[None] < torch.randint(4, tokens + 1, (captions, 1), generator=g)
    ).long()
    text = {
        "input_ids": torch.randint(1000, 5000, (captions, tokens), generator=g) * input_mask,
        "input_mask": input_mask,
        "segment_ids": torch.zeros(captions, tokens, dtype=torch.long),
    }
    image_mask = (
        torch.arange(regions)[None] < torch.randint(2, regions + 1, (images, 1), generator=g)
    ).long()
    image = {
        "image_feat": torch.randn(images, regions, config.v_feature_size, generator=g),
        "image_loc": torch.rand(images, regions, 5, generator=g),
        "image_mask": image_mask,
    }
    return text, image


def _forward_scores(model: torch.nn.Module, text: dict, image: dict) -> np.ndarray:
    """Reference: the model's own forward on each (caption, image) pair, full heads."""
    rows = []
    n = image["image_feat"].shape[0]
    with torch.no_grad():
        for i in range(text["input_ids"].shape[0]):
            caption = {k: v[i : i + 1].expand(n, -1) for k, v in text.items()}
            inputs = dict(
                input_ids=caption["input_ids"],
                image_feat=image["image_feat"],
                image_loc=image["image_loc"],
                token_type_ids=caption["segment_ids"],
                attention_mask=caption["input_mask"],
                image_attention_mask=image["image_mask"],
            )
            if isinstance(model, InterBertForVLTasks):
                logits = model(**inputs).vil_binary_prediction
            else:
                logits = model(**inputs).itm
            rows.append(logits.softmax(dim=1)[:, 0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize(
    "model_class, layers",
    [
        (InterBertForVLTasks, (2, 1, 1)),
        (InterBertForMultiModalPreTraining, (2, 1, 1)),
        (InterBertForVLTasks, (1, 2, 3)),
        (InterBertForMultiModalPreTraining, (2, 0, 0)),
    ],
)
def test_engine_matches_the_model_and_shards_bitwise(model_class, layers):
    values = json.loads(Path(TINY).read_text())
    values.update(num_hidden_layers=layers[0], t_num_hidden_layers=layers[1], v_num_hidden_layers=layers[2])
    values["initializer_range"] = 0.2  # scores spread over (0, 1) rather than all near 0.5
    config = BertConfig(**values)
    torch.manual_seed(0)
    model = model_class(config).eval()
    text, image = _random_inputs(config, captions=5, images=7)
    expected = _forward_scores(model, text, image)
    assert expected.std() > 0.01

    scorer = RetrievalScorer(model, Precision("fp32", torch.device("cpu")), pairs_per_forward=9)
    chunks = [{k: v[:4] for k, v in image.items()}, {k: v[4:] for k, v in image.items()}]
    bank = scorer.embed_images(chunks, 7)
    assert list(bank.extent) == sorted(bank.extent)  # shortest first
    stream = scorer.stream(text, bank)
    scores = scorer.score(stream)
    assert scores.shape == (5, 7) and np.abs(scores - expected).max() < 1e-5
    for world_size in (2, 3):  # ranks share whole blocks: bitwise the same matrix
        shards = [stream.shard(rank, world_size) for rank in range(world_size)]
        assert [p for shard in shards for p in shard] == list(range(35))
        parts = [scorer.score(stream, shard) for shard in shards]
        assert np.array_equal(stream.matrix(np.concatenate(parts)), scores)
    # a prefix of the captions (--max_captions) scores the same, up to rounding
    prefix = scorer.score(scorer.stream({k: v[:2] for k, v in text.items()}, bank))
    assert np.abs(prefix - scores[:2]).max() < 1e-5
    with pytest.raises(ValueError, match="blocks of 9"):
        scorer.score(stream, range(3, 12))


def test_block_size_follows_the_budget_and_the_split():
    config = BertConfig.from_json_file(TINY)
    per_pair = 2**30 // pairs_for_budget(config, 102, 30, 2**30)
    assert pairs_for_budget(config, 102, 30, 10 * per_pair) == 10
    assert pairs_for_budget(config, 102, 30, 1) == 1
    assert block_size(config, 102, 30, total_pairs=7, budget_bytes=2**40) == 7
    base = BertConfig.from_json_file(os.path.join(ROOT, "config", "bert_base_6layer_interbert.json"))
    assert pairs_for_budget(base, 102, 30, 2**30) < pairs_for_budget(config, 102, 30, 2**30)


def test_retrieval_report_on_a_hand_made_matrix():
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # caption 0 -> image 0: rank 1
            [0.5, 0.4, 0.6],  # caption 1 -> image 1: rank 3
            [0.3, 0.8, 0.8],  # caption 2 -> image 2: tie with image 1, ranked against: rank 2
        ]
    )
    report = retrieval_report(scores, np.array([0, 1, 2]), [101, 202, 303], top_k=2)
    image = report["image_retrieval"]
    assert image["r1"] == pytest.approx(100 / 3) and image["r5"] == 100.0
    assert (image["medr"], image["meanr"]) == (2.0, 2.0)
    assert report["top_image_ids"] == [[101, 303], [303, 101], [202, 303]]
    assert report["caption_image_ids"] == [101, 202, 303]
    assert (report["num_captions"], report["num_images"], report["top_k"]) == (3, 3, 2)
    # image 1's only caption is 1 (0.4); caption 2 scores it higher (0.8): rank 2
    assert report["text_retrieval"]["r1"] == pytest.approx(200 / 3)
    table = format_retrieval_table(
        {**report, "task": "RetrievalFlickr30k", "split": "test", "mode": "zero-shot"}
    )
    lines = table.splitlines()
    assert "(zero-shot)" in lines[0] and lines[1].split() == ["R@1", "R@5", "R@10", "medr", "meanr"]
    assert lines[2].split()[:2] == ["image", "retrieval"] and lines[3].split()[:2] == ["text", "retrieval"]


# The command line on the synthetic world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("retrieval_world") / "world"
    generate_synthetic_world(str(root), SyntheticWorldConfig.small(0))
    return root


@pytest.fixture(scope="module")
def checkpoints(world) -> dict[str, str]:
    config = BertConfig.from_json_file(TINY)
    torch.manual_seed(0)
    paths = {
        "vl": str(world / "ckpt" / "finetuned.bin"),
        "pretraining": str(world / "ckpt" / "pretrained.bin"),
    }
    (world / "ckpt").mkdir()
    save_state_dict(InterBertForVLTasks(config), paths["vl"])
    save_state_dict(InterBertForMultiModalPreTraining(config), paths["pretraining"])
    return paths


def _env() -> dict[str, str]:
    """This environment without a launcher's variables, one intra-op thread per process."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")}


def _run(
    command: list[str], cwd: Path | str, env: dict[str, str] | None = None, timeout: int = TIMEOUT
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=cwd, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def _published(checkpoint: str, *extra: str) -> list[str]:
    """The README's command line, verbatim, plus ``extra``."""
    return [
        sys.executable, SCRIPT, "--bert_model", "bert-base-uncased", "--from_pretrained", checkpoint,
        "--config_file", TINY, "--task", "3", "--split", "test", "--batch_size", "1", *extra,
    ]  # fmt: skip


def _outputs(folder: Path) -> tuple[np.ndarray, dict]:
    return np.load(folder / "scores_test.npy"), json.loads((folder / "retrieval_test.json").read_text())


@pytest.fixture(scope="module")
def published_runs(world, checkpoints) -> dict[str, subprocess.CompletedProcess]:
    """Both published command lines, run from the data folder (default YAML, default output_dir)."""
    return {
        "finetuned": _run(_published(checkpoints["vl"], "--num_workers", "0"), world),
        "zero_shot": _run(_published(checkpoints["pretraining"], "--zero_shot"), world),
    }


def test_published_command_lines_run(world, published_runs):
    for name, folder, label in (
        ("finetuned", "ckpt-finetuned", "fine-tuned"),
        ("zero_shot", "ckpt-pretrained-zero_shot", "zero-shot"),
    ):
        scores, report = _outputs(world / "results" / folder)
        assert scores.shape == (150, 30) and scores.dtype == np.float32
        assert np.all((scores >= 0) & (scores <= 1))
        assert (report["num_captions"], report["num_images"], report["mode"]) == (150, 30, label)
        assert len(report["top_image_ids"]) == 150 and all(len(top) == 20 for top in report["top_image_ids"])
        annotations = list(read_jsonl(str(world / "flickr30k" / "all_data_final_test_set0_2014.jsonline")))
        assert report["image_ids"] == [int(a["img_path"].split(".")[0]) for a in annotations]
        assert set(report["image_retrieval"]) >= {"r1", "r5", "r10", "medr", "meanr"}
        truth = np.array([report["image_ids"].index(i) for i in report["caption_image_ids"]])
        recomputed = retrieval_report(scores, truth, report["image_ids"])  # from the saved matrix alone
        assert recomputed["image_retrieval"] == report["image_retrieval"]
        assert recomputed["top_image_ids"] == report["top_image_ids"]
        out = published_runs[name].stdout
        assert f"({label})" in out and "R@1" in out and "meanr" in out


def test_scores_do_not_depend_on_batch_size(world, checkpoints, published_runs, tmp_path):
    runs = {}
    for batch_size in ("1", "7"):
        command = _published(checkpoints["vl"], "--batch_size", batch_size, "--max_captions", "24")
        _run(
            [*command, "--output_dir", str(tmp_path), "--save_name", batch_size, "--num_workers", "0"], world
        )
        runs[batch_size] = _outputs(tmp_path / batch_size)
    assert runs["1"][0].shape == (24, 30)
    assert np.array_equal(runs["1"][0], runs["7"][0])
    for key in ("image_retrieval", "text_retrieval", "top_image_ids"):
        assert runs["1"][1][key] == runs["7"][1][key]
    full, _ = _outputs(world / "results" / "ckpt-finetuned")
    assert np.abs(full[:24] - runs["7"][0]).max() < 1e-6  # a --max_captions prefix, up to rounding


@pytest.mark.slow
def test_scores_do_not_depend_on_world_size(world, checkpoints, published_runs, tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        *_published(checkpoints["vl"])[1:], "--no_cuda", "--num_workers", "0",
        "--output_dir", str(tmp_path), "--save_name", "two",
    ]  # fmt: skip
    _run(command, world)
    two, two_report = _outputs(tmp_path / "two")
    one, one_report = _outputs(world / "results" / "ckpt-finetuned")
    assert np.array_equal(one, two)
    assert one_report["image_retrieval"] == two_report["image_retrieval"]
    assert one_report["top_image_ids"] == two_report["top_image_ids"]


def test_the_fine_tuning_yaml_swapped_for_the_eval_one_still_works(world, checkpoints, tmp_path, monkeypatch):
    """The README's flow: copy interbert_tasks_eval.yml over interbert_tasks.yml (eval file gone)."""
    folder = tmp_path / "swapped"
    folder.mkdir()
    evaluation = yaml.safe_load((world / "interbert_tasks_eval.yml").read_text())
    for task in evaluation.values():
        for key in ("dataroot", "features_h5path1", "features_h5path2", "train_annotations_jsonpath"):
            task[key] = str(world / task[key]) if task[key] else ""
        task["val_annotations_jsonpath"] = str(world / task["val_annotations_jsonpath"])
    (folder / "interbert_tasks.yml").write_text(yaml.safe_dump(evaluation))
    monkeypatch.chdir(folder)
    assert (
        retrieval_main([*_published(checkpoints["vl"])[2:], "--max_captions", "5", "--num_workers", "0"]) == 0
    )
    _, report = _outputs(folder / "results" / "ckpt-finetuned")
    assert report["annotations"].endswith("all_data_final_test_set0_2014.jsonline")


# Bad input: one clear line, exit status 2


@pytest.fixture(scope="module")
def bad_inputs(world, checkpoints) -> dict[str, list[str]]:
    root = world / "bad"
    root.mkdir()
    values = json.loads(Path(TINY).read_text())
    (root / "wide.json").write_text(json.dumps({**values, "hidden_size": 32, "v_hidden_size": 32}))
    (root / "deep.json").write_text(json.dumps({**values, "num_hidden_layers": 3}))
    records = list(read_jsonl(str(world / "flickr30k" / "all_data_final_test_set0_2014.jsonline")))
    records[2]["img_path"] = "987654321.jpg"
    write_jsonl(str(world / "flickr30k" / "missing_image.jsonline"), records)
    tasks = yaml.safe_load((world / "interbert_tasks_eval.yml").read_text())
    tasks["TASK3"]["val_annotations_jsonpath"] = "flickr30k/missing_image.jsonline"
    (world / "missing_image.yml").write_text(yaml.safe_dump(tasks))

    def case(*extra: str, config: str = TINY, checkpoint: str = checkpoints["vl"]) -> list[str]:
        return [
            "--from_pretrained", checkpoint, "--config_file", config, "--task", "3",
            "--task_config", str(world / "interbert_tasks_eval.yml"), "--output_dir", str(root / "out"),
            "--num_workers", "0", "--quiet", *extra,
        ]  # fmt: skip

    return {
        "config_width": case(config=str(root / "wide.json")),
        "config_depth": case(config=str(root / "deep.json")),
        "unknown_split": case("--split", "train2"),
        "missing_image": case("--task_config", str(world / "missing_image.yml")),
        "no_checkpoint": case(checkpoint=str(root / "nowhere.bin")),
        "vcr_task": case("--tasks", "1"),
    }


BAD_INPUT_MESSAGES = {
    "config_width": ["shape mismatch for bert.", "is --config_file the one"],
    "config_depth": ["does not match --config_file", "deep.json", "bert.encoder.layer.3"],
    "unknown_split": ["TASK3 has no split 'train2'", "all_data_final_train2_set0_2014.jsonline"],
    "missing_image": ["image 987654321", "missing_image.jsonline", "not in the region-feature LMDB"],
    "no_checkpoint": ["checkpoint not found", "nowhere.bin"],
    "vcr_task": ["TASK1 (VCR_Q-A)", "evaluates one RetrievalFlickr30k task"],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT_MESSAGES))
def test_bad_input_is_one_clear_line(bad_inputs, case, capsys):
    assert retrieval_main(bad_inputs[case]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("eval_retrieval.py: error:"), error
    for part in BAD_INPUT_MESSAGES[case]:
        assert part in error, error


def test_no_task_yaml_in_the_working_directory(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert retrieval_main(["--from_pretrained", checkpoints["vl"], "--config_file", TINY]) == 2
    assert "interbert_tasks_eval.yml, interbert_tasks.yml" in capsys.readouterr().err


def test_error_line_from_the_script(world, checkpoints):
    command = _published(checkpoints["vl"], "--split", "train2")
    result = subprocess.run(command, cwd=world, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("eval_retrieval.py: error: interbert_tasks_eval.yml")
    )


# Learning: train_concap.py -> eval --zero_shot; train_tasks.py -> eval


def _chance_mean_rank(num_images: int) -> float:
    return (num_images + 1) / 2


@pytest.fixture(scope="module")
def learning_world(tmp_path_factory) -> Path:
    """The small world with 6,000 pretraining and 400 Flickr30K training images, written by the tool."""
    root = tmp_path_factory.mktemp("learning_world") / "world"
    tool = os.path.join(ROOT, "tools", "make_synthetic_data.py")
    sizes = ["--num_images", "6000", "--flickr_train_images", "400"]
    _run([sys.executable, tool, "--output_dir", str(root), "--small", *sizes], ROOT)
    return root


@pytest.fixture(scope="module")
def trained(learning_world, tmp_path_factory) -> dict[str, dict]:
    """Pretrain with train_concap.py, fine-tune that with train_tasks.py, evaluate both.

    The demo's recipe and seed (``config/interbert_demo.json``, batch 64, lr 2e-3, 16 epochs of 6,000
    images = 1,504 steps, ``--seed 0``, two threads): on this world the ITM loss sits at ln 2 until
    masked-segment modelling has grounded words in regions, then falls. When that happens depends on
    the seed (seen from ~750 steps to not within 1,880); seed 0 leaves ln 2 near step 900, and a CPU
    run with a fixed seed and thread count is deterministic. About 5 minutes on two cores, the
    longest run of the suite.
    """
    world = learning_world
    out = tmp_path_factory.mktemp("trained")
    cc = str(world / "conceptual_captions")
    two_threads = {"OMP_NUM_THREADS": "2"}
    _run(
        [
            sys.executable, os.path.join(ROOT, "train_concap.py"), "--train_data_dir", cc,
            "--val_data_dir", cc, "--config_file", DEMO, "--train_batch_size", "64",
            "--learning_rate", "2e-3", "--num_train_epochs", "16", "--num_workers", "1",
            "--region_len", "10", "--max_seq_length", "24", "--span_mask", "--output_dir", str(out),
            "--save_name", "pretrained", "--save_every_steps", "0", "--quiet", "--no_cuda", "--seed", "0",
            "--recipe", "modern",  # the demo recipe, tuned for AdamW
        ],
        world,
        env=two_threads,
        timeout=2400,
    )  # fmt: skip
    pretrained = str(out / "pretrained" / "pytorch_model_15.bin")
    _run(
        [
            sys.executable, os.path.join(ROOT, "train_tasks.py"), "--from_pretrained", pretrained,
            "--config_file", DEMO, "--tasks", "3", "--task_config", str(world / "interbert_tasks.yml"),
            "--learning_rate", "5e-4", "--num_train_epochs", "3", "--num_workers", "0",
            "--output_dir", str(out), "--save_name", "ft", "--use_ema", "--ema_decay_ratio", "0.9",
            "--save_every_steps", "0", "--quiet", "--no_cuda", "--recipe", "modern",
        ],
        world,
        env=two_threads,
    )  # fmt: skip
    finetuned = out / "RetrievalFlickr30k_interbert_demo-ft"
    reports = {}
    for name, checkpoint, extra in (
        ("zero_shot", pretrained, ["--zero_shot"]),
        ("finetuned", str(finetuned / "pytorch_model_2.bin"), []),
        ("finetuned_ema", str(finetuned / "pytorch_model_2_ema.bin"), []),
    ):
        command = _published(checkpoint, *extra, "--output_dir", str(out / "eval"), "--save_name", name)
        command[command.index(TINY)] = DEMO
        _run([*command, "--num_workers", "0", "--quiet"], world)
        reports[name] = _outputs(out / "eval" / name)[1]
    return reports


@pytest.mark.slow
def test_pretrained_and_fine_tuned_checkpoints_evaluate(trained):
    """The checkpoints the two training scripts write (EMA included) load and score the split."""
    for name, report in trained.items():
        assert report["mode"] == ("zero-shot" if name == "zero_shot" else "fine-tuned")
        assert (report["num_captions"], report["num_images"]) == (150, 30)
        assert 1 <= report["image_retrieval"]["meanr"] <= 30


@pytest.mark.slow
def test_zero_shot_beats_chance_and_fine_tuning_beats_zero_shot(trained):
    zero_shot, finetuned = trained["zero_shot"]["image_retrieval"], trained["finetuned"]["image_retrieval"]
    chance = _chance_mean_rank(trained["zero_shot"]["num_images"])
    num_images = trained["zero_shot"]["num_images"]
    assert zero_shot["meanr"] < 0.8 * chance, zero_shot
    assert zero_shot["r1"] > 2 * 100 / num_images and zero_shot["r10"] > 100 * 10 / num_images + 10, zero_shot
    assert finetuned["meanr"] < zero_shot["meanr"] and finetuned["r1"] > zero_shot["r1"], (
        finetuned,
        zero_shot,
    )


def test_a_fine_tuning_run_folder_evaluates_its_best_ema_checkpoint(tmp_path):
    from vilbert.evaluation import EvaluationError, run_folder_checkpoint

    (tmp_path / "metrics.json").write_text(json.dumps({"best_epoch": 1, "validation": []}))
    for name in ("pytorch_model_0.bin", "pytorch_model_1.bin", "pytorch_model_1_ema.bin"):
        (tmp_path / name).write_bytes(b"")
    assert run_folder_checkpoint(str(tmp_path)) == str(tmp_path / "pytorch_model_1_ema.bin")
    (tmp_path / "pytorch_model_1_ema.bin").unlink()
    assert run_folder_checkpoint(str(tmp_path)) == str(tmp_path / "pytorch_model_1.bin")
    (tmp_path / "pytorch_model_1.bin").unlink()
    with pytest.raises(EvaluationError, match="best epoch 1, but its weights are not there"):
        run_folder_checkpoint(str(tmp_path))
    assert run_folder_checkpoint(str(tmp_path / "pytorch_model_0.bin")) == str(
        tmp_path / "pytorch_model_0.bin"
    )


def test_evaluation_knows_what_trained_the_checkpoint(tmp_path, caplog):
    """run_info.json beside a checkpoint tells a pretraining checkpoint (its scores are zero-shot) and
    a fine-tuning run on other tasks (the head that scores was not trained) from the right one."""
    from vilbert.evaluation import check_head_trained

    released = tmp_path / "released.bin"
    assert check_head_trained(str(released), "RetrievalFlickr30k") is False  # nothing to tell
    pretrained = tmp_path / "pre"
    pretrained.mkdir()
    (pretrained / "run_info.json").write_text(json.dumps({"recipe": "published", "train_batch_size": 64}))
    with caplog.at_level("WARNING"):
        assert check_head_trained(str(pretrained / "pytorch_model_0.bin"), "RetrievalFlickr30k") is True
    assert "written by pretraining" in caplog.text and "ZERO-SHOT" in caplog.text
    vcr = tmp_path / "vcr"
    vcr.mkdir()
    tasks = {"TASK1": {"name": "VCR_Q-A"}, "TASK2": {"name": "VCR_QA-R"}}
    (vcr / "run_info.json").write_text(json.dumps({"recipe": "published", "tasks": tasks}))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert check_head_trained(str(vcr / "pytorch_model_4_ema.bin"), "RetrievalFlickr30k") is False
    assert "was fine-tuned on VCR_Q-A, VCR_QA-R, not RetrievalFlickr30k" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_head_trained(str(vcr / "pytorch_model_4_ema.bin"), "VCR_Q-A")
    assert caplog.text == ""


def test_the_padding_report_against_a_hand_count():
    """Captions of 2 and 3 tokens (width 4), images of 1, 2 and 4 regions (width 5), blocks of 4 pairs:
    6 real pairs use 3 x (2 + 3) + 2 x (1 + 2 + 4) = 29 positions. Unsorted, every pair is 9 wide: 54
    computed. Sorted, block 1 (c0 x i0-i2, c1 x i0) is cut to 3 + 4 and block 2 (c1 x i1, i2 and two
    filler copies) too: 2 x 4 x 7 = 56 computed, so here the filler costs more than the cut saves."""
    lengths = {"captions": [3, 2], "images": [4, 1, 2]}  # unsorted: the stream sorts them
    text_mask = (torch.arange(4) < torch.tensor(lengths["captions"])[:, None]).long()
    image_mask = (torch.arange(5) < torch.tensor(lengths["images"])[:, None]).long()
    caption_order, image_order = np.argsort(lengths["captions"]), np.argsort(lengths["images"])
    bank = ImageBank(torch.zeros(3, 5, 1), image_mask[image_order], image_order, np.array([1, 2, 4]))
    stream = PairStream({"input_mask": text_mask[caption_order]}, caption_order, np.array([2, 3]), bank, 4)
    report = stream.padding()
    assert report.unsorted == pytest.approx(1 - 29 / 54) and report.sorted == pytest.approx(1 - 29 / 56)
    assert str(report) == "padding 46.3% of positions unsorted, 48.2% sorted into blocks"
    one_block = PairStream(stream.captions, caption_order, stream.caption_extent, bank, 6)
    assert one_block.padding().sorted == pytest.approx(1 - 29 / (6 * 7))


def test_tiles_cover_every_pair_once_and_keep_blocks_nearly_uniform():
    """500 captions of 8-30 tokens against 200 images of 11-101 regions, blocks of 400 pairs."""
    rng = np.random.default_rng(0)
    caption_extent, image_extent = np.sort(rng.integers(8, 31, 500)), np.sort(rng.integers(11, 102, 200))
    text_mask = (torch.arange(30) < torch.from_numpy(caption_extent)[:, None]).long()
    image_mask = (torch.arange(102) < torch.from_numpy(image_extent)[:, None]).long()
    bank = ImageBank(torch.zeros(200, 1, 1), image_mask, np.arange(200), image_extent)

    def stream(images_per_tile: int = 0) -> PairStream:
        return PairStream(
            {"input_mask": text_mask}, np.arange(500), caption_extent, bank, 400, images_per_tile
        )

    tiled, caption_major = stream(), stream(images_per_tile=200)
    assert tiled.images_per_tile == 13  # sqrt(400 / 100,000) = 6.3% of the 200 images, rounded up
    caption, image = tiled.rows(np.arange(tiled.total))
    assert len(set(zip(caption.tolist(), image.tolist()))) == tiled.total  # every pair exactly once
    assert np.array_equal(
        tiled.matrix(caption * 1000.0 + image), np.add.outer(np.arange(500) * 1000.0, np.arange(200))
    )
    assert tiled.padding().unsorted == caption_major.padding().unsorted
    assert tiled.padding().sorted < 0.05 < 0.35 < caption_major.padding().sorted  # 4.8% and 37.0%


def test_tf32_is_a_choice_and_off_by_default():
    """``--tf32`` turns TF32 matrix products on for the run; without it fp32 stays exact fp32."""
    from vilbert.precision import use_tf32
    from vilbert.retrieval_eval import retrieval_parser

    base = ["--from_pretrained", "x.bin"]
    assert retrieval_parser().parse_args(base).tf32 is False
    assert retrieval_parser().parse_args([*base, "--tf32"]).tf32 is True
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        use_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        use_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
