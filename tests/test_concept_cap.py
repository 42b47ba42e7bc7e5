"""The Conceptual Captions pretraining dataset over a tiny LMDB: ITM pairs, batches, seeding, file layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vilbert.datasets.concept_cap import (
    ConceptCapDataset,
    PretrainingSampleBuilder,
    collate_pretraining,
    pretraining_files,
)
from vilbert.datasets.features import PretrainDatapoint, write_pretraining_lmdb
from vilbert.datasets.masking import IGNORE_INDEX
from vilbert.tokenization import BertTokenizer, default_vocab_path

FEAT, CLASSES, NUM_IMAGES = 12, 9, 24
WORDS = ["dog", "cat", "car", "tree", "house", "boat", "bird", "horse"]


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return BertTokenizer(default_vocab_path())


def _datapoint(rng: np.random.Generator, image_id: int, n: int, caption: str) -> PretrainDatapoint:
    w, h = 320, 240
    x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(10, w / 2, n), y1 + rng.uniform(10, h / 2, n)], axis=1)
    return PretrainDatapoint(
        features=(rng.normal(size=(n, FEAT)) + 3).astype(np.float32),
        cls_prob=rng.dirichlet(np.ones(CLASSES), size=n).astype(np.float32),
        boxes=boxes.astype(np.float32),
        num_boxes=n,
        image_h=h,
        image_w=w,
        image_id=str(image_id),
        caption=caption,
    )


def _write_split(directory: Path, lmdb_name: str, json_name: str, points: list[PretrainDatapoint]) -> None:
    write_pretraining_lmdb(str(directory / lmdb_name), points)
    (directory / json_name).write_text(json.dumps({p.image_id: p.caption for p in points}))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Distinct images and captions (caption i names word i and number i); region counts 2..40."""
    directory = tmp_path_factory.mktemp("concap")
    rng = np.random.default_rng(0)
    points = [
        _datapoint(
            rng, 1000 + i, 2 + (i * 7) % 39, f"a {WORDS[i % 8]} near the {WORDS[(i * 3) % 8]} number {i}"
        )
        for i in range(NUM_IMAGES)
    ]
    _write_split(directory, "training_feat_all.lmdb", "caption_train.json", points)
    return directory


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Identical images and captions under distinct ids: any difference between samples is randomness."""
    directory = tmp_path_factory.mktemp("twins")
    rng = np.random.default_rng(1)
    twin = _datapoint(rng, 0, 20, "a large brown dog runs across the green field after a small red ball")
    points = [PretrainDatapoint(**{**twin.__dict__, "image_id": str(2000 + i)}) for i in range(16)]
    _write_split(directory, "training_feat_all.lmdb", "caption_train.json", points)
    return directory


def _dataset(directory: Path, tokenizer: BertTokenizer, **kwargs) -> ConceptCapDataset:
    return ConceptCapDataset(*pretraining_files(str(directory), "train"), tokenizer, **kwargs)


def _original_text(sample: dict[str, np.ndarray], tokenizer: BertTokenizer) -> list[int]:
    """The caption's ids before masking: labels where masked, inputs elsewhere, specials dropped."""
    ids = np.where(sample["lm_label_ids"] != IGNORE_INDEX, sample["lm_label_ids"], sample["input_ids"])
    return ids[1:-1].tolist()


def test_itm_negatives_never_use_the_images_own_caption_and_are_half(
    data_dir: Path, tokenizer: BertTokenizer
) -> None:
    dataset = _dataset(data_dir, tokenizer)
    captions = json.loads((data_dir / "caption_train.json").read_text())
    tokens_of = {image_id: tokenizer.encode(text) for image_id, text in captions.items()}
    negatives = total = 0
    for epoch in range(25):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            own = tokens_of[str(int(sample["image_id"]))]
            text = _original_text(sample, tokenizer)
            if sample["is_next"] == 0:
                assert text == own
            else:
                assert text != own and text in tokens_of.values()
            negatives += int(sample["is_next"])
            total += 1
    assert abs(negatives / total - 0.5) < 0.05


