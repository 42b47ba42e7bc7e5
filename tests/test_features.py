"""Feature LMDBs (data.md §1, §2): round trips, the restricted decoders, and clear errors."""

from __future__ import annotations

import base64
import multiprocessing
import os
import pickle

import lmdb
import msgpack_numpy
import numpy as np
import pytest

from vilbert.datasets.features import (
    LMDBFormatError,
    MissingImageError,
    PretrainDatapoint,
    PretrainingLMDB,
    RegionFeatureStore,
    write_pretraining_lmdb,
    write_region_features,
)
from vilbert.datasets.jsonl import JSONLinesError, read_jsonl, read_jsonl_records, write_jsonl
from vilbert.datasets.lmdb_writer import AtomicLMDBWriter
from vilbert.datasets.serialization import (
    UnsafePickleError,
    loads_tensorpack_value,
    msgpack_dumps,
    safe_msgpack_loads,
    safe_pickle_loads,
)


def _region_records(n_images: int = 4, dim: int = 8, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        n = 2 + i
        x1y1 = rng.uniform(0, 100, (n, 2))
        boxes = np.concatenate([x1y1, x1y1 + rng.uniform(10, 100, (n, 2))], axis=1)
        records.append(
            {
                "image_id": 1000 + i,
                "image_h": 300,
                "image_w": 400,
                "num_boxes": n,
                "boxes": boxes,
                "features": rng.normal(size=(n, dim)),
                "cls_prob": rng.random((n, 5)) if i % 2 == 0 else None,
            }
        )
    return records


def _datapoints(count: int = 5, seed: int = 0) -> list[PretrainDatapoint]:
    rng = np.random.default_rng(seed)
    return [
        PretrainDatapoint(
            features=rng.normal(size=(3 + i, 16)).astype(np.float32),
            cls_prob=rng.random((3 + i, 7)).astype(np.float32),
            boxes=rng.uniform(0, 50, (3 + i, 4)).astype(np.float32),
            num_boxes=3 + i,
            image_h=240,
            image_w=320,
            image_id=f"img{i}",
            caption=f"a red dog number {i}",
        )
        for i in range(count)
    ]


class _RunsShell:
    """A pickle payload that would run a shell command when loaded by a plain ``pickle.loads``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- region-feature LMDB --------------------------------------------------------------------


def test_region_features_round_trip(tmp_path):
    records = _region_records()
    path = str(tmp_path / "features.lmdb")
    assert write_region_features(path, records) == len(records)
    assert os.path.isdir(path)
    store = RegionFeatureStore(path)
    assert len(store) == 4
    assert store.image_ids() == ["1000", "1001", "1002", "1003"]
    assert 1001 in store and "1002" in store and 5 not in store and "keys" not in store

    record = records[2]
    regions = store[1002]
    n = record["num_boxes"]
    assert regions.num_boxes == n + 1
    assert regions.features.shape == (n + 1, 8) and regions.features.dtype == np.float32
    np.testing.assert_allclose(regions.features[1:], record["features"].astype(np.float32))
    np.testing.assert_allclose(regions.features[0], record["features"].astype(np.float32).mean(0), rtol=1e-5)
    np.testing.assert_array_equal(regions.boxes[0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(regions.pixel_boxes[0], [0, 0, 400, 300])
    np.testing.assert_allclose(regions.pixel_boxes[1:], record["boxes"].astype(np.float32))
    b = record["boxes"].astype(np.float32)
    expected = np.stack(
        [
            b[:, 0] / 400,
            b[:, 1] / 300,
            b[:, 2] / 400,
            b[:, 3] / 300,
            (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / 120000,
        ],
        axis=1,
    )
    np.testing.assert_allclose(regions.boxes[1:], expected, rtol=1e-5)
    np.testing.assert_allclose(regions.cls_prob, record["cls_prob"].astype(np.float32))
    assert store[1001].cls_prob is None
    assert (regions.image_h, regions.image_w) == (300, 400)


def test_reads_values_written_as_strings_and_with_protocol_2(tmp_path):
    # Published converters pickled csv.DictReader rows: every field a str, base64 as str.
    features = np.arange(6, dtype=np.float32).reshape(2, 3)
    boxes = np.array([[0, 0, 10, 20], [5, 5, 15, 25]], dtype=np.float32)
    row = {
        "image_id": "42",
        "image_h": "100",
        "image_w": "50",
        "num_boxes": "2",
        "boxes": base64.b64encode(boxes.tobytes()).decode(),
        "features": base64.b64encode(features.tobytes()).decode(),
    }
    path = str(tmp_path / "published.lmdb")
    with AtomicLMDBWriter(path, subdir=True) as writer:
        writer.put(b"keys", pickle.dumps([b"42"], protocol=2))
        writer.put(b"42", pickle.dumps(row, protocol=2))
    regions = RegionFeatureStore(path)[42]
    np.testing.assert_array_equal(regions.features[1:], features)
    np.testing.assert_allclose(regions.boxes[2], [0.1, 0.05, 0.3, 0.25, 0.04])


def test_in_memory_cache_returns_read_only_arrays(tmp_path):
    path = str(tmp_path / "features.lmdb")
    write_region_features(path, _region_records())
    store = RegionFeatureStore(path, in_memory=True)
    first = store[1000]
    assert store[1000] is first
    with pytest.raises(ValueError):
        first.features[0, 0] = 1.0


def _read_first_feature(store: RegionFeatureStore) -> float:
    return float(store[1003].features[1, 0])


def test_store_pickles_and_reads_in_a_forked_worker(tmp_path):
    path = str(tmp_path / "features.lmdb")
    records = _region_records()
    write_region_features(path, records)
    store = RegionFeatureStore(path)
    expected = _read_first_feature(store)  # opened in the parent before the fork
    clone = pickle.loads(pickle.dumps(store))
    assert _read_first_feature(clone) == expected
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_read_first_feature, [store, clone]) == [expected, expected]


def test_missing_lmdb_and_missing_image(tmp_path):
    missing = str(tmp_path / "nowhere.lmdb")
    with pytest.raises(FileNotFoundError, match="nowhere.lmdb"):
        RegionFeatureStore(missing)
    with pytest.raises(FileNotFoundError, match="nowhere.lmdb"):
        PretrainingLMDB(missing)
    path = str(tmp_path / "features.lmdb")
    write_region_features(path, _region_records())
    with pytest.raises(MissingImageError) as info:
        RegionFeatureStore(path)[424242]
    assert isinstance(info.value, KeyError)
    assert "424242" in str(info.value) and path in str(info.value)


def test_unsafe_pickle_in_a_feature_lmdb_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.lmdb")
    with AtomicLMDBWriter(path, subdir=True) as writer:
        writer.put(b"keys", pickle.dumps([b"7"]))
        writer.put(b"7", pickle.dumps({"image_id": 7, "payload": _RunsShell(str(marker))}))
    store = RegionFeatureStore(path)
    assert store.image_ids() == ["7"]
    with pytest.raises(UnsafePickleError) as info:
        store[7]
    message = str(info.value)
    assert "b'7'" in message and path in message and ".system is not allowed" in message
    assert not marker.exists()


def test_safe_pickle_loads_admits_only_plain_values():
    plain = {"a": [1, 2.5, None, True], "b": (b"raw", "text")}
    for protocol in (2, 3, 4, 5):
        assert safe_pickle_loads(pickle.dumps(plain, protocol=protocol), "plain") == plain
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    with pytest.raises(UnsafePickleError, match="where.lmdb key"):
        safe_pickle_loads(pickle.dumps(array), "where.lmdb key b'x'")
    for protocol in (2, 4, 5):
        data = pickle.dumps([array, np.float32(1.5), np.int64(3)], protocol=protocol)
        loaded = safe_pickle_loads(data, "numpy", allow_numpy=True)
        np.testing.assert_array_equal(loaded[0], array)
        assert loaded[1] == np.float32(1.5) and loaded[2] == 3
    objects = np.array([1, "a"], dtype=object)
    with pytest.raises(UnsafePickleError, match="object"):
        safe_pickle_loads(pickle.dumps(objects), "objects", allow_numpy=True)
    with pytest.raises(UnsafePickleError, match="not a valid pickle"):
        safe_pickle_loads(b"\x80\x04garbage", "junk")


def test_msgpack_object_arrays_are_refused():
    # msgpack-numpy stores object arrays as a pickle; its own decoder would unpickle it.
    data = msgpack_dumps([np.array([1, "a"], dtype=object)])
    with pytest.raises(UnsafePickleError, match="source"):
        safe_msgpack_loads(data, "source")
    value = [np.arange(4, dtype=np.float32), np.int64(7), "x"]
    decoded = loads_tensorpack_value(msgpack_dumps(value), "ok")
    np.testing.assert_array_equal(decoded[0], value[0])
    assert decoded[1] == 7 and decoded[2] == "x"
    legacy = msgpack_numpy.packb(value, use_bin_type=True)
    assert loads_tensorpack_value(legacy, "ok")[1] == 7


# --- pretraining LMDB ------------------------------------------------------------------------


@pytest.mark.parametrize("serializer", ["msgpack", "pickle"])
@pytest.mark.parametrize("subdir", [False, True])
def test_pretraining_lmdb_round_trip(tmp_path, serializer, subdir):
    datapoints = _datapoints()
    path = str(tmp_path / "training_feat_all.lmdb")
    assert write_pretraining_lmdb(path, datapoints, serializer=serializer, subdir=subdir) == 5
    if subdir:
        assert os.path.isdir(path)
    else:  # tensorpack's single-file layout
        assert os.path.isfile(path) and os.path.isfile(path + "-lock")
    lmdb_file = PretrainingLMDB(path)
    assert len(lmdb_file) == 5
    assert lmdb_file.keys()[:2] == [b"00000000", b"00000001"]
    for index in (0, 4, -1):
        got, want = lmdb_file[index], datapoints[index]
        np.testing.assert_array_equal(got.features, want.features)
        np.testing.assert_array_equal(got.cls_prob, want.cls_prob)
        np.testing.assert_array_equal(got.boxes, want.boxes)
        assert (got.num_boxes, got.image_h, got.image_w) == (want.num_boxes, 240, 320)
        assert (got.image_id, got.caption) == (want.image_id, want.caption)
        assert got.features.flags.writeable
    with pytest.raises(IndexError):
        lmdb_file[5]
    assert len(pickle.loads(pickle.dumps(lmdb_file))) == 5


def test_pretraining_values_with_numpy_scalars_decode(tmp_path):
    path = str(tmp_path / "scalars.lmdb")
    features = np.ones((2, 4), dtype=np.float32)
    value = [features, np.full((2, 3), 1 / 3, np.float32), np.zeros((2, 4), np.float32)]
    value += [np.int64(2), np.int32(10), np.int32(20), "id", "caption"]
    with AtomicLMDBWriter(path, subdir=False) as writer:
        writer.put(b"00000000", msgpack_dumps(value))
        writer.put(b"__keys__", msgpack_dumps([b"00000000"]))
    datapoint = PretrainingLMDB(path)[0]
    assert (datapoint.num_boxes, datapoint.image_h, datapoint.image_w) == (2, 10, 20)
    assert isinstance(datapoint.num_boxes, int)


def test_missing_keys_entry_is_a_clear_error(tmp_path):
    path = str(tmp_path / "nokeys.lmdb")
    with AtomicLMDBWriter(path, subdir=False) as writer:
        writer.put(b"00000000", msgpack_dumps(_datapoints(1)[0].to_list()))
    with pytest.raises(LMDBFormatError, match="__keys__") as info:
        len(PretrainingLMDB(path))
    assert path in str(info.value)
    region_path = str(tmp_path / "nokeys_region.lmdb")
    with AtomicLMDBWriter(region_path, subdir=True) as writer:
        writer.put(b"1", pickle.dumps({}))
    with pytest.raises(LMDBFormatError, match="keys"):
        RegionFeatureStore(region_path).image_ids()


# --- writing: overwrite, atomicity, growth ---------------------------------------------------


def test_writers_refuse_to_overwrite_and_failed_writes_leave_the_old_file(tmp_path):
    path = str(tmp_path / "features.lmdb")
    write_region_features(path, _region_records(2))
    with pytest.raises(FileExistsError, match="overwrite"):
        write_region_features(path, _region_records(3))

    def broken():
        yield from _region_records(3)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_region_features(path, broken(), overwrite=True)
    assert len(RegionFeatureStore(path)) == 2
    assert sorted(os.listdir(tmp_path)) == ["features.lmdb"]

    write_region_features(path, _region_records(3), overwrite=True)
    assert len(RegionFeatureStore(path)) == 3

    single = str(tmp_path / "train.lmdb")
    write_pretraining_lmdb(single, _datapoints(2))
    with pytest.raises(FileExistsError):
        write_pretraining_lmdb(single, _datapoints(3))
    write_pretraining_lmdb(single, _datapoints(3), overwrite=True)
    assert len(PretrainingLMDB(single)) == 3
    assert sorted(os.listdir(tmp_path)) == ["features.lmdb", "train.lmdb", "train.lmdb-lock"]


def test_duplicate_image_ids_are_refused(tmp_path):
    records = _region_records(2)
    records[1]["image_id"] = records[0]["image_id"]
    with pytest.raises(ValueError, match="duplicate"):
        write_region_features(str(tmp_path / "dup.lmdb"), records)
    assert os.listdir(tmp_path) == []


def test_map_grows_when_full(tmp_path):
    path = str(tmp_path / "grow.lmdb")
    blob = os.urandom(64 * 1024)
    with AtomicLMDBWriter(path, subdir=True, initial_map_size=256 * 1024, batch_size=8) as writer:
        for i in range(64):
            writer.put(f"{i:04d}".encode(), blob)
    with lmdb.open(path, readonly=True, lock=False) as env:
        assert env.stat()["entries"] == 64


# --- JSON lines --------------------------------------------------------------------------------


def test_read_jsonl_skips_blank_lines_and_names_bad_lines(tmp_path):
    good = str(tmp_path / "good.jsonl")
    write_jsonl(good, [{"a": 1}, {"b": [2, 3]}])
    with open(good, "a") as f:
        f.write("\n   \n")
    assert read_jsonl(good) == [{"a": 1}, {"b": [2, 3]}]
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text('\n{"a": 1}\n\n{"b": 2}\n')
    assert read_jsonl_records(str(spaced)) == [(2, {"a": 1}), (4, {"b": 2})]

    bad = tmp_path / "bad.jsonline"
    bad.write_text('{"a": 1}\n\n{"b": oops}\n')
    with pytest.raises(JSONLinesError, match=r"bad\.jsonline:3: malformed JSON line"):
        read_jsonl(str(bad))
    not_object = tmp_path / "list.jsonl"
    not_object.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object"):
        read_jsonl(str(not_object))
    with pytest.raises(FileNotFoundError):
        read_jsonl(str(tmp_path / "absent.jsonl"))
