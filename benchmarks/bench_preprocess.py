"""Pretraining preprocessing throughput: decoded datapoints → model-ready batches (tokenise, mask, pad,
collate), this project's vectorised pipeline against the published per-sample algorithm, in one run.

The baseline re-implements the published algorithm as it ran: the slow pure-Python BERT tokenizer
(transformers' Python ``BertTokenizer``, standing in for pytorch-pretrained-bert's, whose vocab is
likewise an ``OrderedDict``), Python loops per token, ``random.choice(list(vocab.items()))`` per
randomly replaced token, ``copy.deepcopy`` of the padded feature and target arrays, the published
tiled IoU matrix with Python loops over regions for seeding and labels, fixed padding to 36 tokens /
36 regions, stacking, then the global region and ``torch.tensor`` copies.
Both sides start from the same in-memory datapoints and captions; LMDB reading is not timed.
The last line printed is ``ratio=<baseline time / our time>``.
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import numpy as np
import torch

try:  # transformers >= 5: ``BertTokenizer`` is Rust-backed; the pure-Python one was renamed
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as SlowBertTokenizer
except ImportError:  # transformers < 5
    from transformers import BertTokenizer as SlowBertTokenizer

from vilbert.datasets.concept_cap import PretrainingSampleBuilder, collate_pretraining, sample_rng
from vilbert.datasets.features import PretrainDatapoint
from vilbert.tokenization import BertTokenizer, default_vocab_path

FEATURE_DIM, NUM_CLASSES, SEQ_LEN, REGION_LEN = 2048, 1601, 36, 36


def make_datapoints(num: int, seed: int, vocab: dict[str, int]) -> list[PretrainDatapoint]:
    """Realistic sizes: 10–36 boxes, 2048-d features, 1601-way class distributions, 10–20 word captions."""
    rng = np.random.default_rng(seed)
    words = [w for w, i in vocab.items() if 2000 <= i < 8000 and w.isalpha() and len(w) > 2]
    points = []
    for index in range(num):
        n = int(rng.integers(10, 37))
        w, h = int(rng.integers(300, 800)), int(rng.integers(300, 800))
        x1, y1 = rng.uniform(0, w * 0.7, n), rng.uniform(0, h * 0.7, n)
        boxes = np.stack(
            [
                x1,
                y1,
                np.minimum(x1 + rng.uniform(20, w * 0.5, n), w - 1),
                np.minimum(y1 + rng.uniform(20, h * 0.5, n), h - 1),
            ],
            axis=1,
        )
        scores = rng.random((n, NUM_CLASSES), dtype=np.float32)
        caption = " ".join(rng.choice(words, size=int(rng.integers(10, 21))))
        points.append(
            PretrainDatapoint(
                features=rng.random((n, FEATURE_DIM), dtype=np.float32),
                cls_prob=scores / scores.sum(axis=1, keepdims=True),
                boxes=boxes.astype(np.float32),
                num_boxes=n,
                image_h=h,
                image_w=w,
                image_id=str(1_000_000 + index),
                caption=caption,
            )
        )
    return points


class PublishedPreprocess:
    """The published per-sample algorithm (span masking + group masking), re-implemented for timing."""

    def __init__(self, captions: dict[str, str], tokenizer: SlowBertTokenizer) -> None:
        self.captions = captions
        self.caption_ids = list(captions)
        self.tokenizer = tokenizer
        self.vocab = tokenizer.vocab  # an attribute (an OrderedDict) in pytorch-pretrained-bert

    def __call__(self, point: PretrainDatapoint) -> dict[str, np.ndarray]:
        num_boxes = int(point.num_boxes)
        feat = np.zeros((REGION_LEN, FEATURE_DIM), dtype=np.float32)
        target = np.zeros((REGION_LEN, NUM_CLASSES), dtype=np.float32)
        loc = np.zeros((REGION_LEN, 5), dtype=np.float32)
        feat[:num_boxes] = point.features
        target[:num_boxes] = point.cls_prob
        loc[:num_boxes, :4] = point.boxes
        w, h = float(point.image_w), float(point.image_h)
        loc[:, 4] = (loc[:, 3] - loc[:, 1]) * (loc[:, 2] - loc[:, 0]) / (w * h)
        loc[:, 0] /= w
        loc[:, 1] /= h
        loc[:, 2] /= w
        loc[:, 3] /= h
        feat = copy.deepcopy(feat)
        target = copy.deepcopy(target)

        caption, is_next = point.caption, 0
        if random.random() <= 0.5:
            other = point.image_id
            while other[:-1] == point.image_id[:-1]:
                other = self.caption_ids[random.randint(0, len(self.caption_ids) - 1)]
            caption, is_next = self.captions[other], 1
        tokens = self.tokenizer.tokenize(caption)
        while len(tokens) > SEQ_LEN - 2:
            tokens.pop()
        tokens, lm_labels = self.span_mask(tokens)
        feat, region_labels = self.group_mask(feat, loc, num_boxes, w, h)

        words = ["[CLS]"] + tokens + ["[SEP]"]
        input_ids = [self.vocab[word] for word in words]  # pytorch-pretrained-bert's convert_tokens_to_ids
        lm_labels = [-1] + lm_labels + [-1]
        segment_ids = [0] * len(words)
        input_mask = [1] * len(input_ids)
        image_mask = [1] * num_boxes
        while len(image_mask) < REGION_LEN:
            image_mask.append(0)
            region_labels.append(-1)
        while len(input_ids) < SEQ_LEN:
            input_ids.append(0)
            input_mask.append(0)
            segment_ids.append(0)
            lm_labels.append(-1)
        return {
            "input_ids": np.array(input_ids),
            "input_mask": np.array(input_mask),
            "segment_ids": np.array(segment_ids),
            "lm_label_ids": np.array(lm_labels),
            "is_next": np.array(is_next),
            "image_feat": feat,
            "image_loc": loc,
            "image_target": target,
            "image_label": np.array(region_labels),
            "image_mask": np.array(image_mask),
            "multimodal_mask": np.array(image_mask + input_mask),
            "image_id": np.array(int(point.image_id)),
        }

    def span_mask(self, tokens: list[str]) -> tuple[list[str], list[int]]:
        positions: list[int] = []
        if int(len(tokens) * 0.3) > 0:
            start = random.randint(0, len(tokens))
            for offset in range(random.randint(1, len(tokens))):
                if start + offset > len(tokens) - 1:
                    break
                positions.append(start + offset)
        labels = []
        for i, token in enumerate(tokens):
            if i in positions:
                draw = random.random()
                if draw < 0.8:
                    tokens[i] = "[MASK]"
                elif draw < 0.9:
                    tokens[i] = random.choice(list(self.vocab.items()))[0]
                labels.append(self.vocab[token])
            else:
                labels.append(-1)
        return tokens, labels

    @staticmethod
    def group_mask(
        feat: np.ndarray, loc: np.ndarray, num_boxes: int, w: float, h: float
    ) -> tuple[np.ndarray, list]:
        n = len(loc)
        area = (loc[:, 2] - loc[:, 0] + 1.0 / w) * (loc[:, 3] - loc[:, 1] + 1.0 / h)
        a = np.tile(loc.reshape(n, 1, 5), [1, n, 1])
        b = np.tile(loc.reshape(1, n, 5), [n, 1, 1])
        iw = (
            np.where(a[:, :, 2] < b[:, :, 2], a[:, :, 2], b[:, :, 2])
            - np.where(a[:, :, 0] > b[:, :, 0], a[:, :, 0], b[:, :, 0])
            + 1.0 / w
        )
        iw[iw < 0] = 0
        ih = (
            np.where(a[:, :, 3] < b[:, :, 3], a[:, :, 3], b[:, :, 3])
            - np.where(a[:, :, 1] > b[:, :, 1], a[:, :, 1], b[:, :, 1])
            + 1.0 / h
        )
        ih[ih < 0] = 0
        iou = iw * ih / (area.reshape(1, n) + area.reshape(n, 1) - iw * ih)
        for i in range(num_boxes):
            if random.random() < 0.1:
                feat[iou[i] >= 0.4] = 0
        labels = [1 if not feat[i].any() else -1 for i in range(num_boxes)]
        return feat, labels


def published_batch(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack (as tensorpack's BatchData did), prepend the global region, copy into tensors."""
    stacked = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    size = len(samples)
    feat, mask = stacked["image_feat"], stacked["image_mask"]
    global_feat = feat.sum(axis=1) / mask.sum(axis=1, keepdims=True)
    stacked["image_feat"] = np.concatenate([global_feat[:, None], feat], axis=1).astype(np.float32)
    global_loc = np.repeat(np.array([[0, 0, 1, 1, 1]], dtype=np.float32), size, axis=0)
    stacked["image_loc"] = np.concatenate([global_loc[:, None], stacked["image_loc"]], axis=1)
    ones = np.ones((size, 1), dtype=np.int64)
    stacked["image_mask"] = np.concatenate([ones, mask], axis=1)
    stacked["multimodal_mask"] = np.concatenate([ones, stacked["multimodal_mask"]], axis=1)
    return {k: torch.tensor(v) for k, v in stacked.items()}


