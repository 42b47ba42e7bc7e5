"""The grounded synthetic world: every file in the real formats, readable by the real readers."""

from __future__ import annotations

import csv
import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import PUBLISHED_TASK_KEYS, ROOT
from vilbert.datasets.features import PretrainingLMDB, RegionFeatureStore
from vilbert.datasets.hard_negatives import build_hard_negative_pool, nearest_by_cosine
from vilbert.datasets.jsonl import read_jsonl
from vilbert.datasets.serialization import safe_pickle_loads
from vilbert.datasets.synthetic import (
    ATTRIBUTES,
    OBJECT_CLASSES,
    SyntheticWorldConfig,
    check_vocabulary,
    generate_synthetic_world,
)
from vilbert.tokenization import default_vocab_path

TEXT_FILES = [
    "interbert_tasks.yml",
    "interbert_tasks_eval.yml",
    "conceptual_captions/caption_train.json",
    "conceptual_captions/caption_val.json",
    "flickr30k/all_data_final_train_2014.jsonline",
    "flickr30k/all_data_final_val_set0_2014.jsonline",
    "flickr30k/all_data_final_test_set0_2014.jsonline",
    "VCR/train.jsonl",
    "VCR/val.jsonl",
    "VCR/test.jsonl",
    "VCR/unisex_names_table.csv",
]
LMDBS = [
    "conceptual_captions/training_feat_all.lmdb",
    "conceptual_captions/validation_all.lmdb",
    "flickr30k/flickr30k_resnet101_faster_rcnn_genome.lmdb",
    "flickr30k/flickr30k_test_resnet101_faster_rcnn_genome.lmdb",
    "VCR/VCR_resnet101_faster_rcnn_genome.lmdb",
    "VCR/VCR_gt_resnet101_faster_rcnn_genome.lmdb",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic") / "world")
    generate_synthetic_world(root, SyntheticWorldConfig.small(seed=3))
    return root


def _load_pool(path: str) -> dict:
    with open(path, "rb") as f:
        return safe_pickle_loads(f.read(), path, allow_numpy=True)


def _pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y1 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y2 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area[:, None] + area[None, :] - inter)


def test_all_files_exist(world):
    for name in TEXT_FILES + ["flickr30k/hard_negative.pkl"]:
        assert os.path.isfile(os.path.join(world, name)), name
    for name in LMDBS:
        assert os.path.exists(os.path.join(world, name)), name
    assert os.path.isfile(os.path.join(world, "conceptual_captions/training_feat_all.lmdb"))  # single file
    assert os.path.isdir(os.path.join(world, "flickr30k/flickr30k_resnet101_faster_rcnn_genome.lmdb"))


def test_words_are_whole_bert_tokens():
    check_vocabulary(default_vocab_path())
    assert "person" in OBJECT_CLASSES and 8 <= len(ATTRIBUTES) <= 12 and 20 <= len(OBJECT_CLASSES) <= 40


def test_task_yamls_match_the_published_layout(world):
    for name, split, lmdb_name, val_file in (
        ("interbert_tasks.yml", "val", "flickr30k_resnet101", "val_set0"),
        ("interbert_tasks_eval.yml", "test", "flickr30k_test_resnet101", "test_set0"),
    ):
        with open(os.path.join(world, name)) as f:
            tasks = yaml.safe_load(f)
        assert list(tasks) == ["TASK1", "TASK2", "TASK3"]
        assert [tasks[t]["name"] for t in tasks] == ["VCR_Q-A", "VCR_QA-R", "RetrievalFlickr30k"]
        assert [tasks[t]["task_id"] for t in tasks] == [6, 7, 9]
        assert [tasks[t]["max_seq_length"] for t in tasks] == [60, 80, 30]
        assert [tasks[t]["max_region_num"] for t in tasks] == [16, 16, 12]
        for task in tasks.values():
            assert list(task) == PUBLISHED_TASK_KEYS
            assert task["lr"] == pytest.approx(2e-5)
            for key in (
                "dataroot",
                "features_h5path1",
                "train_annotations_jsonpath",
                "val_annotations_jsonpath",
            ):
                assert os.path.exists(os.path.join(world, task[key])), (name, key)
        flickr = tasks["TASK3"]
        assert flickr["val_split"] == split and flickr["features_h5path2"] == ""
        assert lmdb_name in flickr["features_h5path1"] and val_file in flickr["val_annotations_jsonpath"]


