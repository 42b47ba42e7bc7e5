"""Scoring every caption against every image with the ITM head (Flickr30K retrieval evaluation).

The score of a (caption, image) pair is softmax(ITM logits)[0], the probability of "matched", from
the fine-tuned ``InterBertForVLTasks`` or, zero-shot, from the pretraining model; both carry the
same ``bert`` and ``cls`` modules, and only those are used.

Why this does not simply call ``model.forward`` on (caption, image) pairs:

- The score needs the two pooled vectors only, so neither the vocabulary nor the region heads run,
  and the last text and image layers compute position 0 (the one each pooler reads) only
  (``InterBertModel.encode(..., first_position_only=True)``, the method ``forward`` is built from).
- Image embeddings do not depend on the caption: they are computed once per split
  (``v_embeddings``) and kept on the device; each forward gathers its rows from that cache.
- Captions and images are ordered shortest first and the pairs streamed in tiles of images
  (:class:`PairStream`), and every forward takes the next ``pairs_per_forward`` pairs, cut to the
  token and region columns its pairs use: padding that all pairs of a block share is not computed,
  and a block's captions, like its images, are of nearly one length.
  Masked columns carry exactly zero attention, so the cut changes nothing but rounding.
- Ranks share the stream in whole blocks, and only its very last block is padded. A pair is thus
  scored at the same place of the same block, with the same shapes, whatever the number of ranks or
  the caption batch size: the score matrix is bitwise independent of both (kernels may round a row
  differently at another place of a batch, by ~1e-7, so this alignment matters).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vilbert.config import BertConfig
from vilbert.precision import Precision

FLOAT_BYTES = 4
CPU_MEMORY_BUDGET = 2 * 1024**3
GPU_MEMORY_SHARE = 0.25
TOP_K = 20


def pair_activation_bytes(config: BertConfig, num_regions: int, num_tokens: int) -> int:
    """A generous estimate of the activation memory one pair needs inside a layer (fp32)."""
    length = num_regions + num_tokens
    hidden = max(config.hidden_size, config.v_hidden_size)
    intermediate = max(config.intermediate_size, config.v_intermediate_size)
    heads = max(config.num_attention_heads, config.v_num_attention_heads)
    return FLOAT_BYTES * (length * (6 * hidden + 2 * intermediate) + 2 * heads * length * length)


def default_memory_budget(device: torch.device) -> int:
    """Bytes the forwards may use: 2 GiB on CPU, a quarter of a GPU's memory (its total, not what is
    free now, so the block size, and with it every score, is the same from run to run)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * GPU_MEMORY_SHARE)
    return CPU_MEMORY_BUDGET


