"""The pipeline flags both detector tools share (defaults: the original feature-generation script)."""

from __future__ import annotations

import argparse

from vilbert.detector.config import DetectorConfig

_FLAGS = (
    ("min_boxes", int, "fewest regions saved per image"),
    ("max_boxes", int, "most regions saved per image (36 and 36: the fixed-36 features)"),
    ("conf_threshold", float, "confidence a region needs when the count is within the limits"),
    ("scale", int, "shortest image side after resizing"),
    ("max_size", int, "cap on the longest side after resizing"),
    ("pre_nms_top_n", int, "RPN proposals kept before NMS"),
    ("post_nms_top_n", int, "RPN proposals kept after NMS"),
)


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pipeline (defaults: the original feature-generation script)")
    defaults = DetectorConfig()
    for name, kind, text in _FLAGS:
        group.add_argument(f"--{name}", type=kind, default=getattr(defaults, name), help=text)


def pipeline_config(args: argparse.Namespace) -> DetectorConfig:
    """The default architecture with the pipeline flags of ``args`` (a bad combination is bad input)."""
    return DetectorConfig(**{name: getattr(args, name) for name, _, _ in _FLAGS})
