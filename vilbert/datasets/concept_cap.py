"""Conceptual Captions pretraining data (``docs/data.md`` §2): files → per-sample dicts → named batches.

Per sample: an ITM pair (the image's caption or, w.p. ``itm_prob``, the caption of another image),
masked segment modelling on the caption, masked region modelling on the regions, and the global
region (mean of the real regions *after* masking, so masked content does not leak through it).
Samples are unpadded and carry the regions as the original features plus the MRM decision;
:func:`collate_pretraining` applies the zeroing and the global region while writing the padded
batch (one copy of the features, not two), padding to the batch's own longest caption and region
count (dynamic padding) or to the configured maxima. A DataLoader worker asks for a whole batch
(:meth:`ConceptCapDataset.__getitems__`): one read transaction, the region arithmetic done once for
all its samples, and each record's values checked in the batch right after they are copied there,
so its features are read from memory once, and its class scores only where MRM counts a region.

Randomness: every sample draws from its own generator seeded by ``(seed, rank, epoch, index)``.
That makes masks reproducible, different across ranks (per-rank part files reuse indices) and
across samples (so forked DataLoader workers never repeat each other's draws), and exact when
resuming mid-epoch. The worker id is deliberately *not* part of the seed: which worker handles a
batch depends on ``num_workers`` and on where an iterator starts, so including it would change the
masks on resume or with a different worker count.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from vilbert.datasets.captions import load_caption_json
from vilbert.datasets.features import GLOBAL_BOX, PretrainDatapoint, PretrainingLMDB
from vilbert.datasets.loader import batch_tensors, padded_length
from vilbert.datasets.masking import (
    IGNORE_INDEX,
    bert_mask_tokens,
    group_region_masks,
    group_seeds,
    independent_region_mask,
    region_labels,
    span_mask_tokens,
)
from vilbert.datasets.rules import DataRules, check_rules
from vilbert.datasets.shared_epoch import SharedEpoch
from vilbert.datasets.validation import BOX_SLACK_PIXELS, check_finite_rows, check_region_record
from vilbert.errors import BadInputError
from vilbert.tokenization import BertTokenizer

__all__ = [
    "ConceptCapDataset",
    "PretrainingFiles",
    "PretrainingSampleBuilder",
    "collate_pretraining",
    "load_caption_json",
    "pretraining_files",
    "check_datapoint",
    "sample_rng",
]

logger = logging.getLogger(__name__)

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
        raise BadInputError(f"unknown split {split!r}; expected 'train' or 'val'")
    if not os.path.exists(lmdb_path):
        hint = f" (nor training_feat_part_{rank}.lmdb)" if split == "train" and distributed else ""
        raise FileNotFoundError(f"pretraining LMDB not found: {lmdb_path}{hint}")
    if not os.path.isfile(caption_json):
        raise FileNotFoundError(f"caption json not found: {caption_json}")
    return PretrainingFiles(lmdb_path, caption_json)


def sample_rng(seed: int, rank: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample: a pure function of its coordinates, whoever computes it."""
    entropy = (seed, rank, epoch, index)
    if all(0 <= value < 1 << 32 for value in entropy):
        # The words SeedSequence would make of the list itself, without its slow per-item conversion.
        return np.random.Generator(
            np.random.PCG64(np.random.SeedSequence(np.array(entropy, dtype=np.uint32)))
        )
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


def _image_id_number(image_id: str) -> int:
    try:
        return int(image_id)
    except ValueError:
        raise BadInputError(
            f"image id {image_id!r} is not an integer; batches carry image ids as int64"
        ) from None


