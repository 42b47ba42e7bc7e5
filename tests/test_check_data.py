"""The data doctor on a healthy synthetic world and on one broken copy per kind of problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, task_world
from vilbert.check_data import main
from vilbert.config import BertConfig
from vilbert.data_checks import DataProblemError, RunShape, layout_problems, require_task_data
from vilbert.datasets.features import (
    PretrainingLMDB,
    RegionFeatureStore,
    write_pretraining_lmdb,
    write_region_features,
)
from vilbert.datasets.hard_negatives import write_hard_negatives
from vilbert.datasets.jsonl import read_jsonl, write_jsonl
from vilbert.datasets.retrieval import load_retrieval_annotations

TINY = os.path.join(ROOT, "config", "interbert_tiny.json")
FLICKR_LMDB = "flickr30k/flickr30k_resnet101_faster_rcnn_genome.lmdb"
FLICKR_TRAIN = "flickr30k/all_data_final_train_2014.jsonline"


@pytest.fixture(scope="module")
def healthy_world(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("world"))
    task_world(root, seed=0, flickr=(6, 4, 4), vcr=(6, 4, 4))
    return root


@pytest.fixture
def world(healthy_world, tmp_path) -> str:
    """A private copy of the healthy world, to break."""
    root = str(tmp_path / "world")
    shutil.copytree(healthy_world, root)
    return root


def doctor_args(root: str) -> list[str]:
    cc = os.path.join(root, "conceptual_captions")
    return [
        "--task_config", os.path.join(root, "interbert_tasks.yml"), "--tasks", "1-2-3",
        "--train_data_dir", cc, "--val_data_dir", cc, "--train_batch_size", "2", "--config_file", TINY,
    ]  # fmt: skip


def run_doctor(root: str, capsys) -> tuple[int, list[str], list[str]]:
    status = main(doctor_args(root))
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err.splitlines()


def assert_problems(root: str, capsys, *fragments: str) -> list[str]:
    """Exit 2, one error line on stderr, and every problem line holds all ``fragments``."""
    status, out, err = run_doctor(root, capsys)
    problems = [line for line in out if line.startswith("problem: ")]
    assert status == 2, out
    assert len(err) == 1 and err[0].startswith(f"check_data: error: {len(problems)} problem(s)"), err
    assert problems and all(all(f in line for f in fragments) for line in problems), problems
    return problems


def rewrite_features(path: str, keep=lambda image_id: True, width: int | None = None) -> None:
    """Write the LMDB again through the project's writer: some images left out, or features cut."""
    store = RegionFeatureStore(path)
    records = []
    for image_id in store.image_ids():
        if not keep(image_id):
            continue
        regions = store[image_id]
        records.append(
            {
                "image_id": int(image_id),
                "image_h": regions.image_h,
                "image_w": regions.image_w,
                "num_boxes": regions.num_boxes - 1,
                "boxes": regions.pixel_boxes[1:],
                "features": regions.features[1:, :width],
                "cls_prob": regions.cls_prob,
            }
        )
    write_region_features(path, records, overwrite=True)


def test_healthy_world_passes_with_a_time_estimate(world, capsys):
    status, out, err = run_doctor(world, capsys)
    assert status == 0, out + err
    assert out[0].split() == ["what", "count", "status"] and out[-1] == "all checks hold"
    assert not [line for line in out if line.startswith(("problem", "warning"))]
    probes = [line for line in out if "data loading time" in line]
    assert len(probes) == 4 and all("per epoch and process on one loader worker" in line for line in probes)


def test_missing_image_id(world, capsys):
    lmdb = os.path.join(world, FLICKR_LMDB)
    train_ids = load_retrieval_annotations(os.path.join(world, FLICKR_TRAIN)).image_ids
    rewrite_features(lmdb, keep=lambda image_id: image_id != str(train_ids[2]))
    (line,) = assert_problems(world, capsys, os.path.join(world, FLICKR_TRAIN), "TASK3 features_h5path1")
    assert line.endswith(f"1 of 6 image ids are not in {lmdb} (TASK3 features_h5path1): {train_ids[2]}")


def test_wrong_feature_dimension(world, capsys):
    lmdb = os.path.join(world, FLICKR_LMDB)
    rewrite_features(lmdb, width=32)
    problems = assert_problems(
        world, capsys, lmdb, f"features have 32 dimensions but {TINY} v_feature_size is 64"
    )
    assert len(problems) == 2 and "(6 of 6 sampled images)" in problems[0]  # train and val images


