"""Model folders in the Hugging Face layout: ``config.json``, ``model.safetensors``, ``vocab.txt`` and a
``README.md`` model card, so a trained model travels as one self-describing folder.

A folder is written into a hidden sibling and renamed into place once complete, so a reader never
sees half of one, and an existing folder is replaced only when asked to. Reading never executes
code: the weights are safetensors, the config plain JSON.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import safetensors.torch
from torch import nn

from vilbert.atomic import atomic_write, atomic_write_text
from vilbert.checkpoint import (
    normalize_keys,
    untied_state_dict,
)
from vilbert.config import BertConfig, ConfigError
from vilbert.errors import BadInputError
from vilbert.tokenization import BertTokenizer

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VOCAB_NAME = "vocab.txt"
CARD_NAME = "README.md"
MODEL_TYPE = "interbert"
# The key only the task model has: it tells a fine-tuned checkpoint from a pretraining one.
TASK_HEAD_KEY = "vil_prediction.weight"


class ModelFolderError(BadInputError):
    """A model folder (or export) that cannot be written or read as asked."""


class OutputExistsError(ModelFolderError, FileExistsError):
    """The output folder exists and ``overwrite`` was not given."""


@dataclass(frozen=True)
class FolderConfig:
    """What ``config.json`` says: the network's sizes, the class that wrote it, its task-head width."""

    config: BertConfig
    architecture: str | None
    num_labels: int | None


def is_model_folder(path: str) -> bool:
    """A folder holding both ``config.json`` and ``model.safetensors``."""
    return all(os.path.isfile(os.path.join(path, name)) for name in (CONFIG_NAME, WEIGHTS_NAME))


def read_folder_config(folder: str) -> FolderConfig:
    """The config of a model folder; folder keys are split off so the sizes validate on their own."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ModelFolderError(f"{folder}: no {CONFIG_NAME}; not a model folder (pass a config to load it)")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    architectures = values.pop("architectures", None) or [None]
    values.pop("model_type", None)
    num_labels = values.pop("num_labels", None)
    if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 1):
        raise ConfigError(f"{path}: num_labels must be a positive integer, got {num_labels!r}")
    return FolderConfig(BertConfig.from_dict(values, source=path), architectures[0], num_labels)


def init_kwargs(cls: type, saved: FolderConfig, given: Mapping[str, Any], folder: str) -> dict[str, Any]:
    """Constructor arguments the folder knows (``num_labels``) that the caller did not give."""
    kwargs = dict(given)
    accepts = inspect.signature(cls.__init__).parameters
    if saved.num_labels is not None and "num_labels" in accepts and "num_labels" not in kwargs:
        kwargs["num_labels"] = saved.num_labels
    if saved.architecture not in (None, cls.__name__):
        logger.info("%s was saved from %s; loading it as %s", folder, saved.architecture, cls.__name__)
    return kwargs


def folder_config_json(model: nn.Module) -> str:
    """``config.json``: the published config keys plus the class and task-head width."""
    values = model.config.to_dict()
    values["architectures"] = [type(model).__name__]
    values["model_type"] = MODEL_TYPE
    if isinstance(getattr(model, "num_labels", None), int):
        values["num_labels"] = model.num_labels
    return json.dumps(values, indent=2, sort_keys=True) + "\n"


def model_card(model: nn.Module, card: Mapping[str, Any] | None) -> str:
    """A short ``README.md``: what the model is, its config, how it was trained, what it scored.

    ``card`` may hold ``title``, ``recipe`` (how it was trained: a command line, a sentence),
    ``metrics`` (name → value, validation scores when known) and any other key, listed as is.
    """
    card = dict(card or {})
    config = model.config
    lines = [
        f"# {card.pop('title', 'InterBERT model')}",
        "",
        f"`{type(model).__name__}`: {config.num_hidden_layers} interaction layers, "
        f"{config.t_num_hidden_layers} text and {config.v_num_hidden_layers} image extraction layers, "
        f"hidden size {config.hidden_size}, region features of {config.v_feature_size} dimensions.",
        "",
        "Load it with `from_pretrained(FOLDER)` on the model class above; `--bert_model FOLDER` finds "
        "its vocabulary.",
    ]
    recipe = card.pop("recipe", None)
    if recipe:
        lines += ["", "## Recipe", "", str(recipe)]
    metrics = card.pop("metrics", None)
    if metrics:
        lines += ["", "## Validation metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in metrics.items()]
    if card:
        lines += ["", "## Notes", ""] + [f"- {key}: {value}" for key, value in card.items()]
    lines += ["", "## Config", "", "```json", json.dumps(config.to_dict(), indent=2, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def _checked_vocab(vocab: str, config: BertConfig) -> str:
    """The vocabulary file ``vocab`` names; it must fit the word embedding."""
    tokenizer = BertTokenizer(vocab)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFolderError(
            f"{tokenizer.vocab_file}: {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{config.vocab_size} (is --bert_model the vocabulary this model was trained with?)"
        )
    return tokenizer.vocab_file


def _write_contents(
    model: nn.Module, folder: str, vocab_file: str | None, card: Mapping[str, Any] | None
) -> None:
    tensors = untied_state_dict(model)
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    atomic_write(os.path.join(folder, WEIGHTS_NAME), lambda handle: handle.write(data))
    atomic_write_text(os.path.join(folder, CONFIG_NAME), folder_config_json(model))
    atomic_write_text(os.path.join(folder, CARD_NAME), model_card(model, card))
    if vocab_file is not None:
        shutil.copyfile(vocab_file, os.path.join(folder, VOCAB_NAME))


def occupied(path: str) -> bool:
    """Something is at ``path`` that writing a folder there would replace (an empty folder is not)."""
    return os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path))


def _move_into_place(staging: str, folder: str, overwrite: bool) -> None:
    """Rename the finished folder over ``folder``; an old one is moved aside first, removed last."""
    if not occupied(folder):
        os.replace(staging, folder)
        return
    if not overwrite:
        raise OutputExistsError(f"{folder} already exists; pass --overwrite (overwrite=True) to replace it")
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old.", dir=os.path.dirname(folder))
    old = os.path.join(aside, "old")
    os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(aside)


def write_model_folder(
    model: nn.Module,
    folder: str,
    vocab: str | None = None,
    card: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``model`` as a model folder; ``vocab`` is a vocab.txt, a folder holding one, or
    ``bert-base-uncased``. Returns ``folder``."""
    folder = os.path.abspath(folder)
    if occupied(folder) and not overwrite:
        raise OutputExistsError(f"{folder} already exists; pass --overwrite (overwrite=True) to replace it")
    vocab_file = _checked_vocab(vocab, model.config) if vocab is not None else None
    if vocab_file is None:
        logger.warning("%s: no vocabulary given, so the folder cannot serve as --bert_model", folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", suffix=".tmp", dir=parent)
    try:
        _write_contents(model, staging, vocab_file, card)
        _move_into_place(staging, folder, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote model folder %s", folder)
    return folder


def detect_task(state_dict: Mapping[str, Any]) -> str:
    """``vl`` for a fine-tuned checkpoint (it has the task heads), else ``pretraining``."""
    return "vl" if TASK_HEAD_KEY in normalize_keys(state_dict) else "pretraining"
