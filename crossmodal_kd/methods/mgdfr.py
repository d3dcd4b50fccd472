"""MGDFR: distil only the teacher's modality-general decisive features, ranked by permutation salience."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.models.masks import attached, layer_output_shape
from crossmodal_kd.methods.kd import Distiller
from crossmodal_kd.params import Fraction, ModelRefSpec, PositiveInt
from crossmodal_kd.registry import METHODS


def _channels_view(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A per-channel ``(D,)`` tensor shaped to broadcast over ``out`` (``(B, D)`` or ``(B, D, ...)``)."""
    return mask.view(1, -1, *([1] * (out.dim() - 2)))


FAST_DEV_SALIENCE_PASSES = 8  # forward passes per repeat in a fast-dev-run


@torch.no_grad()
def permutation_salience(
    network: nn.Module,
    layer: str,
    batch: Mapping[str, torch.Tensor],
    reference_logits: torch.Tensor,
    repeats: int = 1,
    max_passes: int | None = None,
) -> torch.Tensor:
    """``(D,)``: for each channel ``d`` of ``network.<layer>``, the MSE between the network's logits and
    ``reference_logits`` once channel ``d`` is shuffled across the batch (mean over ``repeats`` shuffles).
    ``max_passes`` bounds the forward passes per repeat: channels are then shuffled in at most that many
    contiguous groups and each channel gets its group's score (a coarse ranking, for fast-dev-runs)."""
    dims = layer_output_shape(network, layer, batch)[1]
    n = len(reference_logits)
    groups = torch.arange(dims).chunk(min(dims, max_passes or dims))
    salience = torch.zeros(dims)
    for _ in range(repeats):
        for group in groups:
            perm = torch.randperm(n)

            def shuffle(out: torch.Tensor, group: torch.Tensor = group, perm: torch.Tensor = perm) -> torch.Tensor:
                out = out.clone()
                channels = group.to(out.device)
                out[:, channels] = out[perm.to(out.device)][:, channels]
                return out

            with attached(network, layer, shuffle):
                logits = network(batch)["logits"]
            salience[group] += F.mse_loss(logits.float(), reference_logits.float()).cpu() / repeats
    return salience


@METHODS.register("mgdfr")
class MGDFR(Distiller):
    """``w_ce CE + w_kd KD`` from the teacher with its least modality-general feature channels frozen.

    Our reading of the modality-general decisive features of Xue et al. (ICLR 2023, "The Modality
    Focusing Hypothesis") as run by the public MST-Distill code (``MGDFR.py``): a feature channel of the
    teacher is modality-general when the prediction it drives is reproducible from the student's
    modality. So, once at construction, on ``ctx.sample_batch`` (a fixed batch of the training split), each
    channel ``d`` of ``teacher.<layer>`` is shuffled across the batch and its salience is the MSE
    between the teacher's logits and those of ``reference``, a trained network that sees only the
    student's modality (e.g. the no-KD student): the larger, the more the teacher's agreement with
    the student's modality rests on ``d``. The ``remove_ratio`` least salient channels are *frozen*
    during distillation (replaced by their batch mean, as the public code does), so the KD target
    comes only from the most modality-general channels. The public code first co-trains teacher and
    student with an MSE between their logits to obtain the reference; here the reference is any
    trained model. ``salience`` and ``keep`` are buffers, saved with checkpoints. A fast-dev-run scores
    the channels in at most ``FAST_DEV_SALIENCE_PASSES`` groups, one shuffle each.
    """

    class Params(Distiller.Params):
        reference: ModelRefSpec
        layer: str
        remove_ratio: Fraction = 0.75
        repeats: PositiveInt = 3

    def __init__(self, ctx: BuildContext, params: MGDFR.Params) -> None:
        super().__init__(ctx, params)
        self.layer = params.layer
        reference_net = ctx.load(params.reference, key="reference").eval()
        with torch.no_grad():
            reference_logits = reference_net(ctx.sample_batch)["logits"]
        salience = permutation_salience(
            self.teacher.module, self.layer, ctx.sample_batch, reference_logits,
            repeats=ctx.bound(params.repeats, 1), max_passes=ctx.bound(None, FAST_DEV_SALIENCE_PASSES),
        )
        keep = torch.ones_like(salience, dtype=torch.bool)
        keep[salience.argsort()[: int(params.remove_ratio * len(salience))]] = False
        self.register_buffer("salience", salience)
        self.register_buffer("keep", keep)
        # replaces the plain teacher call: the removed channels take their *batch* mean (as the public code
        # does), so a sample's target depends on its batch and cannot be stored per sample
        self.teacher = self.teacher_call(
            "teacher", self._hooked_logits, [self.teacher.module], {"layer": self.layer}, deterministic=False
        )

    def _hooked_logits(self, batch) -> torch.Tensor:
        with attached(self.teacher.module, self.layer, self._freeze_removed):
            return self.teacher.module(batch)["logits"]

    def _freeze_removed(self, out: torch.Tensor) -> torch.Tensor:
        return torch.where(_channels_view(self.keep, out), out, out.mean(0, keepdim=True))

    def forward(self, batch):
        out = self.student(batch)
        return out, self.logit_losses(out["logits"], self.teacher(batch), batch["label"])
