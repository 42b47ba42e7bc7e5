"""Bottom-up-attention TSV reading and the ``tools/convert_tsv_to_lmdb.py`` converter."""

from __future__ import annotations

import base64
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vilbert.datasets.features import PretrainingLMDB, RegionFeatureStore
from vilbert.datasets.tsv import TSVFormatError, convert_tsv_to_lmdb, read_bottom_up_tsv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "tools", "convert_tsv_to_lmdb.py")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode()


def _images(count: int, dim: int, classes: int = 0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        n = 3 + i
        x1y1 = rng.uniform(0, 200, (n, 2))
        image = {
            "image_id": 500 + i,
            "image_w": 640,
            "image_h": 480,
            "num_boxes": n,
            "boxes": np.concatenate([x1y1, x1y1 + rng.uniform(5, 200, (n, 2))], axis=1).astype(np.float32),
            "features": rng.random((n, dim)).astype(np.float32),
        }
        if classes:
            image["cls_prob"] = rng.dirichlet(np.ones(classes), n).astype(np.float32)
        images.append(image)
    return images


def _write_tsv(path, images: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        for image in images:
            row = [image["image_id"], image["image_w"], image["image_h"], image["num_boxes"]]
            row += [_b64(image["boxes"]), _b64(image["features"])]
            if "cls_prob" in image:
                row.append(_b64(image["cls_prob"]))
            writer.writerow(row)
    return str(path)


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, CONVERT, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_read_bottom_up_tsv_with_full_width_features(tmp_path):
    # 2048-d features of 20 boxes are far beyond csv's default 128 KiB field limit.
    images = _images(2, 2048, classes=11)
    images[0]["num_boxes"] = 20
    images[0]["boxes"] = np.tile(images[0]["boxes"][:1], (20, 1))
    images[0]["features"] = np.random.default_rng(1).random((20, 2048)).astype(np.float32)
    images[0]["cls_prob"] = np.full((20, 11), 1 / 11, np.float32)
    path = _write_tsv(tmp_path / "a.tsv", images)
    records = list(read_bottom_up_tsv(path))
    assert [r["image_id"] for r in records] == [500, 501]
    np.testing.assert_array_equal(records[0]["features"], images[0]["features"])
    np.testing.assert_array_equal(records[1]["boxes"], images[1]["boxes"])
    assert records[1]["cls_prob"].shape == (4, 11)
    with pytest.raises(TSVFormatError, match=r"a\.tsv:1: column features"):
        list(read_bottom_up_tsv(path, feature_dim=1000))


def test_truncated_line_names_file_and_line(tmp_path):
    path = _write_tsv(tmp_path / "cut.tsv", _images(3, 16))
    lines = open(path).read().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(TSVFormatError, match=r"cut\.tsv:2: .*truncated"):
        list(read_bottom_up_tsv(path, feature_dim=16))

    fewer = tmp_path / "fewer.tsv"
    fewer.write_text("1\t10\t10\t1\n")
    with pytest.raises(TSVFormatError, match=r"fewer\.tsv:1: expected 6 or 7"):
        list(read_bottom_up_tsv(str(fewer), feature_dim=16))


def test_cli_converts_to_both_lmdbs(tmp_path):
    images = _images(4, 32, classes=9)
    first = _write_tsv(tmp_path / "part0.tsv", images[:2])
    second = _write_tsv(tmp_path / "part1.tsv", images[2:])
    captions = tmp_path / "caption_train.json"
    captions.write_text(json.dumps({"500": "a red dog", "501": "a blue car", "503": "a green tree"}))
    output, pretrain = str(tmp_path / "features.lmdb"), str(tmp_path / "training_feat_all.lmdb")
    result = _convert(
        "--input", first, second, "--output", output, "--pretrain_output", pretrain,
        "--captions", str(captions), "--feature_dim", "32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    store = RegionFeatureStore(output)
    assert store.image_ids() == ["500", "501", "502", "503"]
    regions = store[503]
    np.testing.assert_allclose(regions.features[1:], images[3]["features"])
    np.testing.assert_allclose(regions.pixel_boxes[1:], images[3]["boxes"])
    np.testing.assert_allclose(regions.cls_prob, images[3]["cls_prob"])

    datapoints = PretrainingLMDB(pretrain)
    assert os.path.isfile(pretrain)  # tensorpack's single-file layout
    assert len(datapoints) == 3  # image 502 has no caption
    last = datapoints[2]
    assert (last.image_id, last.caption, last.num_boxes) == ("503", "a green tree", 6)
    np.testing.assert_array_equal(last.cls_prob, images[3]["cls_prob"])
    np.testing.assert_array_equal(last.boxes, images[3]["boxes"])

    again = _convert("--input", first, "--output", output, "--feature_dim", "32")
    assert again.returncode == 2  # the bad-input status of every script and tool
    assert "already exists" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    replaced = _convert("--input", first, "--output", output, "--feature_dim", "32", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert len(RegionFeatureStore(output)) == 2


def test_cli_reports_a_truncated_line_and_writes_nothing(tmp_path):
    path = _write_tsv(tmp_path / "bad.tsv", _images(3, 8))
    lines = open(path).read().splitlines()
    lines[2] = lines[2][:-10]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    output = str(tmp_path / "out.lmdb")
    result = _convert("--input", path, "--output", output, "--feature_dim", "8")
    assert result.returncode == 2  # the bad-input status of every script and tool
    assert f"{path}:3:" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(output)
    assert sorted(os.listdir(tmp_path)) == ["bad.tsv"]


def test_pretraining_output_needs_cls_prob_and_captions(tmp_path):
    path = _write_tsv(tmp_path / "nocls.tsv", _images(1, 8))
    with pytest.raises(TSVFormatError, match=r"nocls\.tsv:1: no cls_prob"):
        convert_tsv_to_lmdb(
            [path], pretrain_output=str(tmp_path / "p.lmdb"), captions={"500": "x"}, feature_dim=8
        )
    with pytest.raises(ValueError, match="captions"):
        convert_tsv_to_lmdb([path], pretrain_output=str(tmp_path / "p.lmdb"), feature_dim=8)
    result = _convert("--input", path, "--pretrain_output", str(tmp_path / "p.lmdb"))
    assert result.returncode == 2 and "--captions" in result.stderr


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert_tsv_to_lmdb: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "caption, shown", [(None, "is null"), (["a", "list"], 'list ["a", "list"]'), (7, "int 7"), ("  ", "str")]
)
def test_cli_refuses_a_caption_that_is_not_text(tmp_path, caption, shown):
    path = _write_tsv(tmp_path / "train.tsv", _images(2, 8, classes=3))
    captions = tmp_path / "caption_train.json"
    captions.write_text(json.dumps({"500": "a red dog", "501": caption}))
    pretrain = tmp_path / "train.lmdb"
    result = _convert(
        "--input", path, "--pretrain_output", str(pretrain), "--captions", str(captions), "--feature_dim", "8"
    )
    error = _one_line_error(result)
    assert f"{captions}: caption of image '501' is " in error and shown in error and "None" not in error
    assert not pretrain.exists()


def test_cli_refuses_a_pretraining_lmdb_without_a_single_caption(tmp_path):
    path = _write_tsv(tmp_path / "train.tsv", _images(2, 8, classes=3))
    captions = tmp_path / "caption_train.json"
    captions.write_text(json.dumps({"train-500": "a red dog"}))  # ids that match no TSV image
    output, pretrain = tmp_path / "features.lmdb", tmp_path / "train.lmdb"
    result = _convert(
        "--input", path, "--output", str(output), "--pretrain_output", str(pretrain),
        "--captions", str(captions), "--feature_dim", "8",
    )  # fmt: skip
    error = _one_line_error(result)
    assert f"{captions}: none of the 2 images of {path} has a caption" in error
    assert sorted(os.listdir(tmp_path)) == ["caption_train.json", "train.tsv"]  # nothing written


def _damaged_row(images: list[dict], case: str) -> None:
    if case == "nan_features":
        images[1]["features"][2, 3] = np.nan
    elif case == "inf_boxes":
        images[1]["boxes"][0, 2] = np.inf
    elif case == "box_outside":
        images[1]["boxes"][0] = [0, 0, 6400, 10]
    elif case == "zero_width":
        images[1]["image_w"] = 0
    else:
        images[1]["image_h"] = "tall"


@pytest.mark.parametrize(
    "case, message",
    [
        ("nan_features", "features holds a non-finite value"),
        ("inf_boxes", "boxes holds a non-finite value"),
        ("box_outside", "box 0 [0.0, 0.0, 6400.0, 10.0] lies outside the 640x480 image"),
        ("zero_width", "image size 0x480 is not positive"),
        ("text_height", "bad image_w/image_h/num_boxes"),
    ],
)
def test_cli_names_the_file_and_line_of_a_damaged_row(tmp_path, case, message):
    images = _images(3, 8)
    _damaged_row(images, case)
    path = _write_tsv(tmp_path / "bad.tsv", images)
    result = _convert("--input", path, "--output", str(tmp_path / "out.lmdb"), "--feature_dim", "8")
    error = _one_line_error(result)
    assert f"{path}:2" in error and message in error
    assert sorted(os.listdir(tmp_path)) == ["bad.tsv"]


def test_cli_refuses_an_empty_tsv(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("")
    result = _convert("--input", str(path), "--output", str(tmp_path / "out.lmdb"), "--feature_dim", "8")
    assert f"{path}: no image rows" in _one_line_error(result)
    assert sorted(os.listdir(tmp_path)) == ["empty.tsv"]
