"""What a caption's words look at: the interaction layers' word→region attention of one pair.

The interaction layers run one sequence, ``[image regions ; text tokens]``, so every token's
attention row is a distribution over both; its first ``R`` columns are the word→region attention.
Rows are averaged over heads, per layer; region 0 is the global region (the whole image), the
others are the detector's boxes. The picture shows the boxes to scale (over the image when its
file is given), each shaded by one word's attention, next to the word × region heat map; the
numbers go to JSON as well, so that they can be checked without reading pixels.

``pointing_game`` asks how often a word's most-attended box belongs to the object it names, against
the rate of picking a box at random.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vilbert.atomic import atomic_write, atomic_write_json
from vilbert.cli import run_script
from vilbert.datasets.features import RegionFeatures, RegionFeatureStore
from vilbert.datasets.retrieval import encode_captions, pad_regions
from vilbert.distributed import DistContext
from vilbert.inference import (
    InferenceError,
    LoadedModel,
    RankSettings,
    checked_captions,
    open_features,
)
from vilbert.rank import add_model_args, check_output, loaded_model

logger = logging.getLogger(__name__)

PROG = "python -m vilbert.attention_maps"
SPECIAL_TOKENS = ("[CLS]", "[SEP]")


@dataclass
class AttentionMap:
    """One pair's head-averaged attention rows of its text tokens, per interaction layer.

    ``token_rows`` [layers, T, R + T]: token t's distribution over the joint sequence (regions
    first); ``pixel_boxes`` [R, 4] are in the image's pixels, row 0 the whole image.
    """

    caption: str
    image_id: str
    tokens: list[str]
    pixel_boxes: np.ndarray
    image_w: int
    image_h: int
    token_rows: np.ndarray

    @property
    def num_regions(self) -> int:
        return self.pixel_boxes.shape[0]

    @property
    def word_to_region(self) -> np.ndarray:
        """[layers, T, R]: the attention each token pays each region."""
        return self.token_rows[:, :, : self.num_regions]

    def layer(self, which: int | str) -> np.ndarray:
        """[T, R] of one interaction layer, or ``"mean"`` over them."""
        if which == "mean":
            return self.word_to_region.mean(axis=0)
        index = int(which)
        if not 0 <= index < self.token_rows.shape[0]:
            raise InferenceError(
                f"--layer {which}: the model has {self.token_rows.shape[0]} interaction layers (0-based)"
            )
        return self.word_to_region[index]

    def token_index(self, pieces: Sequence[str] | None) -> int:
        """Where the WordPieces of a word first occur; ``None``: the token with the sharpest look at
        one box (the largest attention any non-special token pays a detected region, layer mean)."""
        if pieces is None:
            peaks = self.layer("mean")[:, 1:].max(axis=1, initial=0.0)
            peaks[[i for i, token in enumerate(self.tokens) if token in SPECIAL_TOKENS]] = -1.0
            return int(np.argmax(peaks))
        pieces = list(pieces)
        for index in range(len(self.tokens) - len(pieces) + 1):
            if pieces and self.tokens[index : index + len(pieces)] == pieces:
                return index
        raise InferenceError(
            f"--word {''.join(p.removeprefix('##') for p in pieces)!r} is not in the caption's tokens: "
            f"{' '.join(self.tokens)}"
        )

    def to_json(self) -> dict:
        """Every number of the map: per layer and mean, tokens and boxes, for checks without pixels."""
        return {
            "caption": self.caption,
            "image_id": self.image_id,
            "image_w": self.image_w,
            "image_h": self.image_h,
            "tokens": self.tokens,
            "boxes": self.pixel_boxes.tolist(),
            "regions_note": "region 0 is the global region (the whole image)",
            "word_to_region": self.word_to_region.tolist(),
            "word_to_region_mean": self.layer("mean").tolist(),
            "region_share": self.word_to_region.sum(axis=2).tolist(),
        }


def pair_inputs(
    loaded: LoadedModel, regions: RegionFeatures, caption: str, settings: RankSettings
) -> dict[str, torch.Tensor]:
    """One (caption, image) pair as the ranking cuts it, without padding: [1, T] and [1, R, ...]."""
    text = encode_captions(loaded.tokenizer, [caption], settings.max_seq_length)
    length = int(text["input_mask"].sum())
    image = pad_regions(regions, settings.max_region_num)
    kept = int(image["image_mask"].sum())
    device = next(loaded.model.parameters()).device
    return {
        "input_ids": torch.from_numpy(text["input_ids"][:, :length]).to(device),
        "token_type_ids": torch.from_numpy(text["segment_ids"][:, :length]).to(device),
        "attention_mask": torch.from_numpy(text["input_mask"][:, :length]).to(device),
        "image_feat": torch.from_numpy(image["image_feat"][None, :kept]).to(device),
        "image_loc": torch.from_numpy(image["image_loc"][None, :kept]).to(device),
        "image_attention_mask": torch.from_numpy(image["image_mask"][None, :kept]).to(device),
    }


@torch.no_grad()
def attention_map(
    loaded: LoadedModel,
    regions: RegionFeatures,
    caption: str,
    image_id: str = "",
    settings: RankSettings | None = None,
) -> AttentionMap:
    """The word→region attention of ``caption`` over ``regions``, from the model's own forward."""
    settings = settings or RankSettings()
    caption = checked_captions([caption])[0]
    inputs = pair_inputs(loaded, regions, caption, settings)
    model = loaded.model.eval()
    out = model.bert(**inputs, output_attentions=True)
    interaction = out.attentions[: model.config.num_hidden_layers]
    num_regions = inputs["image_feat"].shape[1]
    rows = torch.stack([probs[0].float().mean(dim=0)[num_regions:] for probs in interaction])
    return AttentionMap(
        caption=caption,
        image_id=str(image_id),
        tokens=loaded.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist()),
        pixel_boxes=regions.pixel_boxes[:num_regions].copy(),
        image_w=regions.image_w,
        image_h=regions.image_h,
        token_rows=rows.cpu().numpy(),
    )


