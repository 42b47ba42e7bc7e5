"""Agreement of re-extracted features with released ones (needs the real weights and files).

Two measures, both per image and then pooled: with the released boxes given to the head (no RPN),
the cosine between our feature and the released one for the same box, and whether the class
argmax agrees; and with a full re-extraction, how our boxes match the released ones (best IoU per
released box, with the +1 rule) and the cosine of the matched pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vilbert.datasets.features import RegionFeatures
from vilbert.detector.box_ops import pairwise_iou
from vilbert.detector.model import BottomUpDetector


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


@dataclass
class AgreementReport:
    """Pooled over images: per-box cosines and argmax agreements, per-released-box best IoUs."""

    given_box_cosines: list[float] = field(default_factory=list)
    argmax_agreement: list[bool] = field(default_factory=list)
    best_ious: list[float] = field(default_factory=list)
    matched_cosines: list[float] = field(default_factory=list)
    box_counts: list[tuple[int, int]] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Medians and shares over every box of every image compared (NaN where nothing was measured)."""

        def median(values: list) -> float:
            return float(np.median(values)) if values else float("nan")

        def mean(values: list) -> float:
            return float(np.mean(values)) if values else float("nan")

        return {
            "images": float(len(self.box_counts)),
            "median_cosine_given_boxes": median(self.given_box_cosines),
            "class_argmax_agreement": mean(self.argmax_agreement),
            "median_best_iou": median(self.best_ious),
            "share_iou_at_least_0.5": mean([iou >= 0.5 for iou in self.best_ious]),
            "median_cosine_matched": median(self.matched_cosines),
            "mean_boxes_ours": mean([ours for ours, _ in self.box_counts]),
            "mean_boxes_released": mean([released for _, released in self.box_counts]),
        }


def compare_image(
    detector: BottomUpDetector, image_bgr: np.ndarray, released: RegionFeatures, report: AgreementReport
) -> None:
    """Add one image's measures to ``report`` (``released`` as the feature store returns it)."""
    boxes = released.pixel_boxes[1:]  # row 0 is the global region the reader prepends
    features = released.features[1:]
    given = detector.regions_for_boxes(image_bgr, boxes)
    report.given_box_cosines.extend(row_cosines(given.features.cpu().numpy(), features).tolist())
    if released.cls_prob is not None:
        ours = given.cls_prob.cpu().numpy().argmax(axis=1)
        report.argmax_agreement.extend((ours == released.cls_prob.argmax(axis=1)).tolist())
    detections = detector.detect(image_bgr)
    iou = pairwise_iou(torch.from_numpy(boxes), torch.from_numpy(detections.boxes)).numpy()
    best = iou.argmax(axis=1)
    report.best_ious.extend(iou.max(axis=1).tolist())
    report.matched_cosines.extend(row_cosines(features, detections.features[best]).tolist())
    report.box_counts.append((detections.num_boxes, int(boxes.shape[0])))