def check_datapoint(datapoint: PretrainDatapoint, path: str, key: bytes) -> None:
    """Refuse a record whose counts, image size or boxes cannot be right, naming file and key.

    The box extremes clear a good record in a few operations; the full check, which names the
    culprit, runs only on a suspect one. The feature values are checked where they are copied into
    the batch (:func:`collate_pretraining`), while they are in the cache, instead of being read twice.
    """
    n, image_w, image_h = int(datapoint.num_boxes), int(datapoint.image_w), int(datapoint.image_h)
    features, boxes, cls_prob = datapoint.features[:n], datapoint.boxes[:n], datapoint.cls_prob[:n]
    if n >= 1 and image_w > 0 and image_h > 0 and len(features) == len(boxes) == len(cls_prob) == n:
        inside = boxes.min() >= -BOX_SLACK_PIXELS and boxes[:, 0::2].max() <= image_w + BOX_SLACK_PIXELS
        if inside and boxes[:, 1::2].max() <= image_h + BOX_SLACK_PIXELS:
            return
    check_region_record(f"{path} key {key!r}", features, boxes, image_w, image_h, n, cls_prob)


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
        rules: DataRules = "modern",
    ) -> None:
        if max_seq_length < 2:
            raise BadInputError(f"max_seq_length must hold [CLS] and [SEP], got {max_seq_length}")
        if region_len < 1:
            raise BadInputError(f"region_len must be positive, got {region_len}")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.region_len = region_len
        self.span_mask = span_mask
        self.predict_feature = predict_feature
        self.itm_prob = itm_prob
        self.caption_source = caption_source
        self.rules = check_rules(rules)
        self._caption_ids = list(captions)
        self._caption_texts = [captions[k] for k in self._caption_ids]
        self._caption_position = {k: i for i, k in enumerate(self._caption_ids)}
        self._same_prefix: dict[str, list[int]] = {}  # published rule: positions by id[:-1]
        if rules == "published":
            for position, caption_id in enumerate(self._caption_ids):
                self._same_prefix.setdefault(caption_id[:-1], []).append(position)
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

        Excluded: the image itself; under the published rules every id equal to ``image_id`` up to its
        last character (the published rejection loop compared ``id[:-1]``, see ``datasets/rules.py``).
        """
        if self.rules == "published":
            excluded = self._same_prefix.get(image_id[:-1], [])
        else:
            own = self._caption_position.get(image_id)
            excluded = [] if own is None else [own]
        pool = len(self._caption_ids) - len(excluded)
        if pool <= 0:
            raise BadInputError(
                f"{self.caption_source}: no caption of an image other than {image_id!r} to draw"
            )
        choice = int(rng.integers(pool))
        for position in excluded:  # ascending: skip each excluded position at or below the choice
            if choice >= position:
                choice += 1
        return self._caption_texts[choice]

    def build(self, datapoint: PretrainDatapoint, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One unpadded sample. Regions are returned as the original features plus the MRM decision
        (``region_zeroed``) rather than as a masked copy: :func:`collate_pretraining` applies the
        zeroing and computes the global region while writing into the batch, so the 2048-d features
        are copied once per sample instead of twice. ``image_label`` marks the masked regions; the
        published rule that a region stored as zeros is a target too is applied there as well (the
        dataset's :meth:`~ConceptCapDataset.collate_fn` binds it), where the features are read."""
        return self.build_many([datapoint], [rng])[0]

    def build_many(
        self, datapoints: Sequence[PretrainDatapoint], rngs: Sequence[np.random.Generator]
    ) -> list[dict[str, np.ndarray]]:
        """:meth:`build` of each datapoint with its own generator, the region arithmetic done once for
        all of them. Each generator is drawn from in the same order as alone (region masks, the ITM
        pair, the caption's masks), so a sample does not depend on the others it is built with."""
        counts = [self._region_count(datapoint) for datapoint in datapoints]
        locations = _region_locations(datapoints, counts)
        if self.span_mask:
            sizes = [(float(d.image_w), float(d.image_h)) for d in datapoints]
            seeds = [group_seeds(n, rng) for n, rng in zip(counts, rngs)]
            zeroed = targets = group_region_masks(locations, seeds, sizes)
        else:
            zeroed, targets = map(
                list, zip(*(independent_region_mask(n, rng) for n, rng in zip(counts, rngs)))
            )
        samples = []
        for datapoint, rng, n, location, decided, target in zip(
            datapoints, rngs, counts, locations, zeroed, targets
        ):
            features = datapoint.features[:n]
            samples.append(
                {
                    **self._text(datapoint, rng),
                    "region_feat": features,
                    "region_loc": location,
                    "region_zeroed": decided,
                    "image_target": features if self.predict_feature else datapoint.cls_prob[:n],
                    "image_label": region_labels(target),
                    "image_id": np.array(_image_id_number(datapoint.image_id), dtype=np.int64),
                }
            )
        return samples

    def _region_count(self, datapoint: PretrainDatapoint) -> int:
        num_boxes, rows = int(datapoint.num_boxes), len(datapoint.features)
        if num_boxes < 1 or rows < num_boxes:
            raise BadInputError(
                f"image {datapoint.image_id!r}: num_boxes={num_boxes} with {rows} feature rows"
            )
        return min(num_boxes, self.region_len)

    def _text(self, datapoint: PretrainDatapoint, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The ITM pair's caption (w.p. ``itm_prob`` another image's) with its MSM masking."""
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
        }


def _region_locations(datapoints: Sequence[PretrainDatapoint], counts: Sequence[int]) -> list[np.ndarray]:
    """Each datapoint's first ``count`` boxes as the model's 5-d locations: corners over the image
    size and the box's share of the image area (float32 [count, 5]), computed for all at once."""
    boxes = np.concatenate([d.boxes[:n] for d, n in zip(datapoints, counts)])
    sizes = np.array([(float(d.image_w), float(d.image_h)) for d in datapoints])
    locations = np.empty((len(boxes), 5), dtype=np.float32)
    locations[:, :4] = boxes / np.repeat(sizes[:, [0, 1, 0, 1]].astype(np.float32), counts, axis=0)
    area = np.repeat((sizes[:, 0] * sizes[:, 1]).astype(np.float32), counts)
    locations[:, 4] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / area
    ends = np.cumsum(counts).tolist()
    return [locations[end - n : end] for n, end in zip(counts, ends)]


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
        rules: DataRules = "modern",
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
            rules=rules,
        )
        self.max_seq_length = max_seq_length
        self.region_len = region_len
        self.seed = seed
        self.rank = rank
        # Shared, so persistent DataLoader workers see set_epoch calls made in the main process.
        self._epoch = SharedEpoch()
        logger.info("pretraining data: %s (%d datapoints), captions %s", lmdb_path, len(self), caption_json)

    def __len__(self) -> int:
        return len(self.datapoints)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.set(epoch)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """The samples of ``indices`` (a DataLoader worker asks for a whole batch): read in one
        transaction, with one look at the shared epoch."""
        indices = [index + len(self) if index < 0 else index for index in indices]
        epoch, keys = self.epoch, self.datapoints.keys()
        datapoints = self.datapoints.views(indices)
        for index, datapoint in zip(indices, datapoints):
            check_datapoint(datapoint, self.datapoints.path, keys[index])
        rngs = [sample_rng(self.seed, self.rank, epoch, index) for index in indices]
        samples = self.builder.build_many(datapoints, rngs)
        for index, sample in zip(indices, samples):
            sample["source"] = f"{self.datapoints.path} key {keys[index]!r}"  # named if its values are bad
        return samples

    def collate_fn(self, dynamic_padding: bool = True, pad_to_multiple: int = 8) -> functools.partial:
        """:func:`collate_pretraining` bound to this dataset's maxima and rules (picklable for workers)."""
        builder = self.builder
        return functools.partial(
            collate_pretraining,
            dynamic_padding=dynamic_padding,
            max_seq_length=self.max_seq_length,
            region_len=self.region_len,
            pad_to_multiple=pad_to_multiple,
            zero_rows_are_targets=builder.span_mask and builder.rules == "published",
        )


