"""Pretraining corruptions (docs/data.md §2): masked segment modelling on tokens, group masking on regions.

Everything is vectorised numpy driven by an explicit ``numpy.random.Generator``, so a caller that
derives one generator per sample gets reproducible, worker-independent masks.

Published behaviour kept on purpose:

- a randomly replaced token is drawn uniformly from the *whole* vocabulary, special and
  ``[unused*]`` entries included (the published code did ``random.choice(list(vocab.items()))``);
- span masking draws the start from ``0..len`` inclusive, so one draw in ``len + 1`` masks nothing,
  and captions shorter than 4 tokens are never masked (the published guard ``int(0.3 * len) > 0``);
- group masking seeds only from real regions, and a seed always masks itself (its IoU with itself
  is 1 under the +1-pixel convention).

Published oddities *not* reproduced: the published region labels were derived by testing which
feature rows are all zero after masking, so a real region whose stored feature happened to be all
zeros was a target without being masked; here a label is 1 exactly when the region was masked.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -1
MASK_PROB = 0.8
RANDOM_PROB = 0.1
MIN_SPAN_TOKENS = 4
GROUP_SEED_PROB = 0.1


def _corrupt(
    token_ids: np.ndarray,
    target: slice | np.ndarray,
    u: np.ndarray,
    rng: np.random.Generator,
    vocab_size: int,
    mask_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's 80/10/10 at the ``target`` positions (a slice, or a boolean mask), given one uniform
    draw ``u`` per token. The random replacements are drawn in position order."""
    input_ids = np.array(token_ids, dtype=np.int64)
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    chosen, draws = input_ids[target], u[target]  # views for a slice, copies for a mask
    labels[target] = chosen
    chosen[draws < MASK_PROB] = mask_id
    to_random = (draws >= MASK_PROB) & (draws < MASK_PROB + RANDOM_PROB)
    count = np.count_nonzero(to_random)
    if count:  # skipping an empty draw saves ~10 us per caption
        chosen[to_random] = rng.integers(vocab_size, size=count)
    input_ids[target] = chosen
    return input_ids, labels


def span_mask_tokens(
    token_ids: np.ndarray, rng: np.random.Generator, vocab_size: int, mask_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mask one contiguous span of a caption's tokens (no [CLS]/[SEP]); labels -1 outside it.

    Start ~ U{0..n}, length ~ U{1..n}, clipped at the end of the caption, as published.
    """
    n = len(token_ids)
    if n < MIN_SPAN_TOKENS:
        return np.array(token_ids, dtype=np.int64), np.full(n, IGNORE_INDEX, dtype=np.int64)
    start = int(rng.integers(0, n + 1))
    length = int(rng.integers(1, n + 1))
    return _corrupt(token_ids, slice(start, start + length), rng.random(n), rng, vocab_size, mask_id)


def bert_mask_tokens(
    token_ids: np.ndarray, rng: np.random.Generator, vocab_size: int, mask_id: int, mask_prob: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's independent masking: each token is a target with ``mask_prob``, then 80/10/10."""
    u = rng.random(len(token_ids))
    # Rescaling the same draw (as published) keeps the 80/10/10 split independent of the selection.
    return _corrupt(token_ids, u < mask_prob, u / mask_prob, rng, vocab_size, mask_id)


def group_region_mask(
    boxes_norm: np.ndarray,
    num_real: int,
    rng: np.random.Generator,
    image_w: float,
    image_h: float,
    p: float = GROUP_SEED_PROB,
    iou_threshold: float = 0.4,
) -> np.ndarray:
    """Which of the first ``num_real`` regions group masking zeroes (bool [num_real]).

    Each real region seeds w.p. ``p``; every region with IoU >= ``iou_threshold`` to a seed is
    masked. Masking whole overlapping neighbourhoods stops the model from copying a masked region's
    content from a near-duplicate box.
    """
    seeds = group_seeds(num_real, rng, p)
    return group_region_masks([boxes_norm[:num_real]], [seeds], [(image_w, image_h)], iou_threshold)[0]


def group_seeds(num_real: int, rng: np.random.Generator, p: float = GROUP_SEED_PROB) -> np.ndarray:
    """The seeds of group masking: each real region w.p. ``p`` (the generator's first draw)."""
    return rng.random(num_real) < p


def group_region_masks(
    boxes_norm: Sequence[np.ndarray],
    seeds: Sequence[np.ndarray],
    sizes: Sequence[tuple[float, float]],
    iou_threshold: float = 0.4,
) -> list[np.ndarray]:
    """:func:`group_region_mask` of several images at once, given each one's drawn ``seeds``.

    Every seed of every image is one row of the same few array operations, so a batch costs about
    what one image does. Pairwise IoU uses +1 pixel on widths and heights (a box overlaps itself
    with IoU 1), in float64.
    """
    masks = [np.array(s, dtype=bool) for s in seeds]
    owners = [i for i, s in enumerate(masks) if s.any()]
    if not owners:
        return masks
    width = max(len(masks[i]) for i in owners)
    boxes, seeded = np.zeros((len(owners), width, 4)), np.zeros((len(owners), width), dtype=bool)
    for row, i in enumerate(owners):
        boxes[row, : len(masks[i])] = boxes_norm[i][:, :4]
        seeded[row, : len(masks[i])] = masks[i]
    pixel = np.array([[1.0 / float(sizes[i][0]), 1.0 / float(sizes[i][1])] for i in owners])
    owner, seed = np.nonzero(seeded)
    rows, columns, seed_pixel = boxes[owner, seed][:, None, :], boxes[owner], pixel[owner][:, None, :]
    overlap = np.minimum(rows[..., 2:], columns[..., 2:])
    overlap -= np.maximum(rows[..., :2], columns[..., :2])
    overlap += seed_pixel
    np.maximum(overlap, 0.0, out=overlap)
    inter = overlap[..., 0] * overlap[..., 1]
    extent = boxes[..., 2:] - boxes[..., :2]
    extent += pixel[:, None, :]
    area = extent[..., 0] * extent[..., 1]
    union = area[owner, seed][:, None] + area[owner]
    union -= inter
    hit = np.zeros((len(owners), width), dtype=bool)
    np.logical_or.at(hit, owner, inter / union >= iou_threshold)
    for row, i in enumerate(owners):
        masks[i] = hit[row, : len(masks[i])]
    return masks


def independent_region_mask(
    num_real: int, rng: np.random.Generator, p: float = 0.15, zero_prob: float = 0.9
) -> tuple[np.ndarray, np.ndarray]:
    """BERT-style region masking: ``(zeroed, targets)``, bool [num_real] each.

    Each real region is a target w.p. ``p``; ``zero_prob`` of the targets are zeroed, the rest kept.
    """
    u = rng.random(num_real)
    targets = u < p
    return targets & (u / p < zero_prob), targets


def region_labels(targets: np.ndarray, length: int | None = None) -> np.ndarray:
    """MRM labels: 1 at targets, -1 elsewhere, padded with -1 to ``length``."""
    labels = np.full(len(targets) if length is None else length, IGNORE_INDEX, dtype=np.int64)
    labels[: len(targets)][targets] = 1
    return labels
