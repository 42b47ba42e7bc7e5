"""Loading the public converted checkpoints into one canonical parameter layout.

Three conversions of the original Caffe weights are public; each names and orders some tensors
differently. The canonical layout is this package's module tree; every mapping below is exact and
has an inverse (used by the tests and by ``export_layout``):

==============  ==============================  ==============================  ==========================
canonical       ``lxmert`` (.bin, Hugging Face  ``detectron2`` (.pkl, the       ``bua`` (.pth, the other
                LXMERT demo)                    detectron2-based port)          port, Caffe ordering)
==============  ==============================  ==============================  ==========================
rpn.*           proposal_generator.rpn_head.*   same as lxmert                  proposal_generator.rpn_head.*
objectness      12 channels, fg - bg logit,     as lxmert                       24 channels: 12 bg then 12 fg
(12, fg - bg)   anchors size-major                                              logits, anchors ratio-major
anchor deltas   anchors size-major              as lxmert                       ratio-major (as canonical)
box_head.*      roi_heads.* / box_predictor.*   as lxmert                       as lxmert
cls_score       background row last             as lxmert                       background row first
bbox_pred       1,600 x 4 (no background)       as lxmert                       1,601 x 4
cls_embedding   cls_embedding, background last  as lxmert                       cls_embed, background first
fc_attr         fc_attr                         as lxmert                       attr_linear1
attr_score      attr_score, "no attribute" last as lxmert                       attr_linear2, first
==============  ==============================  ==============================  ==========================

Canonical 12-channel objectness is the difference of the two Caffe logits: the Caffe 2-way softmax
equals its sigmoid, and 24 -> 12 -> 24 writes (0, d), which maps back to d exactly. Background
box deltas, absent from the 1,600-class layouts, load as zeros (they are never used: the saved
boxes are proposals). BatchNorm ``num_batches_tracked`` counters and the lxmert file's stored
``anchor_generator.cell_anchors`` are accepted and ignored (anchors are always the original's).
Anything else missing or unexpected is an error listing the keys.

Reading never runs code: ``.pkl`` through the project's numpy-only restricted unpickler, torch
files with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vilbert.datasets.serialization import UnsafePickleError, safe_pickle_loads
from vilbert.detector.config import DetectorConfig
from vilbert.detector.model import BottomUpDetector
from vilbert.errors import BadInputError

LAYOUTS = ("canonical", "lxmert", "detectron2", "bua")
_SUFFIX_LAYOUT = {".bin": "lxmert", ".pkl": "detectron2", ".pth": "bua", ".pt": "canonical"}
CANONICAL_FORMAT = "vilbert-bottom-up-detector"
_IGNORED_SUFFIXES = ("num_batches_tracked", "anchor_generator.cell_anchors.0")

# canonical prefix -> prefix in the public layouts (the backbone is named alike everywhere)
_COMMON_PREFIXES = {
    "rpn.conv.": "proposal_generator.rpn_head.conv.",
    "rpn.objectness.": "proposal_generator.rpn_head.objectness_logits.",
    "rpn.anchor_deltas.": "proposal_generator.rpn_head.anchor_deltas.",
    "box_head.res5.": "roi_heads.res5.",
    "box_head.cls_score.": "roi_heads.box_predictor.cls_score.",
    "box_head.bbox_pred.": "roi_heads.box_predictor.bbox_pred.",
}
_ATTRIBUTE_PREFIXES = {
    "lxmert": {
        "box_head.cls_embedding.": "roi_heads.box_predictor.cls_embedding.",
        "box_head.fc_attr.": "roi_heads.box_predictor.fc_attr.",
        "box_head.attr_score.": "roi_heads.box_predictor.attr_score.",
    },
    "bua": {
        "box_head.cls_embedding.": "roi_heads.box_predictor.cls_embed.",
        "box_head.fc_attr.": "roi_heads.box_predictor.attr_linear1.",
        "box_head.attr_score.": "roi_heads.box_predictor.attr_linear2.",
    },
}
_ATTRIBUTE_PREFIXES["detectron2"] = _ATTRIBUTE_PREFIXES["lxmert"]


class CheckpointLayoutError(BadInputError):
    """A checkpoint that does not hold exactly the detector's parameters in the layout asked for."""


