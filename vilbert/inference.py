"""Using a trained InterBERT: which images match a caption, which captions match an image.

Scores are those of ``eval_retrieval.py``: the same tokenisation (``encode_captions``), the same
region padding (``pad_regions``), the same image chunks and the same :class:`RetrievalScorer`, so a
caption ranked here against the images of a split gets exactly the row of that split's score
matrix (bitwise when the same captions and images are scored together; otherwise a block may
round differently, by ~1e-7).

Images are scored in banks of at most ``images_per_bank`` (what fits the memory budget), so a
whole feature LMDB can be ranked without holding every embedded image at once.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vilbert.checkpoint import (
    CheckpointError,
    check_backbone_loaded,
    load_state_dict_into,
    normalize_keys,
    read_state_dict,
)
from vilbert.config import BertConfig
from vilbert.datasets.features import MissingImageError, RegionFeatureStore
from vilbert.datasets.retrieval import collate_retrieval, encode_captions, pad_regions
from vilbert.errors import BadInputError
from vilbert.metrics import top_k_images
from vilbert.model_folder import (
    TASK_HEAD_KEY,
    VOCAB_NAME,
    detect_task,
    is_model_folder,
    read_folder_config,
)
from vilbert.modeling import InterBertForMultiModalPreTraining, InterBertForVLTasks
from vilbert.precision import Precision
from vilbert.retrieval_eval import IMAGE_CHUNK
from vilbert.retrieval_scorer import RetrievalScorer, block_size, default_memory_budget
from vilbert.tokenization import BERT_BASE_UNCASED, BertTokenizer

logger = logging.getLogger(__name__)

FLOAT_BYTES = 4
ITM_HEAD = "cls.bi_seq_relationship.weight"


class InferenceError(BadInputError):
    """A model, feature file, caption or image id that cannot be used as asked."""


@dataclass
class LoadedModel:
    """A model with an ITM head, in eval mode, and the tokenizer it was trained with."""

    model: nn.Module
    tokenizer: BertTokenizer
    source: str

    @property
    def config(self) -> BertConfig:
        return self.model.config


def _vocabulary(model_path: str, bert_model: str | None) -> str:
    """``bert_model`` when given, else the model folder's own ``vocab.txt``, else bert-base-uncased."""
    if bert_model:
        return bert_model
    if os.path.isdir(model_path) and os.path.isfile(os.path.join(model_path, VOCAB_NAME)):
        return model_path
    return BERT_BASE_UNCASED


def load_model(
    model_path: str,
    config_file: str | None = None,
    bert_model: str | None = None,
    device: torch.device | str = "cpu",
    do_lower_case: bool = True,
) -> LoadedModel:
    """A model folder (``config_file=None``) or a checkpoint with its config, ready to score.

    The class follows the weights: a fine-tuned checkpoint (task heads present) becomes
    ``InterBertForVLTasks``, a pretraining one ``InterBertForMultiModalPreTraining``; both score with
    the same backbone and ITM head, which must come from the file entirely.
    """
    if config_file is None:
        if not is_model_folder(model_path):
            raise InferenceError(
                f"{model_path}: not a model folder (config.json + model.safetensors); "
                "give a checkpoint with --config_file"
            )
        config = read_folder_config(model_path).config
    else:
        config = BertConfig.from_json_file(config_file)
    state_dict = read_state_dict(model_path)
    if detect_task(state_dict) == "vl":
        head = normalize_keys(state_dict)[TASK_HEAD_KEY]
        model: nn.Module = InterBertForVLTasks(config, num_labels=int(head.shape[0]))
    else:
        model = InterBertForMultiModalPreTraining(config)
    missing, unexpected = load_state_dict_into(model, state_dict, source=model_path)
    check_backbone_loaded(model_path, f"its config {config_file or 'config.json'}", missing, unexpected)
    if ITM_HEAD in missing:
        raise CheckpointError(f"{model_path}: has no ITM head ({ITM_HEAD.rsplit('.', 1)[0]}) to score with")
    tokenizer = BertTokenizer(_vocabulary(model_path, bert_model), do_lower_case=do_lower_case)
    if tokenizer.vocab_size > config.vocab_size:
        raise InferenceError(
            f"{tokenizer.vocab_file}: vocabulary of {tokenizer.vocab_size} tokens exceeds the model's "
            f"vocab_size {config.vocab_size}"
        )
    return LoadedModel(model.to(device).eval(), tokenizer, model_path)


def open_features(path: str) -> RegionFeatureStore:
    """The region-feature LMDB at ``path``, its key list read now so a wrong path fails here."""
    if not os.path.exists(path):
        raise InferenceError(f"--features {path}: no such feature LMDB")
    features = RegionFeatureStore(path)
    features.image_ids()
    return features


@dataclass(frozen=True)
class RankSettings:
    """How captions and images are cut and scored; the defaults are the Flickr30K task's."""

    max_seq_length: int = 30
    max_region_num: int = 102
    precision: str = "fp32"
    pairs_per_forward: int | None = None  # None: what fits the memory budget, as eval_retrieval.py
    memory_budget: int | None = None  # bytes; None: 2 GiB on CPU, 1/4 of a GPU


@dataclass
class ImageHit:
    """One image of a caption's ranking."""

    rank: int
    image_id: str
    score: float


@dataclass
class CaptionHit:
    """One caption of an image's ranking; ``caption_index`` is its position in the given list."""

    rank: int
    caption_index: int
    caption: str
    score: float


@dataclass
class CaptionRanking:
    """The best images for one caption, best first."""

    caption: str
    hits: list[ImageHit]


@dataclass
class ImageRanking:
    """The best captions for one image, best first."""

    image_id: str
    hits: list[CaptionHit]


