"""From a folder (or list) of images to the feature LMDB and/or the pretraining LMDB, resumably.

Work is staged beside the first output in a hidden folder ``.NAME.extract/`` of shard files, each
written atomically once its images are done (``shard-000000.npz``: ids, sizes and the concatenated
regions, read back with ``allow_pickle=False``). A rerun of the same command reads the shards'
image ids and skips those images, so a crash loses at most one shard. When every image is done the
LMDBs are written from the shards through the project's atomic writers, which make them appear
only once complete, and the staging folder is removed.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from vilbert.atomic import atomic_write
from vilbert.datasets.features import PretrainDatapoint, write_pretraining_lmdb, write_region_features
from vilbert.detector.model import BottomUpDetector, Detections
from vilbert.detector.preprocess import UnreadableImageError, read_image_bgr
from vilbert.errors import BadInputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageListError(BadInputError):
    """``--images`` names no readable folder or list, or lists nothing."""


def list_images(spec: str) -> list[str]:
    """Image paths of a folder (sorted, by suffix) or of a text file (one path a line, relative to it)."""
    if os.path.isdir(spec):
        names = sorted(n for n in os.listdir(spec) if n.lower().endswith(IMAGE_SUFFIXES))
        paths = [os.path.join(spec, n) for n in names]
    elif os.path.isfile(spec):
        base = os.path.dirname(os.path.abspath(spec))
        with open(spec, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
        paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in lines if p]
    else:
        raise ImageListError(f"--images: {spec} is neither a folder nor a list file")
    if not paths:
        raise ImageListError(f"--images: {spec} holds no images")
    return paths


def image_id_of(path: str) -> int | str:
    """The file name's stem; an integer when it is one (Flickr30K and CC ids are)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else stem


def _duplicate_check(paths: list[str]) -> None:
    seen: dict[str, str] = {}
    for path in paths:
        key = str(image_id_of(path))
        if key in seen:
            raise ImageListError(f"--images: {seen[key]} and {path} have the same image id {key!r}")
        seen[key] = path


@dataclass
class StagedImage:
    """One image's saved regions as staged (and as both LMDB writers take them)."""

    image_id: str
    image_h: int
    image_w: int
    boxes: np.ndarray
    features: np.ndarray
    cls_prob: np.ndarray


class StagingArea:
    """The hidden folder of finished shards beside the output."""

    def __init__(self, output: str) -> None:
        parent, base = os.path.split(os.path.abspath(output))
        self.folder = os.path.join(parent, f".{base}.extract")

    def shards(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        names = sorted(n for n in os.listdir(self.folder) if n.startswith("shard-") and n.endswith(".npz"))
        return [os.path.join(self.folder, n) for n in names]

    def done_ids(self) -> set[str]:
        done: set[str] = set()
        for shard in self.shards():
            with np.load(shard, allow_pickle=False) as data:
                done.update(str(i) for i in data["image_ids"])
        return done

    def write_shard(self, images: list[StagedImage]) -> None:
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"shard-{len(self.shards()):06d}.npz")
        arrays = {
            "image_ids": np.array([i.image_id for i in images]),
            "image_h": np.array([i.image_h for i in images], dtype=np.int64),
            "image_w": np.array([i.image_w for i in images], dtype=np.int64),
            "num_boxes": np.array([i.boxes.shape[0] for i in images], dtype=np.int64),
            "boxes": np.concatenate([i.boxes for i in images]),
            "features": np.concatenate([i.features for i in images]),
            "cls_prob": np.concatenate([i.cls_prob for i in images]),
        }
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write(path, lambda handle: handle.write(buffer.getvalue()))

    def images(self) -> Iterator[StagedImage]:
        for shard in self.shards():
            with np.load(shard, allow_pickle=False) as data:
                offsets = np.concatenate([[0], np.cumsum(data["num_boxes"])])
                boxes, features, cls_prob = data["boxes"], data["features"], data["cls_prob"]
                for i, image_id in enumerate(data["image_ids"]):
                    rows = slice(offsets[i], offsets[i + 1])
                    yield StagedImage(
                        str(image_id), int(data["image_h"][i]), int(data["image_w"][i]),
                        boxes[rows], features[rows], cls_prob[rows],
                    )  # fmt: skip

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class ExtractionJob:
    """What to extract and where: ``output`` (feature LMDB) and/or ``pretrain_output`` (+ captions)."""

    images: list[str]
    output: str | None = None
    pretrain_output: str | None = None
    captions: dict[str, str] | None = None
    captions_source: str = "the captions"
    overwrite: bool = False
    skip_bad_images: bool = False
    shard_size: int = 256
    progress: bool = True

    def outputs(self) -> list[str]:
        return [p for p in (self.output, self.pretrain_output) if p]


