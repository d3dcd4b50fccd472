"""Views: image transforms that add derived modalities to a batch (TMKD: Zhang et al., arXiv 2603.24208), batched on the device.

A config names each new modality and the view that derives it from a source modality::

    data:
      views:
        image_edge: {name: edge, params: {source: image, alpha: 0.5}}
        image_hf:   {name: highfreq, params: {source: image, alpha: 0.5, radius: 0.25}}

The engine applies them to every batch after it reaches the device (training, evaluation and the probe
batch), so networks read ``image_edge`` like any other modality. Each view keeps its source's shape.
The paper does not publish its operators; these are the documented defaults:

- ``edge``: Sobel gradient magnitude per channel (replicate padding), rescaled per image and channel to the
  source's mean and std, blended ``(1 - alpha) * x + alpha * edges``.
- ``highfreq``: FFT high-pass that zeroes a centred disc of ``radius`` (a fraction of half the shorter
  side) in the shifted spectrum, scaled per image and channel to the source's std, blended the same way.
  Scaling is a per-image constant, so the blend has exactly ``(1 - alpha)^2`` of the source's energy inside
  the disc.
- ``rgb``: the source unchanged (a named copy, so "RGB only" is a view set like any other).
"""

from __future__ import annotations

from typing import Annotated, Callable, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field

from crossmodal_kd.config import Component, ConfigError
from crossmodal_kd.params import PositiveFloat, Probability
from crossmodal_kd.registry import VIEWS

EPS = 1e-6


def _check_alpha(alpha: float, view: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"view '{view}': alpha must be in [0, 1], got {alpha}")


def _match_moments(x: torch.Tensor, like: torch.Tensor, centre: bool) -> torch.Tensor:
    """Scale ``x`` per image and channel to ``like``'s std (and, with ``centre``, its mean)."""
    dims = (-2, -1)
    scale = like.std(dims, keepdim=True) / (x.std(dims, keepdim=True) + EPS)
    if not centre:
        return x * scale
    return (x - x.mean(dims, keepdim=True)) * scale + like.mean(dims, keepdim=True)


@VIEWS.register("rgb")
def rgb_view() -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x


@VIEWS.register("edge")
def edge_view(alpha: Probability = 0.5) -> Callable[[torch.Tensor], torch.Tensor]:
    _check_alpha(alpha, "edge")

    def apply(x: torch.Tensor) -> torch.Tensor:
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype)
        kernels = torch.stack([sobel_x, sobel_x.T]).unsqueeze(1)  # (2, 1, 3, 3)
        b, c, h, w = x.shape
        grads = F.conv2d(F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate"), kernels)
        magnitude = grads.pow(2).sum(1).add(EPS).sqrt().reshape(b, c, h, w)
        return (1 - alpha) * x + alpha * _match_moments(magnitude, x, centre=True)

    return apply


def high_pass_mask(h: int, w: int, radius: float, device: torch.device | None = None) -> torch.Tensor:
    """``(h, w)`` boolean mask of the *kept* frequencies of the shifted spectrum (outside the centred disc)."""
    fy = torch.arange(h, device=device) - h // 2
    fx = torch.arange(w, device=device) - w // 2
    dist = (fy[:, None].float() ** 2 + fx[None, :].float() ** 2).sqrt()
    return dist > radius * min(h, w) / 2


@VIEWS.register("highfreq")
def highfreq_view(alpha: Probability = 0.5, radius: Annotated[PositiveFloat, Field(le=1)] = 0.25) -> Callable[[torch.Tensor], torch.Tensor]:
    _check_alpha(alpha, "highfreq")
    if not 0.0 < radius <= 1.0:
        raise ValueError(f"view 'highfreq': radius must be in (0, 1] (a fraction of half the shorter side), got {radius}")

    def apply(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
        spectrum = spectrum * high_pass_mask(h, w, radius, x.device)
        high = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real.to(x.dtype)
        return (1 - alpha) * x + alpha * _match_moments(high, x, centre=False)

    return apply


class ViewSet:
    """The configured views: ``batch -> batch`` with one new modality per view."""

    def __init__(self, specs: Mapping[str, Component], where: str = "data.views") -> None:
        self.views: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
        for modality, spec in specs.items():
            name, params = spec.name, dict(spec.params)
            source = params.pop("source", "image")
            self.views[modality] = (source, VIEWS.build(name, params, where=f"{where}.{modality}.params"))

    def __bool__(self) -> bool:
        return bool(self.views)

    def input_shapes(self, shapes: Mapping[str, tuple[int, ...]], where: str = "data.views") -> dict[str, tuple[int, ...]]:
        """``shapes`` plus one entry per view (its source's shape)."""
        out = dict(shapes)
        for modality, (source, _) in self.views.items():
            if source not in shapes:
                raise ConfigError(f"{where}.{modality}: source modality '{source}' not in the dataset (has: {sorted(shapes)})")
            if modality in shapes:
                raise ConfigError(f"{where}.{modality}: the dataset already has a modality of that name")
            out[modality] = tuple(shapes[source])
        return out

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.views:
            return batch
        batch = dict(batch)
        with torch.no_grad():
            for modality, (source, view) in self.views.items():
                batch[modality] = view(batch[source])
        return batch
