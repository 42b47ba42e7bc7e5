"""Box arithmetic of the original py-faster-rcnn code, in float32 torch, with its +1 pixel rule.

A box [x1, y1, x2, y2] covers pixels x1..x2 inclusive, so its width is x2 - x1 + 1. Decoding,
clipping to [0, size - 1], the minimum-size filter, NMS (suppress when IoU > threshold) and Caffe's
RoI max pooling all follow that rule. NMS and RoI pooling are written here, from the Caffe
kernels, rather than taken from torchvision: no torchvision build matching the pinned torch can be
installed beside it, and these two are short.
"""

from __future__ import annotations

import torch


def decode_boxes(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Apply (dx, dy, dw, dh) deltas [N, 4] to boxes [N, 4] (``bbox_transform_inv``)."""
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    pred_ctr_x = deltas[:, 0] * widths + ctr_x
    pred_ctr_y = deltas[:, 1] * heights + ctr_y
    pred_w = torch.exp(deltas[:, 2]) * widths
    pred_h = torch.exp(deltas[:, 3]) * heights
    return torch.stack(
        [
            pred_ctr_x - 0.5 * pred_w,
            pred_ctr_y - 0.5 * pred_h,
            pred_ctr_x + 0.5 * pred_w,
            pred_ctr_y + 0.5 * pred_h,
        ],
        dim=1,
    )


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip x to [0, width - 1] and y to [0, height - 1] (``clip_boxes``)."""
    x = boxes[:, 0::2].clamp(max=width - 1).clamp(min=0)
    y = boxes[:, 1::2].clamp(max=height - 1).clamp(min=0)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def large_enough(boxes: torch.Tensor, min_size: torch.Tensor | float) -> torch.Tensor:
    """Mask of boxes whose +1 width and height are both >= ``min_size`` (``_filter_boxes``)."""
    widths = boxes[:, 2] - boxes[:, 0] + 1
    heights = boxes[:, 3] - boxes[:, 1] + 1
    return (widths >= min_size) & (heights >= min_size)


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argsort()[::-1]`` with a stable sort: ties come out highest index first."""
    return torch.sort(scores, stable=True).indices.flip(0)


def pairwise_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """[A, B] IoU with +1 widths, in the order of operations of the original NMS."""
    area_a = (boxes_a[:, 2] - boxes_a[:, 0] + 1) * (boxes_a[:, 3] - boxes_a[:, 1] + 1)
    area_b = (boxes_b[:, 2] - boxes_b[:, 0] + 1) * (boxes_b[:, 3] - boxes_b[:, 1] + 1)
    left = torch.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    top = torch.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    right = torch.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    bottom = torch.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    inter = (right - left + 1).clamp(min=0) * (bottom - top + 1).clamp(min=0)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms_sorted(boxes: torch.Tensor, threshold: float, max_keep: int | None = None) -> torch.Tensor:
    """Greedy NMS over boxes already in priority order; indices of the kept boxes, in that order.

    A box is dropped when its IoU with a kept one is > ``threshold``. Stopping after ``max_keep``
    keeps changes nothing before it (a later keep never removes an earlier one).
    """
    count = boxes.shape[0]
    limit = count if max_keep is None else min(max_keep, count)
    suppressed = torch.zeros(count, dtype=torch.bool, device=boxes.device)
    keep: list[int] = []
    current = 0
    while count and len(keep) < limit:
        keep.append(current)
        rest = boxes[current + 1 :]
        if rest.shape[0] == 0:
            break
        suppressed[current + 1 :] |= pairwise_iou(boxes[current : current + 1], rest)[0] > threshold
        alive = torch.nonzero(~suppressed[current + 1 :])
        if alive.numel() == 0:
            break
        current += 1 + int(alive[0, 0])
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    # C's round(): halves away from zero (torch.round would round them to even).
    whole = torch.trunc(values)
    return whole + torch.sign(values) * ((values - whole).abs() >= 0.5)


def _bin_edges(start: torch.Tensor, end: torch.Tensor, pooled: int, limit: int) -> tuple[list, list]:
    """Per-RoI bin starts and ends along one axis, float32 like the Caffe kernel, clipped to [0, limit]."""
    length = torch.clamp(end - start + 1, min=1).to(torch.float32)
    bin_size = length / float(pooled)
    steps = torch.arange(pooled, dtype=torch.float32, device=start.device)
    lower = torch.floor(steps[None, :] * bin_size[:, None]).to(torch.long) + start[:, None]
    upper = torch.ceil((steps[None, :] + 1) * bin_size[:, None]).to(torch.long) + start[:, None]
    return lower.clamp(0, limit).tolist(), upper.clamp(0, limit).tolist()


def roi_pool(features: torch.Tensor, rois: torch.Tensor, pooled: int, spatial_scale: float) -> torch.Tensor:
    """Caffe's ``ROIPooling`` of ``rois`` [R, 4] (input-image pixels) on ``features`` [1, C, H, W].

    RoI corners are rounded to feature cells, the RoI is split into pooled x pooled bins of
    fractional size, each bin takes the max of the cells it touches, and an empty bin (one that
    lies off the map) is 0. Returns [R, C, pooled, pooled].
    """
    _, channels, height, width = features.shape
    corners = _round_half_away(rois.to(torch.float32) * spatial_scale).to(torch.long)
    rows_lo, rows_hi = _bin_edges(corners[:, 1], corners[:, 3], pooled, height)
    cols_lo, cols_hi = _bin_edges(corners[:, 0], corners[:, 2], pooled, width)
    output = features.new_zeros((rois.shape[0], channels, pooled, pooled))
    fmap = features[0]
    for r in range(rois.shape[0]):
        top, bottom = min(rows_lo[r]), max(rows_hi[r])
        if bottom <= top:
            continue
        band = fmap[:, top:bottom, :]
        empty_column = band.new_zeros((channels, bottom - top))
        columns = torch.stack(
            [
                band[:, :, lo:hi].amax(dim=2) if hi > lo else empty_column
                for lo, hi in zip(cols_lo[r], cols_hi[r])
            ],
            dim=2,
        )
        for ph, (lo, hi) in enumerate(zip(rows_lo[r], rows_hi[r])):
            if hi > lo:
                output[r, :, ph, :] = columns[:, lo - top : hi - top, :].amax(dim=1)
    return output
