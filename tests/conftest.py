"""Shared fixtures: paths to the committed test data and the tiny configs."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vilbert.datasets.synthetic import SyntheticWorldConfig, generate_synthetic_world  # noqa: E402

# The published ``interbert_tasks.yml`` of the InterBERT release: every task's keys, in this order.
PUBLISHED_TASK_KEYS = [
    "name", "type", "loss", "task_id", "dataroot", "features_h5path1", "features_h5path2",
    "train_annotations_jsonpath", "val_annotations_jsonpath", "max_seq_length", "max_region_num",
    "batch_size", "train_split", "val_split", "lr", "num_epoch",
]  # fmt: skip


def task_world(root: str, seed: int, flickr: tuple[int, int, int], vcr: tuple[int, int, int]) -> str:
    """A ``--small`` synthetic world sized for task tests: 2 + 2 pretraining images, Flickr30K images
    and VCR questions per (train, val, test) split as given. Returns its task YAML."""
    config = dataclasses.replace(
        SyntheticWorldConfig.small(seed=seed),
        pretrain_train_images=2,
        pretrain_val_images=2,
        flickr_train_images=flickr[0],
        flickr_val_images=flickr[1],
        flickr_test_images=flickr[2],
        vcr_train_questions=vcr[0],
        vcr_val_questions=vcr[1],
        vcr_test_questions=vcr[2],
    )
    return generate_synthetic_world(root, config).tasks_yaml


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: the tiny models' ops are too small to share, and on a
    busy machine the threads mostly wait for each other (subprocesses get OMP_NUM_THREADS=1 too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class IdTokenizer:
    """The tokenizer interface of the sample builder over captions written as WordPiece ids: no
    vocabulary file; the special ids are bert-base-uncased's."""

    cls_token_id, sep_token_id, mask_token_id = 101, 102, 103

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, caption: str) -> list[int]:
        return [int(word) for word in caption.split()]


def random_pretraining_samples(
    config, count: int, seed: int, boxes: tuple[int, int], caption_tokens: tuple[int, int], **builder_options
) -> list[dict]:
    """Masked pretraining samples of random datapoints with the config's feature and class sizes:
    ``boxes`` and ``caption_tokens`` bound the regions and the caption ids ([low, high)) per image."""
    from vilbert.datasets.concept_cap import PretrainingSampleBuilder, sample_rng
    from vilbert.datasets.features import PretrainDatapoint

    rng = np.random.default_rng(seed)
    points = []
    for index in range(count):
        n = int(rng.integers(*boxes))
        x1, y1 = rng.uniform(0, 200, n), rng.uniform(0, 150, n)
        scores = rng.random((n, config.v_target_size), dtype=np.float32)
        points.append(
            PretrainDatapoint(
                features=rng.normal(size=(n, config.v_feature_size)).astype(np.float32),
                cls_prob=scores / scores.sum(1, keepdims=True),
                boxes=np.stack([x1, y1, x1 + 90, y1 + 80], 1).astype(np.float32),
                num_boxes=n,
                image_h=240,
                image_w=320,
                image_id=str(index),
                caption=" ".join(
                    str(2000 + t) for t in rng.integers(0, 500, int(rng.integers(*caption_tokens)))
                ),
            )
        )
    captions = {point.image_id: point.caption for point in points}
    builder = PretrainingSampleBuilder(IdTokenizer(config.vocab_size), captions, **builder_options)
    return [builder.build(point, sample_rng(seed, 0, 0, i)) for i, point in enumerate(points)]


@pytest.fixture
def repo_root() -> str:
    return ROOT


@pytest.fixture
def data_dir() -> str:
    return DATA
