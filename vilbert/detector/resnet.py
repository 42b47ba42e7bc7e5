"""MSRA ResNet-101 as the bottom-up-attention model used it: frozen batch norm, stride on the 1x1.

The original MSRA (Caffe) ResNet puts a block's stride on its first 1x1 convolution, not on the
3x3 as torchvision does, and its pool1 has no padding and rounds its output size up. Parameter
names follow detectron2 (``res4.22.conv2.norm.running_var``), as two of the public ports do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """Caffe's BatchNorm (global statistics) + Scale layers: a fixed per-channel affine map."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by its frozen batch norm (detectron2's ``Conv2d(norm=...)``)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, eps: float, **kwargs: int
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias=False, **kwargs)
        self.norm = FrozenBatchNorm2d(out_channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """1x1 (strided) -> 3x3 (dilated) -> 1x1, plus a projection shortcut when the width changes."""

    def __init__(
        self, in_channels: int, bottleneck: int, out_channels: int, stride: int, dilation: int, eps: float
    ) -> None:
        super().__init__()
        self.shortcut = (
            ConvNorm(in_channels, out_channels, 1, eps, stride=stride)
            if in_channels != out_channels
            else None
        )
        self.conv1 = ConvNorm(in_channels, bottleneck, 1, eps, stride=stride)
        self.conv2 = ConvNorm(bottleneck, bottleneck, 3, eps, padding=dilation, dilation=dilation)
        self.conv3 = ConvNorm(bottleneck, out_channels, 1, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


def make_stage(
    blocks: int, in_channels: int, bottleneck: int, out_channels: int, stride: int, dilation: int, eps: float
) -> nn.Sequential:
    """A stage: the first block strides (and projects), the others keep the size."""
    layers = [Bottleneck(in_channels, bottleneck, out_channels, stride, dilation, eps)]
    layers += [
        Bottleneck(out_channels, bottleneck, out_channels, 1, dilation, eps) for _ in range(blocks - 1)
    ]
    return nn.Sequential(*layers)


class Stem(nn.Module):
    """conv1 7x7/2 + norm + ReLU, then pool1: 3x3/2 max pooling, no padding, ceil rounding."""

    def __init__(self, out_channels: int, eps: float) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, eps, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class ResNetC4(nn.Module):
    """Stem and res2-res4: the shared feature map at stride 16 that the RPN and RoI pooling read."""

    def __init__(
        self, blocks: tuple[int, int, int], stem_channels: int, res2_bottleneck: int, eps: float
    ) -> None:
        super().__init__()
        self.stem = Stem(stem_channels, eps)
        width = res2_bottleneck
        self.res2 = make_stage(blocks[0], stem_channels, width, 4 * width, 1, 1, eps)
        self.res3 = make_stage(blocks[1], 4 * width, 2 * width, 8 * width, 2, 1, eps)
        self.res4 = make_stage(blocks[2], 8 * width, 4 * width, 16 * width, 2, 1, eps)
        self.out_channels = 16 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))
