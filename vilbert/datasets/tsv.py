"""Bottom-up-attention TSV files (the Faster R-CNN extractor's output) and their conversion to LMDB.

Columns, tab-separated, no header: ``image_id, image_w, image_h, num_boxes, boxes, features``
(base64 float32) plus ``cls_prob`` where the extractor saved it. One image per line; rows are
megabytes long, so the csv field-size limit is raised.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from vilbert.datasets.captions import CaptionFileError
from vilbert.datasets.features import (
    PretrainDatapoint,
    PretrainingLMDBWriter,
    RegionFeatureWriter,
    Serializer,
)
from vilbert.datasets.validation import check_region_record
from vilbert.errors import BadInputError

logger = logging.getLogger(__name__)

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
OPTIONAL_FIELDS = ("cls_prob",)


class TSVFormatError(BadInputError):
    """A TSV line that is truncated or malformed; the message names file and line."""


def _raise_field_size_limit() -> None:
    limit = sys.maxsize
    while True:  # C long may be 32-bit (Windows): back off until accepted
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def _float32(text: str, name: str, rows: int, cols: int | None) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadInputError(f"column {name} is not valid base64 ({err})") from None
    if len(raw) % 4:
        raise BadInputError(f"column {name} holds {len(raw)} bytes, not float32 data")
    array = np.frombuffer(raw, dtype=np.float32)
    if cols is None and array.size % rows == 0:
        cols = array.size // rows
    if cols is None or array.size != rows * cols:
        expected = f"{rows} x {cols}" if cols is not None else f"a multiple of {rows}"
        raise BadInputError(f"column {name} holds {array.size} floats, expected {expected}")
    return array.reshape(rows, cols)


def _parse_row(row: list[str], feature_dim: int) -> dict[str, Any]:
    if len(row) not in (len(TSV_FIELDS), len(TSV_FIELDS) + len(OPTIONAL_FIELDS)):
        raise BadInputError(
            f"expected {len(TSV_FIELDS)} or {len(TSV_FIELDS) + 1} tab-separated columns "
            f"({', '.join(TSV_FIELDS + OPTIONAL_FIELDS)}), got {len(row)}"
        )
    image_id: int | str = int(row[0]) if row[0].isdigit() else row[0]
    try:
        image_w, image_h, num_boxes = int(float(row[1])), int(float(row[2])), int(row[3])
    except ValueError as err:
        raise BadInputError(f"bad image_w/image_h/num_boxes: {err}") from None
    if num_boxes <= 0:
        raise BadInputError(f"num_boxes must be positive, got {num_boxes}")
    record: dict[str, Any] = {
        "image_id": image_id,
        "image_w": image_w,
        "image_h": image_h,
        "num_boxes": num_boxes,
        "boxes": _float32(row[4], "boxes", num_boxes, 4),
        "features": _float32(row[5], "features", num_boxes, feature_dim),
    }
    if len(row) > len(TSV_FIELDS):
        record["cls_prob"] = _float32(row[6], "cls_prob", num_boxes, None)
    return record


def iter_bottom_up_tsv(path: str, feature_dim: int = 2048) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each image of ``path``; a bad line raises :class:`TSVFormatError`."""
    _raise_field_size_limit()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise TSVFormatError(f"{path}:{reader.line_num}: {err}") from None
            if not row:
                continue
            try:
                record = _parse_row(row, feature_dim)
            except ValueError as err:
                raise TSVFormatError(f"{path}:{reader.line_num}: {err} (truncated line?)") from None
            yield reader.line_num, record


def read_bottom_up_tsv(path: str, feature_dim: int = 2048) -> Iterator[dict[str, Any]]:
    """Records ``image_id, image_w, image_h, num_boxes, boxes [n,4], features [n,D]`` (+ ``cls_prob``)."""
    for _, record in iter_bottom_up_tsv(path, feature_dim):
        yield record


@dataclass
class ConversionStats:
    """What a conversion wrote, and how many images had no caption (left out of the pretraining LMDB)."""

    images: int = 0
    region_images: int = 0
    pretrain_datapoints: int = 0
    missing_captions: int = 0


