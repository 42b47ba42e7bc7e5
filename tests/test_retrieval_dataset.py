"""Flickr30K retrieval datasets on a tiny world written with the project's own writers."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vilbert.datasets.features import MissingImageError, RegionFeatureStore, write_region_features
from vilbert.datasets.hard_negatives import flickr_image_id, hard_negatives_from_annotations
from vilbert.datasets.jsonl import AnnotationError
from vilbert.datasets.loader import make_loader
from vilbert.datasets.retrieval import (
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    collate_retrieval,
    encode_captions,
    load_hard_negative_pool,
)
from vilbert.datasets.validation import BadRecordError
from vilbert.distributed import DistContext
from vilbert.tokenization import BertTokenizer, default_vocab_path

IMAGE_IDS = [1000092795, 1000268201, 1000344755, 1000366164, 1000523639, 1000919630]
WORDS = ["red", "blue", "green", "cat", "horse", "bird", "tree", "car", "dog", "chair"]
CAPTIONS_PER_IMAGE = 3
FEATURE_DIM = 8
T, R = 12, 5


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return BertTokenizer(default_vocab_path())


def _captions(image: int) -> list[str]:
    # Distinct word pairs, so a caption's WordPieces name its image.
    return [
        f"a {WORDS[image]} {WORDS[(image + k + 1) % len(WORDS)]} number {k}"
        for k in range(CAPTIONS_PER_IMAGE)
    ]


def _num_boxes(image: int) -> int:
    return 2 + image % 4  # 2..5 real boxes, so R=5 both pads and truncates


def _write_world(root, image_ids=IMAGE_IDS, damaged: int | None = None):
    annotations = root / "train.jsonline"
    lines = [
        json.dumps({"sentences": _captions(i), "id": i, "img_path": f"{image_id}.jpg"})
        for i, image_id in enumerate(image_ids)
    ]
    annotations.write_text("\n".join(lines) + "\n")
    records = []
    for i, image_id in enumerate(IMAGE_IDS):
        n = _num_boxes(i)
        # Every value of box b of image i is image_id-specific: row b is 100 * i + b.
        features = (100.0 * i + np.arange(n, dtype=np.float32))[:, None].repeat(FEATURE_DIM, axis=1)
        if i == damaged:
            features[1, 2] = np.nan
        boxes = np.array([[b, b, b + 10, b + 20] for b in range(n)], dtype=np.float32)
        records.append(
            {
                "image_id": image_id,
                "image_h": 100,
                "image_w": 200,
                "num_boxes": n,
                "boxes": boxes,
                "features": features,
            }
        )
    features_path = str(root / "features.lmdb")
    write_region_features(features_path, records)
    return str(annotations), RegionFeatureStore(features_path)


@pytest.fixture
def world(tmp_path):
    return _write_world(tmp_path)


def _write_pool(path, image_ids, rows):
    with open(path, "wb") as f:
        pickle.dump(
            {"train_image_list": list(image_ids), "train_hard_pool": np.asarray(rows, dtype=np.int64)}, f
        )
    return str(path)


@pytest.fixture
def pool_path(tmp_path):
    # The list in another order than the annotations; each image's 2 hard negatives are its next two.
    order = [3, 0, 5, 1, 4, 2]
    listed = [IMAGE_IDS[i] for i in order]
    position = {image: p for p, image in enumerate(order)}
    rows = [[position[i], position[(i + 1) % 6], position[(i + 2) % 6]] for i in order]
    return _write_pool(tmp_path / "hard_negative.pkl", listed, rows)


def _text_to_image(tokenizer):
    return {
        tuple(tokenizer.encode(caption)): image
        for image in range(len(IMAGE_IDS))
        for caption in _captions(image)
    }


def _caption_image(row_ids, row_mask, text_to_image, tokenizer):
    ids = row_ids[row_mask.astype(bool)].tolist()
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    return text_to_image[tuple(ids[1:-1])]


def _feature_image(image_feat):
    return int(round(image_feat[1, 0] / 100.0))  # row 1 = first real box = 100 * image


def _candidates(sample, text_to_image, tokenizer):
    """(caption's image, region's image) of each of the 4 candidates, recovered from the raw arrays."""
    return [
        (
            _caption_image(sample["input_ids"][c], sample["input_mask"][c], text_to_image, tokenizer),
            _feature_image(sample["image_feat"][c]),
        )
        for c in range(4)
    ]


def test_candidates_pair_captions_and_images_as_published(world, pool_path, tokenizer):
    annotations, features = world
    dataset = RetrievalTrainDataset(
        annotations, features, tokenizer, pool_path, max_seq_length=T, max_region_num=R
    )
    text_to_image = _text_to_image(tokenizer)
    assert len(dataset) == len(IMAGE_IDS) * CAPTIONS_PER_IMAGE
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            true_image = index // CAPTIONS_PER_IMAGE
            pairs = _candidates(sample, text_to_image, tokenizer)
            assert pairs[0] == (true_image, true_image)
            assert pairs[1][1] == true_image and pairs[1][0] != true_image  # same image, other caption
            assert pairs[2][0] == true_image and pairs[2][1] != true_image  # same caption, other image
            assert pairs[3][1] == true_image and pairs[3][0] != true_image  # same image, hard caption
            assert np.array_equal(sample["input_ids"][2], sample["input_ids"][0])
            assert sample["target"] == 0
            assert sample["itm_labels"].tolist() == [0, 1, 1, 1]
            assert sample["image_id"] == IMAGE_IDS[true_image]
            assert [image for _, image in pairs] == sample["image_index"].tolist()


def test_hard_negatives_come_from_the_pool_and_never_the_image(world, pool_path, tokenizer):
    annotations, features = world
    dataset = RetrievalTrainDataset(
        annotations, features, tokenizer, pool_path, max_seq_length=T, max_region_num=R
    )
    text_to_image = _text_to_image(tokenizer)
    drawn: dict[int, set[int]] = {i: set() for i in range(len(IMAGE_IDS))}
    for epoch in range(12):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            hard = _caption_image(sample["input_ids"][3], sample["input_mask"][3], text_to_image, tokenizer)
            drawn[index // CAPTIONS_PER_IMAGE].add(hard)
    for image, hard in drawn.items():
        assert hard == {(image + 1) % 6, (image + 2) % 6}


def test_without_pool_or_outside_training_the_fourth_is_a_random_other_image(world, pool_path, tokenizer):
    annotations, features = world
    text_to_image = _text_to_image(tokenizer)
    for dataset in (
        RetrievalTrainDataset(annotations, features, tokenizer, None, max_seq_length=T, max_region_num=R),
        RetrievalTrainDataset(
            annotations, features, tokenizer, pool_path, max_seq_length=T, max_region_num=R, split="val"
        ),
    ):
        assert dataset.hard_pool is None
        others = set()
        for epoch in range(10):
            dataset.set_epoch(epoch)
            for index in range(0, len(dataset), CAPTIONS_PER_IMAGE):
                sample = dataset[index]
                hard = _caption_image(
                    sample["input_ids"][3], sample["input_mask"][3], text_to_image, tokenizer
                )
                assert hard != index // CAPTIONS_PER_IMAGE
                others.add((index // CAPTIONS_PER_IMAGE, hard))
        assert len(others) > 2 * len(IMAGE_IDS)  # more than the pool's two per image


def test_draws_are_reproducible_and_change_with_epoch_and_seed(world, tokenizer):
    annotations, features = world
    a = RetrievalTrainDataset(
        annotations, features, tokenizer, None, max_seq_length=T, max_region_num=R, seed=3
    )
    b = RetrievalTrainDataset(
        annotations, features, tokenizer, None, max_seq_length=T, max_region_num=R, seed=3
    )
    c = RetrievalTrainDataset(
        annotations, features, tokenizer, None, max_seq_length=T, max_region_num=R, seed=4
    )

    def draws(dataset):
        return [
            dataset[i]["caption_index"].tolist() + dataset[i]["image_index"].tolist()
            for i in range(len(dataset))
        ]

    first = draws(a)
    assert first == draws(b)
    assert first != draws(c)
    a.set_epoch(1)
    assert first != draws(a)
    a.set_epoch(0)
    assert first == draws(a)


def test_shapes_masks_and_region_truncation(world, tokenizer):
    annotations, features = world
    dataset = RetrievalTrainDataset(
        annotations, features, tokenizer, None, max_seq_length=T, max_region_num=R
    )
    sample = dataset[0]  # image 0: 2 real boxes + global = 3 regions, padded to 5
    assert sample["input_ids"].shape == sample["input_mask"].shape == sample["segment_ids"].shape == (4, T)
    assert sample["image_feat"].shape == (4, R, FEATURE_DIM) and sample["image_feat"].dtype == np.float32
    assert sample["image_loc"].shape == (4, R, 5) and sample["image_mask"].shape == (4, R)
    assert sample["image_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert np.array_equal(
        sample["multimodal_mask"], np.concatenate([sample["image_mask"], sample["input_mask"]], 1)
    )
    assert not sample["segment_ids"].any()
    full = features[IMAGE_IDS[0]]
    assert np.allclose(sample["image_feat"][0, :3], full.features)
    assert np.allclose(sample["image_loc"][0, 0], [0, 0, 1, 1, 1])
    assert not sample["image_feat"][0, 3:].any() and not sample["image_loc"][0, 3:].any()

    big = dataset[3 * CAPTIONS_PER_IMAGE]  # image 3: 5 real boxes + global = 6 regions, cut to 5
    kept = features[IMAGE_IDS[3]]
    assert big["image_mask"][0].tolist() == [1] * R
    assert np.allclose(big["image_feat"][0], kept.features[:R])  # the global region first, then boxes 1..4


def test_long_captions_keep_cls_and_sep(tokenizer):
    captions = ["a " + " ".join(WORDS * 3), "dog"]
    arrays = encode_captions(tokenizer, captions, max_seq_length=8)
    ids, mask = arrays["input_ids"], arrays["input_mask"]
    assert ids[0].tolist() == [
        tokenizer.cls_token_id,
        *tokenizer.encode(captions[0])[:6],
        tokenizer.sep_token_id,
    ]
    assert mask[0].tolist() == [1] * 8
    assert (
        ids[1].tolist()
        == [tokenizer.cls_token_id, *tokenizer.encode("dog"), tokenizer.sep_token_id] + [0] * 5
    )
    assert mask[1].tolist() == [1, 1, 1] + [0] * 5


def test_published_rules_cut_long_captions_after_sep(tokenizer, tmp_path):
    """Published: [CLS] caption [SEP], then cut to max_seq_length, so a long caption loses [SEP]
    (a short one keeps it); the cache keeps the two rules apart."""
    captions = ["a " + " ".join(WORDS * 3), "dog"]
    arrays = encode_captions(tokenizer, captions, 8, cache_dir=str(tmp_path), rules="published")
    assert arrays["input_ids"][0].tolist() == [tokenizer.cls_token_id, *tokenizer.encode(captions[0])[:7]]
    assert arrays["input_mask"][0].tolist() == [1] * 8
    short = [tokenizer.cls_token_id, *tokenizer.encode("dog"), tokenizer.sep_token_id]
    assert arrays["input_ids"][1].tolist() == short + [0] * 5
    modern = encode_captions(tokenizer, captions, 8, cache_dir=str(tmp_path))
    assert modern["input_ids"][0][-1] == tokenizer.sep_token_id


def test_caption_cache_is_reused_and_keyed_by_length(tmp_path, tokenizer, monkeypatch):
    captions = ["a red dog", "two blue cars", "a tree"]
    cache = tmp_path / "cache"
    first = encode_captions(tokenizer, captions, 10, cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 1

    def refuse(_texts):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(tokenizer, "encode_batch", refuse)
    again = encode_captions(tokenizer, captions, 10, cache_dir=str(cache))
    for key in first:
        assert np.array_equal(first[key], again[key])
    monkeypatch.undo()
    encode_captions(tokenizer, captions, 12, cache_dir=str(cache))
    encode_captions(tokenizer, captions[:2], 10, cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 3  # another length or caption list is another file
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_eval_dataset_covers_every_caption_and_image(world, tokenizer):
    annotations, features = world
    dataset = RetrievalEvalDataset(annotations, features, tokenizer, max_seq_length=T, max_region_num=R)
    text_to_image = _text_to_image(tokenizer)
    num_captions = len(IMAGE_IDS) * CAPTIONS_PER_IMAGE
    assert len(dataset) == num_captions and dataset.image_ids == IMAGE_IDS
    assert dataset.captions["input_ids"].shape == (num_captions, T)
    for index in range(num_captions):
        true_image = _caption_image(
            dataset.captions["input_ids"][index],
            dataset.captions["input_mask"][index],
            text_to_image,
            tokenizer,
        )
        assert dataset.caption_image_index[index] == true_image
    images = dataset.images()
    assert images["image_feat"].shape == (len(IMAGE_IDS), R, FEATURE_DIM)
    assert images["image_loc"].shape == (len(IMAGE_IDS), R, 5) and images["image_mask"].shape == (
        len(IMAGE_IDS),
        R,
    )
    assert [_feature_image(f) for f in images["image_feat"]] == list(range(len(IMAGE_IDS)))
    assert images is dataset.images()  # loaded once

    batches = list(DataLoader(dataset, batch_size=4, collate_fn=collate_retrieval))
    caption_index = torch.cat([b["caption_index"] for b in batches])
    assert caption_index.tolist() == list(range(num_captions))
    assert batches[0]["input_ids"].shape == (4, T)
    assert torch.equal(
        torch.cat([b["image_index"] for b in batches]), torch.from_numpy(dataset.caption_image_index)
    )


def test_collate_stacks_four_candidates(world, tokenizer):
    annotations, features = world
    dataset = RetrievalTrainDataset(
        annotations, features, tokenizer, None, max_seq_length=T, max_region_num=R
    )
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_retrieval)))
    assert batch["input_ids"].shape == (3, 4, T) and batch["input_ids"].dtype == torch.int64
    assert batch["image_feat"].shape == (3, 4, R, FEATURE_DIM) and batch["image_feat"].dtype == torch.float32
    assert batch["multimodal_mask"].shape == (3, 4, R + T)
    assert batch["target"].tolist() == [0, 0, 0] and batch["itm_labels"].shape == (3, 4)


def test_missing_image_names_the_image_and_the_annotation_file(tmp_path, tokenizer):
    annotations, features = _write_world(tmp_path, IMAGE_IDS + [42])
    with pytest.raises(MissingImageError, match=rf"image 42 of {annotations} .*{features.path}"):
        RetrievalEvalDataset(annotations, features, tokenizer)
    with pytest.raises(MissingImageError, match="image 42"):
        RetrievalTrainDataset(annotations, features, tokenizer, None)


def test_malformed_annotation_lines_name_file_and_line(tmp_path, tokenizer, world):
    _, features = world
    path = tmp_path / "bad.jsonline"
    good = json.dumps({"sentences": ["a dog"], "img_path": f"{IMAGE_IDS[0]}.jpg"})
    cases = {
        json.dumps({"img_path": f"{IMAGE_IDS[1]}.jpg"}): "'sentences'",
        json.dumps({"sentences": ["a cat"]}): "'img_path'",
        json.dumps({"sentences": ["a cat"], "img_path": "abc.jpg"}): "integer image id",
        json.dumps({"sentences": [], "img_path": f"{IMAGE_IDS[1]}.jpg"}): "'sentences'",
        good: "already listed at line 1",
    }
    for line, message in cases.items():
        path.write_text(good + "\n\n" + line + "\n")  # the blank line makes record 2 sit on line 3
        with pytest.raises(AnnotationError, match=rf"{path}:3: .*{message}"):
            RetrievalEvalDataset(str(path), features, tokenizer)


def test_image_id_is_the_integer_stem_of_img_path(tmp_path):
    assert flickr_image_id({"img_path": "flickr30k-images/1000092795.jpg"}) == 1000092795
    for record, message in (
        ({}, "'img_path'"),
        ({"img_path": 12}, "non-string field 'img_path'"),
        ({"img_path": "-5.jpg"}, "integer image id"),
    ):
        with pytest.raises(AnnotationError, match=message):
            flickr_image_id(record)
    # The hard-negative tool reads the ids with the same parser and locates the bad line.
    path = tmp_path / "train.jsonline"
    path.write_text(json.dumps({"img_path": "1.jpg"}) + "\n\n" + json.dumps({"img_path": "x.jpg"}) + "\n")
    with pytest.raises(AnnotationError, match=rf"{path}:3: 'img_path' 'x.jpg' does not name"):
        hard_negatives_from_annotations(str(tmp_path / "absent.lmdb"), str(path), str(tmp_path / "pool.pkl"))


def test_bad_hard_negative_pools(tmp_path, world, tokenizer):
    annotations, features = world
    with pytest.raises(FileNotFoundError, match="nowhere.pkl"):
        RetrievalTrainDataset(annotations, features, tokenizer, str(tmp_path / "nowhere.pkl"))
    missing_key = tmp_path / "no_pool.pkl"
    missing_key.write_bytes(pickle.dumps({"train_image_list": IMAGE_IDS}))
    with pytest.raises(AnnotationError, match="train_hard_pool"):
        load_hard_negative_pool(str(missing_key), IMAGE_IDS)
    rows = [[i, (i + 1) % 6] for i in range(6)]
    partial = _write_pool(tmp_path / "partial.pkl", IMAGE_IDS[:5], [[i, (i + 1) % 5] for i in range(5)])
    with pytest.raises(AnnotationError, match=f"image {IMAGE_IDS[5]} has no row"):
        load_hard_negative_pool(partial, IMAGE_IDS)
    selfish = _write_pool(tmp_path / "self.pkl", IMAGE_IDS, [[i, i] for i in range(6)])
    with pytest.raises(AnnotationError, match="itself"):
        load_hard_negative_pool(selfish, IMAGE_IDS)
    stranger = _write_pool(tmp_path / "stranger.pkl", IMAGE_IDS + [7], rows[:5] + [[5, 6], [6, 0]])
    with pytest.raises(AnnotationError, match="hard negative 7 of image"):
        load_hard_negative_pool(stranger, IMAGE_IDS)


def test_pool_pickles_cannot_run_code(tmp_path, world, tokenizer):
    annotations, features = world
    evil = tmp_path / "evil.pkl"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil.write_bytes(pickle.dumps({"train_image_list": IMAGE_IDS, "train_hard_pool": Evil()}))
    with pytest.raises(ValueError, match="unsafe pickle"):
        RetrievalTrainDataset(annotations, features, tokenizer, str(evil))


def _epoch_draws(dataset, num_workers: int, epochs: int = 3) -> list[list[list[int]]]:
    """Each epoch's candidates (caption and image rows) as the training loop reads them: one
    persistent-worker loader built once, ``set_epoch`` on the dataset and the sampler each epoch."""
    ctx = DistContext(rank=0, local_rank=-1, world_size=1, device=torch.device("cpu"))
    loader = make_loader(
        dataset, 4, collate_retrieval, ctx, shard=True, shuffle=True, num_workers=num_workers, seed=7
    )
    per_epoch = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        loader.batch_sampler.set_epoch(epoch)
        rows = []
        for batch in loader:
            rows.extend(torch.cat([batch["caption_index"], batch["image_index"]], dim=1).tolist())
        per_epoch.append(rows)
    return per_epoch


@pytest.mark.slow
def test_negatives_change_every_epoch_in_persistent_workers(world, pool_path, tokenizer):
    annotations, features = world
    dataset = RetrievalTrainDataset(
        annotations, features, tokenizer, pool_path, max_seq_length=T, max_region_num=R, seed=3
    )
    with_workers = _epoch_draws(dataset, num_workers=2)
    dataset.set_epoch(0)
    in_process = _epoch_draws(dataset, num_workers=0)
    assert with_workers == in_process
    # Same captions each epoch (a permutation), other negatives.
    assert sorted(with_workers[0]) != sorted(with_workers[1]) != sorted(with_workers[2])
    assert [sorted(row[0] for row in epoch) for epoch in with_workers] == [list(range(len(dataset)))] * 3


def test_a_damaged_image_is_named_or_skipped_by_choice(tmp_path, tokenizer, caplog):
    annotations, features = _write_world(tmp_path, damaged=2)
    dataset = RetrievalTrainDataset(
        annotations, features, tokenizer, None, max_seq_length=T, max_region_num=R
    )
    with pytest.raises(
        BadRecordError, match=rf"{features.path} key b'{IMAGE_IDS[2]}': features holds a non-finite"
    ):
        [dataset[i] for i in range(len(dataset))]

    skipping = RegionFeatureStore(features.path, on_bad_record="skip")
    dataset = RetrievalTrainDataset(
        annotations, skipping, tokenizer, None, max_seq_length=T, max_region_num=R
    )
    with caplog.at_level(logging.WARNING):
        samples = [dataset[i] for i in range(len(dataset))]
    assert len(samples) == len(dataset)
    assert all(np.isfinite(sample["image_feat"]).all() for sample in samples)
    assert all(2 not in sample["image_index"] for sample in samples)
    assert skipping.bad_records.skipped == 1
    assert sum("skipping bad record" in r.getMessage() for r in caplog.records) == 1
