"""Conceptual Captions pretraining data (data.md §2): files → per-sample dicts → named batches.

Per sample: an ITM pair (the image's caption or, w.p. ``itm_prob``, the caption of another image),
masked segment modelling on the caption, masked region modelling on the regions, and the global
region (mean of the real regions *after* masking, so masked content does not leak through it).
Samples are unpadded and carry the regions as the original features plus the MRM decision;
:func:`collate_pretraining` applies the zeroing and the global region while writing the padded
batch (one copy of the features, not two), padding to the batch's own longest caption and region
count (dynamic padding) or to the configured maxima.

Randomness: every sample draws from its own generator seeded by ``(seed, rank, epoch, index)``.
That makes masks reproducible, different across ranks (per-rank part files reuse indices) and
across samples (so forked DataLoader workers never repeat each other's draws), and exact when
resuming mid-epoch. The worker id is deliberately *not* part of the seed: which worker handles a
batch depends on ``num_workers`` and on where an iterator starts, so including it would change the
masks on resume or with a different worker count.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from vilbert.datasets.features import PretrainDatapoint, PretrainingLMDB
from vilbert.datasets.masking import (
    IGNORE_INDEX,
    bert_mask_tokens,
    group_region_mask,
    independent_region_mask,
    region_labels,
    span_mask_tokens,
)
from vilbert.tokenization import BertTokenizer

__all__ = [
    "ConceptCapDataset",
    "PretrainingFiles",
    "PretrainingSampleBuilder",
    "collate_pretraining",
    "load_caption_json",
    "pretraining_files",
    "sample_rng",
]

logger = logging.getLogger(__name__)

GLOBAL_LOC = np.array([0.0, 0.0, 1.0, 1.0, 1.0], dtype=np.float32)
MAX_CACHED_CAPTIONS = 1 << 20


class PretrainingFiles(NamedTuple):
    """The LMDB and caption json of one split; unpacks as ``lmdb_path, caption_json``."""

    lmdb_path: str
    caption_json: str

    @property
    def is_rank_part(self) -> bool:
        """True for the published per-rank ``training_feat_part_{rank}.lmdb`` (no distributed sampler)."""
        return os.path.basename(self.lmdb_path).startswith("training_feat_part_")


def pretraining_files(
    data_dir: str, split: str, rank: int = 0, distributed: bool = False
) -> PretrainingFiles:
    """Resolve the published layout: ``training_feat_all.lmdb`` or, when distributed and present,
    ``training_feat_part_{rank}.lmdb`` + ``caption_train.json``; ``validation_all.lmdb`` +
    ``caption_val.json`` for ``split="val"``."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"pretraining data directory not found: {data_dir}")
    if split == "train":
        lmdb_path = os.path.join(data_dir, "training_feat_all.lmdb")
        part = os.path.join(data_dir, f"training_feat_part_{rank}.lmdb")
        if distributed and os.path.exists(part):
            lmdb_path = part
        caption_json = os.path.join(data_dir, "caption_train.json")
    elif split == "val":
        lmdb_path = os.path.join(data_dir, "validation_all.lmdb")
        caption_json = os.path.join(data_dir, "caption_val.json")
    else:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'val'")
    if not os.path.exists(lmdb_path):
        hint = f" (nor training_feat_part_{rank}.lmdb)" if split == "train" and distributed else ""
        raise FileNotFoundError(f"pretraining LMDB not found: {lmdb_path}{hint}")
    if not os.path.isfile(caption_json):
        raise FileNotFoundError(f"caption json not found: {caption_json}")
    return PretrainingFiles(lmdb_path, caption_json)


def load_caption_json(path: str) -> dict[str, str]:
    """The ``image_id → caption`` dict used to draw mismatched captions; empty or malformed is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            captions = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(captions, dict):
        raise ValueError(f"{path}: expected a JSON object image_id → caption, got {type(captions).__name__}")
    if not captions:
        raise ValueError(f"{path}: caption json is empty; ITM needs captions of other images to draw from")
    bad = next((k for k, v in captions.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"{path}: caption of image {bad!r} is not a string")
    return {str(k): v for k, v in captions.items()}


def sample_rng(seed: int, rank: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample: a pure function of its coordinates, whoever computes it."""
    return np.random.default_rng(np.random.SeedSequence([seed, rank, epoch, index]))


def _image_id_number(image_id: str) -> int:
    try:
        return int(image_id)
    except ValueError:
        raise ValueError(
            f"image id {image_id!r} is not an integer; batches carry image ids as int64"
        ) from None