@dataclass
class PointingTarget:
    """A word of a map and the regions (indices into its boxes) of the object the word names."""

    attention: AttentionMap
    token: int
    regions: Sequence[int]


@dataclass
class PointingResult:
    """How often the most-attended detected box is one of the named object's, and chance: the mean
    share of the named object's boxes among the detected ones (a box picked at random)."""

    hits: int
    total: int
    chance: float

    @property
    def rate(self) -> float:
        return self.hits / self.total if self.total else 0.0


def pointing_game(targets: Sequence[PointingTarget], layer: int | str = "mean") -> PointingResult:
    """The pointing game over detected boxes only (region 0, the whole image, is left out)."""
    hits, chance = 0, 0.0
    for target in targets:
        row = target.attention.layer(layer)[target.token, 1:]
        hits += int(np.argmax(row)) + 1 in set(target.regions)
        chance += len(set(target.regions)) / len(row)
    return PointingResult(hits, len(targets), chance / len(targets) if targets else 0.0)


def selected_layers(attention: AttentionMap, layer: str) -> list[int | str]:
    """``all``: every interaction layer, then their mean; else the one named (``mean`` or an index)."""
    if layer == "all":
        return [*range(attention.token_rows.shape[0]), "mean"]
    attention.layer(layer)  # refuses an index out of range
    return [layer if layer == "mean" else int(layer)]


