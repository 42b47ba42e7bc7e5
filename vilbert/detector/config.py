"""The detector's settings as one dataclass: the architecture and the test-time pipeline.

Defaults are the original model and its feature-generation script. Tests shrink the image scale
and the proposal counts (the full-size network on CPU is slow) and, for the weight-layout round
trips, the widths; everything else stays as published.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from vilbert.errors import BadInputError

# The BGR channel means the Caffe model was trained with (subtracted before resizing).
CAFFE_PIXEL_MEANS = (102.9801, 115.9465, 122.7717)


class DetectorConfigError(BadInputError):
    """A detector setting (a flag or a checkpoint's stored config) that cannot work."""


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture and pipeline of the bottom-up-attention detector.

    Widths follow ResNet: a stage's bottleneck is ``res2_bottleneck * 2**k`` and its output four
    times that, so the region feature is ``res2_bottleneck * 32`` wide (2,048 by default).
    """

    # preprocessing
    pixel_means: tuple[float, float, float] = CAFFE_PIXEL_MEANS
    scale: int = 600
    max_size: int = 1000
    # architecture
    blocks_per_stage: tuple[int, int, int, int] = (3, 4, 23, 3)
    stem_channels: int = 64
    res2_bottleneck: int = 64
    bn_eps: float = 1e-5
    rpn_channels: int = 512
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_scales: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)
    feat_stride: int = 16
    pooled_size: int = 14
    num_classes: int = 1601
    num_attributes: int = 401
    class_embedding_dim: int = 256
    attribute_hidden: int = 512
    # proposals
    pre_nms_top_n: int = 6000
    post_nms_top_n: int = 300
    rpn_nms_threshold: float = 0.7
    rpn_min_size: int = 16
    # selection of the saved regions
    class_nms_threshold: float = 0.3
    conf_threshold: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100

    def __post_init__(self) -> None:
        checks = [
            (self.scale > 0 and self.max_size > 0, "--scale and --max_size must be positive"),
            (self.pre_nms_top_n > 0 and self.post_nms_top_n > 0, "proposal counts must be positive"),
            (1 <= self.min_boxes <= self.max_boxes, "need 1 <= --min_boxes <= --max_boxes"),
            (0.0 <= self.conf_threshold <= 1.0, "--conf_threshold must lie in [0, 1]"),
            (
                len(self.blocks_per_stage) == 4 and min(self.blocks_per_stage) >= 1,
                "four stages of >= 1 block",
            ),
            (self.num_classes >= 2 and self.num_attributes >= 2, "classes and attributes include background"),
        ]
        for ok, message in checks:
            if not ok:
                raise DetectorConfigError(f"detector config: {message}")

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_ratios) * len(self.anchor_scales)

    @property
    def feature_dim(self) -> int:
        return self.res2_bottleneck * 32

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so a checkpoint holding it loads with ``weights_only=True``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DetectorConfigError(f"{source}: unknown detector config key(s): {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
