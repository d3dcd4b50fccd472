"""A user's own encoder, in the user's own file: ConvMixer (Trockman & Kolter, "Patches Are All You Need?").

Nothing in the package is edited. The config lists this file under ``imports:``; importing it runs the
``@ENCODERS.register`` decorator, and networks can then name ``conv_mixer`` as their encoder.

The contract of an encoder: a factory called with the modality's ``input_shape`` (no batch dim) plus
the ``params`` of the YAML, returning an ``nn.Module`` that maps ``(B, *input_shape)`` to ``(B, out_dim)``
features and sets ``.out_dim``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from crossmodal_kd.registry import ENCODERS


class Residual(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


@ENCODERS.register("conv_mixer")
def conv_mixer(input_shape: Sequence[int], dim: int = 64, depth: int = 4, patch: int = 4, kernel: int = 5) -> nn.Module:
    """Patch embedding, then ``depth`` blocks of (residual depthwise conv, pointwise conv), then global
    average pooling. For images or spectrograms ``(C, H, W)``."""
    if len(input_shape) != 3:
        raise ValueError(f"encoder 'conv_mixer' expects (C, H, W) inputs, got shape {tuple(input_shape)}")

    def act_norm() -> list[nn.Module]:
        return [nn.GELU(), nn.BatchNorm2d(dim)]

    net = nn.Sequential(
        nn.Conv2d(input_shape[0], dim, patch, stride=patch), *act_norm(),
        *[
            nn.Sequential(
                Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel, groups=dim, padding="same"), *act_norm())),
                nn.Conv2d(dim, dim, 1), *act_norm(),
            )
            for _ in range(depth)
        ],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    net.out_dim = dim
    return net
