"""The pretraining data path against golden batches saved from the loader before it was made fast.

``tests/data/loader_golden/`` holds datapoints and the batches (and, for one configuration, the
samples) that the code of commit 2d75b9c produced from them: the real LMDB writer, reader, sample
builder, masking and collate, through a DataLoader. The same datapoints are written again here and
every batch must come out bitwise identical, through the zero-copy reader, in a worker process
(shared-memory buffers reused across batches) and in the main process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import random_pretraining_samples
from vilbert.datasets.concept_cap import ConceptCapDataset
from vilbert.datasets.features import PretrainDatapoint, PretrainingLMDB, write_pretraining_lmdb
from vilbert.datasets.serialization import loads_tensorpack_view, msgpack_dumps, safe_msgpack_loads
from vilbert.tokenization import BertTokenizer, default_vocab_path

GOLDEN = Path(__file__).parent / "data" / "loader_golden" / "batches.npz"
CONFIGS = {
    "span": (dict(max_seq_length=16, region_len=10, span_mask=True, seed=7), True),
    "span_fixed": (dict(max_seq_length=16, region_len=10, span_mask=True, seed=7), False),
    "bert_feature": (
        dict(max_seq_length=16, region_len=10, span_mask=False, predict_feature=True, seed=1),
        True,
    ),
    "rank1_long": (dict(max_seq_length=36, region_len=36, span_mask=True, seed=3, rank=1), True),
}


def digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as stored:
        return {name: stored[name] for name in stored.files}


def golden_points(golden: dict[str, np.ndarray]) -> list[PretrainDatapoint]:
    meta = json.loads(str(golden["input/meta"]))
    return [
        PretrainDatapoint(
            features=golden[f"input/{i}/features"],
            cls_prob=golden[f"input/{i}/cls_prob"],
            boxes=golden[f"input/{i}/boxes"],
            num_boxes=num_boxes,
            image_h=image_h,
            image_w=image_w,
            image_id=image_id,
            caption=caption,
        )
        for i, (num_boxes, image_h, image_w, image_id, caption) in enumerate(meta)
    ]


@pytest.fixture(scope="module", params=["msgpack", "pickle"])
def golden_files(request, golden, tmp_path_factory) -> tuple[str, str]:
    """The golden datapoints written again by the project's writer, in both tensorpack serializers."""
    folder = tmp_path_factory.mktemp(f"golden_{request.param}")
    points = golden_points(golden)
    lmdb_path = str(folder / "training_feat_all.lmdb")
    write_pretraining_lmdb(lmdb_path, points, serializer=request.param)
    caption_json = folder / "caption_train.json"
    caption_json.write_text(json.dumps({p.image_id: p.caption for p in points}))
    return lmdb_path, str(caption_json)


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return BertTokenizer(default_vocab_path())


def batches_of(dataset: ConceptCapDataset, golden, dynamic: bool, workers: int, epoch: int) -> list[dict]:
    order = golden["order"].tolist()
    dataset.set_epoch(epoch)
    loader = DataLoader(
        dataset,
        batch_sampler=[order[k : k + 8] for k in range(0, len(order), 8)],
        collate_fn=dataset.collate_fn(dynamic, pad_to_multiple=1),
        num_workers=workers,
    )
    return [{key: value.numpy().copy() for key, value in batch.items()} for batch in loader]


def assert_counted_targets(name: str, batch: dict, golden, stored: str) -> None:
    """``mrm_targets`` against the golden ``image_target`` it replaces: that target's rows at the
    counted regions, which are the rows of the source datapoints' class scores (or features)."""
    counted = (batch["image_label"] == 1) & (batch["is_next"] == 0)[:, None]
    targets = batch.pop("mrm_targets")
    field = "features" if CONFIGS[name][0].get("predict_feature") else "cls_prob"
    points = {point.image_id: getattr(point, field) for point in golden_points(golden)}
    images, regions = np.nonzero(counted)
    expected = [points[str(batch["image_id"][i])][r] for i, r in zip(images, regions)]
    width = next(iter(points.values())).shape[1]
    np.testing.assert_array_equal(targets, np.array(expected, dtype=np.float32).reshape(-1, width))
    if stored in golden:
        np.testing.assert_array_equal(targets, golden[stored][counted])


