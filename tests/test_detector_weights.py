"""The public checkpoint layouts: every mapping and its inverse, strict key checks, safe loading.

Random canonical weights are exported to each public layout with the inverse mappings, saved in
that layout's file format, reloaded: no key is missing or unexpected and the outputs are bitwise
identical. The full-size key inventory is checked in memory; file round trips use a narrow model.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from vilbert.detector import BottomUpDetector, CheckpointLayoutError, DetectorConfig, load_detector
from vilbert.detector.weights import from_canonical, read_checkpoint, save_layout, to_canonical

TINY = DetectorConfig(
    blocks_per_stage=(1, 1, 2, 1), stem_channels=8, res2_bottleneck=4, rpn_channels=16,
    num_classes=11, num_attributes=5, class_embedding_dim=8, attribute_hidden=16,
    scale=64, max_size=100, pre_nms_top_n=200, post_nms_top_n=20, min_boxes=2, max_boxes=10,
)  # fmt: skip
SUFFIX = {"canonical": ".pt", "lxmert": ".bin", "detectron2": ".pkl", "bua": ".pth"}


def randomised(config: DetectorConfig, seed: int = 0) -> BottomUpDetector:
    """Every parameter and buffer random (batch-norm variances positive), so no mapping hides."""
    detector = BottomUpDetector(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in detector.state_dict().items():
            values = torch.randn(tensor.shape, generator=generator) * 0.05
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            elif name.endswith("norm.weight"):
                values = values + 1.0
            tensor.copy_(values)
    return detector


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (60, 90, 3), dtype=np.uint8)


@pytest.mark.parametrize("layout", ["lxmert", "detectron2", "bua"])
def test_full_size_inventory_round_trips_through_every_layout(layout):
    config = DetectorConfig()
    state = BottomUpDetector(config).state_dict()
    exported = from_canonical(state, layout, config)
    assert len(exported) == len(state)
    back = to_canonical(exported, layout, config, f"memory ({layout})")  # strict: raises on any key issue
    assert set(back) == set(state)
    for name, value in state.items():
        if name == "box_head.bbox_pred.weight" or name == "box_head.bbox_pred.bias":
            if layout != "bua":  # the background's deltas are not stored there
                torch.testing.assert_close(back[name][4:], value[4:], rtol=0, atol=0)
                continue
        torch.testing.assert_close(back[name], value, rtol=0, atol=0)


def test_documented_layout_facts():
    config = DetectorConfig()
    state = randomised(TINY).state_dict()
    lx = from_canonical(state, "lxmert", TINY)
    bua = from_canonical(state, "bua", TINY)
    head = "roi_heads.box_predictor."
    assert lx[head + "cls_score.weight"].shape[0] == TINY.num_classes
    torch.testing.assert_close(
        lx[head + "cls_score.bias"][-1], state["box_head.cls_score.bias"][0]
    )  # bg last
    torch.testing.assert_close(bua[head + "cls_score.bias"], state["box_head.cls_score.bias"])  # bg first
    assert lx[head + "bbox_pred.weight"].shape[0] == 4 * (TINY.num_classes - 1)
    objectness = "proposal_generator.rpn_head.objectness_logits.bias"
    assert bua[objectness].shape[0] == 2 * TINY.num_anchors and lx[objectness].shape[0] == TINY.num_anchors
    diff = bua[objectness][TINY.num_anchors :] - bua[objectness][: TINY.num_anchors]
    torch.testing.assert_close(diff, state["rpn.objectness.bias"], rtol=0, atol=0)  # fg - bg logit
    # size-major: lxmert anchor 1 is (ratio 1, scale 4), canonical anchor 4 (ratio-major)
    torch.testing.assert_close(lx[objectness][1], state["rpn.objectness.bias"][config.num_anchors // 3])
    assert head + "attr_linear1.weight" in bua and head + "fc_attr.weight" in lx


@pytest.mark.parametrize("layout", ["canonical", "lxmert", "detectron2", "bua"])
def test_saved_layout_reloads_with_bitwise_identical_outputs(layout, tmp_path):
    original = randomised(TINY, seed=1)
    path = str(tmp_path / f"weights{SUFFIX[layout]}")
    save_layout(original, layout, path)
    loaded = load_detector(path, TINY)
    for seed in range(2):
        ours, theirs = original.detect(image(seed)), loaded.detect(image(seed))
        for name in ("boxes", "features", "cls_prob", "attr_prob"):
            np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = from_canonical(randomised(TINY).state_dict(), "lxmert", TINY)
    del state["backbone.res3.0.conv2.weight"]
    state["roi_heads.box_predictor.extra.weight"] = torch.zeros(3)
    state["backbone.res2.0.conv1.norm.num_batches_tracked"] = torch.tensor(0)  # tolerated
    path = str(tmp_path / "broken.bin")
    torch.save(state, path)
    with pytest.raises(CheckpointLayoutError) as info:
        load_detector(path, TINY)
    message = str(info.value)
    assert "\n" not in message and path in message
    assert "1 missing: backbone.res3.0.conv2.weight" in message
    assert "1 unexpected: box_head.extra.weight" in message or "roi_heads.box_predictor.extra" in message


def test_pickles_that_would_run_code_are_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": np.zeros(2)}, "hook": pickle.loads}))
    with pytest.raises(CheckpointLayoutError, match="evil.pkl"):
        read_checkpoint(str(path))
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"model": {"x": np.arange(3, dtype=np.float32)}}))
    state, stored = read_checkpoint(str(plain))
    assert stored is None and state["x"].tolist() == [0, 1, 2]