@pytest.mark.parametrize("itm_prob, expected", [(0.0, 0), (1.0, 1)])
def test_itm_probability_is_configurable(
    data_dir: Path, tokenizer: BertTokenizer, itm_prob, expected
) -> None:
    dataset = _dataset(data_dir, tokenizer, itm_prob=itm_prob)
    assert all(int(dataset[i]["is_next"]) == expected for i in range(len(dataset)))


def test_batch_keys_shapes_dtypes_and_padding(data_dir: Path, tokenizer: BertTokenizer) -> None:
    dataset = _dataset(data_dir, tokenizer, max_seq_length=10, region_len=30)
    samples = [dataset[i] for i in range(6)]
    dynamic = collate_pretraining(samples, pad_to_multiple=1)
    fixed = dataset.collate_fn(dynamic_padding=False)(samples)
    text_len = max(len(s["input_ids"]) for s in samples)
    regions = max(len(s["region_feat"]) for s in samples) + 1
    assert regions <= 31 and max(len(s["region_feat"]) for s in map(dataset.__getitem__, range(24))) == 30
    expected = {
        "input_ids": ((6, text_len), (6, 10), torch.int64),
        "input_mask": ((6, text_len), (6, 10), torch.int64),
        "segment_ids": ((6, text_len), (6, 10), torch.int64),
        "lm_label_ids": ((6, text_len), (6, 10), torch.int64),
        "is_next": ((6,), (6,), torch.int64),
        "image_feat": ((6, regions, FEAT), (6, 31, FEAT), torch.float32),
        "image_loc": ((6, regions, 5), (6, 31, 5), torch.float32),
        "image_label": ((6, regions - 1), (6, 30), torch.int64),
        "image_mask": ((6, regions), (6, 31), torch.int64),
        "multimodal_mask": ((6, regions + text_len), (6, 31 + 10), torch.int64),
        "image_id": ((6,), (6,), torch.int64),
    }
    assert set(dynamic) == set(expected) | {"msm_positions", "mrm_positions", "mrm_targets"} == set(fixed)
    for batch in (dynamic, fixed):  # the flat indices of what the labels select, found on the host
        labels = batch["lm_label_ids"]
        counted = (batch["image_label"] == 1) & (batch["is_next"] == 0)[:, None]
        assert batch["msm_positions"].dtype == batch["mrm_positions"].dtype == torch.int64
        assert torch.equal(batch["msm_positions"], torch.nonzero((labels != -1).flatten()).flatten())
        assert torch.equal(batch["mrm_positions"], torch.nonzero(counted.flatten()).flatten())
        assert len(batch["msm_positions"]) > 0 and len(batch["mrm_positions"]) > 0
        # The MRM targets of exactly the counted regions, in that order: the rows of the detector's
        # class scores that the loss reads (the published [B, R - 1, classes] target at those rows).
        sample, region = np.divmod(batch["mrm_positions"].numpy(), counted.shape[1])
        rows = [samples[i]["image_target"][r] for i, r in zip(sample, region)]
        assert batch["mrm_targets"].dtype == torch.float32
        np.testing.assert_array_equal(batch["mrm_targets"].numpy(), np.stack(rows))
    for name, (dynamic_shape, fixed_shape, dtype) in expected.items():
        assert tuple(dynamic[name].shape) == dynamic_shape and dynamic[name].dtype == dtype, name
        assert tuple(fixed[name].shape) == fixed_shape and fixed[name].dtype == dtype, name

    for name in (
        "input_ids",
        "input_mask",
        "lm_label_ids",
        "image_feat",
        "image_loc",
        "image_label",
    ):
        width = dynamic[name].shape[1]
        assert torch.equal(fixed[name][:, :width], dynamic[name]), name
    assert torch.all(fixed["input_ids"][:, text_len:] == 0)
    assert torch.all(fixed["lm_label_ids"][:, text_len:] == -1)
    assert torch.all(fixed["image_feat"][:, regions:] == 0)
    assert torch.all(fixed["image_label"][:, regions - 1 :] == -1)
    for batch in (dynamic, fixed):
        assert torch.equal(batch["multimodal_mask"], torch.cat([batch["image_mask"], batch["input_mask"]], 1))
        assert torch.all(batch["image_mask"][:, 0] == 1) and torch.all(batch["segment_ids"] == 0)
        assert torch.all(batch["image_loc"][:, 0] == torch.tensor([0, 0, 1, 1, 1.0]))
        assert torch.all(batch["image_label"][batch["image_mask"][:, 1:] == 0] == -1)
    assert batch["image_id"].tolist() == [1000 + i for i in range(6)]