def test_conceptual_captions_read_back(world):
    folder = os.path.join(world, "conceptual_captions")
    for lmdb_name, caption_name, count in (
        ("training_feat_all.lmdb", "caption_train.json", 200),
        ("validation_all.lmdb", "caption_val.json", 50),
    ):
        datapoints = PretrainingLMDB(os.path.join(folder, lmdb_name))
        with open(os.path.join(folder, caption_name)) as f:
            captions = json.load(f)
        assert len(datapoints) == len(captions) == count
        for index in (0, count - 1):
            point = datapoints[index]
            assert captions[point.image_id] == point.caption
            assert point.features.shape == (point.num_boxes, 64)
            assert point.cls_prob.shape == (point.num_boxes, 41)
            np.testing.assert_allclose(point.cls_prob.sum(1), 1.0, rtol=1e-4)
            assert 2 <= point.num_boxes <= 10
            # grounded: every object the caption names is the detector's top class for some region
            detected = {OBJECT_CLASSES[c - 1] for c in point.cls_prob.argmax(1)}
            named = {w for w in point.caption.split() if w in OBJECT_CLASSES}
            assert named and named <= detected


def test_boxes_form_overlap_groups(world):
    store = RegionFeatureStore(
        os.path.join(world, "flickr30k", "flickr30k_resnet101_faster_rcnn_genome.lmdb")
    )
    grouped = 0
    for image_id in store.image_ids()[:40]:
        boxes = store[image_id].pixel_boxes[1:]
        iou = _pairwise_iou(boxes)
        np.fill_diagonal(iou, 0)
        grouped += bool((iou >= 0.4).any())
    assert grouped >= 20


def test_flickr30k_annotations_and_features(world):
    folder = os.path.join(world, "flickr30k")
    store = RegionFeatureStore(os.path.join(folder, "flickr30k_resnet101_faster_rcnn_genome.lmdb"))
    test_store = RegionFeatureStore(os.path.join(folder, "flickr30k_test_resnet101_faster_rcnn_genome.lmdb"))
    seen = set()
    for name, count in (("train", 100), ("val_set0", 30), ("test_set0", 30)):
        annotations = read_jsonl(os.path.join(folder, f"all_data_final_{name}_2014.jsonline"))
        assert len(annotations) == count
        for index, annotation in enumerate(annotations):
            assert annotation["id"] == index and len(annotation["sentences"]) == 5
            image_id = int(annotation["img_path"].removesuffix(".jpg"))
            assert image_id in store and image_id in test_store and image_id not in seen
            seen.add(image_id)
    regions = store[store.image_ids()[0]]
    assert regions.features.shape[1] == 64 and regions.num_boxes <= 11


def test_hard_negative_pool(world):
    folder = os.path.join(world, "flickr30k")
    payload = _load_pool(os.path.join(folder, "hard_negative.pkl"))
    image_ids, pool = payload["train_image_list"], payload["train_hard_pool"]
    train = read_jsonl(os.path.join(folder, "all_data_final_train_2014.jsonline"))
    assert image_ids == [int(a["img_path"].split(".")[0]) for a in train]
    assert pool.shape == (100, 20) and pool.dtype == np.int64
    np.testing.assert_array_equal(pool[:, 0], np.arange(100))

    store = RegionFeatureStore(os.path.join(folder, "flickr30k_resnet101_faster_rcnn_genome.lmdb"))
    features = np.stack([store[i].features[0] for i in image_ids]).astype(np.float64)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cosine = unit @ unit.T
    for row in (0, 57, 99):
        expected = np.argsort(-cosine[row], kind="stable")[:20]
        assert pool[row, 0] == row and expected[0] == row
        np.testing.assert_allclose(cosine[row, pool[row]], cosine[row, expected], rtol=1e-5)
        assert np.all(np.diff(cosine[row, pool[row, 1:]]) <= 1e-6)
    # chunking does not change the answer
    np.testing.assert_array_equal(build_hard_negative_pool(store, image_ids, 20, chunk=7), pool)


def test_nearest_by_cosine_puts_self_first_even_with_duplicates():
    features = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], dtype=np.float32)
    pool = nearest_by_cosine(features, pool_size=3, chunk=2)
    np.testing.assert_array_equal(pool[:, 0], np.arange(4))
    assert pool[0, 1] == 1 and pool[1, 1] == 0 and pool[2, 1] == 3


