"""Every fast path computes what the plain path computes (fp32, CPU, within 1e-5).

The fast paths are SDPA attention, the MSM/MRM heads run only on counted positions
(``gather_heads``) and batches padded to their own longest caption and region list; a whole
optimiser step through the engine must then give the same weights. Batches are real ones: samples
from ``PretrainingSampleBuilder`` (span + group masking) collated both ways by ``collate_pretraining``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from vilbert.config import BertConfig
from vilbert.datasets.concept_cap import PretrainingSampleBuilder, collate_pretraining, sample_rng
from vilbert.datasets.features import PretrainDatapoint
from vilbert.engine import Optimization
from vilbert.modeling import InterBertForMultiModalPreTraining
from vilbert.optimization import build_optimizer, param_groups
from vilbert.precision import Precision
from vilbert.pretraining import LossWeights, build_parser, pretraining_losses
from vilbert.tokenization import BertTokenizer, default_vocab_path
from vilbert.training_state import NonFiniteGuard

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
FEAT, CLASSES, SEQ_LEN, REGION_LEN = 16, 11, 36, 36
BATCH, NUM_BATCHES = 6, 2
WORDS = ["dog", "cat", "red", "car", "tree", "house", "boat", "bird", "runs", "under", "small", "green"]
LOSS_ARGS = LossWeights.from_args(build_parser().parse_args([]))  # the published loss weights


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths are on."""

    sdpa: bool
    gather: bool
    dynamic: bool


PLAIN = FastPaths(sdpa=False, gather=False, dynamic=False)
FAST = FastPaths(sdpa=True, gather=True, dynamic=True)


def tiny_config() -> BertConfig:
    """Small, without dropout, so a training step is deterministic up to the ITM head's fixed dropout."""
    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        t_num_hidden_layers=1,
        v_num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        v_feature_size=FEAT,
        v_target_size=CLASSES,
        v_hidden_size=32,
        v_num_attention_heads=2,
        v_intermediate_size=40,
        bi_hidden_size=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        v_hidden_dropout_prob=0.0,
        v_attention_probs_dropout_prob=0.0,
    )


def _datapoint(rng: np.random.Generator, index: int) -> PretrainDatapoint:
    n = int(rng.integers(4, 30))
    w, h = 400, 300
    x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(20, w / 2, n), y1 + rng.uniform(20, h / 2, n)], axis=1)
    return PretrainDatapoint(
        features=rng.normal(size=(n, FEAT)).astype(np.float32),
        cls_prob=rng.dirichlet(np.ones(CLASSES), size=n).astype(np.float32),
        boxes=boxes.astype(np.float32),
        num_boxes=n,
        image_h=h,
        image_w=w,
        image_id=str(5000 + index),
        caption=" ".join(rng.choice(WORDS, size=int(rng.integers(6, 20)))),
    )


@pytest.fixture(scope="module")
def samples() -> list[list[dict[str, np.ndarray]]]:
    """``NUM_BATCHES`` lists of ``BATCH`` masked samples of different caption and region lengths."""
    rng = np.random.default_rng(3)
    points = [_datapoint(rng, i) for i in range(BATCH * NUM_BATCHES)]
    builder = PretrainingSampleBuilder(
        BertTokenizer(default_vocab_path()), {p.image_id: p.caption for p in points}, SEQ_LEN, REGION_LEN
    )
    built = [builder.build(p, sample_rng(0, 0, 0, i)) for i, p in enumerate(points)]
    return [built[i : i + BATCH] for i in range(0, len(built), BATCH)]


def collate(samples: list[dict[str, np.ndarray]], path: FastPaths) -> dict[str, torch.Tensor]:
    return collate_pretraining(samples, path.dynamic, SEQ_LEN, REGION_LEN)


def configured(
    model: InterBertForMultiModalPreTraining, path: FastPaths
) -> InterBertForMultiModalPreTraining:
    model.set_attention_impl(use_sdpa=path.sdpa)
    model.gather_heads = path.gather
    return model