def test_regions_truncated_targets_and_predict_feature(data_dir: Path, tokenizer: BertTokenizer) -> None:
    plain = _dataset(data_dir, tokenizer, region_len=8)
    regress = _dataset(data_dir, tokenizer, region_len=8, predict_feature=True)
    source = plain.datapoints
    for index in range(len(plain)):
        point, sample, feature_sample = source[index], plain[index], regress[index]
        n = min(point.num_boxes, 8)
        assert len(sample["region_feat"]) == len(sample["region_loc"]) == len(sample["image_label"]) == n
        np.testing.assert_array_equal(sample["image_target"], point.cls_prob[:n])
        # Samples carry the unmasked originals; the MRM zeroing is applied in collate.
        np.testing.assert_array_equal(feature_sample["image_target"], point.features[:n])
        np.testing.assert_array_equal(sample["region_feat"], point.features[:n])
        pixels = sample["region_loc"][:, :4] * [320, 240, 320, 240]
        np.testing.assert_allclose(pixels, point.boxes[:n], rtol=1e-5)


def _masks(batches) -> list[tuple]:
    return [(b["lm_label_ids"].tolist(), b["image_label"].tolist(), b["input_ids"].tolist()) for b in batches]


def test_seeding_workers_ranks_epochs_and_resume(twin_dir: Path, tokenizer: BertTokenizer) -> None:
    def loader(dataset: ConceptCapDataset, workers: int) -> list[tuple]:
        batches = DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=dataset.collate_fn())
        return _masks(batches)

    dataset = _dataset(twin_dir, tokenizer, itm_prob=0.0, seed=3)
    in_workers = loader(dataset, workers=2)
    # Identical datapoints: samples only differ if every worker and index draws its own masks.
    per_sample = [(tuple(t), tuple(r), tuple(i)) for b in in_workers for t, r, i in zip(*b)]
    assert len(set(per_sample)) >= len(per_sample) - 2
    worker0, worker1 = in_workers[0::2], in_workers[1::2]
    assert all(a != b for a, b in zip(worker0, worker1))
    assert loader(dataset, workers=0) == in_workers, "masks must not depend on the worker count"
    assert loader(_dataset(twin_dir, tokenizer, itm_prob=0.0, seed=3), workers=0) == in_workers

    def one_by_one(dataset: ConceptCapDataset) -> list[tuple]:
        return _masks([collate_pretraining([sample]) for sample in dataset])

    same_rank = one_by_one(dataset)
    other_rank = one_by_one(_dataset(twin_dir, tokenizer, itm_prob=0.0, seed=3, rank=1))
    assert all(a != b for a, b in zip(other_rank, same_rank))
    assert one_by_one(_dataset(twin_dir, tokenizer, itm_prob=0.0, seed=4)) != same_rank

    dataset.set_epoch(1)
    next_epoch = one_by_one(dataset)
    assert next_epoch != same_rank
    resumed = _dataset(twin_dir, tokenizer, itm_prob=0.0, seed=3)
    resumed.set_epoch(1)
    assert _masks([collate_pretraining([resumed[i]]) for i in range(9, 16)]) == next_epoch[9:]


def test_set_epoch_reaches_persistent_workers(twin_dir: Path, tokenizer: BertTokenizer) -> None:
    dataset = _dataset(twin_dir, tokenizer, seed=5)
    loader = DataLoader(
        dataset, batch_size=4, num_workers=1, persistent_workers=True, collate_fn=dataset.collate_fn()
    )
    epochs = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        epochs.append(_masks(loader))
    reference = _dataset(twin_dir, tokenizer, seed=5)
    reference.set_epoch(1)
    assert epochs[0] != epochs[1]
    assert epochs[1] == _masks(DataLoader(reference, batch_size=4, collate_fn=reference.collate_fn()))