class PretrainingSampleBuilder:
    """Turns one decoded datapoint and a generator into an unpadded, model-ready sample dict."""

    def __init__(
        self,
        tokenizer: BertTokenizer,
        captions: Mapping[str, str],
        max_seq_length: int = 36,
        region_len: int = 36,
        span_mask: bool = True,
        predict_feature: bool = False,
        itm_prob: float = 0.5,
        caption_source: str = "caption json",
    ) -> None:
        if max_seq_length < 2:
            raise ValueError(f"max_seq_length must hold [CLS] and [SEP], got {max_seq_length}")
        if region_len < 1:
            raise ValueError(f"region_len must be positive, got {region_len}")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.region_len = region_len
        self.span_mask = span_mask
        self.predict_feature = predict_feature
        self.itm_prob = itm_prob
        self.caption_source = caption_source
        self._caption_ids = list(captions)
        self._caption_texts = [captions[k] for k in self._caption_ids]
        self._caption_position = {k: i for i, k in enumerate(self._caption_ids)}
        self._token_cache: dict[str, np.ndarray] = {}

    def tokens(self, caption: str) -> np.ndarray:
        """WordPiece ids of ``caption`` (cached; bounded so a 3M-caption corpus cannot exhaust memory)."""
        ids = self._token_cache.get(caption)
        if ids is None:
            if len(self._token_cache) >= MAX_CACHED_CAPTIONS:
                self._token_cache.clear()
            ids = np.asarray(self.tokenizer.encode(caption), dtype=np.int32)
            self._token_cache[caption] = ids
        return ids

    def other_caption(self, image_id: str, rng: np.random.Generator) -> str:
        """A caption of a uniformly drawn *different* image (no rejection loop).

        The published code rejected ids equal to ``image_id`` up to their last character, which also
        excluded unrelated images whose ids differ only in the last digit; only the image itself is
        excluded here.
        """
        own = self._caption_position.get(image_id)
        pool = len(self._caption_ids) - (own is not None)
        if pool <= 0:
            raise ValueError(f"{self.caption_source}: no caption of an image other than {image_id!r} to draw")
        choice = int(rng.integers(pool))
        if own is not None and choice >= own:
            choice += 1
        return self._caption_texts[choice]

    def build(self, datapoint: PretrainDatapoint, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One unpadded sample. Regions are returned as the original features plus the MRM decision
        (``region_zeroed``) rather than as a masked copy: :func:`collate_pretraining` applies the
        zeroing and computes the global region while writing into the batch, so the 2048-d features
        are copied once per sample instead of twice."""
        num_boxes, rows = int(datapoint.num_boxes), len(datapoint.features)
        if num_boxes < 1 or rows < num_boxes:
            raise ValueError(f"image {datapoint.image_id!r}: num_boxes={num_boxes} with {rows} feature rows")
        n = min(num_boxes, self.region_len)
        features = datapoint.features[:n]
        image_w, image_h = float(datapoint.image_w), float(datapoint.image_h)
        boxes = datapoint.boxes[:n]
        region_loc = np.empty((n, 5), dtype=np.float32)
        region_loc[:, :4] = boxes / np.array([image_w, image_h, image_w, image_h], dtype=np.float32)
        region_loc[:, 4] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (image_w * image_h)
        if self.span_mask:
            region_zeroed = targets = group_region_mask(region_loc, n, rng, image_w, image_h)
        else:
            region_zeroed, targets = independent_region_mask(n, rng)

        is_next = int(rng.random() < self.itm_prob)
        caption = self.other_caption(datapoint.image_id, rng) if is_next else datapoint.caption
        tokens = self.tokens(caption)[: self.max_seq_length - 2]
        mask_tokens = span_mask_tokens if self.span_mask else bert_mask_tokens
        masked, labels = mask_tokens(tokens, rng, self.tokenizer.vocab_size, self.tokenizer.mask_token_id)
        input_ids = np.empty(len(masked) + 2, dtype=np.int64)
        input_ids[0], input_ids[-1] = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        input_ids[1:-1] = masked
        lm_label_ids = np.full(len(masked) + 2, IGNORE_INDEX, dtype=np.int64)
        lm_label_ids[1:-1] = labels

        return {
            "input_ids": input_ids,
            "lm_label_ids": lm_label_ids,
            "is_next": np.array(is_next, dtype=np.int64),
            "region_feat": features,
            "region_loc": region_loc,
            "region_zeroed": region_zeroed,
            "image_target": features if self.predict_feature else datapoint.cls_prob[:n],
            "image_label": region_labels(targets),
            "image_id": np.array(_image_id_number(datapoint.image_id), dtype=np.int64),
        }


class ConceptCapDataset(Dataset):
    """Map-style pretraining dataset over a pretraining LMDB; items are unpadded numpy sample dicts.

    Use with ``DataLoader(..., collate_fn=dataset.collate_fn())``; call :meth:`set_epoch` before
    iterating each epoch so masks change between epochs.
    """

    def __init__(
        self,
        lmdb_path: str,
        caption_json: str,
        tokenizer: BertTokenizer,
        max_seq_length: int = 36,
        region_len: int = 36,
        span_mask: bool = True,
        predict_feature: bool = False,
        seed: int = 0,
        rank: int = 0,
        itm_prob: float = 0.5,
    ) -> None:
        self.datapoints = PretrainingLMDB(lmdb_path)
        self.builder = PretrainingSampleBuilder(
            tokenizer,
            load_caption_json(caption_json),
            max_seq_length=max_seq_length,
            region_len=region_len,
            span_mask=span_mask,
            predict_feature=predict_feature,
            itm_prob=itm_prob,
            caption_source=caption_json,
        )
        self.max_seq_length = max_seq_length
        self.region_len = region_len
        self.seed = seed
        self.rank = rank
        # Shared memory, so persistent DataLoader workers see set_epoch calls made in the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        logger.info("pretraining data: %s (%d datapoints), captions %s", lmdb_path, len(self), caption_json)

    def __len__(self) -> int:
        return len(self.datapoints)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if index < 0:
            index += len(self)
        return self.builder.build(self.datapoints[index], sample_rng(self.seed, self.rank, self.epoch, index))

    def collate_fn(self, dynamic_padding: bool = True) -> functools.partial:
        """:func:`collate_pretraining` bound to this dataset's maxima (picklable for workers)."""
        return functools.partial(
            collate_pretraining,
            dynamic_padding=dynamic_padding,
            max_seq_length=self.max_seq_length,
            region_len=self.region_len,
        )


def _float_batch(shape: tuple[int, int, int], in_worker: bool) -> torch.Tensor:
    """An uninitialised float32 batch tensor. In a DataLoader worker it is allocated straight in
    shared memory (as ``default_collate`` does), else sending it to the main process would move it
    there with one more copy of the largest arrays of the batch."""
    if not in_worker:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)  # the call default_collate makes
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