def _draw_boxes(axis, attention: AttentionMap, row: np.ndarray, image: np.ndarray | None, title: str) -> None:
    """The detected boxes to scale, each shaded by ``row`` (region 0, the whole image, is not drawn)."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    w, h = attention.image_w, attention.image_h
    if image is not None:
        axis.imshow(image, extent=(0, w, h, 0))
    else:
        axis.add_patch(Rectangle((0, 0), w, h, facecolor="white", edgecolor="black"))
    colours = colormaps["viridis"]
    top = max(float(row[1:].max(initial=0.0)), 1e-12)
    for region in np.argsort(row[1:], kind="stable") + 1:  # strongest drawn last, on top
        x1, y1, x2, y2 = attention.pixel_boxes[region]
        shade = float(row[region]) / top
        axis.add_patch(
            Rectangle(
                (x1, y1), x2 - x1, y2 - y1, facecolor=(*colours(shade)[:3], 0.15 + 0.45 * shade),
                edgecolor=colours(shade), linewidth=1 + 2 * shade,
            )
        )  # fmt: skip
        axis.text(x1 + 2, y1 + 2, str(region), fontsize=7, va="top", color="black")
    axis.set_xlim(0, w)
    axis.set_ylim(h, 0)
    axis.set_aspect("equal")
    axis.set_title(title, fontsize=9)


def _draw_heat_map(figure, axis, attention: AttentionMap, matrix: np.ndarray, token: int) -> None:
    """Word × region attention: one row per token, region 0 labelled as the whole image."""
    shown = axis.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0)
    labels = [f"> {t}" if i == token else t for i, t in enumerate(attention.tokens)]
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    axis.set_xticks(
        range(attention.num_regions), ["img", *map(str, range(1, attention.num_regions))], fontsize=7
    )
    axis.set_xlabel("region")
    figure.colorbar(shown, ax=axis, fraction=0.05)


def render_png(
    attention: AttentionMap, token: int, layers: Sequence[int | str], image_path: str | None = None
) -> bytes:
    """The picture: per layer, the boxes shaded by ``token``'s attention and the word × region map.

    matplotlib (an extra of the demo, not a runtime dependency) is imported only here."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import image as mpimg
    from matplotlib.figure import Figure

    image = None
    if image_path is not None:
        if not os.path.isfile(image_path):
            raise InferenceError(f"--image {image_path}: no such file")
        image = mpimg.imread(image_path)
    figure = Figure(figsize=(11, 3.6 * len(layers)), layout="constrained")
    axes = figure.subplots(len(layers), 2, squeeze=False)
    word = attention.tokens[token]
    for (boxes_axis, heat_axis), layer in zip(axes, layers):
        matrix = attention.layer(layer)
        name = "mean of the interaction layers" if layer == "mean" else f"interaction layer {layer}"
        title = f"{name}: '{word}' (whole image {matrix[token, 0]:.3f})"
        _draw_boxes(boxes_axis, attention, matrix[token], image, title)
        _draw_heat_map(figure, heat_axis, attention, matrix, token)
    figure.suptitle(f"image {attention.image_id}: {attention.caption}", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_attention_map(
    attention: AttentionMap,
    png_path: str,
    word_pieces: Sequence[str] | None = None,
    layer: str = "all",
    image_path: str | None = None,
    json_path: str | None = None,
) -> dict:
    """Write the PNG (and its numbers as JSON, default: beside it); returns the numbers."""
    token = attention.token_index(word_pieces)
    layers = selected_layers(attention, layer)
    png = render_png(attention, token, layers, image_path)
    numbers = {**attention.to_json(), "word": attention.tokens[token], "word_token": token}
    atomic_write(png_path, lambda handle: handle.write(png))
    atomic_write_json(json_path or os.path.splitext(png_path)[0] + ".json", numbers)
    logger.info("wrote %s", png_path)
    return numbers


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--image_id", required=True, help="the image (a key of --features)")
    p.add_argument("--caption", required=True, help="the caption")
    p.add_argument("--word", help="the word whose attention shades the boxes (default: the sharpest one)")
    p.add_argument(
        "--layer", default="all", help="an interaction layer (0-based), 'mean', or 'all' (default)"
    )
    p.add_argument("--image", help="the image file, drawn under the boxes (default: a blank canvas)")
    p.add_argument("--output", required=True, help="the PNG to write")
    p.add_argument("--json", help="the numbers as JSON (default: the PNG's name with .json)")
    return p.parse_args(argv)


def draw(args: argparse.Namespace, ctx: DistContext) -> dict:
    """Load, run the pair, write the PNG and the JSON."""
    json_path = args.json or os.path.splitext(args.output)[0] + ".json"
    for path in (args.output, json_path):
        check_output(path, args.overwrite)
    features: RegionFeatureStore = open_features(args.features)
    regions = features[args.image_id]
    loaded = loaded_model(args, ctx)
    settings = RankSettings(max_seq_length=args.max_seq_length, max_region_num=args.max_region_num)
    attention = attention_map(loaded, regions, args.caption, args.image_id, settings)
    pieces = loaded.tokenizer.tokenize(args.word) if args.word is not None else None
    if pieces is not None and not pieces:
        raise InferenceError(f"--word {args.word!r} has no tokens")
    numbers = write_attention_map(attention, args.output, pieces, args.layer, args.image, json_path)
    print(f"'{numbers['word']}' on image {args.image_id}: {args.output} ({json_path})")
    return numbers


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(draw, parse_args(argv), PROG)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sys.exit(main())
