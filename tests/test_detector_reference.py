"""Each step of the detector against a NumPy reference written from the original py-faster-rcnn /
bottom-up-attention sources (anchors, +1 decode and clipping, NMS, Caffe RoI pooling, pool1, the
scale rule, the proposal layer, per-class NMS and the region selection of generate_tsv.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vilbert.detector.anchors import cell_anchors
from vilbert.detector.box_ops import clip_boxes, decode_boxes, nms_sorted, roi_pool
from vilbert.detector.config import DetectorConfig
from vilbert.detector.preprocess import image_scale, prepare_image
from vilbert.detector.resnet import Stem
from vilbert.detector.rpn import ProposalLayer
from vilbert.detector.selection import max_confidence, per_class_nms_keep, select_regions

# --- references, one per original function ---------------------------------------------------


def ref_anchors(base_size=16, ratios=(0.5, 1, 2), scales=(8, 16, 32)) -> np.ndarray:
    def whctrs(a):
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mk(ws, hs, x, y):
        ws, hs = ws[:, None], hs[:, None]
        return np.hstack((x - 0.5 * (ws - 1), y - 0.5 * (hs - 1), x + 0.5 * (ws - 1), y + 0.5 * (hs - 1)))

    base = np.array([1, 1, base_size, base_size]) - 1
    w, h, x, y = whctrs(base)
    ws = np.round(np.sqrt(w * h / np.array(ratios)))
    ratio_anchors = mk(ws, np.round(ws * np.array(ratios)), x, y)
    out = []
    for a in ratio_anchors:
        w, h, x, y = whctrs(a)
        out.append(mk(w * np.array(scales), h * np.array(scales), x, y))
    return np.vstack(out)


def ref_decode(boxes, deltas):
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    px, py = deltas[:, 0] * w + cx, deltas[:, 1] * h + cy
    pw, ph = np.exp(deltas[:, 2]) * w, np.exp(deltas[:, 3]) * h
    return np.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], axis=1)


def ref_clip(boxes, shape):
    b = boxes.copy()
    b[:, 0::2] = np.maximum(np.minimum(b[:, 0::2], shape[1] - 1), 0)
    b[:, 1::2] = np.maximum(np.minimum(b[:, 1::2], shape[0] - 1), 0)
    return b


def ref_nms(dets, thresh):
    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort(kind="stable")[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return np.array(keep, dtype=np.int64)


def ref_roi_pool(fmap, rois, pooled, spatial_scale):
    channels, height, width = fmap.shape
    out = np.zeros((len(rois), channels, pooled, pooled), dtype=np.float32)
    f32 = np.float32
    for r, roi in enumerate(rois.astype(np.float32)):
        # C round(): halves away from zero
        x1, y1, x2, y2 = (int(np.sign(v) * np.floor(abs(v) + 0.5)) for v in roi * f32(spatial_scale))
        rh, rw = max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1)
        bh, bw = f32(rh) / f32(pooled), f32(rw) / f32(pooled)
        for ph in range(pooled):
            for pw in range(pooled):
                hs = min(max(int(np.floor(f32(ph) * bh)) + y1, 0), height)
                he = min(max(int(np.ceil(f32(ph + 1) * bh)) + y1, 0), height)
                ws = min(max(int(np.floor(f32(pw) * bw)) + x1, 0), width)
                we = min(max(int(np.ceil(f32(pw + 1) * bw)) + x1, 0), width)
                if he > hs and we > ws:
                    out[r, :, ph, pw] = fmap[:, hs:he, ws:we].max(axis=(1, 2))
    return out


def ref_proposals(fg, deltas, anchors_cell, im_info, stride, pre, post, thresh, min_size):
    a = anchors_cell.shape[0]
    height, width = fg.shape[-2:]
    sx, sy = np.meshgrid(np.arange(width) * stride, np.arange(height) * stride)
    shifts = np.vstack((sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel())).T
    anchors = (anchors_cell.reshape(1, a, 4) + shifts.reshape(1, -1, 4).transpose(1, 0, 2)).reshape(-1, 4)
    d = deltas.transpose(0, 2, 3, 1).reshape(-1, 4)
    s = fg.transpose(0, 2, 3, 1).reshape(-1)
    boxes = ref_clip(ref_decode(anchors.astype(np.float32), d), im_info[:2])
    ws, hs = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    keep = np.where((ws >= min_size * im_info[2]) & (hs >= min_size * im_info[2]))[0]
    boxes, s = boxes[keep], s[keep]
    order = s.argsort(kind="stable")[::-1][:pre]
    boxes, s = boxes[order], s[order]
    kept = ref_nms(np.hstack((boxes, s[:, None])), thresh)[:post]
    return boxes[kept]


def ref_select(boxes, cls_prob, nms_thresh, conf, min_boxes, max_boxes):
    max_conf = np.zeros(boxes.shape[0])
    for c in range(1, cls_prob.shape[1]):
        scores = cls_prob[:, c]
        keep = ref_nms(np.hstack((boxes, scores[:, None])).astype(np.float32), nms_thresh)
        max_conf[keep] = np.where(scores[keep] > max_conf[keep], scores[keep], max_conf[keep])
    keep_boxes = np.where(max_conf >= conf)[0]
    if len(keep_boxes) < min_boxes:
        keep_boxes = np.argsort(max_conf, kind="stable")[::-1][:min_boxes]
    elif len(keep_boxes) > max_boxes:
        keep_boxes = np.argsort(max_conf, kind="stable")[::-1][:max_boxes]
    return max_conf, keep_boxes


def random_boxes(rng, n, size=60.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(0, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# --- tests --------------------------------------------------------------------------------------


def test_anchor_set_is_the_original_one():
    ours = cell_anchors((0.5, 1.0, 2.0), (4.0, 8.0, 16.0, 32.0))
    assert ours.shape == (12, 4)
    assert ours[0].tolist() == [-38, -16, 53, 31]
    np.testing.assert_array_equal(ours, ref_anchors(scales=(4, 8, 16, 32)))
    # the 9-anchor table py-faster-rcnn documents for scales 8, 16, 32
    published = [[-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
                 [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
                 [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]]  # fmt: skip
    np.testing.assert_array_equal(cell_anchors((0.5, 1.0, 2.0), (8.0, 16.0, 32.0)), published)


def test_decode_and_clip_use_plus_one_widths():
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 200)
    boxes[:5, 2] = boxes[:5, 0]  # one-pixel-wide boxes
    deltas = rng.normal(0, 0.5, (200, 4)).astype(np.float32)
    decoded = decode_boxes(torch.from_numpy(boxes), torch.from_numpy(deltas)).numpy()
    # exp() of torch and of NumPy may differ in the last bit; everything else is exact
    np.testing.assert_allclose(decoded, ref_decode(boxes, deltas), rtol=1e-6, atol=2e-5)
    clipped = clip_boxes(torch.from_numpy(decoded * 3 - 40), 37, 53).numpy()
    np.testing.assert_array_equal(clipped, ref_clip(decoded * 3 - 40, (37, 53)))
    assert clipped[:, 0::2].max() == 52 and clipped.min() == 0


@pytest.mark.parametrize("seed", range(4))
def test_nms_matches_the_plus_one_reference_with_ties_and_degenerate_boxes(seed):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 120)
    boxes[:10, 2], boxes[:10, 3] = boxes[:10, 0], boxes[:10, 1]  # zero extent: one pixel with +1
    boxes[10:20] = boxes[20:30]  # identical boxes
    scores = np.round(rng.uniform(0, 1, 120), 1).astype(np.float32)  # many ties
    order = np.argsort(scores, kind="stable")[::-1]
    for threshold in (0.0, 0.3, 0.7):
        ours = order[nms_sorted(torch.from_numpy(boxes[order]), threshold).numpy()]
        np.testing.assert_array_equal(ours, ref_nms(np.hstack([boxes, scores[:, None]]), threshold))
    limited = nms_sorted(torch.from_numpy(boxes[order]), 0.7, max_keep=5).numpy()
    np.testing.assert_array_equal(order[limited], ref_nms(np.hstack([boxes, scores[:, None]]), 0.7)[:5])


def test_roi_pool_is_caffes_including_off_image_and_one_pixel_rois():
    rng = np.random.default_rng(1)
    fmap = rng.normal(size=(5, 7, 9)).astype(np.float32)
    rois = np.concatenate(
        [
            random_boxes(rng, 30, size=140.0),
            [[0, 0, 0, 0], [8, 8, 8, 8], [15.5, 7.5, 16.4, 8.6]],  # one pixel, and halves rounding away
            [[-50, -40, -20, -10], [200, 150, 260, 220]],  # entirely off the map
            [[-30, -30, 400, 400], [100, 90, 150, 130]],  # larger than / straddling the map
        ]
    ).astype(np.float32)
    ours = roi_pool(torch.from_numpy(fmap)[None], torch.from_numpy(rois), 4, 1 / 16)
    np.testing.assert_array_equal(ours.numpy(), ref_roi_pool(fmap, rois, 4, 1 / 16))
    ours14 = roi_pool(torch.from_numpy(fmap)[None], torch.from_numpy(rois), 14, 1 / 16)
    np.testing.assert_array_equal(ours14.numpy(), ref_roi_pool(fmap, rois, 14, 1 / 16))
    assert (ours14[33:35] == 0).all()  # off-image bins are empty: 0


@pytest.mark.parametrize("size", [(19, 23), (20, 24), (33, 64), (35, 47)])
def test_pool1_rounds_up_without_padding(size):
    stem = Stem(4, 1e-5)
    out = stem(torch.zeros(1, 3, *size))
    conv = [(s + 2 * 3 - 7) // 2 + 1 for s in size]
    expected = [int(np.ceil((c - 3) / 2)) + 1 for c in conv]  # Caffe: ceil((in + 2p - k) / s) + 1
    assert list(out.shape[2:]) == expected


def test_scale_rule_at_the_max_size_boundary():
    assert image_scale(480, 800, 600, 1000) == 600 / 480  # exactly 1000: not capped
    assert image_scale(480, 801, 600, 1000) == 1000 / 801  # 1001.25 rounds to 1001: capped
    assert image_scale(599, 998, 600, 1000) == 600 / 599  # 999.67 rounds to 1000: not capped
    assert image_scale(1200, 800, 600, 1000) == 600 / 800
    # a product in (1000, 1000.5) rounds to 1000 and is not capped
    m, big = next((m, b) for m in range(300, 700) for b in range(m, 3 * m) if 1000 < 600 * b / m < 1000.5)
    assert image_scale(m, big, 600, 1000) == 600 / m


def test_preprocessing_subtracts_means_in_float64_then_resizes():
    image = np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    prepared = prepare_image(image, (102.9801, 115.9465, 122.7717), 60, 1000)
    assert prepared.scale == 2.0 and prepared.tensor.shape == (1, 3, 60, 100)
    same = prepare_image(image, (102.9801, 115.9465, 122.7717), 30, 1000)
    expected = (image.astype(np.float32) - np.array([[[102.9801, 115.9465, 122.7717]]])).astype(np.float32)
    np.testing.assert_array_equal(same.tensor[0].numpy().transpose(1, 2, 0), expected)


def test_proposal_layer_matches_the_reference():
    cfg = DetectorConfig(pre_nms_top_n=400, post_nms_top_n=50)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1, 12, 9, 13)).astype(np.float32)
    deltas = rng.normal(0, 0.3, size=(1, 48, 9, 13)).astype(np.float32)
    scale = np.float32(1.6)
    boxes, _ = ProposalLayer(cfg)(torch.from_numpy(logits), torch.from_numpy(deltas), 140, 205, float(scale))
    fg = torch.sigmoid(torch.from_numpy(logits)).numpy()
    im_info = np.array([140, 205, scale], dtype=np.float32)
    expected = ref_proposals(
        fg, deltas, cell_anchors(cfg.anchor_ratios, cfg.anchor_scales), im_info, 16, 400, 50, 0.7, 16
    )
    np.testing.assert_allclose(boxes.numpy(), expected, rtol=1e-6, atol=2e-5)


def test_vectorised_per_class_nms_equals_a_loop_over_classes():
    rng = np.random.default_rng(4)
    boxes = random_boxes(rng, 60)
    probs = rng.dirichlet(np.ones(21) * 0.3, size=60).astype(np.float32)
    probs[:5, 3] = probs[5:10, 3]  # ties within a class
    kept = per_class_nms_keep(torch.from_numpy(boxes), torch.from_numpy(probs[:, 1:]), 0.3).numpy()
    for c in range(1, 21):
        expected = np.zeros(60, dtype=bool)
        expected[ref_nms(np.hstack([boxes, probs[:, c : c + 1]]), 0.3)] = True
        np.testing.assert_array_equal(kept[c - 1], expected)
    confidence = max_confidence(torch.from_numpy(boxes), torch.from_numpy(probs), 0.3).numpy()
    ref_conf, _ = ref_select(boxes, probs, 0.3, 0.2, 10, 100)
    np.testing.assert_array_equal(confidence, ref_conf)


@pytest.mark.parametrize("confident", [9, 10, 11, 100, 101, 0])
def test_selection_branches_at_exactly_10_and_100_boxes(confident):
    rng = np.random.default_rng(confident)
    confidence = rng.uniform(0.0, 0.19, 300)
    confidence[rng.choice(300, confident, replace=False)] = rng.uniform(0.2, 1.0, confident)
    confidence[[7, 8, 9]] = 0.1  # ties among the unconfident
    confidence[250] = 0.2  # exactly the threshold: confident
    ours = select_regions(torch.from_numpy(confidence), 0.2, 10, 100).numpy()
    keep = np.where(confidence >= 0.2)[0]
    if len(keep) < 10:
        keep = np.argsort(confidence, kind="stable")[::-1][:10]
    elif len(keep) > 100:
        keep = np.argsort(confidence, kind="stable")[::-1][:100]
    np.testing.assert_array_equal(ours, keep)
    assert 10 <= len(ours) <= 100
    if 10 <= int((confidence >= 0.2).sum()) <= 100:
        assert (np.diff(ours) > 0).all()  # proposal order


def test_selection_ties_break_like_a_stable_reversed_argsort():
    confidence = torch.tensor([0.1, 0.1, 0.1, 0.05, 0.1], dtype=torch.float64)
    assert select_regions(confidence, 0.2, 3, 100).tolist() == [4, 2, 1]
