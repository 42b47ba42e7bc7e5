"""Region features from raw images: the bottom-up-attention Faster R-CNN (ResNet-101 C4, Visual
Genome: 1,600 classes + background, 400 attributes + none) in plain PyTorch.

It follows the original Caffe test graph and its feature-generation script step by step (OpenCV
preprocessing, MSRA ResNet-101, 12-anchor RPN, RoI pooling, dilated res5, per-class NMS selection
of the proposals), so that features made here can stand in for the released ones. The user
documentation is ``docs/region_features.md``.
"""

from vilbert.detector.config import DetectorConfig, DetectorConfigError
from vilbert.detector.model import BottomUpDetector, Detections
from vilbert.detector.weights import CheckpointLayoutError, load_detector

__all__ = [
    "BottomUpDetector",
    "CheckpointLayoutError",
    "DetectorConfig",
    "DetectorConfigError",
    "Detections",
    "load_detector",
]
