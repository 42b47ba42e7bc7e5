"""The whole detector: one image in, its saved regions out (boxes, features, class distributions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vilbert.detector.box_head import BoxHead, RegionOutputs
from vilbert.detector.config import DetectorConfig
from vilbert.detector.preprocess import PreparedImage, prepare_image
from vilbert.detector.resnet import ResNetC4
from vilbert.detector.rpn import ProposalLayer, RPNHead
from vilbert.detector.selection import max_confidence, select_regions


@dataclass
class Detections:
    """One image's saved regions, as the feature files store them.

    ``boxes`` [n, 4] are in original-image pixels (the RPN proposals divided by the scale);
    ``features`` [n, D], ``cls_prob`` [n, classes], ``attr_prob`` [n, attributes] are float32.
    ``confidence`` [n] is the selection score (float64).
    """

    image_h: int
    image_w: int
    boxes: np.ndarray
    features: np.ndarray
    cls_prob: np.ndarray
    attr_prob: np.ndarray
    confidence: np.ndarray

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class Proposals:
    """All ``post_nms_top_n`` proposals of one image with their region outputs (before selection)."""

    boxes: torch.Tensor
    objectness: torch.Tensor
    regions: RegionOutputs


class BottomUpDetector(nn.Module):
    """Faster R-CNN ResNet-101 C4 with the attribute head, in the original test-time pipeline."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        super().__init__()
        self.config = config or DetectorConfig()
        cfg = self.config
        self.backbone = ResNetC4(cfg.blocks_per_stage[:3], cfg.stem_channels, cfg.res2_bottleneck, cfg.bn_eps)
        self.rpn = RPNHead(self.backbone.out_channels, cfg.rpn_channels, cfg.num_anchors)
        self.box_head = BoxHead(cfg, self.backbone.out_channels)
        self.proposal_layer = ProposalLayer(cfg)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.rpn.conv.weight.device

    def prepare(self, image_bgr: np.ndarray) -> PreparedImage:
        cfg = self.config
        return prepare_image(image_bgr, cfg.pixel_means, cfg.scale, cfg.max_size)

    @torch.no_grad()
    def propose(self, image: PreparedImage) -> Proposals:
        """Backbone, RPN and the head on every proposal: the Caffe net's forward pass."""
        inputs = image.tensor.to(self.device)
        res4 = self.backbone(inputs)
        logits, deltas = self.rpn(res4)
        boxes, objectness = self.proposal_layer(logits, deltas, image.input_h, image.input_w, image.scale)
        return Proposals(boxes=boxes, objectness=objectness, regions=self.box_head(res4, boxes))

    @torch.no_grad()
    def regions_for_boxes(self, image_bgr: np.ndarray, boxes: np.ndarray) -> RegionOutputs:
        """Features and class distributions for given boxes [n, 4] in original pixels (no RPN)."""
        image = self.prepare(image_bgr)
        res4 = self.backbone(image.tensor.to(self.device))
        rois = torch.as_tensor(np.asarray(boxes, dtype=np.float32), device=self.device) * np.float32(
            image.scale
        )
        return self.box_head(res4, rois)

    @torch.no_grad()
    def detect(self, image_bgr: np.ndarray) -> Detections:
        """The saved regions of one BGR image (the feature-generation script's per-image step)."""
        cfg = self.config
        image = self.prepare(image_bgr)
        proposals = self.propose(image)
        # The script divides the rois blob (float32) by the scale (a Python float) in float32.
        original = proposals.boxes / np.float32(image.scale)
        confidence = max_confidence(original, proposals.regions.cls_prob, cfg.class_nms_threshold)
        keep = select_regions(confidence, cfg.conf_threshold, cfg.min_boxes, cfg.max_boxes)
        regions = proposals.regions

        def rows(tensor: torch.Tensor) -> np.ndarray:
            return tensor[keep].cpu().numpy()

        return Detections(
            image_h=image.image_h,
            image_w=image.image_w,
            boxes=rows(original).astype(np.float32),
            features=rows(regions.features).astype(np.float32),
            cls_prob=rows(regions.cls_prob).astype(np.float32),
            attr_prob=rows(regions.attr_prob).astype(np.float32),
            confidence=rows(confidence),
        )

    def detect_many(self, images_bgr: list[np.ndarray]) -> list[Detections]:
        """One image at a time, never batched: batching pads, and padding changes the features."""
        return [self.detect(image) for image in images_bgr]
