"""Masking module (MST-Distill stage 2): a light gate over one layer's channels, applied by a forward hook.

Model code stays untouched: :func:`attached` hooks a mask onto a named submodule for the duration of a
``with`` block, so exactly one mask is active per specialised teacher, at training and at use time.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn

from crossmodal_kd.registry import MASKS


@MASKS.register("channel_gate")
class ChannelGate(nn.Module):
    """``out * sigmoid(MLP(summary(out)))`` per channel; the summary of a conv map is its spatial mean.

    Parameters: ``2 * C * hidden + hidden + C`` (77 k at C = 596, hidden = 64). The last bias starts at
    ``init_bias`` so a fresh gate is close to the identity (sigmoid(3) = 0.95).
    """

    def __init__(self, channels: int, hidden: int = 64, init_bias: float = 3.0) -> None:
        super().__init__()
        self.channels = channels
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, init_bias)

    def gate(self, out: torch.Tensor) -> torch.Tensor:
        summary = out.float().mean(dim=tuple(range(2, out.dim()))) if out.dim() > 2 else out.float()
        return torch.sigmoid(self.net(summary))

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        if out.dim() < 2 or out.shape[1] != self.channels:
            raise ValueError(f"mask expects outputs with {self.channels} channels in dim 1, got shape {tuple(out.shape)}")
        g = self.gate(out)
        return out * g.view(*g.shape, *([1] * (out.dim() - 2))).to(out.dtype)


def find_layer(network: nn.Module, layer: str) -> nn.Module:
    modules = dict(network.named_modules())
    if layer not in modules or not layer:
        names = [n for n in modules if n]
        raise KeyError(f"no layer '{layer}' in {type(network).__name__}; layers: {', '.join(names)}")
    return modules[layer]


@contextmanager
def attached(network: nn.Module, layer: str, mask: nn.Module) -> Iterator[None]:
    """Apply ``mask`` to the output of ``network.<layer>`` inside the block, and only there."""
    handle = find_layer(network, layer).register_forward_hook(lambda _m, _i, out: mask(out))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_output_shape(network: nn.Module, layer: str, batch: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Shape of ``network.<layer>``'s output on ``batch`` (used to size a mask)."""
    seen: list[tuple[int, ...]] = []
    handle = find_layer(network, layer).register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    try:
        network(batch)
    finally:
        handle.remove()
    return seen[0]
