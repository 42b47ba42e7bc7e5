"""Reading every checkpoint users bring (published InterBERT, BERT in its many spellings) and
writing ours atomically.

Loads never unpickle arbitrary objects: ``.bin``/``.pt`` files go through
``torch.load(weights_only=True)`` and ``.safetensors`` through ``safetensors``.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping

import torch
from torch import nn

from vilbert.atomic import atomic_torch_save
from vilbert.distributed import unwrap_model
from vilbert.errors import BadInputError

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "pytorch_model.pt", "model.pt")
# Bare ``BertModel`` files (sentence-transformers, ``BertModel.save_pretrained``) start with these.
BERT_MODEL_PREFIXES = ("embeddings.", "encoder.", "pooler.")
# Buffers some writers save that are not parameters of any model here.
IGNORED_KEYS = ("bert.embeddings.position_ids",)
# Hugging Face also stores the MLM bias as the decoder's bias (the same tensor).
DECODER_BIAS, MLM_BIAS = "cls.predictions.decoder.bias", "cls.predictions.bias"
# Parameters that are another one under a second name (the MSM decoder is the word embedding):
# a file needs only the source, and loading it ties the alias back.
TIED_WEIGHTS = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}
LIST_PREVIEW = 8


class CheckpointError(BadInputError):
    """A checkpoint that cannot be loaded into the model it was given to."""


def resolve_weights_file(path: str) -> str:
    """A weights file, or the first known weights file inside a folder."""
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise CheckpointError(f"{path}: folder holds none of {', '.join(WEIGHT_FILES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or PyTorch file (or folder), on CPU, without arbitrary unpickling."""
    file = resolve_weights_file(path)
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(file, device="cpu"))
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"{file}: not a loadable PyTorch state dict ({type(err).__name__}: {err})"
        ) from err
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{file}: expected a mapping of parameter names to tensors")
    return dict(loaded)


def normalize_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map DDP, Google/pytorch-pretrained-bert and bare ``BertModel`` spellings onto ours."""
    normalized: dict[str, torch.Tensor] = {}
    bare_bert = not any(k.startswith(("bert.", "module.bert.")) for k in state_dict)
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if bare_bert and key.startswith(BERT_MODEL_PREFIXES):
            key = "bert." + key
        if key in IGNORED_KEYS:
            continue
        normalized[key] = value
    decoder_bias = normalized.pop(DECODER_BIAS, None)
    if decoder_bias is not None:
        normalized.setdefault(MLM_BIAS, decoder_bias)
    return normalized


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:LIST_PREVIEW])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > LIST_PREVIEW else "")


def load_state_dict_into(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict", strict: bool = False
) -> tuple[list[str], list[str]]:
    """Copy matching tensors into ``model``; shape mismatches are errors, the rest is logged.

    Returns (missing, unexpected). Tied parameters (the MLM decoder) stay tied: values are
    copied into the existing tensors.
    """
    state_dict = normalize_keys(state_dict)
    own = model.state_dict()
    for key, value in state_dict.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: shape mismatch for {key}: checkpoint {tuple(value.shape)}, "
                f"model {tuple(own[key].shape)} (is --config_file the one this checkpoint was trained with?)"
            )
    tied = {alias for alias, source in TIED_WEIGHTS.items() if source in state_dict}
    missing = sorted(k for k in own if k not in state_dict and k not in tied)
    unexpected = sorted(k for k in state_dict if k not in own)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source}: strict load failed; "
            f"missing [{_preview(missing)}], unexpected [{_preview(unexpected)}]"
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    if missing:
        logger.info("weights not in %s (left initialised): %s", source, _preview(missing))
    if unexpected:
        logger.info("weights of %s not used by %s: %s", source, type(model).__name__, _preview(unexpected))
    return missing, unexpected


def check_backbone_loaded(source: str, config_name: str, missing: list[str], unexpected: list[str]) -> None:
    """Refuse a checkpoint whose backbone (``bert.*``) disagrees with the config (e.g. in layer count):
    scoring with it would use a partly random model. ``config_name`` says which config, for the message."""
    backbone = [key for key in missing + unexpected if key.startswith("bert.")]
    if backbone:
        raise CheckpointError(
            f"{source}: does not match {config_name}: "
            f"{len(backbone)} backbone weight(s) missing or extra, e.g. {backbone[0]}"
        )


def load_pretrained(model: nn.Module, path: str, strict: bool = False) -> tuple[list[str], list[str]]:
    """Load ``path`` (any supported file or folder) into ``model``."""
    return load_state_dict_into(model, read_state_dict(path), source=path, strict=strict)


def untied_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict on CPU, contiguous, without the aliases of ``TIED_WEIGHTS``.

    Formats that refuse shared storage (safetensors) need every tensor once; loading restores the
    alias because it is the same parameter as its source. Any other sharing is a bug here.
    """
    state = unwrap_model(model).state_dict()
    kept: dict[str, torch.Tensor] = {}
    owner: dict[tuple[int, int], str] = {}
    for key, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if identity in owner and tensor.numel():
            if TIED_WEIGHTS.get(key) != owner[identity]:
                raise RuntimeError(
                    f"{key} shares storage with {owner[identity]}, a tie this format cannot store"
                )
            continue
        owner[identity] = key
        kept[key] = tensor.detach().cpu().contiguous()
    return kept


def save_state_dict(model: nn.Module, path: str) -> None:
    """Write the plain state dict (published naming, no ``module.``) atomically."""
    state = {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    atomic_torch_save(state, path)
