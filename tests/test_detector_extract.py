"""``tools/extract_features.py`` end to end: images on disk -> feature LMDB and pretraining LMDB,
read back through the project's readers and into a pretraining batch; resuming; bad inputs."""

from __future__ import annotations

import importlib.util
import json
import os

import cv2
import numpy as np
import pytest

from tests.test_detector_weights import TINY, randomised
from vilbert.datasets.concept_cap import ConceptCapDataset
from vilbert.datasets.features import PretrainingLMDB, RegionFeatureStore
from vilbert.detector.model import BottomUpDetector
from vilbert.detector.weights import save_layout
from vilbert.tokenization import BertTokenizer, default_vocab_path

TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "extract_features.py")


def load_tool():
    spec = importlib.util.spec_from_file_location("extract_features_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def world(tmp_path):
    """Four PNG images with integer ids, a caption file, and a narrow detector checkpoint."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for image_id in (101, 102, 103, 104):
        cv2.imwrite(
            str(images / f"{image_id}.png"), rng.integers(0, 256, (50 + image_id % 7, 80, 3), np.uint8)
        )
    captions = tmp_path / "caption_train.json"
    captions.write_text(json.dumps({str(i): f"a photo number {i}" for i in (101, 102, 103, 104)}))
    detector = randomised(TINY, seed=3)
    weights = str(tmp_path / "tiny.pt")
    save_layout(detector, "canonical", weights)
    return {"images": str(images), "captions": str(captions), "weights": weights, "detector": detector}


def run(argv, capsys):
    """Exit status and stderr without the progress bar's lines (tqdm draws on stderr)."""
    code = load_tool().main(argv)
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    return code, [line for line in lines if line and not line.startswith("extracting:")]


def test_extracts_both_lmdbs_and_a_pretraining_batch(world, tmp_path, capsys):
    out, pre = str(tmp_path / "features.lmdb"), str(tmp_path / "training_feat_all.lmdb")
    argv = ["--images", world["images"], "--weights", world["weights"], "--output", out,
            "--pretrain_output", pre, "--captions", world["captions"], "--device", "cpu",
            "--scale", "64", "--max_size", "100", "--pre_nms_top_n", "200", "--post_nms_top_n", "20",
            "--min_boxes", "2", "--max_boxes", "10"]  # fmt: skip
    code, _ = run(argv, capsys)
    assert code == 0
    store = RegionFeatureStore(out)
    assert sorted(store.image_ids()) == ["101", "102", "103", "104"]
    detector: BottomUpDetector = world["detector"]
    expected = detector.detect(cv2.imread(os.path.join(world["images"], "102.png")))
    regions = store[102]
    assert regions.num_boxes == expected.num_boxes + 1  # the reader prepends the global region
    np.testing.assert_array_equal(regions.features[1:], expected.features)
    np.testing.assert_array_equal(regions.pixel_boxes[1:], expected.boxes)
    np.testing.assert_array_equal(regions.cls_prob, expected.cls_prob)
    pretraining = PretrainingLMDB(pre)
    assert len(pretraining) == 4
    point = pretraining[1]
    assert point.caption == "a photo number 102" and point.cls_prob.shape[1] == TINY.num_classes
    dataset = ConceptCapDataset(pre, world["captions"], BertTokenizer(default_vocab_path()), region_len=10)
    batch = dataset.collate_fn()([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["image_feat"].shape[-1] == TINY.feature_dim
    assert not os.path.exists(os.path.join(tmp_path, ".features.lmdb.extract"))
    code, err = run(argv, capsys)  # the outputs exist now
    assert code == 2 and len(err) == 1 and out in err[0]


def test_a_rerun_resumes_where_a_failed_run_stopped(world, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "features.lmdb")
    broken = os.path.join(world["images"], "103.png")
    with open(broken, "wb") as handle:
        handle.write(b"not an image")
    argv = ["--images", world["images"], "--weights", world["weights"], "--output", out, "--shard_size", "1",
            "--scale", "64", "--max_size", "100", "--post_nms_top_n", "20", "--min_boxes", "2"]  # fmt: skip
    code, err = run(argv, capsys)
    assert (
        code == 2 and len(err) == 1 and "103.png" in err[0] and err[0].startswith("extract_features: error:")
    )
    assert not os.path.exists(out)  # nothing appears before every image is done
    cv2.imwrite(broken, np.full((40, 60, 3), 90, np.uint8))
    calls = []
    original = BottomUpDetector.detect
    monkeypatch.setattr(BottomUpDetector, "detect", lambda self, im: calls.append(1) or original(self, im))
    code, _ = run(argv, capsys)
    assert code == 0 and len(calls) == 2  # 101 and 102 were staged by the failed run
    assert sorted(RegionFeatureStore(out).image_ids()) == ["101", "102", "103", "104"]


def test_unreadable_images_can_be_skipped_and_bad_weights_are_one_line(world, tmp_path, capsys):
    with open(os.path.join(world["images"], "104.png"), "wb") as handle:
        handle.write(b"\x89PNG truncated")
    out = str(tmp_path / "features.lmdb")
    argv = ["--images", world["images"], "--weights", world["weights"], "--output", out, "--skip_bad_images",
            "--scale", "64", "--max_size", "100", "--post_nms_top_n", "20", "--min_boxes", "2"]  # fmt: skip
    code, _ = run(argv, capsys)
    assert code == 0 and sorted(RegionFeatureStore(out).image_ids()) == ["101", "102", "103"]
    wrong = str(tmp_path / "wrong.bin")
    with open(wrong, "wb") as handle:
        handle.write(b"garbage")
    code, err = run(
        ["--images", world["images"], "--weights", wrong, "--output", str(tmp_path / "x.lmdb")], capsys
    )
    assert code == 2 and len(err) == 1 and "wrong.bin" in err[0]


def test_verify_features_reports_full_agreement_with_its_own_features(world, tmp_path, capsys):
    out = str(tmp_path / "features.lmdb")
    pipeline = ["--scale", "64", "--max_size", "100", "--post_nms_top_n", "20", "--min_boxes", "2"]
    assert (
        run(["--images", world["images"], "--weights", world["weights"], "--output", out, *pipeline], capsys)[
            0
        ]
        == 0
    )
    spec = importlib.util.spec_from_file_location(
        "verify_tool", TOOL.replace("extract_features", "verify_features")
    )
    verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify)
    report = str(tmp_path / "report.json")
    code = verify.main(["--weights", world["weights"], "--inventory", "--images", world["images"],
                        "--released", out, "--num_images", "3", "--report", report, *pipeline])  # fmt: skip
    printed = capsys.readouterr().out
    assert (
        code == 0 and "backbone.stem.conv1.weight" in printed and "no missing or unexpected keys" in printed
    )
    summary = json.loads(open(report).read())
    assert summary["images"] == 3
    assert summary["median_cosine_given_boxes"] > 0.9999 and summary["class_argmax_agreement"] == 1.0
    assert summary["median_best_iou"] == 1.0 and summary["median_cosine_matched"] > 0.9999


def test_verify_features_compares_retrieval_r1_on_two_feature_files(tmp_path, capsys):
    """R@1 of a checkpoint through eval_retrieval.py's own evaluation, on the YAML's features and on a
    re-extracted file: given the same file twice, the two R@1 agree exactly."""
    import torch

    from tests.conftest import task_world
    from vilbert.checkpoint import save_state_dict
    from vilbert.config import BertConfig
    from vilbert.modeling import InterBertForVLTasks
    from vilbert.tasks import load_task_configs

    tasks_yaml = task_world(str(tmp_path / "world"), 0, flickr=(4, 2, 6), vcr=(2, 2, 2))
    eval_yaml = os.path.join(os.path.dirname(tasks_yaml), "interbert_tasks_eval.yml")
    config_file = os.path.join(os.path.dirname(TOOL), "..", "config", "interbert_tiny.json")
    torch.manual_seed(0)
    checkpoint = str(tmp_path / "finetuned.bin")
    save_state_dict(InterBertForVLTasks(BertConfig.from_json_file(config_file)), checkpoint)
    features = load_task_configs(eval_yaml)["TASK3"].features_h5path1
    spec = importlib.util.spec_from_file_location(
        "verify_tool_r1", TOOL.replace("extract_features", "verify_features")
    )
    verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify)
    report = str(tmp_path / "r1.json")
    code = verify.main([
        "--weights", "unused.pt", "--retrieval_checkpoint", checkpoint, "--reextracted", features,
        "--task_config", eval_yaml, "--config_file", config_file, "--report", report,
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads(open(report).read())
    assert summary["r1_released"] == summary["r1_reextracted"] and summary["r1_difference"] == 0.0
    assert 0.0 <= summary["r1_released"] <= 100.0