def convert_tsv_to_lmdb(
    inputs: Sequence[str],
    output: str | None = None,
    pretrain_output: str | None = None,
    captions: Mapping[str, str] | None = None,
    overwrite: bool = False,
    feature_dim: int = 2048,
    serializer: Serializer = "msgpack",
    progress: bool = False,
    captions_source: str = "the captions",
) -> ConversionStats:
    """Convert TSV files into a region-feature LMDB (``output``) and/or a pretraining LMDB.

    Both outputs are written in one pass and only appear once complete; every record is checked
    (finite values, boxes inside the image) and named by file and line when it is not. An output
    that would hold no image (an empty TSV, or no image with a caption in ``captions_source``) is
    an error, and nothing is written.
    """
    if output is None and pretrain_output is None:
        raise BadInputError("nothing to write: give an output and/or a pretraining output path")
    if pretrain_output is not None and captions is None:
        raise BadInputError("a pretraining LMDB needs captions (image id -> caption)")
    stats = ConversionStats()
    with contextlib.ExitStack() as stack:
        region_writer = pretrain_writer = None
        if output is not None:
            region_writer = stack.enter_context(RegionFeatureWriter(output, overwrite=overwrite))
        if pretrain_output is not None:
            pretrain_writer = stack.enter_context(
                PretrainingLMDBWriter(pretrain_output, serializer=serializer, overwrite=overwrite)
            )
        bar = stack.enter_context(tqdm(desc="images", unit="img", disable=not progress))
        for path in inputs:
            for lineno, record in iter_bottom_up_tsv(path, feature_dim):
                where = f"{path}:{lineno}"
                _check_record(record, where)
                if region_writer is not None:
                    try:
                        region_writer.add(record)
                    except ValueError as err:
                        raise TSVFormatError(f"{where}: {err}") from None
                    stats.region_images += 1
                if pretrain_writer is not None:
                    _add_pretraining(pretrain_writer, record, captions or {}, where, stats)
                stats.images += 1
                bar.update(1)
        _refuse_empty(stats, inputs, pretrain_output, captions_source)
    if stats.missing_captions:
        logger.warning("%d images without a caption left out of %s", stats.missing_captions, pretrain_output)
    return stats


def _check_record(record: Mapping[str, Any], where: str) -> None:
    check_region_record(
        f"{where} (image {record['image_id']!r})",
        record["features"],
        record["boxes"],
        record["image_w"],
        record["image_h"],
        record["num_boxes"],
        record.get("cls_prob"),
    )


def _refuse_empty(
    stats: ConversionStats, inputs: Sequence[str], pretrain_output: str | None, captions_source: str
) -> None:
    """Raise (inside the writers' block, so nothing is written) when an output would be empty."""
    if stats.images == 0:
        raise TSVFormatError(f"{', '.join(inputs)}: no image rows; nothing to convert")
    if pretrain_output is not None and stats.pretrain_datapoints == 0:
        raise CaptionFileError(
            f"{captions_source}: none of the {stats.images} images of {', '.join(inputs)} has a caption "
            f"there (image ids must match the TSV's first column); {pretrain_output} not written"
        )


def _add_pretraining(
    writer: PretrainingLMDBWriter,
    record: Mapping[str, Any],
    captions: Mapping[str, str],
    where: str,
    stats: ConversionStats,
) -> None:
    caption = captions.get(str(record["image_id"]))
    if caption is None:
        stats.missing_captions += 1
        return
    if "cls_prob" not in record:
        raise TSVFormatError(f"{where}: no cls_prob column, which the pretraining LMDB needs")
    writer.add(
        PretrainDatapoint(
            features=record["features"],
            cls_prob=record["cls_prob"],
            boxes=record["boxes"],
            num_boxes=record["num_boxes"],
            image_h=record["image_h"],
            image_w=record["image_w"],
            image_id=str(record["image_id"]),
            caption=caption,
        )
    )
    stats.pretrain_datapoints += 1