def assert_golden(name: str, epoch: int, batches: list[dict], golden) -> None:
    digests = json.loads(str(golden["digests"]))
    for number, batch in enumerate(batches):
        # Not in the golden files (added later): the flat indices of what the golden labels select,
        # and the counted regions' targets in place of the whole image_target.
        np.testing.assert_array_equal(batch.pop("msm_positions"), np.flatnonzero(batch["lm_label_ids"] != -1))
        counted = (batch["image_label"] == 1) & (batch["is_next"] == 0)[:, None]
        np.testing.assert_array_equal(batch.pop("mrm_positions"), np.flatnonzero(counted))
        assert_counted_targets(name, batch, golden, f"batch/{name}/{epoch}/{number}/image_target")
        for key, value in batch.items():
            stored = f"batch/{name}/{epoch}/{number}/{key}"
            if stored in golden:  # arrays kept for one configuration: a failure shows the difference
                np.testing.assert_array_equal(value, golden[stored], err_msg=stored)
                assert value.dtype == golden[stored].dtype, stored
            assert digest(value) == digests[f"{name}/{epoch}/{number}/{key}"], (
                f"{name} {epoch} {number} {key}"
            )
    assert len(batches) * 12 == sum(k.startswith(f"{name}/{epoch}/") for k in digests)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batches_equal_the_golden_ones_in_the_main_process(name, golden_files, golden, tokenizer) -> None:
    kwargs, dynamic = CONFIGS[name]
    dataset = ConceptCapDataset(*golden_files, tokenizer, **kwargs)
    for epoch in (0, 1):
        assert_golden(name, epoch, batches_of(dataset, golden, dynamic, 0, epoch), golden)


def test_batches_equal_the_golden_ones_from_a_worker(golden_files, golden, tokenizer) -> None:
    """One worker, every batch of two epochs: more batches than buffers, so buffers are reused."""
    kwargs, dynamic = CONFIGS["span"]
    dataset = ConceptCapDataset(*golden_files, tokenizer, **kwargs)
    for epoch in (0, 1):
        assert_golden("span", epoch, batches_of(dataset, golden, dynamic, 1, epoch), golden)


def test_samples_equal_the_golden_ones(golden_files, golden, tokenizer) -> None:
    kwargs, _ = CONFIGS["span"]
    dataset = ConceptCapDataset(*golden_files, tokenizer, **kwargs)
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample.pop("source") == f"{golden_files[0]} key {dataset.datapoints.keys()[index]!r}"
        for key, value in sample.items():
            stored = golden[f"sample/span/0/{index}/{key}"]
            np.testing.assert_array_equal(np.asarray(value), stored, err_msg=f"{index} {key}")
            assert np.asarray(value).dtype == stored.dtype and np.shape(value) == stored.shape


def test_reader_returns_read_only_views_that_outlive_the_reader(golden_files, golden) -> None:
    lmdb_path, _ = golden_files
    reader = PretrainingLMDB(lmdb_path)
    points = [reader.view(i) for i in range(len(reader))]
    del reader
    for point, expected in zip(points, golden_points(golden)):
        for name in ("features", "cls_prob", "boxes"):
            array = getattr(point, name)
            np.testing.assert_array_equal(array, getattr(expected, name))
            assert array.dtype == np.float32
        assert (point.num_boxes, point.image_id, point.caption) == (
            expected.num_boxes,
            expected.image_id,
            expected.caption,
        )
    if lmdb_path.count("msgpack"):
        assert not points[0].features.flags.writeable  # a view of the memory map, not a copy


def _datapoint_list(rows: int, image_h: int, image_id: str, caption: str, dtype=np.float32) -> list:
    rng = np.random.default_rng(rows)
    arrays = [rng.random((rows, cols)).astype(dtype) for cols in (300, 17, 4)]
    return [*arrays, rows, image_h, 70000, image_id, caption]