def _batch_shape(
    text_lengths: np.ndarray,
    region_counts: np.ndarray,
    dynamic: bool,
    max_seq_length: int,
    region_len: int,
    pad: int,
) -> tuple[int, int]:
    """(tokens, regions including the global one) of the padded batch."""
    longest_text, most_regions = int(text_lengths.max()), int(region_counts.max())
    if dynamic:
        return (
            padded_length(longest_text, pad, max_seq_length),
            padded_length(most_regions + 1, pad, region_len + 1),
        )
    if longest_text > max_seq_length or most_regions > region_len:
        raise BadInputError(
            f"a sample has {longest_text} tokens / {most_regions} regions, more than the "
            f"fixed padding {max_seq_length} / {region_len}"
        )
    return max_seq_length, region_len + 1


def _batch_fields(
    size: int, seq_len: int, num_regions: int, feat_dim: int, target_dim: int
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The batch's tensors; the position lists and ``mrm_targets`` get room for every position and
    are cut to their counts later."""
    f32, i64 = torch.float32, torch.int64
    return [
        ("msm_positions", i64, (size * seq_len,)),
        ("mrm_positions", i64, (size * (num_regions - 1),)),
        ("input_ids", i64, (size, seq_len)),
        ("input_mask", i64, (size, seq_len)),
        ("segment_ids", i64, (size, seq_len)),
        ("lm_label_ids", i64, (size, seq_len)),
        ("is_next", i64, (size,)),
        ("image_feat", f32, (size, num_regions, feat_dim)),
        ("image_loc", f32, (size, num_regions, 5)),
        ("mrm_targets", f32, (size * (num_regions - 1), target_dim)),
        ("image_label", i64, (size, num_regions - 1)),
        ("image_mask", i64, (size, num_regions)),
        ("multimodal_mask", i64, (size, num_regions + seq_len)),
        ("image_id", i64, (size,)),
    ]


def _write_regions(
    samples: Sequence[Mapping[str, Any]],
    image_feat: np.ndarray,
    mrm_targets: np.ndarray,
    zero_rows_are_targets: bool,
) -> tuple[list[np.ndarray], int]:
    """Each sample's regions with its MRM zeroing, the global region (row 0: the mean of the real
    regions after masking) and zeroed padding, written straight into the batch arrays, and the
    targets of the regions MRM counts (masked, in a matched pair) into ``mrm_targets``. Returns each
    sample's MRM labels and how many targets were written.

    Each sample's values are checked in the batch right after they are copied there, while they are
    in the cache, so they are read from memory once. Under the published rule
    ``zero_rows_are_targets`` (see ``datasets/rules.py``) a region stored as zeros is labelled too.
    """
    labels, written = [], 0
    for i, sample in enumerate(samples):
        features, target = sample["region_feat"], sample["image_target"]
        source = sample.get("source") or f"sample {i} of the batch"
        n = len(features)
        regions = image_feat[i, 1 : n + 1]
        regions[...] = features
        check_finite_rows(source, "features", regions)
        label = sample["image_label"]
        if zero_rows_are_targets:
            label = np.where(sample["region_zeroed"] | ~(regions != 0).any(axis=1), 1, IGNORE_INDEX)
        labels.append(label)
        if int(sample["is_next"]) == 0:
            counted = np.flatnonzero(label == 1)
            rows = mrm_targets[written : written + len(counted)]
            rows[...] = target[counted]
            if target is not features:  # the class scores (not the features again)
                check_finite_rows(source, "cls_prob", rows)
            written += len(counted)
        regions[sample["region_zeroed"]] = 0
        np.add.reduce(regions, axis=0, out=image_feat[i, 0])
        image_feat[i, 0] /= np.float32(n)  # bitwise the float64 quotient rounded, as published
        image_feat[i, n + 1 :] = 0
    return labels, written


def _scatter_rows(target: np.ndarray, filled: np.ndarray, rows: list[np.ndarray], pad: int) -> None:
    """``target[i, :len(rows[i])] = rows[i]`` for every i and ``pad`` elsewhere, in two operations."""
    target.fill(pad)
    target[filled] = np.concatenate(rows)


def collate_pretraining(
    samples: Sequence[Mapping[str, Any]],
    dynamic_padding: bool = True,
    max_seq_length: int = 36,
    region_len: int = 36,
    pad_to_multiple: int = 8,
    zero_rows_are_targets: bool = False,
) -> dict[str, torch.Tensor]:
    """Pad and stack samples into the named pretraining batch, applying each sample's region masking.

    ``image_feat`` row 0 is the global region: the mean over the real regions after masking
    (zeroed regions count as zeros). Text is padded with id 0, label -1; regions with zero
    features/boxes, label -1. With ``dynamic_padding`` the batch is as long as its longest caption
    and region list (the global one included) rounded up to ``pad_to_multiple`` positions, never
    past the fixed padding; otherwise ``max_seq_length`` tokens and ``region_len + 1`` regions.
    ``image_label`` covers the real regions only (one fewer than ``image_feat``).
    ``msm_positions`` and ``mrm_positions`` are the flat indices of the labelled tokens and of the
    regions MRM counts (``image_label == 1`` in a matched pair), found here on the host so the model
    can gather its heads' inputs on the device without a sync. ``mrm_targets`` holds the MRM targets
    (class scores, or features with ``predict_feature``) of those regions only, in that order: the
    loss reads no other row, and the published ``[B, R - 1, classes]`` target would be nearly half
    of the batch's bytes, almost all never read.
    Region values that are not finite are refused, naming the sample's ``source`` (file and key).
    ``zero_rows_are_targets``: the published group-masking rule, a region stored as zeros is an MRM
    target too. Every tensor is a view of one buffer, reused across batches in a DataLoader worker
    (:func:`~vilbert.datasets.loader.batch_tensors`).
    """
    if not samples:
        raise BadInputError("cannot collate an empty list of samples")
    text_lengths = np.array([len(s["input_ids"]) for s in samples])
    region_counts = np.array([len(s["region_feat"]) for s in samples])
    seq_len, num_regions = _batch_shape(
        text_lengths, region_counts, dynamic_padding, max_seq_length, region_len, pad_to_multiple
    )
    size = len(samples)
    feat_dim, target_dim = samples[0]["region_feat"].shape[1], samples[0]["image_target"].shape[1]
    longest, most = max(seq_len, max_seq_length), max(num_regions, region_len + 1)
    largest = _batch_fields(size, longest, most, feat_dim, target_dim)
    batch = batch_tensors(
        _batch_fields(size, seq_len, num_regions, feat_dim, target_dim),
        capacity=sum(math.prod(shape) * dtype.itemsize + 64 for _, dtype, shape in largest),
    )
    arrays = {name: tensor.numpy() for name, tensor in batch.items()}
    labels, targets = _write_regions(
        samples, arrays["image_feat"], arrays["mrm_targets"], zero_rows_are_targets
    )

    text = np.arange(seq_len) < text_lengths[:, None]
    regions = np.arange(num_regions - 1) < region_counts[:, None]
    _scatter_rows(arrays["input_ids"], text, [s["input_ids"] for s in samples], 0)
    _scatter_rows(arrays["lm_label_ids"], text, [s["lm_label_ids"] for s in samples], IGNORE_INDEX)
    _scatter_rows(arrays["image_label"], regions, labels, IGNORE_INDEX)
    image_loc = arrays["image_loc"]
    image_loc[:, 0] = GLOBAL_BOX
    image_loc[:, 1:][~regions] = 0
    image_loc[:, 1:][regions] = np.concatenate([s["region_loc"] for s in samples])
    arrays["input_mask"][...] = text
    arrays["segment_ids"].fill(0)
    image_mask = arrays["image_mask"]
    image_mask[:, 0] = 1
    image_mask[:, 1:] = regions
    arrays["multimodal_mask"][:, :num_regions] = image_mask
    arrays["multimodal_mask"][:, num_regions:] = text
    arrays["is_next"][...] = [int(s["is_next"]) for s in samples]
    arrays["image_id"][...] = [int(s["image_id"]) for s in samples]
    counted = (arrays["image_label"] == 1) & (arrays["is_next"] == 0)[:, None]
    for name, where in (
        ("msm_positions", arrays["lm_label_ids"] != IGNORE_INDEX),
        ("mrm_positions", counted),
    ):
        positions = np.flatnonzero(where)
        arrays[name][: len(positions)] = positions
        batch[name] = batch[name][: len(positions)]  # a view of the buffer, as long as the count
    batch["mrm_targets"] = batch["mrm_targets"][:targets]
    return batch