def test_file_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    points = [_datapoint(rng, i, 3, f"caption {i}") for i in range(3)]
    single = tmp_path / "single"
    single.mkdir()
    _write_split(single, "training_feat_all.lmdb", "caption_train.json", points)
    _write_split(single, "validation_all.lmdb", "caption_val.json", points)
    files = pretraining_files(str(single), "train", rank=1, distributed=True)
    assert files == (str(single / "training_feat_all.lmdb"), str(single / "caption_train.json"))
    assert not files.is_rank_part
    lmdb_path, caption_json = pretraining_files(str(single), "val")
    assert (lmdb_path, caption_json) == (
        str(single / "validation_all.lmdb"),
        str(single / "caption_val.json"),
    )

    parts = tmp_path / "parts"
    parts.mkdir()
    for rank in range(2):
        _write_split(parts, f"training_feat_part_{rank}.lmdb", "caption_train.json", points)
    files = pretraining_files(str(parts), "train", rank=1, distributed=True)
    assert files.lmdb_path == str(parts / "training_feat_part_1.lmdb") and files.is_rank_part
    with pytest.raises(FileNotFoundError, match="training_feat_all.lmdb"):
        pretraining_files(str(parts), "train")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        pretraining_files(str(tmp_path / "missing_dir"), "train")
    os.remove(parts / "caption_train.json")
    with pytest.raises(FileNotFoundError, match="caption_train.json"):
        pretraining_files(str(parts), "train", rank=0, distributed=True)


def test_bad_caption_json_is_an_error_naming_the_file(
    data_dir: Path, tokenizer: BertTokenizer, tmp_path: Path
) -> None:
    lmdb_path = str(data_dir / "training_feat_all.lmdb")
    empty = tmp_path / "caption_empty.json"
    empty.write_text("{}")
    with pytest.raises(ValueError, match="caption_empty.json"):
        ConceptCapDataset(lmdb_path, str(empty), tokenizer)
    lonely = tmp_path / "caption_lonely.json"
    lonely.write_text(json.dumps({"1000": "a dog"}))
    dataset = ConceptCapDataset(lmdb_path, str(lonely), tokenizer, itm_prob=1.0)
    with pytest.raises(ValueError, match="caption_lonely.json"):
        dataset[0]


def test_published_rules_exclude_negatives_equal_up_to_the_last_character(tokenizer):
    """Published: the mismatched caption comes from an image whose id differs once the last character
    is dropped ("100" never draws "101"); corrected: only the image itself is excluded."""
    captions = {"100": "own", "101": "neighbour", "200": "far", "201": "far too"}

    def drawn(rules: str) -> set[str]:
        builder = PretrainingSampleBuilder(tokenizer, captions, rules=rules)
        rng = np.random.default_rng(0)
        return {builder.other_caption("100", rng) for _ in range(400)}

    assert drawn("modern") == {"neighbour", "far", "far too"}
    assert drawn("published") == {"far", "far too"}


def test_published_rules_make_regions_stored_as_zeros_mrm_targets(tmp_path: Path, tokenizer):
    """Published: group masking labels every region whose features are all zero after masking, so a
    region stored as zeros is always a target; corrected: only masked regions are targets. The rule
    is applied by the dataset's collate (where the features are read), so it is tested through it."""
    point = _datapoint(np.random.default_rng(1), 100, 6, "a dog near the cat")
    point.features[2] = 0.0
    _write_split(
        tmp_path,
        "training_feat_all.lmdb",
        "caption_train.json",
        [point, _datapoint(np.random.default_rng(2), 200, 6, "a cat")],
    )
    labels = {}
    for rules in ("modern", "published"):
        draws = []
        for seed in range(200):
            dataset = _dataset(tmp_path, tokenizer, span_mask=True, rules=rules, seed=seed)
            batch = dataset.collate_fn(pad_to_multiple=1)(dataset.__getitems__([0]))
            draws.append((batch["image_label"][0].numpy(), (batch["image_feat"][0, 1:] == 0).all(-1).numpy()))
        labels[rules] = np.array([label for label, _ in draws])
        zeroed = np.array([zero for _, zero in draws])
        other = np.arange(6) != 2
        assert ((labels[rules] == 1) >= zeroed)[:, other].all()  # every masked region is a target in both
    assert (labels["published"][:, 2] == 1).all()
    assert (labels["modern"][:, 2] == IGNORE_INDEX).mean() > 0.5  # masked w.p. about 0.1 (+ its group)
    assert np.array_equal(labels["published"][:, other], labels["modern"][:, other])
