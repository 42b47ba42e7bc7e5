"""Exponential moving average of the weights (`--use_ema`), as the published fine-tuning does it.

Every floating-point tensor of the model's state dict (parameters and floating buffers) gets a
shadow copy on the same device; after each optimiser step, ema <- ema - (1 - decay)(ema - current).
Validation runs with the shadow weights swapped in; `pytorch_model_{epoch}_ema.bin` holds them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vilbert.distributed import unwrap_model


class ExponentialMovingAverage:
    """Shadow weights keyed like the bare model's state dict (no `module.` prefix, DDP or not)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        state = unwrap_model(model).state_dict()
        self._order = list(state)
        self.shadow: dict[str, torch.Tensor] = {
            name: tensor.detach().clone() for name, tensor in state.items() if tensor.is_floating_point()
        }
        self._others = {name: tensor for name, tensor in state.items() if not tensor.is_floating_point()}

    def _live_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        """The model's current floating tensors, in shadow order; a different model is an error."""
        state = unwrap_model(model).state_dict()
        missing = [name for name in self.shadow if name not in state]
        if missing:
            raise KeyError(
                f"EMA tracks {len(missing)} tensor(s) the model does not have, e.g. {missing[0]!r}"
            )
        self._others = {name: tensor for name, tensor in state.items() if not tensor.is_floating_point()}
        return [state[name] for name in self.shadow]

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """Move the shadow weights toward the current ones; call once after each optimiser step.

        ``skip`` (0-d, 1.0 when the optimiser step was skipped on the device) leaves them as they are.
        """
        current = self._live_tensors(model)
        shadow = list(self.shadow.values())
        # ema <- ema - (1 - decay)(ema - current), the published formula, fused over all tensors. The
        # weight may be a device tensor (0 for a skipped step): a product with it needs no host sync,
        # where torch's lerp reads a tensor weight on the host.
        weight = 1.0 - self.decay if skip is None else (1.0 - skip) * (1.0 - self.decay)
        difference = torch._foreach_sub(shadow, current)
        torch._foreach_mul_(difference, weight)
        torch._foreach_sub_(shadow, difference)
        self.num_updates += 1

    @contextlib.contextmanager
    def apply_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Swap the shadow weights in (e.g. for validation); the raw weights come back on exit, always."""
        live = self._live_tensors(model)
        with torch.no_grad():
            backup = [tensor.detach().clone() for tensor in live]
            for tensor, average in zip(live, self.shadow.values()):
                tensor.copy_(average)
        try:
            yield model
        finally:
            with torch.no_grad():
                for tensor, raw in zip(live, backup):
                    tensor.copy_(raw)

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """A complete bare-model state dict with the averaged weights, for `pytorch_model_{epoch}_ema.bin`.

        Floating tensors are the live shadow tensors (not copies); non-floating buffers are the
        model's own, as of the last update.
        """
        return {
            name: self.shadow[name] if name in self.shadow else self._others[name] for name in self._order
        }

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore shadow weights into the existing tensors, so they stay on the model's device."""
        shadow = state.get("shadow")
        if not isinstance(shadow, dict):
            raise ValueError("EMA state has no 'shadow' dict of tensors")
        unknown = sorted(set(shadow) - set(self.shadow))
        missing = sorted(set(self.shadow) - set(shadow))
        if unknown or missing:
            example = (missing or unknown)[0]
            raise ValueError(
                f"EMA state does not match the model: {len(missing)} missing and {len(unknown)} unexpected "
                f"tensor(s), e.g. {example!r}"
            )
        for name, average in self.shadow.items():
            if average.shape != shadow[name].shape:
                raise ValueError(
                    f"EMA tensor {name!r} has shape {tuple(shadow[name].shape)}, "
                    f"model has {tuple(average.shape)}"
                )
            average.copy_(shadow[name])
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
