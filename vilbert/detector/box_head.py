"""The per-region head: res5 on 14x14 RoI pools, the 2,048-d feature, classes and attributes.

res5 runs at stride 1 with dilation 2 in all three blocks (the bottom-up-attention change to the
C4 head), so the pooled 14x14 stays 14x14 and is averaged into the region feature (``pool5``).
Class scores are 1,601-way with background at index 0; the attribute branch embeds the argmax
class (256-d), concatenates it with the feature and predicts 401 attributes (index 0: none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vilbert.detector.box_ops import roi_pool
from vilbert.detector.config import DetectorConfig
from vilbert.detector.resnet import make_stage


@dataclass
class RegionOutputs:
    """Per-RoI outputs: ``features`` [R, D], ``cls_prob`` [R, classes], ``attr_prob`` [R, attributes]."""

    features: torch.Tensor
    cls_prob: torch.Tensor
    attr_prob: torch.Tensor


class BoxHead(nn.Module):
    """RoI pooling on res4, dilated res5, average pooling, and the class and attribute predictors."""

    def __init__(self, config: DetectorConfig, in_channels: int) -> None:
        super().__init__()
        self.config = config
        width = config.res2_bottleneck
        self.res5 = make_stage(
            config.blocks_per_stage[3], in_channels, 8 * width, 32 * width, 1, 2, config.bn_eps
        )
        dim = config.feature_dim
        self.cls_score = nn.Linear(dim, config.num_classes)
        # Class-specific box regression (1,601 x 4). Kept so that checkpoints load strictly; the
        # saved boxes are the proposals, never these regressed ones.
        self.bbox_pred = nn.Linear(dim, 4 * config.num_classes)
        self.cls_embedding = nn.Embedding(config.num_classes, config.class_embedding_dim)
        self.fc_attr = nn.Linear(dim + config.class_embedding_dim, config.attribute_hidden)
        self.attr_score = nn.Linear(config.attribute_hidden, config.num_attributes)

    def forward(self, res4: torch.Tensor, rois: torch.Tensor) -> RegionOutputs:
        """``rois`` [R, 4] in input (resized) pixels."""
        cfg = self.config
        pooled = roi_pool(res4, rois, cfg.pooled_size, 1.0 / cfg.feat_stride)
        features = self.res5(pooled).mean(dim=(2, 3))
        scores = self.cls_score(features)
        embedded = self.cls_embedding(scores.argmax(dim=1))
        hidden = torch.relu(self.fc_attr(torch.cat([features, embedded], dim=1)))
        return RegionOutputs(
            features=features,
            cls_prob=torch.softmax(scores, dim=1),
            attr_prob=torch.softmax(self.attr_score(hidden), dim=1),
        )
