"""Contrastive representation distillation (Tian et al., ICLR 2020), device-agnostic and DDP-safe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.methods.collectives import gather_cat, global_mean
from crossmodal_kd.losses import nce_loss
from crossmodal_kd.methods.kd import Distiller
from crossmodal_kd.params import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability
from crossmodal_kd.registry import METHODS


class Embed(nn.Module):
    """Linear projection to the contrastive space, then L2 normalisation."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@METHODS.register("crd")
class CRD(Distiller):
    """``w_ce CE + w_kd KD + w_crd (NCE_student + NCE_teacher)`` with momentum memory banks.

    Each side's embedding of a training sample is contrasted with the *other* side's bank row for that
    sample (positive) and ``nce_k`` uniformly drawn rows (negatives); scores are ``exp(<v, m> / nce_t) / Z``
    with ``Z`` fixed on the first batch (as in RepDistiller). After each training step the rows of the
    batch's ``index`` become ``normalize(momentum * row + (1 - momentum) * v)``. The banks (``bank_size``
    rows: at least the training split's size) are buffers, so checkpoints hold them; under DDP every
    process applies the same gathered update, so they stay identical.

    ``warmup_epochs``: the NCE weight ramps as ``min(epoch / warmup_epochs, 1)``, so epoch 0 is CE only. A
    freshly initialised student whose features barely vary across samples (LeNet on avdigits: feature std
    0.012 at init) otherwise gets NCE gradients ~36x CE's, which collapse its features and kill its ReLUs
    (CE stays at chance). ``warmup_epochs=0`` is RepDistiller's schedule.
    """

    class Params(Distiller.Params):
        bank_size: PositiveInt | None = None
        feat_dim: PositiveInt = 128
        nce_k: PositiveInt = 4096
        nce_t: PositiveFloat = 0.07
        momentum: Probability = 0.5
        w_crd: NonNegativeFloat = 0.8
        w_kd: NonNegativeFloat = 0.0
        warmup_epochs: NonNegativeInt = 0

    def __init__(self, ctx: BuildContext, params: CRD.Params) -> None:
        super().__init__(ctx, params)
        bank_size, feat_dim = params.bank_size or ctx.num_train, params.feat_dim
        self.embed_s = Embed(self.student.feature_dim, feat_dim)
        self.embed_t = Embed(self.teacher.module.feature_dim, feat_dim)
        self.bank_size, self.nce_k, self.nce_t = bank_size, params.nce_k, params.nce_t
        self.momentum, self.w_crd = params.momentum, params.w_crd
        self.register_buffer("bank_s", F.normalize(torch.randn(bank_size, feat_dim), dim=1))
        self.register_buffer("bank_t", F.normalize(torch.randn(bank_size, feat_dim), dim=1))
        self.register_buffer("z", torch.zeros(2))  # normalisers (student side, teacher side); 0 = not set yet
        self.warmup_epochs = params.warmup_epochs
        self.warmup_factor = self._warmup_factor(0)

    def _warmup_factor(self, epoch: int) -> float:
        return min(epoch / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.warmup_factor = self._warmup_factor(epoch)

    def epoch_info(self):
        return {"crd_warmup": self.warmup_factor}

    def forward(self, batch):
        out = self.student(batch)
        t_out = self.teacher(batch)
        index = batch["index"]
        if int(index.max()) >= self.bank_size:
            raise IndexError(
                f"crd: sample index {int(index.max())} >= bank_size {self.bank_size}; "
                "set bank_size to the training split's size"
            )
        v_s, v_t = self.embed_s(out["features"]), self.embed_t(t_out["features"])
        negatives = torch.randint(self.bank_size, (len(index), self.nce_k), device=index.device)
        rows = torch.cat([index.unsqueeze(1), negatives], 1)
        noise = 1.0 / self.bank_size
        crd = nce_loss(self._scores(v_s, self.bank_t, rows, 0), noise)  # student vs the teacher's bank
        crd = crd + nce_loss(self._scores(v_t, self.bank_s, rows, 1), noise)  # and the other way round
        if self.training:
            self._update_banks(index, v_s.detach(), v_t.detach())
        losses = self.logit_losses(out["logits"], t_out["logits"], batch["label"])
        losses["crd"] = self.warmup_factor * self.w_crd * crd
        return out, losses

    def _scores(self, v: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, side: int) -> torch.Tensor:
        """``exp(<bank[rows], v> / nce_t) / Z``: ``(B, 1 + K)``, the positive first.

        In fp32: ``exp(1 / 0.07)`` overflows fp16."""
        with torch.autocast(v.device.type, enabled=False):
            scores = torch.exp(torch.bmm(bank[rows], v.float().unsqueeze(2)).squeeze(2) / self.nce_t)
        if self.z[side] == 0:
            self.z[side] = global_mean(scores.detach()).mean() * self.bank_size
        return scores / self.z[side].clone()  # a copy: z is written in place on the first batch

    @torch.no_grad()
    def _update_banks(self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        index, v = gather_cat(index), gather_cat(torch.cat([v_s, v_t], 1))
        for bank, new in zip((self.bank_s, self.bank_t), v.chunk(2, dim=1)):
            bank.index_copy_(0, index, F.normalize(self.momentum * bank[index] + (1 - self.momentum) * new, dim=1))
