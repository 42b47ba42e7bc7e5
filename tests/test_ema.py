"""EMA: the update formula on every floating tensor, swap-in/restore, wrappers and round trips."""

import pytest
import torch
from torch import nn

from vilbert.ema import ExponentialMovingAverage

DECAY = 0.9


class TinyModel(nn.Module):
    """Parameters, a tied weight, floating buffers and an integer buffer, like the real model."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(10, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.norm = nn.BatchNorm1d(4)
        self.decoder = nn.Linear(4, 10)
        self.decoder.weight = self.embeddings.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.LayerNorm(self.embeddings(ids))))


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the model lives under `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    loss = model(torch.tensor([1, 2, 3, 4])).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_one_update_matches_the_formula_on_every_floating_tensor():
    torch.manual_seed(0)
    model = TinyModel()
    ema = ExponentialMovingAverage(model, DECAY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    _train_step(model, optimizer)
    ema.update(model)
    previous = {name: tensor.clone() for name, tensor in ema.shadow.items()}
    _train_step(model, optimizer)
    ema.update(model)

    current = model.state_dict()
    floating = {name for name, tensor in current.items() if tensor.is_floating_point()}
    assert set(ema.shadow) == floating
    assert {"norm.running_mean", "norm.running_var"} <= floating  # buffers are averaged too
    assert "norm.num_batches_tracked" not in ema.shadow
    for name in floating:
        expected = previous[name] - (1 - DECAY) * (previous[name] - current[name])
        torch.testing.assert_close(ema.shadow[name], expected)
    assert ema.num_updates == 2


def test_apply_to_swaps_in_and_restores():
    torch.manual_seed(0)
    model = TinyModel()
    ema = ExponentialMovingAverage(model, DECAY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    _train_step(model, optimizer)
    ema.update(model)
    raw = _snapshot(model)

    with ema.apply_to(model):
        for name, tensor in model.state_dict().items():
            expected = ema.shadow.get(name, raw[name])
            torch.testing.assert_close(tensor, expected)
        assert model.decoder.weight is model.embeddings.weight  # tying survives the swap
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, raw[name])


def test_apply_to_restores_raw_weights_after_an_exception():
    model = TinyModel()
    ema = ExponentialMovingAverage(model, DECAY)
    for average in ema.shadow.values():
        average.add_(1.0)
    raw = _snapshot(model)
    with pytest.raises(RuntimeError, match="validation failed"):
        with ema.apply_to(model):
            raise RuntimeError("validation failed")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, raw[name])


def test_wrapped_model_uses_bare_names():
    model = TinyModel()
    wrapped = Wrapper(model)
    ema = ExponentialMovingAverage(wrapped, DECAY)
    assert all(not name.startswith("module.") for name in ema.shadow)
    ema.update(wrapped)
    with ema.apply_to(wrapped):
        pass
    exported = ema.ema_state_dict()
    assert list(exported) == list(model.state_dict())
    TinyModel().load_state_dict(exported, strict=True)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = TinyModel()
    ema = ExponentialMovingAverage(model, DECAY)
    for average in ema.shadow.values():
        average.mul_(0.5)
    saved = {name: tensor.clone() for name, tensor in ema.state_dict()["shadow"].items()}
    state = {"decay": DECAY, "num_updates": 7, "shadow": saved}

    restored = ExponentialMovingAverage(model, 0.5)
    restored.load_state_dict(state)
    assert restored.decay == DECAY and restored.num_updates == 7
    for name, tensor in saved.items():
        torch.testing.assert_close(restored.shadow[name], tensor)


def test_mismatched_state_is_a_clear_error():
    ema = ExponentialMovingAverage(TinyModel(), DECAY)
    state = ema.state_dict()
    del state["shadow"]["LayerNorm.bias"]
    with pytest.raises(ValueError, match="1 missing"):
        ExponentialMovingAverage(TinyModel(), DECAY).load_state_dict(state)
    with pytest.raises(ValueError, match="decay"):
        ExponentialMovingAverage(TinyModel(), 1.5)


def test_a_skipped_step_leaves_the_average_and_a_kept_one_is_bitwise_the_published_formula():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    plain, gated = ExponentialMovingAverage(model, decay=0.9), ExponentialMovingAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(torch.randn_like(model.weight))
    expected = [e - (1 - 0.9) * (e - v) for e, v in zip(plain.shadow.values(), model.state_dict().values())]
    plain.update(model)
    gated.update(model, skip=torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(plain.shadow.values(), gated.shadow.values()))
    assert all(torch.equal(a, b) for a, b in zip(expected, gated.shadow.values()))
    before = [t.clone() for t in gated.shadow.values()]
    with torch.no_grad():
        model.weight.add_(1.0)
    gated.update(model, skip=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, gated.shadow.values()))
