"""The region proposal network and the original proposal layer.

The head scores 12 anchors per cell. The Caffe model has two logits per anchor (background,
foreground) and a 2-way softmax; its foreground probability is exactly the sigmoid of their
difference, so the canonical layout stores that difference (12 channels), which both public
objectness layouts convert to and from without loss.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vilbert.detector.anchors import cell_anchors, shifted_anchors
from vilbert.detector.box_ops import clip_boxes, decode_boxes, descending_order, large_enough, nms_sorted
from vilbert.detector.config import DetectorConfig


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then per-anchor objectness (fg - bg logit) and box deltas."""

    def __init__(self, in_channels: int, channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        self.objectness = nn.Conv2d(channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(channels, 4 * num_anchors, kernel_size=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.conv(features))
        return self.objectness(hidden), self.anchor_deltas(hidden)


class ProposalLayer:
    """Anchors + deltas -> at most ``post_nms_top_n`` proposals, as the Caffe ``ProposalLayer``."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.cell = cell_anchors(config.anchor_ratios, config.anchor_scales)

    def __call__(
        self, logits: torch.Tensor, deltas: torch.Tensor, input_h: int, input_w: int, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Proposals [P, 4] in input (resized) pixels and their foreground probabilities [P]."""
        cfg = self.config
        _, num_anchors, height, width = logits.shape
        scores = torch.sigmoid(logits[0].permute(1, 2, 0).reshape(-1))
        box_deltas = deltas[0].permute(1, 2, 0).reshape(-1, 4)
        anchors = shifted_anchors(self.cell, height, width, cfg.feat_stride).to(deltas.device)
        boxes = clip_boxes(decode_boxes(anchors, box_deltas), input_h, input_w)
        # min_size is compared in the input's pixels; the scale travelled through a float32 blob.
        min_size = float(np.float32(cfg.rpn_min_size) * np.float32(scale))
        keep = torch.nonzero(large_enough(boxes, min_size)).squeeze(1)
        boxes, scores = boxes[keep], scores[keep]
        order = descending_order(scores)[: cfg.pre_nms_top_n]
        boxes, scores = boxes[order], scores[order]
        kept = nms_sorted(boxes, cfg.rpn_nms_threshold, cfg.post_nms_top_n)
        return boxes[kept], scores[kept]