def test_vcr_files(world):
    folder = os.path.join(world, "VCR")
    detected = RegionFeatureStore(os.path.join(folder, "VCR_resnet101_faster_rcnn_genome.lmdb"))
    gt = RegionFeatureStore(os.path.join(folder, "VCR_gt_resnet101_faster_rcnn_genome.lmdb"))
    offsets = {"train": 0, "val": 1_000_000, "test": 2_000_000}
    for split, count in (("train", 200), ("val", 50), ("test", 50)):
        lines = read_jsonl(os.path.join(folder, f"{split}.jsonl"))
        assert len(lines) == count
        assert [line["annot_id"] for line in lines] == [f"{split}-{k}" for k in range(count)]
        for line in lines:
            assert ("answer_label" in line) == ("rationale_label" in line) == (split != "test")
            assert len(line["answer_choices"]) == 4 and len(line["rationale_choices"]) == 4
            assert "person" in line["objects"]
            prefix, number = line["img_id"].split("-")
            assert prefix == split
            image_id = int(number) + offsets[split]
            assert image_id in detected and image_id in gt
            with open(os.path.join(folder, "vcr1images", line["metadata_fn"])) as f:
                metadata = json.load(f)
            assert metadata["names"] == line["objects"]
            assert line["img_fn"].removesuffix(".jpg") == line["metadata_fn"].removesuffix(".json")
            regions = gt[image_id]
            assert regions.num_boxes == len(line["objects"]) + 1
            np.testing.assert_allclose(regions.pixel_boxes[1:], np.array(metadata["boxes"])[:, :4], rtol=1e-5)
            tokens = [line["question"], *line["answer_choices"], *line["rationale_choices"]]
            refs = [i for text in tokens for item in text if isinstance(item, list) for i in item]
            assert refs and all(0 <= i < len(line["objects"]) for i in refs)


def test_vcr_right_answers_are_true_of_the_image(world):
    folder = os.path.join(world, "VCR")
    for line in read_jsonl(os.path.join(folder, "train.jsonl"))[:40]:
        if line["question"][:2] != ["what", "color"]:
            continue
        target = line["question"][3][0]
        colours = [choice[2] for choice in line["answer_choices"]]
        assert len(set(colours)) == 4  # exactly one colour can be right
        right = line["answer_choices"][line["answer_label"]]
        assert right[0] == [target] and right[2] in ATTRIBUTES


def test_unisex_names_table(world):
    with open(os.path.join(world, "VCR", "unisex_names_table.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][1] == "name" and len(rows) > 10
    assert all(row[1].isalpha() for row in rows[1:])


def test_same_seed_same_world_other_seed_other_world(world, tmp_path):
    again = str(tmp_path / "again")
    generate_synthetic_world(again, SyntheticWorldConfig.small(seed=3))
    for name in TEXT_FILES:
        assert filecmp.cmp(os.path.join(world, name), os.path.join(again, name), shallow=False), name
    pools = [_load_pool(os.path.join(root, "flickr30k", "hard_negative.pkl")) for root in (world, again)]
    np.testing.assert_array_equal(pools[0]["train_hard_pool"], pools[1]["train_hard_pool"])
    first = PretrainingLMDB(os.path.join(world, "conceptual_captions", "training_feat_all.lmdb"))
    second = PretrainingLMDB(os.path.join(again, "conceptual_captions", "training_feat_all.lmdb"))
    np.testing.assert_array_equal(first[17].features, second[17].features)

    other = str(tmp_path / "other")
    generate_synthetic_world(other, SyntheticWorldConfig.small(seed=4))
    assert not filecmp.cmp(
        os.path.join(world, "VCR", "train.jsonl"), os.path.join(other, "VCR", "train.jsonl"), shallow=False
    )
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_synthetic_world(other, SyntheticWorldConfig.small(seed=4))


def test_config_validation():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticWorldConfig(num_classes=17).validate()
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticWorldConfig(max_boxes=1).validate()


def test_cli_tools_run(tmp_path):
    out = str(tmp_path / "cli_world")
    command = [sys.executable, os.path.join(ROOT, "tools", "make_synthetic_data.py"), "--output_dir", out]
    result = subprocess.run([*command, "--seed", "1", "--small"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(os.path.join(out, "interbert_tasks.yml"))
    refused = subprocess.run([*command, "--small"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr

    folder = os.path.join(out, "flickr30k")
    pool_path = str(tmp_path / "pool.pkl")
    build = subprocess.run(
        [
            sys.executable, os.path.join(ROOT, "tools", "build_hard_negatives.py"),
            "--features", os.path.join(folder, "flickr30k_resnet101_faster_rcnn_genome.lmdb"),
            "--annotations", os.path.join(folder, "all_data_final_train_2014.jsonline"),
            "--output", pool_path, "--pool_size", "20",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    built, shipped = _load_pool(pool_path), _load_pool(os.path.join(folder, "hard_negative.pkl"))
    assert built["train_image_list"] == shipped["train_image_list"]
    np.testing.assert_array_equal(built["train_hard_pool"], shipped["train_hard_pool"])
