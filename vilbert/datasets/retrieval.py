"""Flickr30K image-caption retrieval (``docs/data.md`` §3): 4-candidate ITM training and all-pairs evaluation.

Training turns every caption into four (caption, image) candidates scored by the ITM head, in the
published order: the true pair, the same image with another image's caption, another image with the
same caption, and the same image with the caption of a *hard negative* image (``hard_negative.pkl``).
Only candidate 0 matches. Evaluation scores every caption against every image, so it exposes the
captions and the images as two separate stacks rather than as pairs.

Captions are tokenised once (``encode_batch``) into fixed-width arrays, optionally cached on disk;
random draws are seeded by (seed, epoch, index), so a sample is reproducible in any worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vilbert.atomic import atomic_write
from vilbert.datasets.features import (
    RegionFeatures,
    RegionFeatureStore,
    check_images_present,
)
from vilbert.datasets.hard_negatives import flickr_image_id
from vilbert.datasets.jsonl import AnnotationError, read_jsonl_records
from vilbert.datasets.loader import trim_padding
from vilbert.datasets.rules import DataRules, check_rules
from vilbert.datasets.serialization import safe_pickle_loads
from vilbert.datasets.shared_epoch import SharedEpoch
from vilbert.datasets.validation import build_skipping_bad
from vilbert.errors import BadInputError
from vilbert.tokenization import BertTokenizer

logger = logging.getLogger(__name__)

NUM_CANDIDATES = 4
MATCH, MISMATCH = 0, 1
_CAPTION_CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalAnnotations:
    """Images and captions in file order; image i owns ``captions[image_caption_start[i]:...[i+1]]``."""

    path: str
    image_ids: list[int]
    captions: list[str]
    caption_image_index: np.ndarray
    image_caption_start: np.ndarray

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)


def load_retrieval_annotations(path: str) -> RetrievalAnnotations:
    """Read ``{"sentences": [...], "img_path": "N.jpg"}`` lines (one image per line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"retrieval annotations not found: {path}")
    image_ids: list[int] = []
    first_line: dict[int, int] = {}
    captions: list[str] = []
    owners: list[int] = []
    starts = [0]
    for lineno, record in read_jsonl_records(path):
        try:
            image_id = flickr_image_id(record)
        except AnnotationError as err:
            raise AnnotationError(f"{path}:{lineno}: {err}") from None
        sentences = record.get("sentences")
        problem = None
        if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
            problem = "field 'sentences' must be a non-empty list of strings"
        elif image_id in first_line:
            problem = f"image {image_id} is already listed at line {first_line[image_id]}"
        if problem is not None:
            raise AnnotationError(f"{path}:{lineno}: {problem}")
        first_line[image_id] = lineno
        owners.extend([len(image_ids)] * len(sentences))
        image_ids.append(image_id)
        captions.extend(sentences)
        starts.append(len(captions))
    if not image_ids:
        raise AnnotationError(f"{path}: no annotations")
    return RetrievalAnnotations(
        path=path,
        image_ids=image_ids,
        captions=captions,
        caption_image_index=np.asarray(owners, dtype=np.int64),
        image_caption_start=np.asarray(starts, dtype=np.int64),
    )


# ---------------------------------------------------------------------------------------------
# Captions: [CLS] caption [SEP], tokenised once, optionally cached on disk
# ---------------------------------------------------------------------------------------------


def _caption_cache_file(
    tokenizer: BertTokenizer, captions: Sequence[str], max_seq_length: int, cache_dir: str, rules: str
) -> str:
    digest = hashlib.sha256()
    with open(tokenizer.vocab_file, "rb") as f:
        digest.update(f.read())
    rule = "" if rules == "modern" else f" rules={rules}"  # modern keeps the names of earlier caches
    digest.update(f"v{_CAPTION_CACHE_VERSION} T={max_seq_length}{rule}\n".encode())
    digest.update(json.dumps(list(captions)).encode())
    return os.path.join(cache_dir, f"captions_{digest.hexdigest()[:24]}.npz")