@dataclass
class ExtractionStats:
    """Counts of one run: images extracted now, found already staged, unreadable, without a caption."""

    extracted: int = 0
    already_done: int = 0
    bad_images: list[str] = field(default_factory=list)
    without_caption: int = 0
    written: dict[str, int] = field(default_factory=dict)


def _staged(image_id: int | str, detections: Detections) -> StagedImage:
    return StagedImage(
        str(image_id), detections.image_h, detections.image_w,
        detections.boxes, detections.features, detections.cls_prob,
    )  # fmt: skip


def _check_outputs(job: ExtractionJob) -> None:
    if not job.outputs():
        raise BadInputError("give --output and/or --pretrain_output")
    if job.pretrain_output and job.captions is None:
        raise BadInputError("--pretrain_output needs --captions")
    for path in job.outputs():
        if os.path.lexists(path) and not job.overwrite:
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


def _extract_remaining(
    detector: BottomUpDetector, job: ExtractionJob, staging: StagingArea, stats: ExtractionStats
) -> None:
    done = staging.done_ids()
    todo = [p for p in job.images if str(image_id_of(p)) not in done]
    stats.already_done = len(job.images) - len(todo)
    if stats.already_done:
        logger.info(
            "resuming: %d of %d images already extracted in %s",
            stats.already_done,
            len(job.images),
            staging.folder,
        )
    pending: list[StagedImage] = []
    for path in tqdm(todo, desc="extracting", unit="image", disable=not job.progress):
        try:
            image = read_image_bgr(path)
        except UnreadableImageError as err:
            if not job.skip_bad_images:
                raise
            logger.warning("skipping %s", err)
            stats.bad_images.append(path)
            continue
        pending.append(_staged(image_id_of(path), detector.detect(image)))
        stats.extracted += 1
        if len(pending) >= job.shard_size:
            staging.write_shard(pending)
            pending = []
    if pending:
        staging.write_shard(pending)


def _write_outputs(job: ExtractionJob, staging: StagingArea, stats: ExtractionStats) -> None:
    if job.output:
        records = (
            {"image_id": _plain_id(s.image_id), "image_h": s.image_h, "image_w": s.image_w,
             "num_boxes": s.boxes.shape[0], "boxes": s.boxes, "features": s.features, "cls_prob": s.cls_prob}
            for s in staging.images()
        )  # fmt: skip
        stats.written[job.output] = write_region_features(job.output, records, overwrite=job.overwrite)
    if job.pretrain_output:
        assert job.captions is not None
        stats.written[job.pretrain_output] = write_pretraining_lmdb(
            job.pretrain_output,
            _datapoints(staging, job.captions, job.captions_source, stats),
            overwrite=job.overwrite,
        )


def _plain_id(image_id: str) -> int | str:
    return int(image_id) if image_id.isdigit() else image_id


def _datapoints(
    staging: StagingArea, captions: dict[str, str], source: str, stats: ExtractionStats
) -> Iterator[PretrainDatapoint]:
    for s in staging.images():
        caption = captions.get(s.image_id)
        if caption is None:
            stats.without_caption += 1
            logger.warning(
                "image %s has no caption in %s; left out of the pretraining LMDB", s.image_id, source
            )
            continue
        yield PretrainDatapoint(
            features=s.features, cls_prob=s.cls_prob, boxes=s.boxes, num_boxes=s.boxes.shape[0],
            image_h=s.image_h, image_w=s.image_w, image_id=s.image_id, caption=caption,
        )  # fmt: skip


def extract_to_lmdb(detector: BottomUpDetector, job: ExtractionJob) -> ExtractionStats:
    """Run ``job``: extract what is not staged yet, then write the LMDBs and drop the staging."""
    _check_outputs(job)
    _duplicate_check(job.images)
    staging = StagingArea(job.outputs()[0])
    stats = ExtractionStats()
    _extract_remaining(detector, job, staging, stats)
    _write_outputs(job, staging, stats)
    staging.remove()
    return stats
