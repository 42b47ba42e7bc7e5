"""The caption JSON of a pretraining split (``caption_train.json``: ``{image_id: caption}``), read once.

Both the pretraining dataset (which draws the mismatched captions of ITM from it) and the TSV
conversion (which joins it with the region features) read it here, with one set of rules.
"""

from __future__ import annotations

import json

from vilbert.errors import BadInputError


class CaptionFileError(BadInputError):
    """A caption JSON that is not valid JSON, not an ``image_id → caption`` object, empty, or holds a
    null, non-string or blank caption."""


def load_caption_json(path: str, allow_empty: bool = False, allow_blank: bool = True) -> dict[str, str]:
    """``{image_id: caption}`` with string keys; every problem is one line naming the file (and the
    image). A null or non-string caption turned into text would train on ``"None"``. ``allow_empty``:
    an empty object is fine (a conversion then reports the images it could not caption);
    ``allow_blank``: a caption of only white space is fine (the pretraining data accepts it, as
    published; a conversion refuses it)."""
    with open(path, encoding="utf-8") as f:
        try:
            captions = json.load(f)
        except json.JSONDecodeError as err:
            raise CaptionFileError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(captions, dict):
        raise CaptionFileError(
            f"{path}: expected a JSON object image_id → caption, got {type(captions).__name__}"
        )
    if not captions and not allow_empty:
        raise CaptionFileError(
            f"{path}: caption json is empty; ITM needs captions of other images to draw from"
        )
    for image_id, caption in captions.items():
        if not isinstance(caption, str) or not (allow_blank or caption.strip()):
            shown = "null" if caption is None else f"{type(caption).__name__} {json.dumps(caption)[:60]}"
            raise CaptionFileError(f"{path}: caption of image {image_id!r} is {shown}, not a non-empty text")
    return {str(k): v for k, v in captions.items()}
