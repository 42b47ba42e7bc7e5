"""Mixed precision with PyTorch's own autocast and GradScaler (the published code needed apex)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from vilbert.errors import BadInputError

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
NEVER = 2**31 - 1


@dataclass
class Precision:
    """``fp16``: autocast float16 + dynamic (or static ``loss_scale``) GradScaler; ``bf16``: autocast only."""

    mode: str
    device: torch.device
    loss_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in PRECISIONS:
            raise BadInputError(f"unknown precision {self.mode!r}; choose one of {', '.join(PRECISIONS)}")
        if self.mode == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise BadInputError("--bf16 needs a GPU with bfloat16 support (Ampere or newer); use --fp16")

    @classmethod
    def from_flags(cls, fp16: bool, bf16: bool, device: torch.device, loss_scale: float = 0.0) -> Precision:
        if fp16 and bf16:
            raise BadInputError("--fp16 and --bf16 exclude each other")
        return cls("fp16" if fp16 else "bf16" if bf16 else "fp32", device, loss_scale)

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.mode]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        """Enabled for fp16 only; a positive ``loss_scale`` starts there and never grows (static)."""
        enabled = self.mode == "fp16"
        if enabled and self.loss_scale > 0:
            return torch.amp.GradScaler(self.device.type, init_scale=self.loss_scale, growth_interval=NEVER)
        return torch.amp.GradScaler(self.device.type, enabled=enabled)


def use_tf32(enabled: bool) -> None:
    """TF32 matrix products on a GPU (``--tf32``): about 8x the fp32 rate with a 10-bit mantissa.

    Off by default so that fp32 means fp32 (torch's default for matrix products; convolutions too).
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if enabled:
        logger.info("--tf32: fp32 matrix products run in TF32 on the GPU (10-bit mantissa)")