def _prefixes(layout: str) -> dict[str, str]:
    return {**_COMMON_PREFIXES, **_ATTRIBUTE_PREFIXES[layout]}


def _rename(name: str, mapping: dict[str, str]) -> str:
    for source, target in mapping.items():
        if name.startswith(source):
            return target + name[len(source) :]
    return name


def _anchor_permutation(config: DetectorConfig) -> torch.Tensor:
    """Index i of the size-major (detectron2) order -> the ratio-major (Caffe) anchor it holds."""
    ratios, scales = len(config.anchor_ratios), len(config.anchor_scales)
    return torch.tensor([r * scales + s for s in range(scales) for r in range(ratios)])


def _background_last(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([rows[1:], rows[:1]])


def _background_first(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([rows[-1:], rows[:-1]])


def _per_anchor(tensor: torch.Tensor, order: torch.Tensor, width: int) -> torch.Tensor:
    """Reorder the anchor groups (``width`` channels each) of a conv weight or bias."""
    grouped = tensor.reshape(-1, width, *tensor.shape[1:])
    return grouped[order].reshape(tensor.shape)


def _transforms(
    layout: str, config: DetectorConfig, inverse: bool
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Canonical-key -> value transform: public -> canonical, or canonical -> public with ``inverse``."""
    a = config.num_anchors
    if layout == "bua":
        if inverse:
            return {"rpn.objectness.": lambda t: torch.cat([torch.zeros_like(t), t])}
        return {"rpn.objectness.": lambda t: t[a:] - t[:a]}
    to_d2 = _anchor_permutation(config)
    to_caffe = torch.argsort(to_d2)
    anchors = to_caffe if not inverse else to_d2
    move = _background_first if not inverse else _background_last

    def bbox(t: torch.Tensor) -> torch.Tensor:
        if inverse:
            return t[4:]
        return torch.cat([torch.zeros_like(t[:4]), t])

    return {
        "rpn.objectness.": lambda t: _per_anchor(t, anchors, 1),
        "rpn.anchor_deltas.": lambda t: _per_anchor(t, anchors, 4),
        "box_head.cls_score.": move,
        "box_head.cls_embedding.": move,
        "box_head.attr_score.": move,
        "box_head.bbox_pred.": bbox,
    }


def _apply(name: str, value: torch.Tensor, transforms: dict[str, Callable]) -> torch.Tensor:
    for prefix, transform in transforms.items():
        if name.startswith(prefix):
            return transform(value)
    return value


def to_canonical(
    state: dict[str, Any], layout: str, config: DetectorConfig, source: str
) -> dict[str, torch.Tensor]:
    """A public layout's state dict in canonical names and order, strictly checked against ``config``."""
    if layout not in LAYOUTS:
        raise CheckpointLayoutError(f"{source}: unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    tensors = {k: torch.as_tensor(v) for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if layout != "canonical":
        reverse = {target: name for name, target in _prefixes(layout).items()}
        transforms = _transforms(layout, config, inverse=False)
        renamed = {_rename(k, reverse): v for k, v in tensors.items()}
        tensors = {k: _apply(k, v, transforms) for k, v in renamed.items()}
    _check_keys(tensors, config, layout, source)
    return tensors


def from_canonical(
    state: dict[str, torch.Tensor], layout: str, config: DetectorConfig
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_canonical` (used to test the mappings and to export)."""
    if layout == "canonical":
        return dict(state)
    transforms = _transforms(layout, config, inverse=True)
    prefixes = _prefixes(layout)
    return {_rename(k, prefixes): _apply(k, v, transforms) for k, v in state.items()}


def _check_keys(tensors: dict[str, torch.Tensor], config: DetectorConfig, layout: str, source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in BottomUpDetector(config).state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {', '.join(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {', '.join(unexpected)}")
    if wrong:
        shapes = ", ".join(f"{k} {list(tensors[k].shape)} != {list(expected[k])}" for k in wrong)
        problems.append(f"{len(wrong)} of the wrong shape: {shapes}")
    if problems:
        raise CheckpointLayoutError(f"{source} (layout {layout}): " + "; ".join(problems))


def _unwrap(obj: Any, source: str) -> dict[str, Any]:
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointLayoutError(f"{source}: not a state dict (a mapping of parameter names to tensors)")
    return obj


def read_checkpoint(path: str) -> tuple[dict[str, Any], DetectorConfig | None]:
    """The raw state dict of ``path`` and, for a canonical file, the config stored with it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights: no such file: {path}")
    if path.endswith(".pkl"):
        with open(path, "rb") as handle:
            data = handle.read()
        try:
            return _unwrap(safe_pickle_loads(data, path, allow_numpy=True), path), None
        except UnsafePickleError as err:
            raise CheckpointLayoutError(str(err)) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointLayoutError(f"{path}: cannot be read as a torch checkpoint: {first_line}") from None
    if isinstance(obj, dict) and obj.get("format") == CANONICAL_FORMAT:
        return _unwrap(obj.get("state_dict"), path), DetectorConfig.from_dict(obj.get("config", {}), path)
    return _unwrap(obj, path), None


def layout_of(path: str, layout: str | None) -> str:
    """The layout asked for, else the one the file's suffix implies (.bin/.pkl/.pth/.pt)."""
    if layout:
        return layout
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIX_LAYOUT:
        raise CheckpointLayoutError(f"{path}: cannot tell the layout from the suffix; pass --weights_layout")
    return _SUFFIX_LAYOUT[suffix]


def load_detector(
    path: str, config: DetectorConfig | None = None, layout: str | None = None, device: str = "cpu"
) -> BottomUpDetector:
    """A detector holding the weights of ``path``; a canonical file's stored architecture wins.

    ``config`` supplies the pipeline settings (scale, proposal counts, box limits).
    """
    state, stored = read_checkpoint(path)
    layout = layout_of(path, layout)
    config = config or DetectorConfig()
    if stored is not None:
        config = _with_pipeline(stored, config)
    tensors = to_canonical(state, layout, config, path)
    detector = BottomUpDetector(config)
    detector.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)
    return detector.to(device)


_PIPELINE_FIELDS = (
    "scale", "max_size", "pre_nms_top_n", "post_nms_top_n", "conf_threshold", "min_boxes", "max_boxes",
)  # fmt: skip


def _with_pipeline(architecture: DetectorConfig, pipeline: DetectorConfig) -> DetectorConfig:
    values = architecture.to_dict()
    values.update({name: getattr(pipeline, name) for name in _PIPELINE_FIELDS})
    return DetectorConfig.from_dict(values, "detector config")


def save_layout(detector: BottomUpDetector, layout: str, path: str) -> None:
    """Write ``detector``'s weights as a ``layout`` file (``.pkl`` as numpy arrays under ``model``)."""
    state = from_canonical(detector.state_dict(), layout, detector.config)
    if layout == "canonical":
        torch.save(
            {"format": CANONICAL_FORMAT, "config": detector.config.to_dict(), "state_dict": state}, path
        )
    elif layout == "detectron2":
        with open(path, "wb") as handle:
            pickle.dump({"model": {k: v.cpu().numpy() for k, v in state.items()}}, handle)
    elif layout == "bua":
        torch.save({"model": state}, path)
    else:
        torch.save(state, path)


def inventory(path: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every key of a checkpoint file with its shape, as stored (for ``verify_features.py``)."""
    state, _ = read_checkpoint(path)
    return [(k, tuple(np.shape(v))) for k, v in sorted(state.items())]
