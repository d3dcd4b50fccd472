"""Decoupled knowledge distillation (Zhao et al., CVPR 2022)."""

from __future__ import annotations

from typing import ClassVar

from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.losses import non_target_kl, target_kl
from crossmodal_kd.methods.kd import Distiller
from crossmodal_kd.params import NonNegativeFloat, NonNegativeInt
from crossmodal_kd.registry import METHODS


@METHODS.register("dkd")
class DKD(Distiller):
    """``w_ce CE + warm-up * (w_tckd TCKD + w_nckd NCKD)``; the warm-up factor is ``min((epoch + 1) / warmup, 1)``.

    Defaults are the paper's CIFAR-100 settings (its alpha 1 = ``w_tckd``, beta 8 = ``w_nckd``, tau 4, 20
    warm-up epochs). ``w_kd`` (default 0) adds Hinton's KD term on top, as for every :class:`Distiller`.
    """

    class Params(Distiller.Params):
        renamed: ClassVar[dict[str, str]] = {"alpha": "w_tckd", "beta": "w_nckd"}
        w_tckd: NonNegativeFloat = 1.0
        w_nckd: NonNegativeFloat = 8.0
        warmup: NonNegativeInt = 20
        w_kd: NonNegativeFloat = 0.0

    def __init__(self, ctx: BuildContext, params: DKD.Params) -> None:
        super().__init__(ctx, params)
        self.w_tckd, self.w_nckd, self.warmup = params.w_tckd, params.w_nckd, params.warmup
        self.warmup_factor = self._warmup_factor(0)

    def _warmup_factor(self, epoch: int) -> float:
        return min((epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.warmup_factor = self._warmup_factor(epoch)

    def epoch_info(self):
        return {"dkd_warmup": self.warmup_factor}

    def forward(self, batch):
        out = self.student(batch)
        t_logits = self.teacher(batch)["logits"]
        y, w = batch["label"], self.warmup_factor
        losses = self.logit_losses(out["logits"], t_logits, y)
        losses["tckd"] = w * self.w_tckd * target_kl(out["logits"], t_logits, y, self.tau)
        losses["nckd"] = w * self.w_nckd * non_target_kl(out["logits"], t_logits, y, self.tau)
        return out, losses