def pairs_for_budget(config: BertConfig, num_regions: int, num_tokens: int, budget_bytes: int) -> int:
    """How many pairs one forward may hold within ``budget_bytes`` (at least 1)."""
    return max(1, budget_bytes // pair_activation_bytes(config, num_regions, num_tokens))


def _extent(mask: torch.Tensor) -> np.ndarray:
    """Per row, one past the last kept position: the columns that hold anything but padding."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return ((mask != 0) * positions).amax(dim=1).clamp_(min=1).cpu().numpy()


@dataclass
class ImageBank:
    """Every image of the split, embedded once and kept on the device, shortest first.

    ``embeddings`` [N, R, H] and ``mask`` [N, R] are in ``order`` (row i is image ``order[i]`` of the
    split); ``extent`` [N] is each row's length without padding.
    """

    embeddings: torch.Tensor
    mask: torch.Tensor
    order: np.ndarray
    extent: np.ndarray

    @property
    def num_images(self) -> int:
        return self.embeddings.shape[0]


@dataclass(frozen=True)
class PaddingReport:
    """Shares of padded positions among those computed, before and after sorting into blocks."""

    unsorted: float
    sorted: float

    def __str__(self) -> str:
        return f"padding {self.unsorted:.1%} of positions unsorted, {self.sorted:.1%} sorted into blocks"


@dataclass
class PairStream:
    """Every (caption, image) pair in one stream, captions and images shortest first, ordered so that
    each block of ``pairs_per_forward`` consecutive pairs holds captions and images of similar length.

    The sorted images are cut into tiles of ``images_per_tile``; the stream runs tile by tile, and
    within a tile caption by caption over the tile's images. A block then spans about the same share
    of the sorted captions as of the sorted images (``tile_width``), so both of its lengths are
    nearly uniform; with one tile of every image this is the caption-major stream.
    """

    captions: dict[str, torch.Tensor]
    caption_order: np.ndarray
    caption_extent: np.ndarray
    bank: ImageBank
    pairs_per_forward: int
    images_per_tile: int = 0  # 0: tile_width's choice

    def __post_init__(self) -> None:
        if self.images_per_tile <= 0:
            self.images_per_tile = tile_width(self.num_captions, self.bank.num_images, self.pairs_per_forward)

    @property
    def num_captions(self) -> int:
        return len(self.caption_order)

    @property
    def total(self) -> int:
        return self.num_captions * self.bank.num_images

    def rows(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sorted caption row and image row of each stream position in ``pairs``."""
        width, captions = self.images_per_tile, self.num_captions
        tile = pairs // (captions * width)
        first_image = tile * width
        tile_width_here = np.minimum(width, self.bank.num_images - first_image)
        within = pairs - tile * captions * width
        return within // tile_width_here, first_image + within % tile_width_here

    def shard(self, rank: int, world_size: int) -> range:
        """This rank's pairs: a contiguous run of whole blocks, so each pair lands at the same place of
        the same block on any number of ranks."""
        blocks = math.ceil(self.total / self.pairs_per_forward)
        first, last = rank * blocks // world_size, (rank + 1) * blocks // world_size
        return range(
            min(first * self.pairs_per_forward, self.total), min(last * self.pairs_per_forward, self.total)
        )

    def padding(self) -> PaddingReport:
        """The share of computed positions (tokens + regions) that are padding, without the sort and
        the cut (every pair at the stacks' full width) and with them (every pair of a block at the
        block's widest caption and image, the last block's filler copies included)."""
        num_images, block = self.bank.num_images, self.pairs_per_forward
        full_width = self.captions["input_mask"].shape[1] + self.bank.mask.shape[1]
        used = num_images * int(self.caption_extent.sum()) + self.num_captions * int(self.bank.extent.sum())
        padded_stream = np.minimum(np.arange(math.ceil(self.total / block) * block), self.total - 1)
        caption, image = self.rows(padded_stream)
        starts = np.arange(0, len(caption), block)
        tokens = np.maximum.reduceat(self.caption_extent[caption], starts)
        regions = np.maximum.reduceat(self.bank.extent[image], starts)
        computed = int((tokens + regions).sum()) * block
        return PaddingReport(1.0 - used / (self.total * full_width), 1.0 - used / computed)

    def matrix(self, flat: np.ndarray) -> np.ndarray:
        """Stream-order scores of every pair → [num_captions, num_images] in the split's order."""
        scores = np.empty((self.num_captions, self.bank.num_images), dtype=flat.dtype)
        caption, image = self.rows(np.arange(self.total))
        scores[self.caption_order[caption], self.bank.order[image]] = flat
        return scores


def check_itm_model(model: nn.Module) -> None:
    """Both InterBERT models with an ITM head qualify; anything else is a usage error."""
    if not (hasattr(model, "bert") and hasattr(model, "cls") and hasattr(model.cls, "bi_seq_relationship")):
        raise TypeError(f"{type(model).__name__} has no bert + ITM head (cls.bi_seq_relationship)")


class RetrievalScorer:
    """Scores captions against an :class:`ImageBank` with a model in eval mode, without gradients."""

    def __init__(
        self,
        model: nn.Module,
        precision: Precision,
        pairs_per_forward: int,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        """``compile_options``: compile the encoder + ITM head with these ``torch.compile`` options,
        with dynamic shapes (the blocks' widths differ); None: eager."""
        check_itm_model(model)
        if pairs_per_forward < 1:
            raise ValueError(f"pairs_per_forward must be at least 1, got {pairs_per_forward}")
        self.model = model.eval()
        self.precision = precision
        self.pairs_per_forward = pairs_per_forward
        self.device = precision.device
        self._logits = self._itm_logits
        if compile_options is not None:
            self._logits = torch.compile(self._itm_logits, dynamic=True, **compile_options)

    @torch.no_grad()
    def embed_images(self, chunks: Iterable[dict[str, torch.Tensor]], num_images: int) -> ImageBank:
        """Embed the split's images chunk by chunk (``image_feat`` [n, R, D], ``image_loc``,
        ``image_mask``), in order; only the embeddings stay on the device."""
        embeddings: torch.Tensor | None = None
        mask: torch.Tensor | None = None
        filled = 0
        for chunk in chunks:
            feat = chunk["image_feat"].to(self.device, non_blocking=True)
            loc = chunk["image_loc"].to(self.device, non_blocking=True)
            with self.precision.autocast():
                embedded = self.model.bert.v_embeddings(feat, loc)
            if embeddings is None or mask is None:
                embeddings = embedded.new_empty((num_images, *embedded.shape[1:]))
                mask = torch.empty((num_images, embedded.shape[1]), dtype=torch.long, device=self.device)
            count = embedded.shape[0]
            embeddings[filled : filled + count] = embedded
            mask[filled : filled + count] = chunk["image_mask"].to(self.device)
            filled += count
        if embeddings is None or mask is None or filled != num_images:
            raise ValueError(f"expected {num_images} images, the image chunks held {filled}")
        extent = _extent(mask)
        order = np.argsort(extent, kind="stable")
        rows = torch.from_numpy(order).to(self.device)
        return ImageBank(embeddings[rows], mask[rows], order, extent[order])

    def stream(self, captions: dict[str, torch.Tensor], bank: ImageBank) -> PairStream:
        """``captions`` (``input_ids``, ``input_mask``, ``segment_ids`` [n, T]) against ``bank``."""
        extent = _extent(captions["input_mask"])
        order = np.argsort(extent, kind="stable")
        rows = torch.from_numpy(order)
        on_device = {key: value[rows].to(self.device) for key, value in captions.items()}
        return PairStream(on_device, order, extent[order], bank, self.pairs_per_forward)

    def _itm_logits(
        self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor, image_mask: torch.Tensor
    ) -> torch.Tensor:
        """The ITM logits [P, 2] of embedded pairs, through the model's own encoder (first position
        only: the poolers need no more) and ITM head."""
        out = self.model.bert.encode(text, image, text_mask, image_mask, first_position_only=True)
        return self.model.cls.itm(out)

    @torch.no_grad()
    def score(
        self, stream: PairStream, pairs: range | None = None, on_progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Scores (float32): of every pair as the [num_captions, num_images] matrix in the split's order,
        or, given ``pairs`` (from :meth:`PairStream.shard`), of those pairs, flat, in stream order.

        Blocks of exactly ``pairs_per_forward`` pairs are aligned on the whole stream; the last one is
        padded with copies of its last pair. Each block keeps only the token and region columns that
        one of its pairs uses. ``on_progress(k)``: k more pairs scored.
        """
        selected = range(stream.total) if pairs is None else pairs
        block = self.pairs_per_forward
        if selected.start % block or (selected.stop % block and selected.stop != stream.total):
            raise ValueError(f"pairs {selected} do not start and end on blocks of {block} pairs")
        scores = torch.empty(len(selected), dtype=torch.float32, device=self.device)
        for start in range(selected.start, selected.stop, block):
            count = min(block, selected.stop - start)
            caption, image = stream.rows(np.minimum(np.arange(start, start + block), stream.total - 1))
            scores[start - selected.start : start - selected.start + count] = self._score_pairs(
                stream,
                torch.from_numpy(caption).to(self.device),
                torch.from_numpy(image).to(self.device),
                int(stream.caption_extent[caption].max()),
                int(stream.bank.extent[image].max()),
            )[:count]
            if on_progress is not None:
                on_progress(count)
        flat = scores.cpu().numpy()
        return stream.matrix(flat) if pairs is None else flat

    def _score_pairs(
        self, stream: PairStream, caption: torch.Tensor, image: torch.Tensor, tokens: int, regions: int
    ) -> torch.Tensor:
        """Match probabilities of (caption, image) rows, cut to ``tokens`` and ``regions`` columns."""
        text_mask = stream.captions["input_mask"][caption, :tokens]
        with self.precision.autocast():
            text = self.model.bert.embeddings(
                stream.captions["input_ids"][caption, :tokens],
                stream.captions["segment_ids"][caption, :tokens],
            )
            bank = stream.bank
            image_rows, image_mask = bank.embeddings[image, :regions], bank.mask[image, :regions]
            logits = self._logits(text, text_mask, image_rows, image_mask)
        return logits.float().softmax(dim=1)[:, 0]


def tile_width(num_captions: int, num_images: int, pairs_per_forward: int) -> int:
    """Images per tile such that a block covers the same share of the sorted captions as of the
    sorted images (sqrt(pairs / all pairs) of each), so neither length varies much within a block."""
    share = math.sqrt(pairs_per_forward / max(num_captions * num_images, 1))
    return max(1, min(num_images, math.ceil(num_images * share)))


def block_size(
    config: BertConfig, num_regions: int, num_tokens: int, total_pairs: int, budget_bytes: int
) -> int:
    """Pairs per forward: as many as the budget allows, never more than the whole evaluation holds."""
    return max(1, min(pairs_for_budget(config, num_regions, num_tokens, budget_bytes), total_pairs))