def losses_and_gradients(
    model: InterBertForMultiModalPreTraining, batch: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total, parts = pretraining_losses(model, batch, LOSS_ARGS)
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {name: value.detach() for name, value in parts.items()}, grads


def assert_all_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], **TOLERANCE, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_batches_exercise_every_loss_and_both_paddings(samples):
    """Preconditions of the comparisons below: something to differ on."""
    for batch_samples in samples:
        dynamic, full = collate(batch_samples, FAST), collate(batch_samples, PLAIN)
        assert dynamic["input_ids"].shape[1] < SEQ_LEN and dynamic["image_feat"].shape[1] < REGION_LEN + 1
        assert full["input_ids"].shape[1] == SEQ_LEN and full["image_feat"].shape[1] == REGION_LEN + 1
        assert (dynamic["lm_label_ids"] != -1).any()
        counted_regions = (dynamic["image_label"] == 1) & (dynamic["is_next"] == 0)[:, None]
        assert counted_regions.any()
        assert dynamic["is_next"].unique().numel() == 2


@pytest.mark.parametrize(
    "fast, plain",
    [
        (FastPaths(sdpa=True, gather=False, dynamic=False), PLAIN),
        (FastPaths(sdpa=False, gather=True, dynamic=False), PLAIN),
        (FastPaths(sdpa=False, gather=False, dynamic=True), PLAIN),
        (FAST, FastPaths(sdpa=True, gather=True, dynamic=False)),
        (FAST, PLAIN),
    ],
    ids=["sdpa", "gathered-heads", "dynamic-padding", "dynamic-padding-with-fast-model", "all"],
)
def test_fast_path_gives_the_plain_losses_and_gradients(samples, fast: FastPaths, plain: FastPaths):
    torch.manual_seed(0)
    reference = InterBertForMultiModalPreTraining(tiny_config()).eval()
    candidate = copy.deepcopy(reference)
    expected = losses_and_gradients(configured(reference, plain), collate(samples[0], plain))
    actual = losses_and_gradients(configured(candidate, fast), collate(samples[0], fast))
    assert all(value > 0 for value in expected[0].values())
    assert_all_close(actual[0], expected[0])
    assert_all_close(actual[1], expected[1])


def _optimization(model: InterBertForMultiModalPreTraining) -> Optimization:
    optimizer = build_optimizer("AdamW", param_groups(model), lr=1e-3, fused=False)
    scaler = Precision("fp32", torch.device("cpu")).make_scaler()
    return Optimization(model, optimizer, None, scaler, NonFiniteGuard(max_bad_steps=3), max_grad_norm=1.0)


def test_engine_steps_with_every_fast_path_give_the_plain_weights(samples):
    """Two optimiser steps in train mode, for-loop AdamW on both sides (the ITM head's fixed dropout is
    drawn from the same seed on both)."""
    torch.manual_seed(0)
    plain_model = configured(InterBertForMultiModalPreTraining(tiny_config()), PLAIN).train()
    fast_model = configured(copy.deepcopy(plain_model), FAST)
    plain_step, fast_step = _optimization(plain_model), _optimization(fast_model)
    initial = {name: p.detach().clone() for name, p in plain_model.named_parameters()}
    for seed, batch_samples in enumerate(samples):
        for model, step, path in ((plain_model, plain_step, PLAIN), (fast_model, fast_step, FAST)):
            torch.manual_seed(seed)
            loss, _ = pretraining_losses(model, collate(batch_samples, path), LOSS_ARGS)
            step.backward(loss)
            assert not step.step()  # 0.0: not skipped
    assert all(not torch.equal(p, initial[name]) for name, p in plain_model.named_parameters())
    assert_all_close(dict(fast_model.named_parameters()), dict(plain_model.named_parameters()))


def test_heads_gathered_by_the_collate_positions_give_the_mask_gathers_losses_bitwise(samples):
    """``msm_positions`` / ``mrm_positions`` (no host sync) select the same rows in the same order as
    the boolean masks (a sync on a GPU): the losses and gradients are identical to the last bit."""
    torch.manual_seed(0)
    model = configured(InterBertForMultiModalPreTraining(tiny_config()).eval(), FAST)
    for batch_samples in samples:
        batch = collate(batch_samples, FAST)
        by_mask = {key: value for key, value in batch.items() if not key.endswith("_positions")}
        losses, grads = losses_and_gradients(model, batch)
        mask_losses, mask_grads = losses_and_gradients(model, by_mask)
        assert all(torch.equal(losses[name], mask_losses[name]) for name in losses)
        assert all(torch.equal(grads[name], mask_grads[name]) for name in grads)
