"""Augmentations: random image transforms for *training* batches, batched on the device (``AUGMENTATIONS``).

A method that supports them (``supervised``) takes ``augment: {modality: {name, params}}``::

    method:
      name: supervised
      params:
        network: image_net
        augment: {image: {name: strong, params: {degrees: 15}}}

They are applied to training batches only, after views and after the batch reached the device; evaluation,
selection and the probe batch always see the data unchanged. Randomness comes from torch's generator
on the batch's device, which the engine seeds per stage, so a run is reproducible. Every sample of a
batch draws its own transform. Inputs are ``(B, C, H, W)`` images as the dataset yields them (normalised
or not): fills use each image's own border or mean, never a fixed "black".

- ``weak``: a random integer shift of up to ``shift`` pixels in each direction (edges replicated, i.e. a
  random crop of the edge-padded image), and a horizontal flip with probability ``flip`` (default 0:
  off, a mirrored digit is another symbol).
- ``strong``: a random affine map (rotation in ``±degrees``, scale in ``1 ± scale``, shear in
  ``±shear`` degrees, translation in ``±translate`` of the size; bilinear, edges replicated), then
  Gaussian noise of ``noise`` times the image's standard deviation, then, with probability
  ``cutout_p``, one square of side ``cutout`` (a fraction of the shorter side) set to the image's mean.
- ``none``: the identity (a named no-op, for ablations that switch augmentation off by config).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from crossmodal_kd.config import ConfigError
from crossmodal_kd.params import NonNegativeFloat, NonNegativeInt, Probability
from crossmodal_kd.registry import AUGMENTATIONS

Transform = Callable[[torch.Tensor], torch.Tensor]


def _check_images(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"augmentation '{name}': expected images (B, C, H, W), got shape {tuple(x.shape)}")


def _uniform(b: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(b, device=like.device, dtype=torch.float32) * (high - low) + low


@AUGMENTATIONS.register("none")
def no_augmentation() -> Transform:
    return lambda x: x


@AUGMENTATIONS.register("weak")
def weak(shift: NonNegativeInt = 2, flip: Probability = 0.0) -> Transform:
    """Random shift by up to ``shift`` pixels (edge-padded random crop), optional horizontal flip."""
    if shift < 0:
        raise ValueError(f"augmentation 'weak': shift must be >= 0 pixels, got {shift}")
    if not 0.0 <= flip <= 1.0:
        raise ValueError(f"augmentation 'weak': flip is a probability in [0, 1], got {flip}")

    def apply(x: torch.Tensor) -> torch.Tensor:
        _check_images(x, "weak")
        b, _, h, w = x.shape
        if shift > 0:
            padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
            dy = torch.randint(0, 2 * shift + 1, (b,), device=x.device)
            dx = torch.randint(0, 2 * shift + 1, (b,), device=x.device)
            rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])[:, :, None]  # (B, H, 1)
            cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])[:, None, :]  # (B, 1, W)
            batch = torch.arange(b, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
        if flip > 0:
            flipped = torch.rand(b, device=x.device) < flip
            x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
        return x.contiguous()

    return apply


@AUGMENTATIONS.register("strong")
def strong(
    degrees: NonNegativeFloat = 15.0,
    scale: Probability = 0.1,
    shear: NonNegativeFloat = 10.0,
    translate: Probability = 0.1,
    noise: NonNegativeFloat = 0.1,
    cutout: Probability = 0.3,
    cutout_p: Probability = 0.5,
) -> Transform:
    """Random affine + Gaussian noise + cutout (see the module docstring for the parameters)."""
    for key, value in {"scale": scale, "translate": translate, "cutout": cutout, "cutout_p": cutout_p}.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"augmentation 'strong': {key} must be in [0, 1], got {value}")
    if degrees < 0 or shear < 0 or noise < 0:
        raise ValueError("augmentation 'strong': degrees, shear and noise must be >= 0")

    def apply(x: torch.Tensor) -> torch.Tensor:
        _check_images(x, "strong")
        b, _, h, w = x.shape
        dtype = x.dtype
        x = x.float()
        angle = _uniform(b, -degrees, degrees, x) * math.pi / 180
        shear_ = _uniform(b, -shear, shear, x) * math.pi / 180
        zoom = _uniform(b, 1 - scale, 1 + scale, x)
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear_)
        # output -> input sampling map: rotation @ shear, divided by the zoom; translation in [-1, 1] units
        theta = torch.stack(
            [
                torch.stack([cos, cos * tan - sin, 2 * _uniform(b, -translate, translate, x)], 1),
                torch.stack([sin, sin * tan + cos, 2 * _uniform(b, -translate, translate, x)], 1),
            ],
            1,
        )
        theta[:, :, :2] /= zoom[:, None, None]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if noise > 0:
            x = x + noise * x.std(dim=(1, 2, 3), keepdim=True) * torch.randn_like(x)
        if cutout > 0 and cutout_p > 0:
            side = max(1, round(cutout * min(h, w)))
            cy = torch.randint(0, h, (b,), device=x.device)[:, None, None]
            cx = torch.randint(0, w, (b,), device=x.device)[:, None, None]
            yy = torch.arange(h, device=x.device)[None, :, None]
            xx = torch.arange(w, device=x.device)[None, None, :]
            inside = ((yy - cy).abs() <= side // 2) & ((xx - cx).abs() <= side // 2)  # (B, H, W)
            inside &= (torch.rand(b, device=x.device) < cutout_p)[:, None, None]
            x = torch.where(inside[:, None], x.mean(dim=(1, 2, 3), keepdim=True), x)
        return x.to(dtype)

    return apply


class AugmentSet:
    """The configured augmentations: ``batch -> batch`` with the named modalities transformed."""

    def __init__(
        self,
        specs: Mapping[str, Any] | None,
        input_shapes: Mapping[str, tuple[int, ...]],
        where: str = "augment",
    ) -> None:
        self.transforms: dict[str, Transform] = {}
        for modality, spec in (specs or {}).items():
            if modality not in input_shapes:
                raise ConfigError(f"{where}.{modality}: no such modality; have {', '.join(sorted(input_shapes))}")
            if len(input_shapes[modality]) != 3:
                raise ConfigError(
                    f"{where}.{modality}: augmentations transform images (C, H, W), "
                    f"not shape {tuple(input_shapes[modality])}"
                )
            self.transforms[modality] = AUGMENTATIONS.build_spec(spec, where=f"{where}.{modality}")

    def __bool__(self) -> bool:
        return bool(self.transforms)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.transforms:
            return dict(batch)
        batch = dict(batch)
        with torch.no_grad():
            for modality, transform in self.transforms.items():
                batch[modality] = transform(batch[modality])
        return batch
