"""Which proposals become saved regions: the rule of the original feature-generation script.

Each proposal's confidence is the highest class probability (classes 1..C-1) among the classes
whose NMS (IoU 0.3, on the proposal boxes) keeps it, 0 if none does. Proposals with confidence >=
0.2 are saved in proposal order; if there are fewer than ``min_boxes`` or more than ``max_boxes``,
the ``min_boxes`` / ``max_boxes`` most confident are saved instead, most confident first.
"""

from __future__ import annotations

import torch

from vilbert.detector.box_ops import descending_order, pairwise_iou


def per_class_nms_keep(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """[K, R] mask: does class k's greedy NMS over ``boxes`` [R, 4] ranked by ``scores`` [R, K] keep r?

    All classes advance together through their own rank orders, so the loop runs R times (not K x R).
    A box is alive at its turn unless a kept box of the same class overlaps it by IoU > threshold.
    """
    num_boxes, num_classes = scores.shape
    iou = pairwise_iou(boxes, boxes)
    order = torch.sort(scores.T, dim=1, stable=True).indices.flip(1)  # per class: argsort()[::-1]
    classes = torch.arange(num_classes, device=boxes.device)
    suppressed = torch.zeros((num_classes, num_boxes), dtype=torch.bool, device=boxes.device)
    kept = torch.zeros_like(suppressed)
    for rank in range(num_boxes):
        candidate = order[:, rank]
        alive = ~suppressed[classes, candidate]
        kept[classes, candidate] = alive
        suppressed |= alive[:, None] & (iou[candidate] > threshold)
    return kept


def max_confidence(boxes: torch.Tensor, cls_prob: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per proposal, the best foreground probability among the classes whose NMS keeps it (float64)."""
    foreground = cls_prob[:, 1:]
    kept = per_class_nms_keep(boxes, foreground, threshold).T
    return torch.where(kept, foreground, torch.zeros_like(foreground)).amax(dim=1).to(torch.float64)


def select_regions(
    confidence: torch.Tensor, conf_threshold: float, min_boxes: int, max_boxes: int
) -> torch.Tensor:
    """Indices of the saved proposals (see the module docstring)."""
    confident = torch.nonzero(confidence >= conf_threshold).squeeze(1)
    if min_boxes <= confident.numel() <= max_boxes:
        return confident
    limit = min_boxes if confident.numel() < min_boxes else max_boxes
    return descending_order(confidence)[:limit]
