"""Checks of decoded region records, and what to do with a record that fails them.

A NaN in one image's features, an ``image_w`` of 0 or boxes far outside the image do not fail
anywhere by themselves: they surface much later as "non-finite loss: step skipped", with no image
named. Every decoded record is therefore checked once, where it is decoded (the pretraining
loader checks a record's values where its collate copies them into the batch, so that they are read
once), and a bad one is named by file and key. The default is to refuse it (:class:`BadRecordError`,
a bad-input error); with ``on_bad_record="skip"`` the record is left out, each skip logged as a
counted warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, TypeVar, get_args

import numpy as np

from vilbert.errors import BadInputError

logger = logging.getLogger(__name__)

T = TypeVar("T")
BadRecordPolicy = Literal["error", "skip"]
BAD_RECORD_POLICIES: tuple[str, ...] = get_args(BadRecordPolicy)
BOX_SLACK_PIXELS = 4.0  # extractors round and pad boxes by a pixel or two; more means a wrong image size


class BadRecordError(BadInputError):
    """A decoded record whose values cannot be right (non-finite, empty image, box outside it)."""


class SkippedRecordError(BadRecordError):
    """A bad record that the ``"skip"`` policy leaves out: the caller takes another sample."""


def check_policy(policy: str, what: str = "on_bad_record") -> BadRecordPolicy:
    """``policy`` if it is one of :data:`BAD_RECORD_POLICIES`, else a one-line error naming ``what``."""
    if policy not in BAD_RECORD_POLICIES:
        raise BadInputError(f"{what}: {policy!r} is not one of {', '.join(BAD_RECORD_POLICIES)}")
    return policy  # type: ignore[return-value]


def _rows_problem(name: str, array: np.ndarray, num_boxes: int, cols: int | None) -> str | None:
    if array.ndim != 2 or array.shape[0] != num_boxes or (cols is not None and array.shape[1] != cols):
        expected = f"[{num_boxes}, {cols if cols is not None else 'D'}]"
        return f"{name} has shape {list(array.shape)}, expected {expected} (num_boxes = {num_boxes})"
    if not np.isfinite(array).all():
        row = int(np.argwhere(~np.isfinite(array))[0][0])
        return f"{name} holds a non-finite value (NaN or Inf) in region {row}"
    return None


def _boxes_problem(boxes: np.ndarray, image_w: int, image_h: int, slack: float) -> str | None:
    low = np.array([-slack, -slack, -slack, -slack], dtype=np.float64)
    high = np.array([image_w, image_h, image_w, image_h], dtype=np.float64) + slack
    outside = np.argwhere((boxes < low) | (boxes > high))
    if len(outside):
        row = int(outside[0][0])
        box = [round(float(v), 1) for v in boxes[row]]
        return f"box {row} {box} lies outside the {image_w}x{image_h} image (slack {slack:g} px)"
    return None


def region_record_problem(
    features: np.ndarray,
    boxes: np.ndarray,
    image_w: int,
    image_h: int,
    num_boxes: int,
    cls_prob: np.ndarray | None = None,
    slack: float = BOX_SLACK_PIXELS,
) -> str | None:
    """What is wrong with one image's regions (pixel boxes ``x1, y1, x2, y2``), or ``None``."""
    if image_w <= 0 or image_h <= 0:
        return f"image size {image_w}x{image_h} is not positive (image_w, image_h)"
    if num_boxes <= 0:
        return f"num_boxes is {num_boxes}, not positive"
    arrays = (("features", features, None), ("boxes", boxes, 4), ("cls_prob", cls_prob, None))
    for name, array, cols in arrays:
        if array is not None:
            problem = _rows_problem(name, np.asarray(array), num_boxes, cols)
            if problem is not None:
                return problem
    return _boxes_problem(np.asarray(boxes), image_w, image_h, slack)


def check_region_record(
    where: str,
    features: np.ndarray,
    boxes: np.ndarray,
    image_w: int,
    image_h: int,
    num_boxes: int,
    cls_prob: np.ndarray | None = None,
    slack: float = BOX_SLACK_PIXELS,
) -> None:
    """Raise :class:`BadRecordError` ``"WHERE: problem"`` when the record is damaged.

    ``where`` names the record, e.g. ``"features.lmdb key b'1000'"``: the file and the key.
    """
    problem = region_record_problem(features, boxes, image_w, image_h, num_boxes, cls_prob, slack)
    if problem is not None:
        raise BadRecordError(f"{where}: {problem}")


def check_finite_rows(where: str, name: str, rows: np.ndarray) -> None:
    """Raise :class:`BadRecordError` ``"WHERE: NAME holds a non-finite value ... in region R"``.

    The largest and smallest values are finite only if every value is (NaN propagates through both),
    so two vectorised reductions clear good rows; only suspect rows are looked at one by one.
    """
    if rows.size and not (
        np.isfinite(np.maximum.reduce(rows, axis=None)) and np.isfinite(np.minimum.reduce(rows, axis=None))
    ):
        raise BadRecordError(f"{where}: {_rows_problem(name, rows, len(rows), None)}")


class BadRecordCounter:
    """Applies a policy to bad records: re-raise (``"error"``) or count, warn and mark as skipped."""

    def __init__(self, policy: BadRecordPolicy = "error") -> None:
        self.policy = check_policy(policy)
        self.skipped = 0

    def handle(self, error: BadInputError) -> SkippedRecordError:
        """Raise ``error`` under ``"error"``; under ``"skip"`` log it and return the error to raise."""
        if self.policy == "error":
            raise error
        self.skipped += 1
        logger.warning("skipping bad record (%d skipped in this process): %s", self.skipped, error)
        return SkippedRecordError(str(error))


def build_skipping_bad(index: int, length: int, build: Callable[[int], T], what: str) -> T:
    """``build(index)``; when a record it reads was skipped, the next index's sample (cyclically),
    so a map-style dataset still returns one sample per index and batches keep their size."""
    for offset in range(length):
        try:
            return build((index + offset) % length)
        except SkippedRecordError:
            continue
    raise BadRecordError(f"{what}: every sample reads a skipped bad record; nothing left to train on")
