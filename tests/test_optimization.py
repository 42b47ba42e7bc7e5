"""Parameter groups, BertAdam's update, the schedules (against the published rules), step counts, --freeze."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from vilbert.bert_adam import schedule_factor
from vilbert.optimization import (
    BertAdam,
    FineTuneSchedule,
    build_optimizer,
    freeze_layers,
    num_optimization_steps,
    param_groups,
    step_decay_factor,
    warmup_linear,
)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)


class TinyBert(nn.Module):
    """The parameter naming of the real model, at toy size."""

    def __init__(self, num_layers: int = 12) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(10, 4)
        self.v_embeddings = nn.Linear(6, 4)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer() for _ in range(num_layers))
        self.encoder.v_layer = nn.ModuleList(Layer() for _ in range(2))


class TinyPretraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bert = TinyBert()
        self.decoder = nn.Linear(4, 10)
        self.decoder.weight = self.bert.embeddings.weight  # tied, as the MLM decoder is
        self.head_norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


class Wrapper(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(parameter) for parameter in group["params"]}
    return {name for name, parameter in model.named_parameters() if id(parameter) in ids}


def test_param_groups_split_decay_and_count_tied_weights_once():
    model = TinyPretraining()
    model.head.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, weight_decay=0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    decay_names, no_decay_names = _names(model, decay), _names(model, no_decay)
    assert all(name.endswith("weight") and "Norm" not in name and "norm" not in name for name in decay_names)
    assert all("bias" in name or "norm" in name.lower() for name in no_decay_names)
    assert "head_norm.weight" in no_decay_names and "bert.encoder.layer.0.LayerNorm.weight" in no_decay_names
    assert "head.weight" not in decay_names  # frozen
    all_params = decay["params"] + no_decay["params"]
    assert len(all_params) == len({id(parameter) for parameter in all_params})
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert len(all_params) == len(trainable)


def test_param_groups_reject_a_fully_frozen_model():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model)


def test_bert_adam_one_step_has_no_bias_correction():
    lr, weight_decay, eps, b1, b2 = 0.1, 0.01, 1e-6, 0.9, 0.999
    parameter = nn.Parameter(torch.tensor([1.0, -2.0]))
    grad = torch.tensor([0.5, 0.25])
    optimizer = BertAdam([{"params": [parameter], "weight_decay": weight_decay}], lr=lr)
    parameter.grad = grad.clone()
    optimizer.step()
    m = (1 - b1) * grad
    v = (1 - b2) * grad**2
    expected = torch.tensor([1.0, -2.0]) - lr * (
        m / (v.sqrt() + eps) + weight_decay * torch.tensor([1.0, -2.0])
    )
    torch.testing.assert_close(parameter.detach(), expected)
    assert optimizer.state[parameter]["step"] == 1


def test_bert_adam_skips_parameters_without_gradients_and_round_trips():
    used, unused = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = BertAdam([used, unused], lr=0.1)
    used.grad = torch.ones(2)
    optimizer.step()
    assert torch.equal(unused.detach(), torch.ones(2))
    restored = BertAdam([used, unused], lr=0.1)
    restored.load_state_dict(optimizer.state_dict())
    torch.testing.assert_close(restored.state[used]["exp_avg"], optimizer.state[used]["exp_avg"])


def test_build_optimizer():
    model = TinyPretraining()
    adamw = build_optimizer("AdamW", param_groups(model), lr=1e-4)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["eps"] == 1e-6 and adamw.defaults["betas"] == (0.9, 0.999)
    cpu_fused = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4)
    assert bool(adamw.defaults.get("fused")) == cpu_fused  # fused kernel on the CPU from torch 2.4
    assert not build_optimizer("AdamW", param_groups(model), lr=1e-4, fused=False).defaults.get("fused")
    assert [group["weight_decay"] for group in adamw.param_groups] == [0.01, 0.0]
    assert isinstance(build_optimizer("BertAdam", param_groups(model), lr=1e-4), BertAdam)
    with pytest.raises(ValueError, match="unknown optimizer 'Adamax'"):
        build_optimizer("Adamax", param_groups(model), lr=1e-4)


def _optimizer(lr: float = 1.0, groups: int = 1) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr * (g + 1)} for g in range(groups)]
    )


def _run_lambda(scheduler: LambdaLR, steps: int) -> list[float]:
    factors = []
    for _ in range(steps):
        factors.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return factors


def test_warmup_linear():
    scheduler = warmup_linear(_optimizer(), warmup_steps=2, total_steps=6)
    assert _run_lambda(scheduler, 8) == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


def test_warmup_linear_matches_the_published_formula():
    warmup, total = 0.1, 50
    scheduler = warmup_linear(_optimizer(), warmup_steps=int(warmup * total), total_steps=total)
    factors = _run_lambda(scheduler, total)
    for step, factor in enumerate(factors):
        progress = step / total
        published = progress / warmup if progress < warmup else max((progress - 1.0) / (warmup - 1.0), 0.0)
        assert factor == pytest.approx(published)


def test_warmup_constant():
    """BertAdam's fine-tuning schedule on a parameter's update counter (t_total 16, warm-up 0.25)."""
    factors = [schedule_factor("warmup_constant", step, 16, 0.25) for step in range(6)]
    assert factors == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert [schedule_factor("warmup_constant", step, 16, 0.0) for step in range(2)] == [1.0, 1.0]


def test_manual_decay_matches_the_published_lambda_lr():
    milestones = np.array([12, 16, 20, 22, 26])
    published = LambdaLR(_optimizer(), lambda epoch: pow(0.1, np.sum(milestones <= epoch)))
    schedule = FineTuneSchedule(_optimizer(), "mannul", warmup_steps=0)
    for epoch in range(30):
        assert schedule.get_last_lr()[0] == pytest.approx(published.get_last_lr()[0]), epoch
        published.optimizer.step()
        published.step()
        schedule.epoch_end(epoch)
    assert step_decay_factor(12) == pytest.approx(0.1) and step_decay_factor(27) == pytest.approx(1e-5)


def test_automatic_decay_matches_reduce_lr_on_plateau():
    scores = [0.50, 0.60, 0.60, 0.6003, 0.59, 0.70, 0.69, 0.68, 0.67, 0.66, 0.80, 0.10, 0.10, 0.10]
    reference_optimizer = _optimizer()
    reference = ReduceLROnPlateau(
        reference_optimizer, mode="max", factor=0.2, patience=1, cooldown=1, threshold=0.001
    )
    schedule = FineTuneSchedule(_optimizer(), "automatic", warmup_steps=0)
    lrs = []
    for epoch, score in enumerate(scores):
        reference.step(score)
        schedule.epoch_end(epoch, score)
        lrs.append(schedule.get_last_lr()[0])
        assert lrs[-1] == pytest.approx(reference_optimizer.param_groups[0]["lr"]), epoch
    assert min(lrs) < 1.0  # the sequence does trigger reductions
    with pytest.raises(ValueError, match="finite validation score"):
        schedule.epoch_end(len(scores), float("nan"))


def test_many_plateaus_stop_where_reduce_lr_on_plateau_stops_each_group():
    """Thirty flat epochs after a peak cut the lr every third epoch; below torch's eps (1e-8) a cut is
    not made, which stops the 2e-5 group (the published fine-tuning lr) after 5 cuts and the 1e-3
    group after 8, as torch does for each of its groups."""

    def two_groups():
        first, second = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        return torch.optim.SGD([{"params": [first], "lr": 2e-5}, {"params": [second], "lr": 1e-3}])

    reference_optimizer = two_groups()
    reference = ReduceLROnPlateau(
        reference_optimizer, mode="max", factor=0.2, patience=1, cooldown=1, threshold=0.001
    )
    schedule = FineTuneSchedule(two_groups(), "automatic", warmup_steps=0)
    for epoch, score in enumerate([0.9] + [0.5] * 30):
        reference.step(score)
        schedule.epoch_end(epoch, score)
        expected = [group["lr"] for group in reference_optimizer.param_groups]
        assert schedule.get_last_lr() == pytest.approx(expected, rel=1e-12), epoch
    assert schedule.get_last_lr() == pytest.approx([2e-5 * 0.2**5, 1e-3 * 0.2**8], rel=1e-12)
    restored = FineTuneSchedule(two_groups(), "automatic", warmup_steps=0)
    restored.load_state_dict(schedule.state_dict())
    assert restored.get_last_lr() == schedule.get_last_lr()
    older = {key: value for key, value in schedule.state_dict().items() if key != "decays"}
    restored.load_state_dict({**older, "decay": 0.2})  # a resume file of the single-decay format
    assert restored.get_last_lr() == pytest.approx([2e-5 * 0.2, 1e-3 * 0.2])


def test_fine_tune_schedule_combines_warmup_and_decay_per_group():
    optimizer = _optimizer(lr=2.0, groups=2)
    schedule = FineTuneSchedule(optimizer, "mannul", warmup_steps=4)
    assert schedule.get_last_lr() == [0.0, 0.0]
    schedule.step()
    assert schedule.get_last_lr() == pytest.approx([0.5, 1.0])
    schedule.epoch_end(11)  # after 12 epochs: x0.1
    assert schedule.get_last_lr() == pytest.approx([0.05, 0.1])
    for _ in range(5):
        schedule.step()
    assert schedule.get_last_lr() == pytest.approx([0.2, 0.4])


def test_fine_tune_schedule_resumes_exactly():
    first = FineTuneSchedule(_optimizer(groups=2), "automatic", warmup_steps=10)
    for _ in range(7):
        first.step()
    for epoch, score in enumerate([0.5, 0.4, 0.3]):
        first.epoch_end(epoch, score)
    second = FineTuneSchedule(_optimizer(groups=2), "automatic", warmup_steps=10)
    second.load_state_dict(first.state_dict())
    assert second.get_last_lr() == first.get_last_lr()
    first.step(), second.step()
    assert second.get_last_lr() == first.get_last_lr()
    with pytest.raises(ValueError, match="saved lr schedule is 'automatic'"):
        FineTuneSchedule(_optimizer(groups=2), "mannul", 10).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="unknown --lr_scheduler 'cosine'"):
        FineTuneSchedule(_optimizer(), "cosine", 10)


def test_step_counts_account_for_accumulation_and_world_size():
    assert num_optimization_steps(10, 3, gradient_accumulation_steps=4) == 9  # ceil(10 / 4) * 3
    assert num_optimization_steps(12, 2, gradient_accumulation_steps=4) == 6
    assert num_optimization_steps(10, 2.5) == 25
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        num_optimization_steps(10, 1, 0)


def test_freeze_embeddings_and_layers_up_to_k():
    model = Wrapper(TinyPretraining())
    frozen = set(freeze_layers(model, 1))
    for name, parameter in model.module.named_parameters():
        expected_frozen = name.startswith(
            ("bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1.")
        )
        assert parameter.requires_grad != expected_frozen, name
        assert (name in frozen) == expected_frozen
    assert model.module.bert.encoder.layer[10].dense.weight.requires_grad  # "10" is not <= 1
    assert model.module.bert.v_embeddings.weight.requires_grad
    assert model.module.bert.encoder.v_layer[0].dense.weight.requires_grad


def test_freeze_minus_one_freezes_nothing_and_bad_models_fail_clearly():
    model = TinyPretraining()
    assert freeze_layers(model, -1) == []
    assert all(parameter.requires_grad for parameter in model.parameters())
    with pytest.raises(ValueError, match="matched no parameter"):
        freeze_layers(nn.Linear(2, 2), 0)
    with pytest.raises(ValueError, match=">= -1"):
        freeze_layers(model, -2)


def test_frozen_parameters_stay_put_through_a_step():
    model = TinyPretraining()
    freeze_layers(model, 0)
    optimizer = build_optimizer("AdamW", param_groups(model), lr=0.1)
    before = model.bert.embeddings.weight.detach().clone()
    layer1 = model.bert.encoder.layer[1].dense.weight.detach().clone()
    x = torch.randn(3, 4)
    loss = sum(layer.dense(x).sum() for layer in model.bert.encoder.layer) + model.head(x).sum()
    loss.backward()
    optimizer.step()
    assert torch.equal(model.bert.embeddings.weight, before)
    assert not torch.equal(model.bert.encoder.layer[1].dense.weight, layer1)
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.1)
