"""Damaged data is named, never a signal or a traceback: damaged LMDB files and damaged records.

Every bad input is made with the project's own writers, or by damaging a file they wrote
(truncating it, emptying it, overwriting its bytes); the tools are run as the user runs them, and
must exit with status 2 and one line on stderr that names the culprit.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from vilbert.datasets.concept_cap import ConceptCapDataset
from vilbert.datasets.features import (
    LMDBFormatError,
    MissingImageError,
    PretrainDatapoint,
    PretrainingLMDB,
    RegionFeatureStore,
    write_pretraining_lmdb,
    write_region_features,
)
from vilbert.datasets.hard_negatives import global_features
from vilbert.datasets.jsonl import AnnotationError, JSONLinesError, write_jsonl
from vilbert.datasets.lmdb_check import DamagedLMDBError, check_lmdb_file
from vilbert.datasets.loader import make_loader
from vilbert.datasets.serialization import UnsafePickleError
from vilbert.datasets.tsv import TSVFormatError
from vilbert.datasets.validation import BadRecordError, SkippedRecordError
from vilbert.distributed import DistContext
from vilbert.errors import EXIT_BAD_INPUT, BadInputError
from vilbert.tokenization import BertTokenizer, default_vocab_path

HARD_NEGATIVES = os.path.join(ROOT, "tools", "build_hard_negatives.py")
PAGE = 4096
DIM = 8


def _region_record(image_id: int, n: int = 3, w: int = 64, h: int = 48, **changes) -> dict:
    rng = np.random.default_rng(image_id)
    x1y1 = rng.uniform(0, 20, (n, 2))
    record = {
        "image_id": image_id,
        "image_w": w,
        "image_h": h,
        "num_boxes": n,
        "boxes": np.concatenate([x1y1, x1y1 + rng.uniform(5, 20, (n, 2))], axis=1),
        "features": rng.normal(size=(n, DIM)),
        "cls_prob": rng.dirichlet(np.ones(4), n),
    }
    record.update(changes)
    return record


def _datapoint(index: int, **changes) -> PretrainDatapoint:
    record = _region_record(index)
    fields = {
        "features": record["features"].astype(np.float32),
        "cls_prob": record["cls_prob"].astype(np.float32),
        "boxes": record["boxes"].astype(np.float32),
        "num_boxes": record["num_boxes"],
        "image_h": record["image_h"],
        "image_w": record["image_w"],
        "image_id": str(index),
        "caption": f"a red dog number {index}",
    }
    fields.update(changes)
    return PretrainDatapoint(**fields)


def _write_lmdb(kind: str, path: str, count: int = 40) -> str:
    """A region-feature LMDB (a directory) or a pretraining LMDB (a single file); returns the data file."""
    if kind == "region":
        write_region_features(path, [_region_record(1000 + i) for i in range(count)])
        return os.path.join(path, "data.mdb")
    write_pretraining_lmdb(path, [_datapoint(i) for i in range(count)])
    return path


def _damage(data_file: str, how: str) -> None:
    size = os.path.getsize(data_file)
    rng = np.random.default_rng(0)
    if how == "truncated":
        os.truncate(data_file, size // 2)
    elif how == "empty":
        os.truncate(data_file, 0)
    elif how == "random":
        with open(data_file, "wb") as f:
            f.write(rng.bytes(size))
    else:  # a B-tree page of the file overwritten with garbage, the meta pages intact
        with open(data_file, "r+b") as f:
            f.seek(2 * PAGE)
            f.write(rng.bytes(PAGE))


def _read_all(kind: str, path: str) -> None:
    if kind == "region":
        store = RegionFeatureStore(path)
        for image_id in store.image_ids():
            store[image_id]
    else:
        datapoints = PretrainingLMDB(path)
        for index in range(len(datapoints)):
            datapoints[index]


def _one_line_error(result: subprocess.CompletedProcess, prog: str) -> str:
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    return lines[0]


# --- damaged LMDB files ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["region", "pretraining"])
@pytest.mark.parametrize("how", ["truncated", "empty", "random", "page"])
def test_a_damaged_lmdb_is_one_line_naming_the_file_never_a_signal(tmp_path, kind, how):
    path = str(tmp_path / f"{kind}.lmdb")
    data_file = _write_lmdb(kind, path)
    _damage(data_file, how)
    # In a child process: were the file mapped past its end, the reader would die of SIGBUS.
    code = f"from tests.test_damaged_data import _read_all; _read_all({kind!r}, {path!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "Traceback" in result.stderr, result  # an exception, not a signal
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vilbert.datasets.lmdb_check.DamagedLMDBError: ") and path in last
    expected = {"truncated": "truncated", "empty": "empty (0 bytes)", "random": "not an LMDB file"}
    assert expected.get(how, "unreadable LMDB") in last
    if how != "truncated":  # safe to read in this process
        with pytest.raises(DamagedLMDBError, match=path) as info:
            _read_all(kind, path)
        assert "\n" not in str(info.value)


def test_the_size_check_reads_the_meta_pages_of_a_good_file(tmp_path):
    data_file = _write_lmdb("pretraining", str(tmp_path / "p.lmdb"))
    meta = check_lmdb_file(data_file, subdir=False)
    assert meta.page_size == PAGE and meta.required_bytes == os.path.getsize(data_file)
    os.truncate(data_file, meta.required_bytes - PAGE)  # one page short: refused before any read
    with pytest.raises(DamagedLMDBError, match=rf"{meta.last_page + 1} pages of {PAGE} bytes"):
        PretrainingLMDB(data_file)


@pytest.mark.parametrize("how", ["truncated", "empty", "random", "page"])
def test_build_hard_negatives_names_a_damaged_feature_lmdb(tmp_path, how):
    features = str(tmp_path / "features.lmdb")
    _damage(_write_lmdb("region", features), how)
    annotations = str(tmp_path / "train.jsonline")
    write_jsonl(annotations, [{"sentences": ["a dog"], "img_path": f"{1000 + i}.jpg"} for i in range(40)])
    output = tmp_path / "pool.pkl"
    result = subprocess.run(
        [sys.executable, HARD_NEGATIVES, "--features", features, "--annotations", annotations,
         "--output", str(output), "--pool_size", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert features in _one_line_error(result, "build_hard_negatives")
    assert not output.exists()


# --- damaged records ------------------------------------------------------------------------

BAD_RECORDS = {
    "nan_features": ({"features": np.full((3, DIM), np.nan)}, "features holds a non-finite value"),
    "inf_features": ({"features": np.full((3, DIM), np.inf)}, "features holds a non-finite value"),
    "nan_boxes": ({"boxes": np.full((3, 4), np.nan)}, "boxes holds a non-finite value"),
    "inf_cls_prob": ({"cls_prob": np.full((3, 4), -np.inf)}, "cls_prob holds a non-finite value"),
    "zero_width": ({"image_w": 0}, "image_w"),
    "zero_height": ({"image_h": 0}, "image_h"),
    "box_outside": ({"boxes": np.array([[0, 0, 10, 10], [5, 5, 300, 40], [1, 1, 2, 2]])}, "box 1"),
    "box_negative": ({"boxes": np.array([[-30, 0, 10, 10], [5, 5, 30, 40], [1, 1, 2, 2]])}, "box 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_damaged_region_record_is_refused_naming_file_and_key(tmp_path, case):
    changes, message = BAD_RECORDS[case]
    path = str(tmp_path / "features.lmdb")
    write_region_features(path, [_region_record(1), _region_record(2, **changes)])
    store = RegionFeatureStore(path)
    store[1]
    with pytest.raises(BadRecordError, match=message) as info:
        store[2]
    assert str(info.value).startswith(f"{path} key b'2': ") and "\n" not in str(info.value)


def test_boxes_within_the_slack_are_accepted(tmp_path):
    path = str(tmp_path / "features.lmdb")
    boxes = np.array([[-2, -1, 64, 48], [0, 0, 66, 50], [1, 1, 2, 2]])  # 2 px over the edges
    write_region_features(path, [_region_record(1, boxes=boxes)])
    np.testing.assert_allclose(RegionFeatureStore(path)[1].pixel_boxes[1:], boxes)


@pytest.mark.parametrize("case", ["nan_features", "inf_cls_prob", "zero_width", "box_outside", "num_boxes"])
@pytest.mark.parametrize("rules", ["published", "modern"])
def test_the_pretraining_loader_names_a_damaged_record(tmp_path, case, rules):
    """Through the trainer's loader: counts and boxes are checked where the record is decoded, the
    values where the collate copies them into the batch; either way the file and key are named.
    Class scores reach the batch only for the regions MRM counts (masked, in a matched pair), so a
    record whose class scores are damaged is refused in the first epoch that uses them."""
    changes = {"num_boxes": ({"num_boxes": 5}, "num_boxes = 5")}.get(case) or BAD_RECORDS[case]
    path = str(tmp_path / "training_feat_all.lmdb")
    points = [_datapoint(10), _datapoint(21, **changes[0]), _datapoint(32)]
    write_pretraining_lmdb(path, points)
    captions = tmp_path / "caption_train.json"
    captions.write_text(json.dumps({p.image_id: p.caption for p in points}))
    dataset = ConceptCapDataset(path, str(captions), BertTokenizer(default_vocab_path()), rules=rules)
    ctx = DistContext(rank=0, local_rank=-1, world_size=1, device=torch.device("cpu"))
    loader = make_loader(dataset, 3, dataset.collate_fn(), ctx, False, False, 0, 0)
    epochs = 40 if case == "inf_cls_prob" else 1
    with pytest.raises(BadRecordError, match=changes[1]) as info:
        for epoch in range(epochs):
            loader.batch_sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            batch = next(iter(loader))
            assert batch["mrm_targets"].isfinite().all()  # the epochs before: no damaged row read
    assert str(info.value).startswith(f"{path} key b'00000001': ") and "\n" not in str(info.value)
    good = make_loader(dataset, 1, dataset.collate_fn(), ctx, False, False, 0, 0)
    assert next(iter(good))["image_feat"].isfinite().all()


def test_skip_policy_warns_once_per_record_and_counts(tmp_path, caplog):
    path = str(tmp_path / "features.lmdb")
    write_region_features(path, [_region_record(1), _region_record(2, image_w=0), _region_record(3)])
    store = RegionFeatureStore(path, on_bad_record="skip")
    with caplog.at_level(logging.WARNING, logger="vilbert.datasets.validation"):
        for _ in range(3):
            with pytest.raises(SkippedRecordError, match="key b'2'"):
                store[2]
        store[1], store[3]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 skipped" in warnings[0] and f"{path} key b'2'" in warnings[0]
    assert store.bad_records.skipped == 1
    with pytest.raises(BadInputError, match="on_bad_record: 'ignore' is not one of error, skip"):
        RegionFeatureStore(path, on_bad_record="ignore")


# --- the error classes ----------------------------------------------------------------------


def test_bad_input_errors_of_the_data_modules_share_one_base():
    for error in (
        JSONLinesError, AnnotationError, UnsafePickleError, TSVFormatError, LMDBFormatError,
        MissingImageError, DamagedLMDBError, BadRecordError,
    ):  # fmt: skip
        assert issubclass(error, BadInputError), error
    assert issubclass(MissingImageError, KeyError)  # ``except KeyError`` callers keep working
    assert str(MissingImageError("image id '7' not found")) == "image id '7' not found"


# --- the hard-negative pool -----------------------------------------------------------------


def _hard_negatives(tmp_path, records: list[dict], *extra: str) -> subprocess.CompletedProcess:
    features = str(tmp_path / "features.lmdb")
    write_region_features(features, records, overwrite=True)
    annotations = str(tmp_path / "train.jsonline")
    write_jsonl(annotations, [{"sentences": ["a dog"], "img_path": f"{r['image_id']}.jpg"} for r in records])
    return subprocess.run(
        [sys.executable, HARD_NEGATIVES, "--features", features, "--annotations", annotations,
         "--output", str(tmp_path / "pool.pkl"), "--pool_size", "3", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_build_hard_negatives_refuses_to_replace_a_pool_without_overwrite(tmp_path):
    records = [_region_record(1000 + i) for i in range(4)]
    assert _hard_negatives(tmp_path, records).returncode == 0
    pool = tmp_path / "pool.pkl"
    before = pool.read_bytes()
    error = _one_line_error(_hard_negatives(tmp_path, records[:3]), "build_hard_negatives")
    assert f"{pool} already exists" in error and "--overwrite" in error
    assert pool.read_bytes() == before
    assert _hard_negatives(tmp_path, records[:3], "--overwrite").returncode == 0
    assert pool.read_bytes() != before


@pytest.mark.parametrize("case", ["nan_region", "inf_global"])
def test_build_hard_negatives_names_an_image_without_finite_features(tmp_path, case):
    records = [_region_record(1000 + i) for i in range(4)]
    if case == "nan_region":
        records[2]["features"][1, 0] = np.nan
        expected = "key b'1002': features holds a non-finite value"
    else:  # finite regions whose mean overflows float32
        records[2]["features"] = np.full((3, DIM), 3e38)
        expected = "key b'1002': the global feature (mean of its 3 regions) overflows float32"
    error = _one_line_error(_hard_negatives(tmp_path, records), "build_hard_negatives")
    assert expected in error and str(tmp_path / "features.lmdb") in error
    assert not (tmp_path / "pool.pkl").exists()


def test_global_features_refuse_a_non_finite_image():
    class Store(dict):
        path = "features.lmdb"

    row = np.ones((2, DIM), dtype=np.float32)
    store = Store({7: SimpleNamespace(features=row), 8: SimpleNamespace(features=row * np.inf)})
    with pytest.raises(BadRecordError, match="features.lmdb: global feature of image 8 is not finite"):
        global_features(store, [7, 8])
