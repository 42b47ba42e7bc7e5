"""The RPN's anchors, built as the original ``generate_anchors`` did (not detectron2's).

A 16-pixel reference box [0, 0, 15, 15] is reshaped to each aspect ratio with its width and height
rounded (``np.round``: halves to even), then scaled; the set is ratio-major (all scales of ratio
0.5 first). With ratios 0.5/1/2 and scales 4-32 the first anchor is [-38, -16, 53, 31].
"""

from __future__ import annotations

import numpy as np
import torch


def _box_from_centre(widths: np.ndarray, heights: np.ndarray, x_ctr: float, y_ctr: float) -> np.ndarray:
    half_w, half_h = 0.5 * (widths - 1), 0.5 * (heights - 1)
    return np.stack([x_ctr - half_w, y_ctr - half_h, x_ctr + half_w, y_ctr + half_h], axis=1)


def cell_anchors(ratios: tuple[float, ...], scales: tuple[float, ...], base_size: int = 16) -> np.ndarray:
    """[len(ratios) * len(scales), 4] anchors (x1, y1, x2, y2) of one feature-map cell, float64."""
    centre = 0.5 * (base_size - 1)
    area = float(base_size * base_size)
    rows = []
    for ratio in ratios:
        width = np.round(np.sqrt(area / ratio))
        height = np.round(width * ratio)
        scale_array = np.asarray(scales, dtype=np.float64)
        rows.append(_box_from_centre(width * scale_array, height * scale_array, centre, centre))
    return np.concatenate(rows, axis=0)


def shifted_anchors(cell: np.ndarray, height: int, width: int, stride: int) -> torch.Tensor:
    """All anchors of an [height, width] feature map, ordered (y, x, anchor) as the proposal layer.

    Float32, as the proposal layer cast them before decoding.
    """
    ys, xs = np.meshgrid(np.arange(height) * stride, np.arange(width) * stride, indexing="ij")
    shifts = np.stack([xs.ravel(), ys.ravel(), xs.ravel(), ys.ravel()], axis=1)
    anchors = shifts[:, None, :] + cell[None, :, :]
    return torch.from_numpy(anchors.reshape(-1, 4).astype(np.float32))
