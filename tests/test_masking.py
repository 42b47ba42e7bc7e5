"""Statistics of the pretraining corruptions (data.md §2) over many draws, against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from vilbert.datasets.concept_cap import PretrainingSampleBuilder, collate_pretraining
from vilbert.datasets.features import PretrainDatapoint
from vilbert.datasets.masking import (
    IGNORE_INDEX,
    bert_mask_tokens,
    group_region_mask,
    independent_region_mask,
    region_labels,
    span_mask_tokens,
)
from vilbert.tokenization import BertTokenizer, default_vocab_path

VOCAB_SIZE = 30522
MASK_ID = 103
DRAWS = 20_000


def _split_fractions(inputs: np.ndarray, originals: np.ndarray) -> tuple[float, float, float]:
    """Fractions of target tokens that became [MASK], another token, or stayed unchanged."""
    total = inputs.size
    masked = np.count_nonzero(inputs == MASK_ID) / total
    kept = np.count_nonzero(inputs == originals) / total
    return masked, 1.0 - masked - kept, kept


def _draws(mask_fn, tokens: np.ndarray, seed: int, draws: int = DRAWS) -> tuple[np.ndarray, np.ndarray]:
    """``draws`` masked copies of ``tokens``: input ids and labels, each [draws, len(tokens)]."""
    rng = np.random.default_rng(seed)
    pairs = [mask_fn(tokens, rng, VOCAB_SIZE, MASK_ID) for _ in range(draws)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_span_start_and_length_are_uniform_and_clipped() -> None:
    n = 6
    tokens = np.arange(2000, 2000 + n)
    _, labels = _draws(span_mask_tokens, tokens, seed=0)
    target = labels != IGNORE_INDEX
    assert np.array_equal(labels[target], np.broadcast_to(tokens, labels.shape)[target])
    lengths = target.sum(axis=1)
    first = np.where(lengths > 0, target.argmax(axis=1), n)
    last = np.where(lengths > 0, n - 1 - target[:, ::-1].argmax(axis=1), n - 1)
    assert np.all(last - first + 1 == lengths), "span not contiguous"
    observed = np.zeros((n + 1, n + 1))  # [first masked position (n = none), span length]
    np.add.at(observed, (first, lengths), 1)
    # start ~ U{0..n}, length ~ U{1..n}, clipped at n: a start s shows n - s tokens at most.
    expected = np.zeros_like(observed)
    expected[n, 0] = 1 / (n + 1)
    for start in range(n):
        for length in range(1, n + 1):
            expected[start, min(length, n - start)] += 1 / ((n + 1) * n)
    sigma = np.sqrt(expected * (1 - expected) / DRAWS)
    assert np.all(np.abs(observed / DRAWS - expected) <= 4.5 * sigma + 1e-12)


def test_span_corruption_is_80_10_10_and_leaves_the_rest_alone() -> None:
    tokens = np.arange(2000, 2012)
    ids, labels = _draws(span_mask_tokens, tokens, seed=1)
    target = labels != IGNORE_INDEX
    originals = np.broadcast_to(tokens, ids.shape)
    assert np.array_equal(ids[~target], originals[~target])
    masked, random, kept = _split_fractions(ids[target], originals[target])
    assert abs(masked - 0.8) < 0.015 and abs(random - 0.1) < 0.015 and abs(kept - 0.1) < 0.015
    random_ids = ids[target & (ids != MASK_ID) & (ids != originals)]
    assert random_ids.min() >= 0 and random_ids.max() < VOCAB_SIZE
    assert abs(random_ids.mean() / VOCAB_SIZE - 0.5) < 0.03  # uniform over the whole vocabulary


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_captions_shorter_than_four_tokens_are_never_span_masked(n: int) -> None:
    tokens = np.arange(2000, 2000 + n)
    rng = np.random.default_rng(2)
    for _ in range(500):
        ids, labels = span_mask_tokens(tokens, rng, VOCAB_SIZE, MASK_ID)
        assert np.array_equal(ids, tokens) and np.all(labels == IGNORE_INDEX)


def test_four_token_captions_are_span_masked() -> None:
    rng = np.random.default_rng(3)
    hits = sum((span_mask_tokens(np.arange(4), rng, VOCAB_SIZE, MASK_ID)[1] != -1).any() for _ in range(200))
    assert hits > 100  # all but the ~1/5 of draws that start at len(tokens)


def test_bert_masking_is_15_percent_with_80_10_10() -> None:
    tokens = np.arange(2000, 2030)
    ids, labels = _draws(bert_mask_tokens, tokens, seed=4)
    target = labels != IGNORE_INDEX
    originals = np.broadcast_to(tokens, ids.shape)
    assert np.array_equal(ids[~target], originals[~target]) and np.array_equal(
        labels[target], originals[target]
    )
    assert abs(target.mean() - 0.15) < 0.005
    masked, random, kept = _split_fractions(ids[target], originals[target])
    assert abs(masked - 0.8) < 0.015 and abs(random - 0.1) < 0.015 and abs(kept - 0.1) < 0.015


def _reference_iou(a: np.ndarray, b: np.ndarray, w: float, h: float) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1 / w)
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1 / h)
    area_a = (a[2] - a[0] + 1 / w) * (a[3] - a[1] + 1 / h)
    area_b = (b[2] - b[0] + 1 / w) * (b[3] - b[1] + 1 / h)
    return inter_w * inter_h / (area_a + area_b - inter_w * inter_h)


def _clustered_boxes(rng: np.random.Generator, n: int, w: int, h: int) -> np.ndarray:
    """Normalised boxes jittered around a few centres, so IoU neighbourhoods of several sizes form."""
    centres = rng.uniform(0.2, 0.8, size=(4, 2))
    picked = centres[rng.integers(4, size=n)] + rng.normal(0, 0.04, size=(n, 2))
    half = rng.uniform(0.05, 0.2, size=(n, 2))
    boxes = np.concatenate([picked - half, picked + half], axis=1).clip(0, 1)
    boxes = np.round(boxes * [w, h, w, h]) / [w, h, w, h]  # whole pixels, as detector boxes are
    return boxes.astype(np.float32)


def test_group_masks_are_iou_neighbourhoods_of_seeds_at_the_published_rate() -> None:
    rng = np.random.default_rng(6)
    w, h, n, pad = 600, 400, 24, 4
    boxes = _clustered_boxes(rng, n, w, h)
    reference = np.array([[_reference_iou(a, b, w, h) for b in boxes.astype(np.float64)] for a in boxes])
    neighbourhoods = reference >= 0.4
    features = rng.normal(size=(n + pad, 8)).astype(np.float32) + 10.0
    degree = neighbourhoods.sum(axis=1)
    assert degree.max() > 2, "fixture should have overlapping clusters"

    masked_count = np.zeros(n)
    draws = 10_000
    for _ in range(draws):
        decided = group_region_mask(boxes, n, rng, w, h)  # what the sample builder draws
        labels = region_labels(decided, len(features))
        out = features.copy()
        out[:n][decided] = 0  # as collate_pretraining applies it
        zeroed = ~out.any(axis=1)
        assert np.array_equal(labels == 1, zeroed)
        assert np.all(labels[n:] == IGNORE_INDEX) and np.array_equal(out[n:], features[n:])
        assert np.array_equal(out[~zeroed], features[~zeroed])
        # The zeroed set must be exactly a union of whole neighbourhoods.
        possible_seeds = ~(neighbourhoods & ~zeroed[None, :n]).any(axis=1)
        assert np.array_equal(neighbourhoods[possible_seeds].any(axis=0), zeroed[:n])
        masked_count += zeroed[:n]
    # Region j is masked iff some region of its neighbourhood seeds: 1 - 0.9^|N(j)|.
    np.testing.assert_allclose(masked_count / draws, 1 - 0.9**degree, atol=0.02)
    assert np.all(features[:, 0] > 0), "input must not be modified"


def test_independent_region_masking_is_15_percent_with_90_10() -> None:
    rng = np.random.default_rng(7)
    n, pad, draws = 30, 6, 5000
    features = rng.normal(size=(n + pad, 4)).astype(np.float32) + 10.0
    targets = zeroed_targets = 0
    for _ in range(draws):
        decided, chosen = independent_region_mask(n, rng)
        labels = region_labels(chosen, len(features))
        out = features.copy()
        out[:n][decided] = 0
        zeroed = ~out.any(axis=1)
        assert np.all(labels[zeroed] == 1), "only targets are zeroed"
        assert np.all(labels[n:] == IGNORE_INDEX) and not zeroed[n:].any()
        targets += np.count_nonzero(labels == 1)
        zeroed_targets += np.count_nonzero(zeroed)
    assert abs(targets / (draws * n) - 0.15) < 0.005
    assert abs(zeroed_targets / targets - 0.9) < 0.015


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return BertTokenizer(default_vocab_path())


def _datapoint(rng: np.random.Generator, image_id: int, n: int, caption: str) -> PretrainDatapoint:
    w, h = 500, 400
    boxes = _clustered_boxes(rng, n, w, h) * np.array([w, h, w, h], dtype=np.float32)
    return PretrainDatapoint(
        features=(rng.normal(size=(n, 16)) + 5).astype(np.float32),
        cls_prob=rng.dirichlet(np.ones(7), size=n).astype(np.float32),
        boxes=boxes,
        num_boxes=n,
        image_h=h,
        image_w=w,
        image_id=str(image_id),
        caption=caption,
    )


@pytest.mark.parametrize("span_mask", [True, False])
def test_samples_label_specials_and_padding_ignored_and_global_region_is_masked_mean(
    tokenizer: BertTokenizer, span_mask: bool
) -> None:
    rng = np.random.default_rng(8)
    captions = {str(i): f"a {'big ' * (i % 7)}dog sits on the red sofa number {i}" for i in range(10)}
    points = [_datapoint(rng, i, 3 + 3 * i, captions[str(i)]) for i in range(10)]
    builder = PretrainingSampleBuilder(
        tokenizer, captions, max_seq_length=14, region_len=20, span_mask=span_mask
    )
    any_region_masked = False
    for step in range(30):
        samples = [builder.build(p, np.random.default_rng([step, i])) for i, p in enumerate(points)]
        batch = {k: v.numpy() for k, v in collate_pretraining(samples).items()}
        lengths = batch["input_mask"].sum(axis=1)
        rows = np.arange(len(samples))
        assert np.all(batch["input_ids"][:, 0] == tokenizer.cls_token_id)
        assert np.all(batch["input_ids"][rows, lengths - 1] == tokenizer.sep_token_id)
        assert np.all(batch["lm_label_ids"][:, 0] == IGNORE_INDEX)
        assert np.all(batch["lm_label_ids"][rows, lengths - 1] == IGNORE_INDEX)
        assert np.all(batch["lm_label_ids"][batch["input_mask"] == 0] == IGNORE_INDEX)
        assert np.all(batch["input_ids"][batch["input_mask"] == 0] == 0)

        feat, mask = batch["image_feat"], batch["image_mask"]
        real = mask[:, 1:].astype(bool)
        assert np.all(batch["image_label"][~real] == IGNORE_INDEX)
        assert batch["image_label"].shape[1] == feat.shape[1] - 1, "the global region has no label"
        zeroed = ~feat[:, 1:].any(axis=2) & real
        if span_mask:
            assert np.array_equal(zeroed, batch["image_label"] == 1)
        else:
            assert np.all(batch["image_label"][zeroed] == 1)
        any_region_masked |= bool(zeroed.any())
        counts = real.sum(axis=1)
        mean = feat[:, 1:].sum(axis=1) / counts[:, None]
        np.testing.assert_allclose(feat[:, 0], mean, rtol=1e-5, atol=1e-5)
        assert np.all(feat[:, 0].any(axis=1)), "the global region is never zeroed"
        np.testing.assert_array_equal(batch["image_loc"][:, 0], [[0, 0, 1, 1, 1]] * len(samples))
    assert any_region_masked


@pytest.mark.parametrize("span_mask", [True, False])
def test_a_sample_built_with_its_batch_equals_the_sample_built_alone(
    tokenizer: BertTokenizer, span_mask: bool
) -> None:
    """The loader builds a whole batch at once (``build_many``: one set of region arithmetic for every
    image); each sample must be bitwise what ``build`` makes of its datapoint and generator alone,
    whatever the other images' sizes and region counts."""
    rng = np.random.default_rng(11)
    captions = {str(i): f"a {'small ' * (i % 5)}cat under the table number {i}" for i in range(12)}
    points = [_datapoint(rng, i, 1 + (7 * i) % 30, captions[str(i)]) for i in range(12)]
    for i, point in enumerate(points):  # different image sizes in one batch
        point.image_w, point.image_h = 500 + 37 * i, 400 - 11 * i
    builder = PretrainingSampleBuilder(tokenizer, captions, region_len=24, span_mask=span_mask)
    masked = 0
    for step in range(20):
        together = builder.build_many(points, [np.random.default_rng([step, i]) for i in range(12)])
        for i, (point, sample) in enumerate(zip(points, together)):
            alone = builder.build(point, np.random.default_rng([step, i]))
            assert alone.keys() == sample.keys()
            for key, value in alone.items():
                assert value.dtype == sample[key].dtype and np.array_equal(value, sample[key]), (step, i, key)
            masked += int(sample["region_zeroed"].sum())
    assert masked > 0