def test_hard_negative_outside_the_training_set(world, capsys):
    train_ids = load_retrieval_annotations(os.path.join(world, FLICKR_TRAIN)).image_ids
    pool_ids = [*train_ids, 999999]
    # Row i's hard negative is image i + 1: the last training image's is 999999.
    pool = np.array([[i, (i + 1) % len(pool_ids)] for i in range(len(pool_ids))])
    path = os.path.join(world, "flickr30k", "hard_negative.pkl")
    os.remove(path)
    write_hard_negatives(path, pool_ids, pool)
    (line,) = assert_problems(world, capsys, path, "hard negative 999999", os.path.join(world, FLICKR_TRAIN))


def test_missing_caption(world, capsys):
    path = os.path.join(world, "conceptual_captions", "caption_train.json")
    with open(path, encoding="utf-8") as f:
        captions = json.load(f)
    del captions["0"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(captions, f)
    lmdb = os.path.join(world, "conceptual_captions", "training_feat_all.lmdb")
    (line,) = assert_problems(world, capsys, path, lmdb)
    assert line.endswith("1 of 2 sampled images of " + lmdb + " have no caption: 0")


def test_damaged_pretraining_record(world, capsys):
    """The doctor reads every value of the sampled records, the rows no batch reads included."""
    lmdb = os.path.join(world, "conceptual_captions", "training_feat_all.lmdb")
    points = [PretrainingLMDB(lmdb)[i] for i in range(len(PretrainingLMDB(lmdb)))]
    points[1].cls_prob[-1, 0] = np.inf
    os.remove(lmdb)
    write_pretraining_lmdb(lmdb, points)
    last = points[1].num_boxes - 1
    (line,) = assert_problems(world, capsys, lmdb, f"image {points[1].image_id}")
    assert line.endswith(
        f"cls_prob holds a non-finite value (NaN or Inf) in region {last} (1 of 2 sampled images)"
    )


def test_bad_object_reference(world, capsys):
    path = os.path.join(world, "VCR", "train.jsonl")
    records = read_jsonl(path)
    objects = records[0]["objects"]
    objects.append("dog")  # an object without a ground-truth box, which the question then names
    records[0]["question"].append([len(objects) - 1])
    write_jsonl(path, records)
    gt = os.path.join(world, "VCR", "VCR_gt_resnet101_faster_rcnn_genome.lmdb")
    fragment = f"{path}: annot_id 'train-0' refers to object {len(objects) - 1} but image 0 has "
    problems = assert_problems(world, capsys, fragment, f"{len(objects) - 1} ground-truth boxes in {gt}")
    assert len(problems) == 2  # TASK1 and TASK2 read the same file


def test_missing_file(world, capsys):
    path = os.path.join(world, "flickr30k", "all_data_final_val_set0_2014.jsonline")
    os.remove(path)
    (line,) = assert_problems(world, capsys)
    yaml = os.path.join(world, "interbert_tasks.yml")
    assert line == f"problem: {yaml}: TASK3 val_annotations_jsonpath: {path} does not exist"


def test_startup_check_raises_one_line(world):
    """What the training scripts call: one error with the first problem and the count of the rest."""
    os.remove(os.path.join(world, "VCR", "val.jsonl"))
    config = BertConfig.from_json_file(TINY)
    with pytest.raises(DataProblemError) as err:
        require_task_data(os.path.join(world, "interbert_tasks.yml"), "1-2", config, TINY, world_size=3)
    message = str(err.value)
    assert "\n" not in message and "TASK1 val_annotations_jsonpath" in message
    assert message.endswith("(and 3 more; python -m vilbert.check_data lists them)")  # TASK2 file, 2 batches


@pytest.mark.slow
def test_command_line_end_to_end(world):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "vilbert.check_data", *doctor_args(world)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    os.remove(os.path.join(world, "VCR", "unisex_names_table.csv"))
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["check_data: error: 2 problem(s) in the data; each is listed above"]
    assert "TASK1 dataroot (unisex_names_table.csv)" in done.stdout


def test_box_layout_problems():
    """Boxes stored normalised, or as x, y, w, h with a corner before its origin, are named."""
    shape = RunShape(BertConfig.from_json_file(TINY), TINY)
    normalised = np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
    swapped = np.array([[50, 60, 10, 90]], dtype=np.float32)
    assert [kind for kind, _ in layout_problems("f.lmdb image 7", 64, normalised, 640, 480, shape)] == [
        "normalised"
    ]
    ((kind, line),) = layout_problems("f.lmdb image 7", 64, swapped, 640, 480, shape)
    assert kind == "order" and line.startswith("f.lmdb image 7: a box has x2 < x1")
    assert layout_problems("f.lmdb image 7", 64, swapped[:, [2, 1, 0, 3]], 640, 480, shape) == []
