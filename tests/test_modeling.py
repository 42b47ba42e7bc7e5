"""Model structure and numerics: published names, attention kernels, masks, losses."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from vilbert.config import BertConfig
from vilbert.modeling import InterBertForMultiModalPreTraining, InterBertForVLTasks, InterBertModel

DATA = os.path.join(os.path.dirname(__file__), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        t_num_hidden_layers=1,
        v_num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        v_feature_size=12,
        v_target_size=7,
        v_hidden_size=32,
        v_num_attention_heads=2,
        v_intermediate_size=40,
        bi_hidden_size=16,
    )
    values.update(overrides)
    return BertConfig(**values)


def random_batch(config: BertConfig, batch: int = 3, text: int = 7, regions: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(batch, text, dtype=torch.long)
    attention_mask[0, 5:] = 0
    image_mask = torch.ones(batch, regions, dtype=torch.long)
    image_mask[min(1, batch - 1), 3:] = 0
    loc = torch.rand(batch, regions, 5, generator=g)
    loc[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    return dict(
        input_ids=torch.randint(1, config.vocab_size, (batch, text), generator=g),
        image_feat=torch.randn(batch, regions, config.v_feature_size, generator=g),
        image_loc=loc,
        token_type_ids=torch.zeros(batch, text, dtype=torch.long),
        attention_mask=attention_mask,
        image_attention_mask=image_mask,
        multimodal_mask=torch.cat([image_mask, attention_mask], dim=1),
    )


@pytest.mark.parametrize("name", ["InterBertForVLTasks", "InterBertForMultiModalPreTraining"])
def test_state_dict_matches_published_keys_and_shapes(name):
    with open(os.path.join(DATA, "state_dict_keys.json")) as f:
        published = json.load(f)[name]
    expected = {name: tuple(shape) for name, shape in published}
    config = BertConfig.from_json_file(os.path.join(ROOT, "config", "bert_base_6layer_interbert.json"))
    with torch.device("meta"):
        model = (
            InterBertForVLTasks(config, 1)
            if name == "InterBertForVLTasks"
            else (InterBertForMultiModalPreTraining(config))
        )
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(expected)
    assert ours == expected


def test_sdpa_matches_plain_attention_with_masks():
    config = tiny_config()
    model = InterBertForVLTasks(config).eval()
    batch = random_batch(config)
    with torch.no_grad():
        model.set_attention_impl(True)
        fused = model(**batch)
        model.set_attention_impl(False)
        plain = model(**batch)
    for name in ("vil_logit", "vil_binary_prediction", "vision_prediction", "linguisic_prediction"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), atol=1e-5, rtol=0)


def test_attention_probabilities_returned_on_request():
    config = tiny_config()
    model = InterBertModel(config).eval()
    batch = random_batch(config)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    layers = config.num_hidden_layers + config.t_num_hidden_layers + config.v_num_hidden_layers
    assert len(out.attentions) == layers
    assert out.attentions[0].shape == (3, config.num_attention_heads, 12, 12)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(3, config.num_attention_heads, 12))
    # padded keys of the joint sequence get no attention
    assert float(out.attentions[0][1, :, :, 3:5].max()) < 1e-6


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_padding_never_changes_unpadded_outputs(use_sdpa):
    config = tiny_config()
    model = InterBertModel(config).eval()
    model.set_attention_impl(use_sdpa)
    batch = random_batch(config, batch=1)
    batch["attention_mask"][:] = 1
    batch["image_attention_mask"][:] = 1
    batch["multimodal_mask"][:] = 1
    padded = {k: v.clone() for k, v in batch.items()}
    pad_t, pad_r = 4, 3
    padded["input_ids"] = torch.cat([batch["input_ids"], torch.randint(1, 60, (1, pad_t))], 1)
    padded["token_type_ids"] = torch.cat(
        [batch["token_type_ids"], torch.zeros(1, pad_t, dtype=torch.long)], 1
    )
    padded["attention_mask"] = torch.cat(
        [batch["attention_mask"], torch.zeros(1, pad_t, dtype=torch.long)], 1
    )
    padded["image_feat"] = torch.cat([batch["image_feat"], torch.randn(1, pad_r, config.v_feature_size)], 1)
    padded["image_loc"] = torch.cat([batch["image_loc"], torch.rand(1, pad_r, 5)], 1)
    padded["image_attention_mask"] = torch.cat(
        [batch["image_attention_mask"], torch.zeros(1, pad_r, dtype=torch.long)], 1
    )
    padded["multimodal_mask"] = torch.cat([padded["image_attention_mask"], padded["attention_mask"]], 1)
    with torch.no_grad():
        a, b = model(**batch), model(**padded)
    torch.testing.assert_close(b.sequence_output_t[:, :7], a.sequence_output_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.sequence_output_v[:, :5], a.sequence_output_v, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.pooled_output_t, a.pooled_output_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.pooled_output_v, a.pooled_output_v, atol=1e-5, rtol=0)


def test_tied_decoder_shares_embedding_storage():
    model = InterBertForMultiModalPreTraining(tiny_config())
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert "cls.predictions.decoder.weight" not in names  # counted once by optimisers


def _labels(config, batch):
    b, t = batch["input_ids"].shape
    r = batch["image_feat"].shape[1]
    lm = torch.full((b, t), -1)
    lm[0, 1], lm[1, 2], lm[2, 3] = 5, 6, 7
    image_label = torch.full((b, r - 1), -1)
    image_label[0, 0] = 1
    image_label[1, 1] = 1
    image_label[2, 2] = 1
    target = torch.softmax(torch.randn(b, r - 1, config.v_target_size), -1)
    return lm, image_label, target


def test_losses_hand_computed():
    config = tiny_config()
    model = InterBertForMultiModalPreTraining(config).eval()
    batch = random_batch(config)
    lm, image_label, target = _labels(config, batch)
    itm = torch.tensor([0, 1, 0])
    with torch.no_grad():
        losses = model(
            **batch,
            masked_lm_labels=lm,
            image_label=image_label,
            image_target=target,
            next_sentence_label=itm,
        )
        scores = model(**batch)
    # MSM: -1 ignored, every pair counted (matched or not)
    expected_msm = F.cross_entropy(scores.text[lm != -1], lm[lm != -1])
    torch.testing.assert_close(losses.msm, expected_msm, atol=1e-6, rtol=0)
    # MRM: only masked regions of matched pairs (rows 0 and 2), region 0 dropped
    logp = F.log_softmax(scores.image[:, 1:], -1)
    kl = lambda i, j: (target[i, j] * (target[i, j].log() - logp[i, j])).sum()  # noqa: E731
    expected_mrm = (kl(0, 0) + kl(2, 2)) / 2
    torch.testing.assert_close(losses.mrm, expected_mrm, atol=1e-6, rtol=0)
    # ITM: class 0 = matched
    torch.testing.assert_close(losses.itm, F.cross_entropy(scores.itm, itm), atol=1e-6, rtol=0)


@pytest.mark.parametrize("predict_feature", [False, True])
@pytest.mark.parametrize("gather", [True, False], ids=["gathered", "full"])
def test_counted_targets_give_the_losses_and_gradients_of_the_full_target(gather, predict_feature):
    """The collate's ``mrm_targets`` (the counted regions' rows, in ``mrm_positions`` order) in
    place of the published ``[B, R - 1, D]`` ``image_target``: bitwise the same losses and gradients,
    with the heads gathered or run everywhere (where the rows are scattered into zeros)."""
    config = tiny_config(predict_feature=predict_feature)
    batch = random_batch(config)
    lm, image_label, target = _labels(config, batch)
    if predict_feature:
        target = torch.randn(*image_label.shape, config.v_feature_size)
    itm = torch.tensor([0, 1, 0])
    counted = (image_label == 1) & (itm == 0)[:, None]
    positions = torch.nonzero(counted.flatten()).flatten()
    forms = {
        "full": dict(image_target=target),
        "counted": dict(mrm_targets=target[counted], mrm_positions=positions),
        "counted, no positions": dict(mrm_targets=target[counted]),
    }
    results = {}
    for name, targets in forms.items():
        torch.manual_seed(0)
        model = InterBertForMultiModalPreTraining(config).eval()
        model.gather_heads = gather
        losses = model(
            **batch, masked_lm_labels=lm, image_label=image_label, next_sentence_label=itm, **targets
        )
        losses.mrm.backward()
        results[name] = (losses.mrm, [p.grad for p in model.parameters() if p.grad is not None])
    for name in ("counted", "counted, no positions"):
        assert torch.equal(results[name][0], results["full"][0]), name
        assert all(torch.equal(a, b) for a, b in zip(results[name][1], results["full"][1])), name


def test_gathered_heads_match_full_heads_losses_and_gradients():
    config = tiny_config()
    batch = random_batch(config)
    lm, image_label, target = _labels(config, batch)
    labels = dict(
        masked_lm_labels=lm,
        image_label=image_label,
        image_target=target,
        next_sentence_label=torch.tensor([0, 1, 0]),
    )
    results = []
    for gather in (True, False):
        torch.manual_seed(0)
        model = InterBertForMultiModalPreTraining(config).eval()
        model.gather_heads = gather
        losses = model(**batch, **labels)
        (losses.msm + losses.mrm + losses.itm).backward()
        results.append(
            (losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (a, ga), (b, gb) = results
    for name in ("msm", "mrm", "itm"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=0)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4)


def test_predict_feature_regresses_features():
    config = tiny_config(predict_feature=True)
    model = InterBertForMultiModalPreTraining(config).eval()
    assert model.cls.imagePredictions.decoder.out_features == config.v_feature_size
    batch = random_batch(config)
    lm, image_label, _ = _labels(config, batch)
    target = torch.randn(3, 4, config.v_feature_size)
    with torch.no_grad():
        losses = model(
            **batch,
            masked_lm_labels=lm,
            image_label=image_label,
            image_target=target,
            next_sentence_label=torch.tensor([0, 0, 1]),
        )
        pred = model(**batch).image[:, 1:]
    expected = (((pred[0, 0] - target[0, 0]) ** 2).sum() + ((pred[1, 1] - target[1, 1]) ** 2).sum()) / 2
    torch.testing.assert_close(losses.mrm, expected, atol=1e-5, rtol=1e-5)


def test_no_masked_token_gives_zero_not_nan():
    config = tiny_config()
    model = InterBertForMultiModalPreTraining(config)
    batch = random_batch(config)
    losses = model(
        **batch,
        masked_lm_labels=torch.full((3, 7), -1),
        image_label=torch.full((3, 4), -1),
        image_target=torch.rand(3, 4, config.v_target_size),
        next_sentence_label=torch.zeros(3).long(),
    )
    assert float(losses.msm) == 0.0 and float(losses.mrm) == 0.0


def test_vision_logit_masks_padded_regions():
    config = tiny_config()
    model = InterBertForVLTasks(config).eval()
    batch = random_batch(config)
    with torch.no_grad():
        out = model(**batch)
    assert float(out.vision_logit[1, 3:].max()) < -9000
    assert float(out.vision_logit[0].min()) > -100