def collate_pretraining(
    samples: Sequence[Mapping[str, np.ndarray]],
    dynamic_padding: bool = True,
    max_seq_length: int = 36,
    region_len: int = 36,
) -> dict[str, torch.Tensor]:
    """Pad and stack samples into the named pretraining batch, applying each sample's region masking.

    ``image_feat`` row 0 is the global region: the mean over the real regions after masking
    (zeroed regions count as zeros). Text is padded with id 0, label -1; regions with zero
    features/boxes, label -1. With ``dynamic_padding`` the batch is as long as its longest caption
    and region list; otherwise ``max_seq_length`` tokens and ``region_len + 1`` regions.
    ``image_target`` and ``image_label`` cover the real regions only (one fewer than ``image_feat``).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    text_lengths = np.array([len(s["input_ids"]) for s in samples])
    region_counts = np.array([len(s["region_feat"]) for s in samples])
    if dynamic_padding:
        seq_len, num_regions = int(text_lengths.max()), int(region_counts.max()) + 1
    else:
        seq_len, num_regions = max_seq_length, region_len + 1
        if text_lengths.max() > seq_len or region_counts.max() >= num_regions:
            raise ValueError(
                f"a sample has {text_lengths.max()} tokens / {region_counts.max()} regions, more than the "
                f"fixed padding {seq_len} / {region_len}"
            )
    size = len(samples)
    feat_dim = samples[0]["region_feat"].shape[1]
    target_dim = samples[0]["image_target"].shape[1]
    in_worker = torch.utils.data.get_worker_info() is not None
    feat_tensor = _float_batch((size, num_regions, feat_dim), in_worker)
    target_tensor = _float_batch((size, num_regions - 1, target_dim), in_worker)
    image_feat, image_target = feat_tensor.numpy(), target_tensor.numpy()

    input_ids = np.zeros((size, seq_len), dtype=np.int64)
    lm_label_ids = np.full((size, seq_len), IGNORE_INDEX, dtype=np.int64)
    image_loc = np.zeros((size, num_regions, 5), dtype=np.float32)
    image_loc[:, 0] = GLOBAL_LOC
    image_label = np.full((size, num_regions - 1), IGNORE_INDEX, dtype=np.int64)
    for i, (sample, length, n) in enumerate(zip(samples, text_lengths, region_counts)):
        input_ids[i, :length] = sample["input_ids"]
        lm_label_ids[i, :length] = sample["lm_label_ids"]
        regions = image_feat[i, 1 : n + 1]
        regions[...] = sample["region_feat"]
        regions[sample["region_zeroed"]] = 0
        np.add.reduce(regions, axis=0, out=image_feat[i, 0])
        image_feat[i, 0] /= n
        image_feat[i, n + 1 :] = 0
        image_target[i, :n] = sample["image_target"]
        image_target[i, n:] = 0
        image_loc[i, 1 : n + 1] = sample["region_loc"]
        image_label[i, :n] = sample["image_label"]

    input_mask = (np.arange(seq_len) < text_lengths[:, None]).astype(np.int64)
    image_mask = (np.arange(num_regions) <= region_counts[:, None]).astype(np.int64)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "input_mask": torch.from_numpy(input_mask),
        "segment_ids": torch.zeros((size, seq_len), dtype=torch.int64),
        "lm_label_ids": torch.from_numpy(lm_label_ids),
        "is_next": torch.tensor([int(s["is_next"]) for s in samples], dtype=torch.int64),
        "image_feat": feat_tensor,
        "image_loc": torch.from_numpy(image_loc),
        "image_target": target_tensor,
        "image_label": torch.from_numpy(image_label),
        "image_mask": torch.from_numpy(image_mask),
        "multimodal_mask": torch.from_numpy(np.concatenate([image_mask, input_mask], axis=1)),
        "image_id": torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.int64),
    }
