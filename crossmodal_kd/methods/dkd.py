"""Decoupled knowledge distillation (Zhao et al., CVPR 2022)."""

from __future__ import annotations

from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.losses import non_target_kl, target_kl
from crossmodal_kd.methods.kd import Distiller
from crossmodal_kd.params import ModelRefSpec, NetworkName, NonNegativeFloat, NonNegativeInt, PositiveFloat
from crossmodal_kd.registry import METHODS


@METHODS.register("dkd")
class DKD(Distiller):
    """``w_ce CE + warm-up * (alpha TCKD + beta NCKD)``; the warm-up factor is ``min((epoch + 1) / warmup, 1)``.

    Defaults are the paper's CIFAR-100 settings (alpha 1, beta 8, tau 4, 20 warm-up epochs).
    """

    def __init__(
        self,
        ctx: BuildContext,
        student: NetworkName,
        teacher: ModelRefSpec,
        alpha: NonNegativeFloat = 1.0,
        beta: NonNegativeFloat = 8.0,
        tau: PositiveFloat = 4.0,
        warmup: NonNegativeInt = 20,
        w_ce: NonNegativeFloat = 1.0,
        student_init: ModelRefSpec | None = None,
    ) -> None:
        super().__init__(ctx, student, teacher, student_init, tau, w_ce, w_kd=0.0)
        self.alpha, self.beta, self.warmup = alpha, beta, warmup
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
        losses["tckd"] = w * self.alpha * target_kl(out["logits"], t_logits, y, self.tau)
        losses["nckd"] = w * self.beta * non_target_kl(out["logits"], t_logits, y, self.tau)
        return out, losses