def time_both(
    points: list[PretrainDatapoint], captions: dict[str, str], batch_size: int, seed: int
) -> tuple[float, float]:
    """(baseline seconds, our seconds) over all batches, alternating sides batch by batch (and which
    side goes first) so that load from elsewhere on the machine and cache warmth hit both alike."""
    slow_tokenizer = SlowBertTokenizer(default_vocab_path(), do_lower_case=True)
    if getattr(slow_tokenizer, "is_fast", False):
        raise RuntimeError("the baseline needs the pure-Python BERT tokenizer, got a Rust-backed one")
    preprocess = PublishedPreprocess(captions, slow_tokenizer)
    builder = PretrainingSampleBuilder(BertTokenizer(default_vocab_path()), captions)  # empty token cache
    random.seed(seed)

    def baseline_batch(chunk: range) -> None:
        published_batch([preprocess(points[i]) for i in chunk])

    def our_batch(chunk: range) -> None:
        collate_pretraining([builder.build(points[i], sample_rng(seed, 0, 0, i)) for i in chunk])

    elapsed = {baseline_batch: 0.0, our_batch: 0.0}
    for number, first in enumerate(range(0, len(points), batch_size)):
        chunk = range(first, min(first + batch_size, len(points)))
        for run in (baseline_batch, our_batch) if number % 2 == 0 else (our_batch, baseline_batch):
            start = time.perf_counter()
            run(chunk)
            elapsed[run] += time.perf_counter() - start
    return elapsed[baseline_batch], elapsed[our_batch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="report the best of N runs of each side")
    args = parser.parse_args()

    torch.set_num_threads(1)
    points = make_datapoints(args.num_samples, args.seed, BertTokenizer(default_vocab_path()).vocab)
    captions = {p.image_id: p.caption for p in points}
    runs = [time_both(points, captions, args.batch_size, args.seed) for _ in range(args.repeats)]
    baseline, ours = min(r[0] for r in runs), min(r[1] for r in runs)
    n = len(points)
    shape = f"feature_dim={FEATURE_DIM} classes={NUM_CLASSES}"
    print(f"samples={n} batch_size={args.batch_size} {shape} (best of {args.repeats})")
    print(f"published per-sample algorithm: {n / baseline:9.1f} samples/s ({baseline:.3f} s)")
    print(f"this project (vectorised):      {n / ours:9.1f} samples/s ({ours:.3f} s)")
    print(f"ratio={baseline / ours:.2f}")


if __name__ == "__main__":
    main()
