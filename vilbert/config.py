"""The InterBERT configuration: the published JSON keys as a validated dataclass."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from vilbert.errors import BadInputError

logger = logging.getLogger(__name__)

# Keys the published JSON carries that the InterBERT model never reads (ViLBERT co-attention
# leftovers and data-loader settings); accepted silently so published files load unchanged.
LEGACY_KEYS = frozenset(
    {
        "pooling_method",
        "conv_layer",
        "max_region_length",
        "max_seq_length",
        "bi_num_attention_heads",
        "bi_intermediate_size",
        "bi_attention_type",
        "v_biattention_id",
        "t_biattention_id",
        "fast_mode",
        "fixed_v_layer",
        "fixed_t_layer",
        "in_batch_pairs",
        "intra_gate",
        "with_coattention",
        "layer_norm_eps",
        "model_type",
        "architectures",
    }
)
ACTIVATIONS = ("gelu", "relu", "swish")
FUSION_METHODS = ("mul", "sum")


class ConfigError(BadInputError):
    """An invalid or unreadable model configuration."""


@dataclass
class BertConfig:
    """Sizes of the interaction, text-extraction and image-extraction modules (see ``docs/model.md``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 6
    t_num_hidden_layers: int = 6
    v_num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    v_feature_size: int = 2048
    v_target_size: int = 1601
    v_hidden_size: int = 768
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 3072
    v_hidden_dropout_prob: float = 0.2
    v_attention_probs_dropout_prob: float = 0.1
    v_hidden_act: str = "gelu"
    v_initializer_range: float = 0.02
    bi_hidden_size: int = 1024
    fusion_method: str = "mul"
    predict_feature: bool = False
    legacy: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(msg)

        for name in (
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "v_feature_size",
            "v_target_size",
            "v_hidden_size",
            "v_num_attention_heads",
            "v_intermediate_size",
            "bi_hidden_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_hidden_layers", "t_num_hidden_layers", "v_num_hidden_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                fail(f"{name} must be a non-negative integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            fail(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.v_hidden_size % self.v_num_attention_heads:
            fail(
                f"v_hidden_size {self.v_hidden_size} is not divisible by "
                f"v_num_attention_heads {self.v_num_attention_heads}"
            )
        if self.v_hidden_size != self.hidden_size:
            fail(
                f"v_hidden_size {self.v_hidden_size} must equal hidden_size {self.hidden_size}: "
                "regions and words share the interaction layers"
            )
        for name in ("hidden_act", "v_hidden_act"):
            if getattr(self, name) not in ACTIVATIONS:
                fail(f"{name} must be one of {ACTIVATIONS}, got {getattr(self, name)!r}")
        if self.fusion_method not in FUSION_METHODS:
            fail(f"fusion_method must be one of {FUSION_METHODS}, got {self.fusion_method!r}")
        for name in (
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "v_hidden_dropout_prob",
            "v_attention_probs_dropout_prob",
        ):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                fail(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    @property
    def region_target_size(self) -> int:
        """Output width of the region head: classes, or the feature itself with predict_feature."""
        return self.v_feature_size if self.predict_feature else self.v_target_size

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> BertConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"legacy"}
        unknown = sorted(set(values) - known - LEGACY_KEYS)
        if unknown:
            logger.warning("%s: ignoring unknown config keys: %s", source, ", ".join(unknown))
        legacy = {k: v for k, v in values.items() if k in LEGACY_KEYS}
        try:
            return cls(**{k: v for k, v in values.items() if k in known}, legacy=legacy)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BertConfig:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(values, source=path)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "legacy"}
        values.update(self.legacy)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
