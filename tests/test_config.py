"""Configuration: the published file, defaults, validation, round trip."""

from __future__ import annotations

import json
import logging
import os

import pytest

from vilbert.config import BertConfig, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "config", "bert_base_6layer_interbert.json")


def test_published_values_and_defaults():
    config = BertConfig.from_json_file(BASE)
    assert (config.hidden_size, config.num_hidden_layers, config.t_num_hidden_layers) == (768, 6, 6)
    assert (config.v_num_hidden_layers, config.v_num_attention_heads, config.v_target_size) == (6, 8, 1601)
    assert (config.bi_hidden_size, config.fusion_method, config.predict_feature) == (1024, "mul", False)
    assert config.legacy["pooling_method"] == "mul"


def test_round_trip(tmp_path):
    config = BertConfig.from_json_file(BASE)
    config.to_json_file(tmp_path / "c.json")
    assert BertConfig.from_json_file(tmp_path / "c.json") == config
    assert json.loads(config.to_json())["max_seq_length"] == 36


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 100}, "not divisible by num_attention_heads"),
        ({"v_hidden_size": 512, "v_num_attention_heads": 8}, "must equal hidden_size"),
        ({"fusion_method": "concat"}, "fusion_method"),
        ({"hidden_act": "tanh"}, "hidden_act"),
        ({"vocab_size": "many"}, "vocab_size"),
    ],
)
def test_invalid_values_are_clear_errors(tmp_path, change, message):
    with open(BASE) as f:
        values = json.load(f)
    values.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=message) as info:
        BertConfig.from_json_file(path)
    assert "bad.json" in str(info.value)


def test_unknown_keys_warn(tmp_path, caplog):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"hidden_sise": 3}))
    with caplog.at_level(logging.WARNING):
        BertConfig.from_json_file(path)
    assert "hidden_sise" in caplog.text


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        BertConfig.from_json_file(tmp_path / "none.json")
    (tmp_path / "broken.json").write_text("{\n  'a': 1\n}")
    with pytest.raises(ConfigError, match="broken.json: invalid JSON at line 2"):
        BertConfig.from_json_file(tmp_path / "broken.json")
