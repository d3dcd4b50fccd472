"""Relational knowledge distillation (Park et al., CVPR 2019)."""

from __future__ import annotations

from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.losses import rkd_angle, rkd_distance
from crossmodal_kd.methods.kd import Distiller
from crossmodal_kd.params import NonNegativeFloat
from crossmodal_kd.registry import METHODS


@METHODS.register("rkd")
class RKD(Distiller):
    """``w_ce CE + w_kd KD + w_distance RKD-D + w_angle RKD-A`` on the networks' ``features``.

    Relations need no adapter, so student and teacher feature sizes may differ. Defaults: the paper's
    weights 25 and 50, no logit KD.
    """

    class Params(Distiller.Params):
        w_distance: NonNegativeFloat = 25.0
        w_angle: NonNegativeFloat = 50.0
        w_kd: NonNegativeFloat = 0.0

    def __init__(self, ctx: BuildContext, params: RKD.Params) -> None:
        super().__init__(ctx, params)
        self.w_distance, self.w_angle = params.w_distance, params.w_angle

    def forward(self, batch):
        out = self.student(batch)
        t_out = self.teacher(batch)
        losses = self.logit_losses(out["logits"], t_out["logits"], batch["label"])
        losses["rkd_distance"] = self.w_distance * rkd_distance(out["features"], t_out["features"])
        losses["rkd_angle"] = self.w_angle * rkd_angle(out["features"], t_out["features"])
        return out, losses
