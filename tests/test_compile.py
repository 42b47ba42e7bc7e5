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
