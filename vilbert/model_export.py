"""Exporting a published checkpoint (``.bin``, raw or EMA) as a model folder (``tools/export_model.py``).

Separate from :mod:`vilbert.model_folder` so that the folder format does not import the model
classes (the models import the format for ``save_pretrained`` / ``from_pretrained``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from vilbert.checkpoint import CheckpointError, load_state_dict_into, normalize_keys, read_state_dict
from vilbert.config import BertConfig
from vilbert.model_folder import (
    TASK_HEAD_KEY,
    ModelFolderError,
    OutputExistsError,
    detect_task,
    occupied,
    write_model_folder,
)
from vilbert.modeling import InterBertForMultiModalPreTraining, InterBertForVLTasks

logger = logging.getLogger(__name__)


def export_checkpoint(
    checkpoint: str,
    config: BertConfig,
    vocab: str,
    output: str,
    task: str | None = None,
    overwrite: bool = False,
    card: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Convert a published ``.bin`` (raw or EMA, ``module.`` prefixes or not) into a model folder.

    Every parameter of the model must come from the checkpoint: a folder is a finished model, so a
    checkpoint that leaves some initialised (plain BERT, another config) is refused.
    """
    if occupied(output) and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    state_dict = read_state_dict(checkpoint)
    task = task or detect_task(state_dict)
    if task == "vl":
        head = normalize_keys(state_dict).get(TASK_HEAD_KEY)
        model: nn.Module = InterBertForVLTasks(
            config, num_labels=int(head.shape[0]) if head is not None else 1
        )
    elif task == "pretraining":
        model = InterBertForMultiModalPreTraining(config)
    else:
        raise ModelFolderError(f"--task must be 'pretraining' or 'vl', got {task!r}")
    missing, unexpected = load_state_dict_into(model, state_dict, source=checkpoint)
    if missing:
        raise CheckpointError(
            f"{checkpoint}: {len(missing)} parameters of {type(model).__name__} are not in the checkpoint, "
            f"e.g. {missing[0]} (wrong --task or --config_file?)"
        )
    if unexpected:
        logger.warning("%s: %d tensors not part of %s were left out", checkpoint, len(unexpected), task)
    card = {"recipe": f"Exported from `{os.path.basename(checkpoint)}`.", **(card or {})}
    write_model_folder(model, output, vocab=vocab, card=card, overwrite=overwrite)
    return model