@dataclass
class ScoreMatrix:
    """ITM match probabilities, ``scores[c, i]`` for ``captions[c]`` and ``image_ids[i]``."""

    captions: list[str]
    image_ids: list[str]
    scores: np.ndarray

    def images_per_caption(self, k: int) -> list[CaptionRanking]:
        columns = top_k_images(self.scores, k)
        return [
            CaptionRanking(
                caption,
                [ImageHit(r + 1, self.image_ids[i], float(self.scores[c, i])) for r, i in enumerate(row)],
            )
            for c, (caption, row) in enumerate(zip(self.captions, columns))
        ]

    def captions_per_image(self, k: int) -> list[ImageRanking]:
        rows = top_k_images(self.scores.T, k)
        return [
            ImageRanking(
                image_id,
                [
                    CaptionHit(r + 1, int(c), self.captions[c], float(self.scores[c, i]))
                    for r, c in enumerate(column)
                ],
            )
            for i, (image_id, column) in enumerate(zip(self.image_ids, rows))
        ]


def checked_captions(captions: Sequence[str], source: str = "--caption") -> list[str]:
    """Captions as given; none at all, or a blank one, is refused (it would rank on [CLS] [SEP])."""
    captions = list(captions)
    if not captions:
        raise InferenceError(f"{source}: no captions to rank")
    for index, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise InferenceError(f"{source}: caption {index + 1} is empty")
    return captions


class Ranker:
    """Ranks images for captions and captions for images with a model's ITM head."""

    def __init__(
        self, loaded: LoadedModel, features: RegionFeatureStore, settings: RankSettings | None = None
    ) -> None:
        self.loaded = loaded
        self.features = features
        self.settings = settings or RankSettings()
        self.device = next(loaded.model.parameters()).device
        self.precision = Precision(self.settings.precision, self.device)
        self.budget = self.settings.memory_budget or default_memory_budget(self.device)

    def checked_image_ids(self, image_ids: Sequence[int | str] | None) -> list[str]:
        """``image_ids`` as the LMDB's keys (strings), every one present; ``None``: all of them."""
        available = self.features.image_ids()
        if image_ids is None:
            return available
        ids = [str(image_id) for image_id in image_ids]
        if not ids:
            raise InferenceError("--image_ids: no image ids given")
        present = set(available)
        missing = [image_id for image_id in ids if image_id not in present]
        if missing:
            raise MissingImageError(
                f"image {missing[0]} is not in the region-feature LMDB {self.features.path} "
                f"({len(missing)} of {len(ids)} given ids missing)"
            )
        return ids

    @property
    def images_per_bank(self) -> int:
        """Images whose embeddings fit half the memory budget (the forwards get the rest)."""
        config = self.loaded.config
        per_image = self.settings.max_region_num * config.v_hidden_size * FLOAT_BYTES
        return max(IMAGE_CHUNK, self.budget // 2 // per_image)

    def _image_chunks(self, image_ids: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
        """Padded regions, ``IMAGE_CHUNK`` images at a time, as ``eval_retrieval.py`` reads them."""
        for start in range(0, len(image_ids), IMAGE_CHUNK):
            chunk = image_ids[start : start + IMAGE_CHUNK]
            yield collate_retrieval(
                [pad_regions(self.features[image_id], self.settings.max_region_num) for image_id in chunk]
            )

    def score(
        self,
        captions: Sequence[str],
        image_ids: Sequence[int | str] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> ScoreMatrix:
        """Every caption against every image (``None``: every image of the LMDB).

        ``on_progress(k)``: k more (caption, image) pairs scored.
        """
        captions = checked_captions(captions)
        ids = self.checked_image_ids(image_ids)
        encoded = encode_captions(self.loaded.tokenizer, captions, self.settings.max_seq_length)
        text = {key: torch.from_numpy(value) for key, value in encoded.items()}
        scores = np.empty((len(captions), len(ids)), dtype=np.float32)
        per_bank = self.images_per_bank
        banks = math.ceil(len(ids) / per_bank)
        for first in range(0, len(ids), per_bank):
            bank_ids = ids[first : first + per_bank]
            scores[:, first : first + len(bank_ids)] = self._score_bank(text, bank_ids, on_progress)
        logger.info("scored %d captions x %d images in %d bank(s)", len(captions), len(ids), banks)
        return ScoreMatrix(captions, ids, scores)

    def _score_bank(
        self,
        text: dict[str, torch.Tensor],
        image_ids: Sequence[str],
        on_progress: Callable[[int], None] | None,
    ) -> np.ndarray:
        """One bank of images against every caption, in one stream (as ``eval_retrieval.py``)."""
        settings = self.settings
        total = text["input_ids"].shape[0] * len(image_ids)
        pairs = settings.pairs_per_forward or block_size(
            self.loaded.config, settings.max_region_num, settings.max_seq_length, total, self.budget
        )
        scorer = RetrievalScorer(self.loaded.model, self.precision, pairs)
        bank = scorer.embed_images(self._image_chunks(image_ids), len(image_ids))
        return scorer.score(scorer.stream(text, bank), on_progress=on_progress)

    def rank_images(
        self,
        captions: Sequence[str],
        image_ids: Sequence[int | str] | None = None,
        k: int = 10,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[CaptionRanking]:
        """For each caption, its ``k`` best images among ``image_ids`` (default: the whole LMDB)."""
        return self.score(captions, image_ids, on_progress).images_per_caption(k)

    def rank_captions(
        self,
        image_ids: Sequence[int | str],
        captions: Sequence[str],
        k: int = 10,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[ImageRanking]:
        """For each image, its ``k`` best captions among ``captions``."""
        return self.score(captions, image_ids, on_progress).captions_per_image(k)
