"""Proof of identity: the published model's own outputs, reproduced to 1e-5 (fp32, eval)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from vilbert.checkpoint import load_state_dict_into
from vilbert.config import BertConfig
from vilbert.modeling import InterBertForMultiModalPreTraining, InterBertForVLTasks

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")
TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    config = BertConfig.from_json_file(os.path.join(GOLDEN, "config.json"))
    weights = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(GOLDEN, "state_dict_vl.npz")).items()}
    inputs = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(GOLDEN, "inputs.npz")).items()}
    outputs = dict(np.load(os.path.join(GOLDEN, "outputs.npz")))
    return config, weights, inputs, outputs


def _close(actual: torch.Tensor, expected: np.ndarray, name: str) -> None:
    actual = actual.detach().numpy()
    assert actual.shape == expected.shape, name
    err = float(np.abs(actual - expected).max())
    assert err <= TOL, f"{name}: max abs error {err:.3g}"


def _model_inputs(inputs):
    return dict(
        input_ids=inputs["input_ids"],
        image_feat=inputs["image_feat"],
        image_loc=inputs["image_loc"],
        token_type_ids=inputs["token_type_ids"],
        attention_mask=inputs["attention_mask"],
        image_attention_mask=inputs["image_attention_mask"],
        multimodal_mask=inputs["multimodal_mask"],
    )


def pretraining_model(
    config: BertConfig, weights: dict[str, torch.Tensor], use_sdpa: bool, gather_heads: bool
) -> InterBertForMultiModalPreTraining:
    """The published pretraining model (its ``bert.``/``cls.`` weights, loaded strictly), in eval mode."""
    model = InterBertForMultiModalPreTraining(config).eval()
    pretrain_weights = {k: v for k, v in weights.items() if k.startswith(("bert.", "cls."))}
    load_state_dict_into(model, pretrain_weights, strict=True)
    model.set_attention_impl(use_sdpa)
    model.gather_heads = gather_heads
    return model


def task_model(config: BertConfig, weights: dict[str, torch.Tensor], use_sdpa: bool) -> InterBertForVLTasks:
    """The published task model (every weight, loaded strictly), in eval mode."""
    model = InterBertForVLTasks(config, num_labels=1).eval()
    load_state_dict_into(model, weights, strict=True)
    model.set_attention_impl(use_sdpa)
    return model


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "plain"])
@pytest.mark.parametrize("gather_heads", [True, False], ids=["gathered", "full"])
def test_pretraining_model_matches_published(golden, use_sdpa, gather_heads):
    config, weights, inputs, outputs = golden
    model = pretraining_model(config, weights, use_sdpa, gather_heads)
    with torch.no_grad():
        losses = model(
            **_model_inputs(inputs),
            masked_lm_labels=inputs["masked_lm_labels"],
            image_label=inputs["image_label"],
            image_target=inputs["image_target"],
            next_sentence_label=inputs["next_sentence_label"],
        )
        scores = model(**_model_inputs(inputs))
        bert = model.bert(**_model_inputs(inputs))
    _close(losses.msm, outputs["pretrain_loss_msm"], "msm")
    _close(losses.mrm, outputs["pretrain_loss_mrm"], "mrm")
    _close(losses.itm, outputs["pretrain_loss_itm"], "itm")
    _close(scores.text, outputs["pretrain_scores_text"], "scores_text")
    _close(scores.image, outputs["pretrain_scores_image"], "scores_image")
    _close(scores.itm, outputs["pretrain_scores_itm"], "scores_itm")
    _close(bert.sequence_output_t, outputs["bert_sequence_text"], "sequence_text")
    _close(bert.sequence_output_v, outputs["bert_sequence_image"], "sequence_image")
    _close(bert.pooled_output_t, outputs["bert_pooled_text"], "pooled_text")
    _close(bert.pooled_output_v, outputs["bert_pooled_image"], "pooled_image")


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "plain"])
def test_task_model_matches_published(golden, use_sdpa):
    config, weights, inputs, outputs = golden
    model = task_model(config, weights, use_sdpa)
    with torch.no_grad():
        out = model(**_model_inputs(inputs))
        pooled = model(**_model_inputs(inputs), pooled_only=True)
    for name in (
        "vil_prediction",
        "vil_logit",
        "vil_binary_prediction",
        "vision_prediction",
        "vision_logit",
        "linguisic_prediction",
        "linguisic_logit",
    ):
        _close(getattr(out, name), outputs[f"vl_{name}"], name)
    for name in ("vil_prediction", "vil_logit", "vil_binary_prediction"):
        _close(getattr(pooled, name), outputs[f"vl_{name}"], f"pooled_only {name}")


def test_decoder_stays_tied_after_loading(golden):
    config, weights, _, _ = golden
    model = InterBertForVLTasks(config, num_labels=1)
    load_state_dict_into(model, weights, strict=True)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    np.testing.assert_array_equal(
        model.cls.predictions.decoder.weight.detach().numpy(),
        weights["bert.embeddings.word_embeddings.weight"],
    )
