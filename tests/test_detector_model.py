"""A randomly initialised full-size detector (ResNet-101, 1,601 classes, 401 attributes) on small
generated images: shapes, probabilities, box counts and bounds, bitwise determinism, batches of
images equal to each image alone, and the confidence-threshold branch of the selection."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vilbert.detector import BottomUpDetector, DetectorConfig
from vilbert.detector.box_ops import descending_order
from vilbert.detector.selection import max_confidence

pytestmark = pytest.mark.slow

# Full architecture; only the image scale and the proposal counts are cut for CPU time.
SMALL_PIPELINE = DetectorConfig(scale=64, max_size=100, pre_nms_top_n=300, post_nms_top_n=12)


def generated_image(seed: int, height: int, width: int) -> np.ndarray:
    """Smooth blobs on noise, so the random network sees structure (BGR uint8)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = rng.normal(120, 20, (height, width, 3))
    for _ in range(4):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(5, 20)
        image[(ys - cy) ** 2 + (xs - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def detector():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    yield BottomUpDetector(SMALL_PIPELINE)
    torch.use_deterministic_algorithms(previous)


def test_outputs_have_the_published_shapes_and_rules(detector: BottomUpDetector):
    image = generated_image(0, 70, 110)
    out = detector.detect(image)
    n = out.num_boxes
    assert 10 <= n <= 100
    assert out.features.shape == (n, 2048) and out.features.dtype == np.float32
    assert out.cls_prob.shape == (n, 1601) and out.attr_prob.shape == (n, 401)
    np.testing.assert_allclose(out.cls_prob.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.attr_prob.sum(axis=1), 1.0, atol=1e-5)
    assert (out.image_h, out.image_w) == (70, 110)
    assert (out.boxes[:, 0] >= 0).all() and (out.boxes[:, 1] >= 0).all()
    # clipped to the resized input's last pixel, then divided by the scale
    scale = detector.prepare(image).scale
    assert (out.boxes[:, 2] <= (round(110 * scale) - 1) / scale + 1e-3).all()
    assert (out.boxes[:, 3] <= (round(70 * scale) - 1) / scale + 1e-3).all()
    assert (out.boxes[:, 2] >= out.boxes[:, 0]).all() and (out.boxes[:, 3] >= out.boxes[:, 1]).all()


def test_bitwise_deterministic_and_a_list_equals_each_image_alone(detector: BottomUpDetector):
    images = [generated_image(1, 64, 96), generated_image(2, 90, 60)]
    together = detector.detect_many(images)
    for image, batched in zip(images, together):
        alone = detector.detect(image)
        for name in ("boxes", "features", "cls_prob", "attr_prob", "confidence"):
            np.testing.assert_array_equal(getattr(alone, name), getattr(batched, name))


def test_a_confident_class_exercises_the_threshold_branch(detector: BottomUpDetector):
    image = generated_image(3, 64, 96)
    bias = detector.box_head.cls_score.bias
    saved_bias, saved_config = bias.detach().clone(), detector.config
    try:
        with torch.no_grad():
            bias[7] += 40.0  # class 7 takes nearly all the probability of every region
        detector.config = dataclasses.replace(saved_config, min_boxes=1, max_boxes=100)
        out = detector.detect(image)
        proposals = detector.propose(detector.prepare(image))
        original = proposals.boxes / np.float32(detector.prepare(image).scale)
        confidence = max_confidence(original, proposals.regions.cls_prob, 0.3).numpy()
    finally:
        with torch.no_grad():
            bias.copy_(saved_bias)
        detector.config = saved_config
    confident = np.where(confidence >= 0.2)[0]
    assert 1 <= len(confident) < len(confidence)  # class 7's NMS keeps some, suppresses others
    assert (out.cls_prob[:, 7] > 0.99).all()
    np.testing.assert_array_equal(out.confidence, confidence[confident])  # proposal order
    assert descending_order(torch.from_numpy(confidence))[0].item() in confident
