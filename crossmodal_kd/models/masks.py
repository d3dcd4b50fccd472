"""Masking module (MST-Distill stage 2): a light gate over one layer's channels, applied by a forward hook.

Model code stays untouched: :func:`attached` hooks a mask onto a named submodule for the duration of a
``with`` block, so exactly one mask is active per specialised teacher, at training and at use time (unless
the routed stage asks for the public code's cumulative hooks). A layer name ending in ``:input`` masks the
layer's input instead of its output (e.g. ``fusion.0:input``, the concatenated modality features of a
``fusion`` network: the public code's ``concat_identity``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn

from crossmodal_kd.params import PositiveInt
from crossmodal_kd.registry import MASKS


@MASKS.register("channel_gate")
class ChannelGate(nn.Module):
    """``out * sigmoid(MLP(summary(out)))`` per channel; the summary of a conv map is its spatial mean.

    Parameters: ``2 * C * hidden + hidden + C`` (77 k at C = 596, hidden = 64). The last bias starts at
    ``init_bias`` so a fresh gate is close to the identity (sigmoid(3) = 0.95).
    """

    def __init__(self, channels: int, hidden: PositiveInt = 64, init_bias: float = 3.0) -> None:
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


@MASKS.register("official")
class OfficialMask(nn.Module):
    """The public code's MaskNet (Li et al., MST-Distill, ACM MM 2025; Gray-OREO/MST-Distill, ``KD_methods/MST.py``).

    ``out * sigmoid(fc(MHA(reshape(Linear(C, h*C)(summary)))))``: each channel becomes a token of width
    ``h = C // (hidden_dim_factor * num_heads) * num_heads``, self-attention over the C tokens, one logit per
    token. The summary of a conv map (``spatial``) is the public ``SpatialReduction``: depthwise 3x3 stride-2
    conv, 1x1 conv, BatchNorm, ReLU, global average pooling; of a vector or a 1x1 map, the values themselves.
    About ``h * C^2`` parameters: 106 M at C = 596 with the public defaults (factor 2, 3 heads).
    """

    def __init__(self, channels: int, spatial: bool = False, hidden_dim_factor: int = 2, num_heads: int = 3) -> None:
        super().__init__()
        if hidden_dim_factor < 1 or num_heads < 1:
            raise ValueError(f"mask 'official': hidden_dim_factor and num_heads must be >= 1, got {hidden_dim_factor}, {num_heads}")
        hidden = channels // (hidden_dim_factor * num_heads) * num_heads
        if hidden == 0:
            raise ValueError(
                f"mask 'official': {channels} channels give token width 0 with hidden_dim_factor={hidden_dim_factor}, "
                f"num_heads={num_heads}; lower them"
            )
        self.channels, self.hidden = channels, hidden
        self.reduce = (
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
                nn.Conv2d(channels, channels, 1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            )
            if spatial
            else None
        )
        self.embed = nn.Linear(channels, hidden * channels)
        self.mha = nn.MultiheadAttention(hidden, num_heads, batch_first=True)
        self.fc = nn.Linear(hidden, 1)

    def gate(self, out: torch.Tensor) -> torch.Tensor:
        x = out.float()
        if self.reduce is not None and x.dim() == 4 and x.shape[2:] != (1, 1):
            x = self.reduce(x)
        x = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x
        tokens = self.embed(x).view(x.shape[0], self.channels, self.hidden)
        attended, _ = self.mha(tokens, tokens, tokens, need_weights=False)
        return torch.sigmoid(self.fc(attended).squeeze(-1))

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        if out.dim() < 2 or out.shape[1] != self.channels:
            raise ValueError(f"mask expects outputs with {self.channels} channels in dim 1, got shape {tuple(out.shape)}")
        g = self.gate(out)
        return out * g.view(*g.shape, *([1] * (out.dim() - 2))).to(out.dtype)


def _split(layer: str) -> tuple[str, bool]:
    """``'name'`` -> (name, False); ``'name:input'`` -> (name, True)."""
    name, sep, point = layer.partition(":")
    if sep and point != "input":
        raise KeyError(f"layer '{layer}': the only suffix is ':input' (mask the layer's input), got ':{point}'")
    return name, bool(sep)


def find_layer(network: nn.Module, layer: str) -> nn.Module:
    modules = dict(network.named_modules())
    name, _ = _split(layer)
    if name not in modules or not name:
        names = [n for n in modules if n]
        raise KeyError(f"no layer '{name}' in {type(network).__name__}; layers: {', '.join(names)}")
    return modules[name]


def _hook(network: nn.Module, layer: str, fn) -> torch.utils.hooks.RemovableHandle:
    """``fn(tensor) -> tensor | None`` on the output of ``network.<layer>``, or on its first input with ``:input``."""
    module = find_layer(network, layer)
    if not _split(layer)[1]:
        return module.register_forward_hook(lambda _m, _i, out: fn(out))

    def on_input(_m, args):
        new = fn(args[0])
        return None if new is None else (new, *args[1:])

    return module.register_forward_pre_hook(on_input)


@contextmanager
def attached(network: nn.Module, layer: str, mask: nn.Module) -> Iterator[None]:
    """Apply ``mask`` to the output of ``network.<layer>`` (its input with ``:input``) inside the block, and only there."""
    handle = _hook(network, layer, mask)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_output_shape(network: nn.Module, layer: str, batch: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Shape of the tensor a mask at ``layer`` sees on ``batch`` (the output, or the input with ``:input``)."""
    seen: list[tuple[int, ...]] = []
    handle = _hook(network, layer, lambda t: seen.append(tuple(t.shape)))
    try:
        network(batch)
    finally:
        handle.remove()
    return seen[0]
