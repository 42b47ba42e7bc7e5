"""VCR evaluation: results files, Q->A / QA->R / Q->AR joined by id, the leaderboard file, bad inputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT
from tools.compute_q_ar import main as compute_q_ar_main
from vilbert.checkpoint import save_state_dict
from vilbert.config import BertConfig
from vilbert.datasets.jsonl import read_jsonl, write_jsonl
from vilbert.datasets.synthetic import SyntheticWorldConfig, generate_synthetic_world
from vilbert.modeling import InterBertForMultiModalPreTraining, InterBertForVLTasks
from vilbert.vcr_eval import (
    LEADERBOARD_COLUMNS,
    ResultsError,
    leaderboard_from_files,
    q_ar_from_files,
    results_file_name,
    vcr_main,
)

TINY = os.path.join(ROOT, "config", "interbert_tiny.json")
ANSWERS = [0, 1, 2, 3]
RATIONALES = [3, 2, 1, 0]
VAL_QUESTIONS, TEST_QUESTIONS = 16, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _record(annot_id: str, labelled: bool = True, index: int = 0) -> dict:
    record = {
        "annot_id": annot_id,
        "img_id": f"{annot_id.split('-')[0]}-{index}",
        "objects": ["person", "dog"],
        "question": ["what", "is", [0], "doing", "?"],
        "answer_choices": [["eating"], ["sleeping"], ["running", "with", [1]], ["reading"]],
        "rationale_choices": [["because"], ["it", "is", "late"], [[1], "is", "there"], ["so"]],
    }
    if labelled:
        record.update(answer_label=ANSWERS[index], rationale_label=RATIONALES[index])
    return record


def _write_json(path: Path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def _onehot(option: int) -> list[float]:
    probabilities = [0.1] * 4
    probabilities[option] = 0.7
    return probabilities


@pytest.fixture
def hand_made(tmp_path: Path) -> dict[str, str]:
    """Four val questions; Q->A right on 0, 1, 3; QA->R right on 0, 2, 3; both right on 0 and 3.

    The two results lists are in different orders, so a join by position would score otherwise.
    """
    annotations = tmp_path / "val.jsonl"
    write_jsonl(str(annotations), [_record(f"val-{i}", index=i) for i in range(4)])
    qa_predictions = {0: 0, 1: 1, 2: 0, 3: 3}
    qar_predictions = {0: 3, 1: 0, 2: 1, 3: 0}
    qa = [{"question_id": f"val-{i}", "answer": _onehot(qa_predictions[i])} for i in (2, 0, 3, 1)]
    qar = [{"question_id": f"val-{i}", "answer": _onehot(qar_predictions[i])} for i in (1, 3, 0, 2)]
    return {
        "annotations": str(annotations),
        "qa": _write_json(tmp_path / "qa.json", qa),
        "qar": _write_json(tmp_path / "qar.json", qar),
    }


def test_q_ar_joins_by_question_id_not_position(hand_made):
    metrics = q_ar_from_files(hand_made["qa"], hand_made["qar"], hand_made["annotations"])
    assert metrics == {"q_a": 75.0, "qa_r": 75.0, "q_ar": 50.0, "num_questions": 4}


def test_q_ar_reads_the_published_integer_ids(hand_made, tmp_path):
    for name in ("qa", "qar"):
        results = json.loads(Path(hand_made[name]).read_text())
        for entry in results:
            entry["question_id"] = int(entry["question_id"].split("-")[1])
        _write_json(Path(hand_made[name]), results)
    metrics = q_ar_from_files(hand_made["qa"], hand_made["qar"], hand_made["annotations"])
    assert (metrics["q_a"], metrics["qa_r"], metrics["q_ar"]) == (75.0, 75.0, 50.0)


def test_compute_q_ar_tool(hand_made, capsys):
    argv = ["--qa", hand_made["qa"], "--qar", hand_made["qar"], "--annotations", hand_made["annotations"]]
    assert compute_q_ar_main(argv) == 0
    assert "Q->A 75.00  QA->R 75.00  Q->AR 50.00  (4 questions)" in capsys.readouterr().out


def test_results_of_another_split_are_refused(hand_made, tmp_path, capsys):
    results = json.loads(Path(hand_made["qa"]).read_text())
    for entry in results:
        entry["question_id"] = entry["question_id"].replace("val", "test")
    other = _write_json(tmp_path / "test_qa.json", results)
    with pytest.raises(ResultsError, match="not in the ground truth.*another split"):
        q_ar_from_files(other, hand_made["qar"], hand_made["annotations"])
    argv = ["--qa", other, "--qar", hand_made["qar"], "--annotations", hand_made["annotations"]]
    assert compute_q_ar_main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("compute_q_ar: error:") and "test_qa.json" in error and "another split" in error
    assert len(error.splitlines()) == 1


def test_duplicate_and_malformed_results_are_refused(hand_made, tmp_path):
    results = json.loads(Path(hand_made["qa"]).read_text())
    duplicated = _write_json(tmp_path / "dup.json", [*results, results[0]])
    with pytest.raises(ResultsError, match="more than once"):
        q_ar_from_files(duplicated, hand_made["qar"], hand_made["annotations"])
    short = _write_json(tmp_path / "short.json", [{"question_id": "val-0", "answer": [0.5, 0.5]}])
    with pytest.raises(ResultsError, match="short.json: entry 0"):
        q_ar_from_files(short, hand_made["qar"], hand_made["annotations"])
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ResultsError, match="not valid JSON"):
        q_ar_from_files(str(tmp_path / "broken.json"), hand_made["qar"], hand_made["annotations"])


def test_leaderboard_rows_pair_answers_and_conditioned_rationales(tmp_path):
    annotations = tmp_path / "test.jsonl"
    write_jsonl(str(annotations), [_record(f"test-{i}", labelled=False, index=i) for i in range(2)])
    qa = [{"question_id": f"test-{i}", "answer": [0.1 * i, 0.2, 0.3, 0.4]} for i in (1, 0)]
    qar = [
        {"question_id": f"test-{i}", "answer_index": a, "answer": [i, a, 0.5, 0.25]}
        for a in (3, 1, 0, 2)
        for i in (0, 1)
    ]
    out = tmp_path / "submission.csv"
    count = leaderboard_from_files(
        _write_json(tmp_path / "qa.json", qa),
        _write_json(tmp_path / "qar.json", qar),
        str(annotations),
        str(out),
    )
    assert count == 2
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == LEADERBOARD_COLUMNS and len(LEADERBOARD_COLUMNS) == 21
    assert [row[0] for row in rows[1:]] == ["test-0", "test-1"]
    second = dict(zip(rows[0], rows[2]))
    assert float(second["answer_0"]) == pytest.approx(0.1)
    assert float(second["rationale_conditioned_on_a2_0"]) == 1.0
    assert float(second["rationale_conditioned_on_a2_1"]) == 2.0
    assert float(second["rationale_conditioned_on_a3_3"]) == 0.25

    missing = _write_json(tmp_path / "qar_missing.json", qar[1:])
    with pytest.raises(ResultsError, match="given answer 3"):
        leaderboard_from_files(str(tmp_path / "qa.json"), missing, str(annotations), str(out))


def _named_like_eval_tasks(hand_made, folder: Path) -> dict[str, str]:
    """The hand-made results under the names eval_tasks.py gives them."""
    folder.mkdir()
    paths = {}
    for name, task in (("qa", "VCR_Q-A"), ("qar", "VCR_QA-R")):
        paths[name] = str(folder / results_file_name(task, "val"))
        shutil.copy(hand_made[name], paths[name])
    return paths


def test_compute_q_ar_refuses_swapped_result_files(hand_made, tmp_path):
    named = _named_like_eval_tasks(hand_made, tmp_path / "run")
    argv = ["--qa", named["qar"], "--qar", named["qa"], "--annotations", hand_made["annotations"]]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "compute_q_ar.py"), *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    [error] = result.stderr.strip().splitlines()
    assert error.startswith(f"compute_q_ar: error: {named['qar']}: holds QA->R results, not the Q->A")
    assert "swapped" in error


def test_a_task_record_in_the_results_tells_the_tasks_apart(hand_made, tmp_path):
    for name, task in (("qa", "VCR_Q-A"), ("qar", "VCR_QA-R")):
        results = json.loads(Path(hand_made[name]).read_text())
        _write_json(Path(hand_made[name]), [{**entry, "task": task} for entry in results])
    metrics = q_ar_from_files(hand_made["qa"], hand_made["qar"], hand_made["annotations"])
    assert metrics["q_ar"] == 50.0
    with pytest.raises(ResultsError, match=rf"{hand_made['qar']}: holds QA->R results, not the Q->A"):
        q_ar_from_files(hand_made["qar"], hand_made["qa"], hand_made["annotations"])


def test_leaderboard_refuses_swapped_test_results(tmp_path, capsys):
    annotations = tmp_path / "test.jsonl"
    write_jsonl(str(annotations), [_record("test-0", labelled=False)])
    qa = _write_json(tmp_path / "qa.json", [{"question_id": "test-0", "answer": _onehot(1)}])
    qar = _write_json(
        tmp_path / "qar.json",
        [{"question_id": "test-0", "answer_index": a, "answer": _onehot(a)} for a in range(4)],
    )
    out = tmp_path / "submission.csv"
    argv = ["--qa", qar, "--qar", qa, "--annotations", str(annotations), "--submission", str(out)]
    assert compute_q_ar_main(argv) == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert f"{qar}: holds QA->R results" in error and not out.exists()


# eval_tasks.py on the synthetic world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vcr_world") / "world"
    config = SyntheticWorldConfig.small(0)
    sizes = dict(vcr_train_questions=8, vcr_val_questions=VAL_QUESTIONS, vcr_test_questions=TEST_QUESTIONS)
    generate_synthetic_world(str(root), dataclasses.replace(config, **sizes))
    return root


@pytest.fixture(scope="module")
def checkpoints(world) -> dict[str, str]:
    config = BertConfig.from_json_file(TINY)
    torch.manual_seed(0)
    paths = {"vl": str(world / "vl.bin"), "pretraining": str(world / "pretraining.bin")}
    save_state_dict(InterBertForVLTasks(config), paths["vl"])
    save_state_dict(InterBertForMultiModalPreTraining(config), paths["pretraining"])
    return paths


def _eval_tasks(world: Path, checkpoint: str, output: Path, *extra: str) -> int:
    return vcr_main(
        [
            "--from_pretrained", checkpoint, "--config_file", TINY, "--task_config",
            str(world / "interbert_tasks.yml"), "--output_dir", str(output), "--save_name", "run",
            "--num_workers", "0", "--quiet", *extra,
        ]
    )  # fmt: skip


def test_eval_tasks_writes_results_and_q_ar(world, checkpoints, tmp_path, capsys):
    assert (
        _eval_tasks(world, checkpoints["vl"], tmp_path, "--tasks", "1-2", "--split", "val", "--compute_q_ar")
        == 0
    )
    out = capsys.readouterr().out
    folder = tmp_path / "run"
    annot_ids = [record["annot_id"] for record in read_jsonl(str(world / "VCR" / "val.jsonl"))]
    for name in ("VCR_Q-A", "VCR_QA-R"):
        results = json.loads((folder / f"{name}_val_result.json").read_text())
        assert [entry["question_id"] for entry in results] == annot_ids
        assert all(set(entry) == {"question_id", "answer"} for entry in results)
        assert np.allclose([sum(entry["answer"]) for entry in results], 1.0, atol=1e-5)
        assert f"{name} val: accuracy" in out
    metrics = q_ar_from_files(
        str(folder / "VCR_Q-A_val_result.json"),
        str(folder / "VCR_QA-R_val_result.json"),
        str(world / "VCR" / "val.jsonl"),
    )
    assert f"Q->AR {metrics['q_ar']:.2f}" in out
    saved = json.loads((folder / "VCR_val_metrics.json").read_text())
    assert saved["q_ar"] == metrics


def test_eval_tasks_test_split_writes_the_leaderboard_file(world, checkpoints, tmp_path):
    assert _eval_tasks(world, checkpoints["vl"], tmp_path, "--tasks", "1-2", "--split", "test") == 0
    folder = tmp_path / "run"
    qar = json.loads((folder / "VCR_QA-R_test_result.json").read_text())
    assert len(qar) == 4 * TEST_QUESTIONS and {entry["answer_index"] for entry in qar} == {0, 1, 2, 3}
    with open(folder / "VCR_test_submission.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test_ids = [record["annot_id"] for record in read_jsonl(str(world / "VCR" / "test.jsonl"))]
    assert [row["annot_id"] for row in rows] == test_ids
    for row in rows:
        assert sum(float(row[f"answer_{j}"]) for j in range(4)) == pytest.approx(1.0, abs=1e-5)
        for i in range(4):
            group = [float(row[f"rationale_conditioned_on_a{i}_{j}"]) for j in range(4)]
            assert sum(group) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_image", "is not in the region-feature LMDB"),
        ("pretraining_checkpoint", "has no vil_logit weights"),
        ("retrieval_task", "eval_tasks.py evaluates VCR tasks"),
        ("q_ar_on_test", "--compute_q_ar needs labels"),
        ("unknown_split", "TASK1 has no split 'train2'"),
    ],
)
def test_eval_tasks_bad_input_is_one_clear_line(world, checkpoints, tmp_path, capsys, case, message):
    checkpoint, extra = checkpoints["vl"], ["--tasks", "1-2", "--split", "val"]
    if case == "missing_image":
        records = list(read_jsonl(str(world / "VCR" / "val.jsonl")))
        records[3]["img_id"] = "val-99999"
        write_jsonl(str(world / "VCR" / "val_missing_image.jsonl"), records)
        tasks = yaml.safe_load((world / "interbert_tasks.yml").read_text())
        tasks["TASK1"]["val_annotations_jsonpath"] = "VCR/val_missing_image.jsonl"
        (world / "missing_image.yml").write_text(yaml.safe_dump(tasks))
        extra = ["--tasks", "1", "--split", "val", "--task_config", str(world / "missing_image.yml")]
    elif case == "pretraining_checkpoint":
        checkpoint = checkpoints["pretraining"]
    elif case == "retrieval_task":
        extra = ["--tasks", "3"]
    elif case == "q_ar_on_test":
        extra = ["--split", "test", "--compute_q_ar"]
    else:
        extra = ["--split", "train2"]
    assert _eval_tasks(world, checkpoint, tmp_path, *extra) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("eval_tasks.py: error:") and message in error[-1], error
    if case == "missing_image":
        assert "1099999" in error[-1] and "val_missing_image.jsonl" in error[-1]
    assert not (tmp_path / "run" / "VCR_Q-A_val_result.json").exists()


def test_q_ar_from_an_earlier_run_of_the_other_task(world, checkpoints, tmp_path, capsys):
    """--tasks 1, then --tasks 2 --compute_q_ar: the Q->A file of the first run is joined."""
    assert _eval_tasks(world, checkpoints["vl"], tmp_path, "--tasks", "1", "--split", "val") == 0
    shutil.copy(tmp_path / "run" / "VCR_Q-A_val_result.json", tmp_path / "first.json")
    assert (
        _eval_tasks(world, checkpoints["vl"], tmp_path, "--tasks", "2", "--split", "val", "--compute_q_ar")
        == 0
    )
    assert "Q->AR" in capsys.readouterr().out