def _arrays_from_lengths(token_ids: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    positions = np.arange(token_ids.shape[1])[None, :]
    return {
        "input_ids": token_ids.astype(np.int64),
        "input_mask": (positions < lengths[:, None]).astype(np.int64),
        "segment_ids": np.zeros(token_ids.shape, dtype=np.int64),
    }


def encode_captions(
    tokenizer: BertTokenizer,
    captions: Sequence[str],
    max_seq_length: int,
    cache_dir: str | None = None,
    rules: DataRules = "modern",
) -> dict[str, np.ndarray]:
    """``[CLS] caption [SEP]`` for every caption: ``input_ids``, ``input_mask``, ``segment_ids`` [N, T].

    A caption longer than ``max_seq_length - 2`` WordPieces is cut before the ``[SEP]`` is added, so
    every row keeps both special tokens; the published loader cut after, dropping the ``[SEP]``
    (``rules="published"``, see ``datasets/rules.py``).
    With ``cache_dir``, the arrays are stored under a name that hashes the vocabulary, the length and
    the captions, so a changed tokenizer or annotation file never reads a stale cache.
    """
    if max_seq_length < 2:
        raise BadInputError(f"max_seq_length must be at least 2 ([CLS] and [SEP]), got {max_seq_length}")
    cache_file = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = _caption_cache_file(tokenizer, captions, max_seq_length, cache_dir, check_rules(rules))
        if os.path.isfile(cache_file):
            try:
                with np.load(cache_file, allow_pickle=False) as cached:
                    token_ids, lengths = cached["token_ids"], cached["lengths"]
                if token_ids.shape == (len(captions), max_seq_length) and lengths.shape == (len(captions),):
                    logger.info("loaded %d tokenised captions from %s", len(captions), cache_file)
                    return _arrays_from_lengths(token_ids, lengths)
                logger.warning("ignoring caption cache %s: unexpected shape", cache_file)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
                logger.warning("ignoring unreadable caption cache %s: %s", cache_file, err)

    token_ids = np.full((len(captions), max_seq_length), tokenizer.pad_token_id, dtype=np.int32)
    lengths = np.empty(len(captions), dtype=np.int32)
    for row, ids in enumerate(tokenizer.encode_batch(list(captions))):
        if rules == "published":
            ids = [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id][:max_seq_length]
        else:
            ids = [tokenizer.cls_token_id, *ids[: max_seq_length - 2], tokenizer.sep_token_id]
        token_ids[row, : len(ids)] = ids
        lengths[row] = len(ids)

    if cache_file is not None:
        atomic_write(cache_file, lambda handle: np.savez(handle, token_ids=token_ids, lengths=lengths))
        logger.info("cached %d tokenised captions in %s", len(captions), cache_file)
    return _arrays_from_lengths(token_ids, lengths)


# ---------------------------------------------------------------------------------------------
# Regions
# ---------------------------------------------------------------------------------------------


def pad_regions(regions: RegionFeatures, max_region_num: int) -> dict[str, np.ndarray]:
    """The first ``max_region_num`` regions (global first), zero-padded to [R, D], [R, 5] and mask [R]."""
    kept = min(regions.num_boxes, max_region_num)
    image_feat = np.zeros((max_region_num, regions.features.shape[1]), dtype=np.float32)
    image_loc = np.zeros((max_region_num, 5), dtype=np.float32)
    image_mask = np.zeros(max_region_num, dtype=np.int64)
    image_feat[:kept] = regions.features[:kept]
    image_loc[:kept] = regions.boxes[:kept]
    image_mask[:kept] = 1
    return {"image_feat": image_feat, "image_loc": image_loc, "image_mask": image_mask}


# ---------------------------------------------------------------------------------------------
# Hard negatives
# ---------------------------------------------------------------------------------------------


def load_hard_negative_pool(path: str, image_ids: Sequence[int]) -> np.ndarray:
    """Hard negatives of each annotated image as annotation image indices, [num_images, K-1].

    ``hard_negative.pkl`` holds ``train_image_list`` (image ids) and ``train_hard_pool``
    ([len(list), K] indices into that list, column 0 being the image itself, never drawn). It is
    read with the restricted unpickler: a downloaded pool must not be able to run code.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"hard-negative pool not found: {path}")
    with open(path, "rb") as f:
        content = safe_pickle_loads(f.read(), path, allow_numpy=True)
    if not isinstance(content, dict):
        raise AnnotationError(f"{path}: expected a dict, got {type(content).__name__}")
    for key in ("train_image_list", "train_hard_pool"):
        if key not in content:
            raise AnnotationError(f"{path}: missing key {key!r}")
    try:
        pool_ids = [int(i) for i in content["train_image_list"]]
        pool = np.asarray(content["train_hard_pool"], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise AnnotationError(f"{path}: malformed train_image_list / train_hard_pool: {err}") from None
    if pool.ndim != 2 or pool.shape[0] != len(pool_ids) or pool.shape[1] < 2:
        raise AnnotationError(
            f"{path}: train_hard_pool has shape {list(pool.shape)}, expected [{len(pool_ids)}, K>=2]"
        )
    if pool.min() < 0 or pool.max() >= len(pool_ids):
        raise AnnotationError(f"{path}: train_hard_pool holds indices outside train_image_list")

    index_of = {image_id: index for index, image_id in enumerate(image_ids)}
    pool_to_annotation = np.array([index_of.get(image_id, -1) for image_id in pool_ids], dtype=np.int64)
    row_of = {image_id: row for row, image_id in enumerate(pool_ids)}
    missing = [image_id for image_id in image_ids if image_id not in row_of]
    if missing:
        raise AnnotationError(
            f"{path}: image {missing[0]} has no row in train_image_list ({len(missing)} missing)"
        )
    hard = pool_to_annotation[pool[[row_of[image_id] for image_id in image_ids], 1:]]
    outside = np.argwhere(hard < 0)
    if len(outside):
        image, column = outside[0]
        raise AnnotationError(
            f"{path}: hard negative {pool_ids[pool[row_of[image_ids[image]], column + 1]]} of image "
            f"{image_ids[image]} is not in the annotations"
        )
    itself = np.argwhere(hard == np.arange(len(image_ids))[:, None])
    if len(itself):
        raise AnnotationError(
            f"{path}: image {image_ids[itself[0][0]]} lists itself beyond column 0 of its pool"
        )
    return hard


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


class RetrievalTrainDataset(Dataset):
    """One sample per caption: 4 candidates (true pair, wrong caption, wrong image, hard wrong caption).

    Sample (numpy): ``input_ids``, ``input_mask``, ``segment_ids`` [4, T] int64; ``image_feat``
    [4, R, D] float32; ``image_loc`` [4, R, 5] float32; ``image_mask`` [4, R] int64;
    ``multimodal_mask`` [4, R+T] int64 (image first, as the model concatenates); ``target`` int64 = 0
    (the index of the true candidate); ``itm_labels`` [4] = [0, 1, 1, 1] (ITM class per candidate,
    0 = match); ``caption_index`` / ``image_index`` [4] (rows of the annotations, for inspection);
    ``image_id`` (the true image).

    When the feature store skips a damaged image (``on_bad_record="skip"``), a sample that would
    read it is replaced by the next caption's sample, so every index still yields a sample.
    """

    def __init__(
        self,
        annotations_jsonpath: str,
        features: RegionFeatureStore,
        tokenizer: BertTokenizer,
        hard_negative_path: str | None,
        max_seq_length: int = 30,
        max_region_num: int = 102,
        split: str = "train",
        seed: int = 0,
        cache_dir: str | None = None,
        rules: DataRules = "modern",
    ) -> None:
        self.annotations = load_retrieval_annotations(annotations_jsonpath)
        if self.annotations.num_images < 2:
            raise AnnotationError(f"{annotations_jsonpath}: negatives need at least 2 images")
        check_images_present(self.annotations.image_ids, features, annotations_jsonpath)
        self.features = features
        self.max_seq_length = max_seq_length
        self.max_region_num = max_region_num
        self.split = split
        self.seed = seed
        self._epoch = SharedEpoch()
        self.captions = encode_captions(
            tokenizer, self.annotations.captions, max_seq_length, cache_dir, rules
        )
        self.hard_pool: np.ndarray | None = None
        if split == "train" and hard_negative_path is not None:
            self.hard_pool = load_hard_negative_pool(hard_negative_path, self.annotations.image_ids)
        elif split == "train":
            logger.warning("%s: no hard-negative pool; candidate 4 uses a random image", annotations_jsonpath)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Change the negatives drawn for every index (call once per epoch, like a sampler's); shared
        with persistent DataLoader workers, which would otherwise keep drawing epoch 0's negatives."""
        self._epoch.set(epoch)

    def __len__(self) -> int:
        return self.annotations.num_captions

    def _other_image(self, rng: np.random.Generator, image: int) -> int:
        drawn = int(rng.integers(self.annotations.num_images - 1))
        return drawn + 1 if drawn >= image else drawn

    def _hard_image(self, rng: np.random.Generator, image: int) -> int:
        if self.hard_pool is None:
            return self._other_image(rng, image)
        return int(self.hard_pool[image, rng.integers(self.hard_pool.shape[1])])

    def _caption_of(self, rng: np.random.Generator, image: int) -> int:
        start = self.annotations.image_caption_start
        return int(rng.integers(start[image], start[image + 1]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return build_skipping_bad(index, len(self), self._sample, self.annotations.path)

    def _sample(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        image = int(self.annotations.caption_image_index[index])
        wrong_caption = self._caption_of(rng, self._other_image(rng, image))
        wrong_image = self._other_image(rng, image)
        hard_caption = self._caption_of(rng, self._hard_image(rng, image))
        caption_index = np.array([index, wrong_caption, index, hard_caption], dtype=np.int64)
        image_index = np.array([image, image, wrong_image, image], dtype=np.int64)

        own = pad_regions(self.features[self.annotations.image_ids[image]], self.max_region_num)
        other = pad_regions(self.features[self.annotations.image_ids[wrong_image]], self.max_region_num)
        per_candidate = (own, own, other, own)
        sample: dict[str, Any] = {key: self.captions[key][caption_index] for key in self.captions}
        for key in own:
            sample[key] = np.stack([regions[key] for regions in per_candidate])
        sample["multimodal_mask"] = np.concatenate([sample["image_mask"], sample["input_mask"]], axis=1)
        sample["target"] = np.int64(0)
        sample["itm_labels"] = np.array([MATCH, MISMATCH, MISMATCH, MISMATCH], dtype=np.int64)
        sample["caption_index"] = caption_index
        sample["image_index"] = image_index
        sample["image_id"] = np.int64(self.annotations.image_ids[image])
        return sample


class RetrievalEvalDataset(Dataset):
    """Every caption against every image: items are captions; ``images()`` is the stack to score against.

    Item (numpy): ``input_ids``, ``input_mask``, ``segment_ids`` [T] int64, ``caption_index`` and
    ``image_index`` (the row of its true image in ``image_ids``) int64.
    """

    def __init__(
        self,
        annotations_jsonpath: str,
        features: RegionFeatureStore,
        tokenizer: BertTokenizer,
        max_seq_length: int = 30,
        max_region_num: int = 102,
        cache_dir: str | None = None,
        rules: DataRules = "modern",
    ) -> None:
        self.annotations = load_retrieval_annotations(annotations_jsonpath)
        check_images_present(self.annotations.image_ids, features, annotations_jsonpath)
        self.features = features
        self.max_region_num = max_region_num
        self.captions = encode_captions(
            tokenizer, self.annotations.captions, max_seq_length, cache_dir, rules
        )
        self._images: dict[str, np.ndarray] | None = None

    @property
    def image_ids(self) -> list[int]:
        return self.annotations.image_ids

    @property
    def caption_image_index(self) -> np.ndarray:
        return self.annotations.caption_image_index

    @property
    def num_images(self) -> int:
        return self.annotations.num_images

    def images(self) -> dict[str, np.ndarray]:
        """All images padded and stacked, read once: ``image_feat`` [N, R, D], ``image_loc`` [N, R, 5],
        ``image_mask`` [N, R]."""
        if self._images is None:
            padded = [
                pad_regions(self.features[image_id], self.max_region_num) for image_id in self.image_ids
            ]
            self._images = {key: np.stack([p[key] for p in padded]) for key in padded[0]}
        return self._images

    def __len__(self) -> int:
        return self.annotations.num_captions

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = {key: value[index] for key, value in self.captions.items()}
        sample["caption_index"] = np.int64(index)
        sample["image_index"] = np.int64(self.annotations.caption_image_index[index])
        return sample


def collate_retrieval(
    samples: Sequence[dict[str, Any]], pad_to_multiple: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack per-sample arrays along a new batch axis: [B, 4, ...] for training, [B, ...] for evaluation.

    With ``pad_to_multiple``, training batches are cut to their longest caption and region list
    rounded up to that many positions (:func:`~vilbert.datasets.loader.trim_padding`); by default
    they keep the fixed padding.
    """
    stacked = {key: np.stack([s[key] for s in samples]) for key in samples[0]}
    if pad_to_multiple is not None and "image_mask" in stacked:
        stacked = trim_padding(stacked, pad_to_multiple)
    return {key: torch.from_numpy(value) for key, value in stacked.items()}
