"""Hard-negative pools for Flickr30K retrieval training (``hard_negative.pkl``, ``docs/data.md`` §3).

For each training image, the indices (into ``train_image_list``) of the images most similar to it,
position 0 being the image itself. Similarity here is the cosine of the global region features
(the mean of each image's region features), computed in chunks so 30k images fit in memory.
Reading the file back is the retrieval dataset's job (``vilbert.datasets.retrieval``).

An existing pool is never replaced without ``overwrite`` (as every other writer of the project),
and an image whose global feature is not finite is an error naming it: its cosine with every
other image would be NaN and its "neighbours" arbitrary.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vilbert.datasets.features import RegionFeatureStore
from vilbert.datasets.jsonl import AnnotationError, read_jsonl_records
from vilbert.datasets.validation import BadRecordError
from vilbert.errors import BadInputError

logger = logging.getLogger(__name__)


def flickr_image_id(annotation: Mapping[str, Any]) -> int:
    """Flickr30K's image id: the integer stem of ``img_path`` (``"1000092795.jpg"`` → 1000092795).

    A missing or malformed ``img_path`` is an :class:`AnnotationError` saying what is wrong; the
    caller, which knows the file and line, puts them in front.
    """
    img_path = annotation.get("img_path")
    if not isinstance(img_path, str):
        raise AnnotationError("missing or non-string field 'img_path'")
    stem = os.path.splitext(os.path.basename(img_path))[0]
    if not stem.isdigit():
        raise AnnotationError(f"'img_path' {img_path!r} does not name an integer image id")
    return int(stem)


def global_features(store: RegionFeatureStore, image_ids: Sequence[int | str]) -> np.ndarray:
    """[N, D] float32: each image's global region (row 0 of its features), refused when not finite."""
    rows = [store[image_id].features[0] for image_id in image_ids]
    features = np.stack(rows).astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        raise BadRecordError(
            f"{store.path}: global feature of image {image_ids[bad[0]]} is not finite (NaN or Inf; "
            f"{len(bad)} such images); its hard negatives would be arbitrary"
        )
    return features


def nearest_by_cosine(features: np.ndarray, pool_size: int, chunk: int = 1024) -> np.ndarray:
    """[N, K] indices of the K = min(pool_size, N) most cosine-similar rows, self first, best first."""
    n = features.shape[0]
    if n == 0:
        raise BadInputError("cannot build a hard-negative pool from zero images")
    k = min(pool_size, n)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = features / np.maximum(norms, np.finfo(np.float32).tiny)
    pool = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sims = unit[start:stop] @ unit.T
        sims[np.arange(stop - start), np.arange(start, stop)] = np.inf  # self always first
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        pool[start:stop] = np.take_along_axis(top, order, axis=1)
    return pool


def build_hard_negative_pool(
    store: RegionFeatureStore, image_ids: Sequence[int | str], pool_size: int = 100, chunk: int = 1024
) -> np.ndarray:
    """``train_hard_pool`` for ``image_ids``: row i = [i, its nearest images by global-feature cosine]."""
    return nearest_by_cosine(global_features(store, image_ids), pool_size, chunk)


def refuse_existing(path: str, overwrite: bool) -> None:
    """An existing pool is replaced only when asked to."""
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")


def write_hard_negatives(
    path: str, image_ids: Sequence[int | str], pool: np.ndarray, overwrite: bool = False
) -> None:
    """Write the published pickle layout: ``{"train_image_list": [...], "train_hard_pool": array}``."""
    refuse_existing(path, overwrite)
    if len(image_ids) != pool.shape[0]:
        raise BadInputError(f"{path}: {len(image_ids)} image ids but {pool.shape[0]} pool rows")
    payload = {"train_image_list": list(image_ids), "train_hard_pool": np.asarray(pool, dtype=np.int64)}
    data = pickle.dumps(payload, protocol=4)
    # Temp file + rename (as vilbert.atomic does, without importing torch into a data tool).
    handle, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path) or "."
    )
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.remove(temporary)
        raise


def hard_negatives_from_annotations(
    features_path: str,
    annotations_path: str,
    output_path: str,
    pool_size: int = 100,
    chunk: int = 1024,
    overwrite: bool = False,
) -> tuple[list[int], np.ndarray]:
    """Build and write ``hard_negative.pkl`` for the images of a Flickr30K ``.jsonline`` file."""
    refuse_existing(output_path, overwrite)  # before the work, not after it
    image_ids: list[int] = []
    for lineno, annotation in read_jsonl_records(annotations_path):
        try:
            image_ids.append(flickr_image_id(annotation))
        except AnnotationError as err:
            raise AnnotationError(f"{annotations_path}:{lineno}: {err}") from None
    image_ids = list(dict.fromkeys(image_ids))
    pool = build_hard_negative_pool(RegionFeatureStore(features_path), image_ids, pool_size, chunk)
    write_hard_negatives(output_path, image_ids, pool, overwrite=overwrite)
    logger.info("wrote a %d x %d hard-negative pool to %s", pool.shape[0], pool.shape[1], output_path)
    return image_ids, pool