@pytest.mark.parametrize(
    "value",
    [
        _datapoint_list(1, 5, "1", ""),
        _datapoint_list(36, 300, "123456789", "a dog " * 30),  # bin16 arrays, uint16 ints, str8
        _datapoint_list(200, 2**40, "x" * 40, "é" * 3000),  # bin32 array, uint64, str16
        _datapoint_list(3, 7, "3", "c", dtype=np.float64),  # another dtype: a view all the same
        [*_datapoint_list(3, 7, "3", "c")[:7], 2.5],  # a float caption: still decoded like msgpack
        [1, 2, 3, 4, 5, 6, 7, 8],  # not the layout: the general decoder
        {"features": np.zeros(3, np.float32)},
    ],
)
def test_view_decoder_agrees_with_msgpack(value) -> None:
    data = msgpack_dumps(value)
    expected = safe_msgpack_loads(data, "value")
    got = loads_tensorpack_view(memoryview(data), "value")
    assert _equal(got, expected)


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b) and a.dtype == b.dtype and a.shape == b.shape
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


def test_damaged_values_are_named_by_the_general_decoder() -> None:
    data = msgpack_dumps(_datapoint_list(4, 5, "7", "a cat"))
    for damaged in (data[:-1], data[:20], data + b"\x00", data[:1] + b"\xc1" + data[2:]):
        with pytest.raises(ValueError, match="key b'7'"):
            loads_tensorpack_view(memoryview(damaged), "file key b'7'")
    assert msgpack.unpackb(data, raw=False)[3] == 4


def test_workers_reuse_shared_buffers_only_once_released(golden_files, golden, tokenizer) -> None:
    """Batches kept alive by the consumer are never overwritten by later ones."""
    kwargs, dynamic = CONFIGS["span"]
    dataset = ConceptCapDataset(*golden_files, tokenizer, **kwargs)
    order = golden["order"].tolist()
    loader = DataLoader(
        dataset,
        batch_sampler=[order[k : k + 8] for k in range(0, len(order), 8)] * 3,
        collate_fn=dataset.collate_fn(dynamic, pad_to_multiple=1),
        num_workers=1,
    )
    kept = list(loader)  # every batch alive at once: more than the pool holds
    reference = batches_of(dataset, golden, dynamic, 0, 0)
    for number, batch in enumerate(kept):
        for key, value in batch.items():
            assert torch.equal(value, torch.from_numpy(reference[number % len(reference)][key])), key


@pytest.mark.parametrize("gather_heads, use_sdpa", [(True, True), (False, False)])
def test_bucketed_padding_gives_the_losses_of_exact_padding(gather_heads: bool, use_sdpa: bool) -> None:
    """Rounding the padding up to multiples of 8 (text and regions) leaves every loss unchanged (to
    1e-6, relative: sums over more padded positions may round differently in the last bit)."""
    from vilbert.config import BertConfig
    from vilbert.datasets.concept_cap import collate_pretraining
    from vilbert.modeling import InterBertForMultiModalPreTraining
    from vilbert.pretraining import model_inputs

    config = BertConfig.from_json_file(Path(__file__).parent.parent / "config" / "interbert_tiny.json")
    torch.manual_seed(0)
    model = InterBertForMultiModalPreTraining(config).eval()
    model.gather_heads = gather_heads
    model.set_attention_impl(use_sdpa=use_sdpa)

    def losses(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**model_inputs(batch))  # the trainer's own renaming
        return torch.stack([out.msm, out.mrm, out.itm])

    for seed in range(3):
        samples = random_pretraining_samples(
            config, 7, seed, boxes=(1, 20), caption_tokens=(1, 30), region_len=18
        )
        exact = collate_pretraining(samples, max_seq_length=36, region_len=18, pad_to_multiple=1)
        bucketed = collate_pretraining(samples, max_seq_length=36, region_len=18, pad_to_multiple=8)
        text, regions = bucketed["input_ids"].shape[1], bucketed["image_feat"].shape[1]
        assert (text % 8 == 0 or text == 36) and (regions % 8 == 0 or regions == 19)
        assert (text, regions) != tuple(exact["input_ids"].shape[1:]) + tuple(exact["image_feat"].shape[1:2])
        with torch.no_grad():
            torch.testing.assert_close(losses(bucketed), losses(exact), rtol=1e-6, atol=1e-6)


