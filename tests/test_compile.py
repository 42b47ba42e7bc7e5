"""``--compile``: the training forward + loss and the retrieval scorer trace as one graph each (no graph
break), and the compiled pretraining losses equal the eager ones (fp32, CPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from vilbert.config import BertConfig
from vilbert.modeling import InterBertForMultiModalPreTraining, InterBertForVLTasks
from vilbert.precision import Precision
from vilbert.pretraining import LossWeights, pretraining_losses
from vilbert.retrieval_scorer import RetrievalScorer

DATA = os.path.join(os.path.dirname(__file__), "data")
CONFIG = BertConfig.from_json_file(os.path.join(DATA, "golden", "config.json"))


def _batch() -> dict[str, torch.Tensor]:
    """The golden trajectory's first pretraining batch, under the collate's names."""
    from tests.test_golden_training import _npz, _pretraining_batch

    return _pretraining_batch(_npz("pretrain_batches.npz"), 0)


def _compiled_training_model() -> InterBertForMultiModalPreTraining:
    """The model as the trainer compiles it: heads on every position (static shapes)."""
    torch.manual_seed(0)
    model = InterBertForMultiModalPreTraining(CONFIG).train()
    model.gather_heads = False
    return model


def test_training_forward_and_loss_have_no_graph_break():
    model = _compiled_training_model()
    explained = torch._dynamo.explain(lambda batch: pretraining_losses(model, batch, LossWeights())[0])(
        _batch()
    )
    assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]
    assert explained.graph_count == 1


def test_retrieval_scorer_has_no_graph_break():
    model = InterBertForVLTasks(CONFIG).eval()
    scorer = RetrievalScorer(model, Precision("fp32", torch.device("cpu")), pairs_per_forward=8)
    text = torch.randn(8, 9, CONFIG.hidden_size)
    image = torch.randn(8, 7, CONFIG.v_hidden_size)
    masks = torch.ones(8, 9, dtype=torch.long), torch.ones(8, 7, dtype=torch.long)
    with torch.no_grad():
        explained = torch._dynamo.explain(scorer._itm_logits)(text, masks[0], image, masks[1])
    assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]


@pytest.mark.slow
def test_compiled_losses_equal_eager_losses():
    model = _compiled_training_model().eval()  # eval: no dropout draw to differ between the two
    compiled = torch.compile(model)
    batch = _batch()
    with torch.no_grad():
        eager = pretraining_losses(model, batch, LossWeights())[1]
        fast = pretraining_losses(compiled, batch, LossWeights())[1]
    for name in eager:
        np.testing.assert_allclose(float(fast[name]), float(eager[name]), atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_compiled_retrieval_scores_equal_eager_scores():
    """``eval_retrieval.py --compile``: the scorer's encoder + ITM head compiled with dynamic shapes
    (blocks of 9 pairs, each cut to its own widths) gives the eager score matrix to 1e-5 (fp32)."""
    from tests.test_eval_retrieval import TINY, _random_inputs

    config = BertConfig.from_json_file(TINY)
    config.initializer_range = 0.2  # scores spread over (0, 1)
    torch.manual_seed(0)
    model = InterBertForVLTasks(config).eval()
    text, image = _random_inputs(config, captions=5, images=7)
    scores = {}
    for name, options in (("eager", None), ("compiled", {"mode": None})):
        scorer = RetrievalScorer(model, Precision("fp32", torch.device("cpu")), 9, compile_options=options)
        bank = scorer.embed_images([image], 7)
        scores[name] = scorer.score(scorer.stream(text, bank))
    assert scores["eager"].std() > 1e-3
    np.testing.assert_allclose(scores["compiled"], scores["eager"], atol=1e-5)


def test_the_compile_flag_takes_an_optional_mode():
    from vilbert.retrieval_eval import retrieval_parser

    base = ["--from_pretrained", "x.bin"]
    assert retrieval_parser().parse_args(base).compile is None
    assert retrieval_parser().parse_args([*base, "--compile"]).compile == "default"
    assert retrieval_parser().parse_args([*base, "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    with pytest.raises(SystemExit):
        retrieval_parser().parse_args([*base, "--compile", "fastest"])