def test_fine_tuning_collates_cut_to_buckets_without_changing_scores() -> None:
    from vilbert.config import BertConfig
    from vilbert.datasets.retrieval import collate_retrieval
    from vilbert.datasets.vcr import collate_vcr
    from vilbert.modeling import InterBertForVLTasks

    config = BertConfig.from_json_file(Path(__file__).parent.parent / "config" / "interbert_tiny.json")
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(3):  # retrieval training samples: 4 candidates, fixed padding 30 tokens / 40 regions
        lengths, counts = rng.integers(3, 12, 4), rng.integers(2, 15, 4)
        input_mask = (np.arange(30) < lengths[:, None]).astype(np.int64)
        image_mask = (np.arange(40) < counts[:, None]).astype(np.int64)
        samples.append(
            {
                "input_ids": rng.integers(1000, 3000, (4, 30)) * input_mask,
                "input_mask": input_mask,
                "segment_ids": np.zeros((4, 30), dtype=np.int64),
                "image_feat": (
                    rng.normal(size=(4, 40, config.v_feature_size)) * image_mask[..., None]
                ).astype(np.float32),
                "image_loc": (rng.random((4, 40, 5)) * image_mask[..., None]).astype(np.float32),
                "image_mask": image_mask,
                "multimodal_mask": np.concatenate([image_mask, input_mask], axis=1),
                "target": np.int64(0),
            }
        )
    full, cut = collate_retrieval(samples), collate_retrieval(samples, pad_to_multiple=8)
    tokens = -(-int(full["input_mask"].sum(-1).max()) // 8) * 8
    regions = -(-int(full["image_mask"].sum(-1).max()) // 8) * 8
    assert full["input_ids"].shape == (3, 4, 30) and cut["input_ids"].shape == (3, 4, tokens)
    assert cut["image_feat"].shape == (3, 4, regions, config.v_feature_size)
    assert cut["multimodal_mask"].shape == (3, 4, regions + tokens) and regions + tokens < 70
    for key in ("input_ids", "input_mask", "image_feat", "image_mask"):
        width = cut[key].shape[2]
        assert torch.equal(cut[key], full[key][:, :, :width]) and cut[key].is_contiguous(), key
    assert torch.equal(cut["multimodal_mask"], torch.cat([cut["image_mask"], cut["input_mask"]], dim=-1))
    torch.manual_seed(0)
    model = InterBertForVLTasks(config).eval()

    def scores(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = {k: v.flatten(0, 1) for k, v in batch.items() if k != "target"}
        with torch.no_grad():
            out = model(
                flat["input_ids"],
                flat["image_feat"],
                flat["image_loc"],
                flat["segment_ids"],
                flat["input_mask"],
                flat["image_mask"],
                flat["multimodal_mask"],
                pooled_only=True,
            )
        return out.vil_binary_prediction

    torch.testing.assert_close(scores(cut), scores(full), rtol=0, atol=1e-6)
    vcr = [
        {
            **{k: s[k] for k in ("input_ids", "input_mask", "segment_ids", "multimodal_mask")},
            "image_feat": s["image_feat"][0],
            "image_loc": s["image_loc"][0],
            "image_mask": s["image_mask"][0],
            "annot_id": f"val-{i}",
        }
        for i, s in enumerate(samples)
    ]
    for sample in vcr:  # VCR: one region list per question, shared by its four options
        sample["multimodal_mask"] = np.concatenate(
            [np.broadcast_to(sample["image_mask"], (4, 40)), sample["input_mask"]], 1
        )
    batch = collate_vcr(vcr, pad_to_multiple=8)
    assert batch["annot_id"] == ["val-0", "val-1", "val-2"] and batch["image_feat"].shape[1] % 8 == 0
    assert torch.equal(batch["image_mask"], collate_vcr(vcr)["image_mask"][:, : batch["image_feat"].shape[1]])


def test_prefetching_to_the_device_keeps_the_order_and_hands_back_the_host_batch() -> None:
    """On the CPU the batch is moved when taken; the CUDA side stream is tested in test_cuda.py."""
    from vilbert.device_prefetch import prefetch_to_device

    host = [{"x": torch.arange(3) + 10 * i, "y": torch.ones(2) * i} for i in range(4)]
    pairs = list(prefetch_to_device(iter(host), torch.device("cpu")))
    assert [h for h, _ in pairs] == host
    assert all(torch.equal(moved[k], h[k]) for h, moved in pairs for k in h)
