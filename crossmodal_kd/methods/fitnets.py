"""FitNets (Romero et al., 2015): the student's features regress the teacher's through a learned adapter."""

from __future__ import annotations

from torch import nn

from crossmodal_kd.config import ConfigError
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.losses import hint_mse
from crossmodal_kd.methods.kd import Distiller
from crossmodal_kd.params import NonNegativeFloat
from crossmodal_kd.registry import METHODS


@METHODS.register("fitnets")
class FitNets(Distiller):
    """``w_ce CE + w_kd KD + w_hint MSE(W f_s, f_t)`` on the networks' ``features``, ``W`` a linear regressor.

    The original is two-stage: a hint stage (``hint_only: true``: only the hint term trains the student's
    encoder), then a KD stage that starts from it (``student_init: {stage: <hint stage>, model: student}``,
    ``w_hint: 0`` to drop the hint term and its regressor). Hints are taken at the penultimate features,
    the only layer every network exposes.
    """

    class Params(Distiller.Params):
        w_hint: NonNegativeFloat = 100.0
        hint_only: bool = False
        w_kd: NonNegativeFloat = 0.0

    def __init__(self, ctx: BuildContext, params: FitNets.Params) -> None:
        super().__init__(ctx, params)
        if params.hint_only and params.w_hint <= 0:
            raise ConfigError(f"{ctx.where}: hint_only needs w_hint > 0, got {params.w_hint}")
        self.w_hint, self.hint_only = params.w_hint, params.hint_only
        if self.w_hint > 0:
            self.regressor = nn.Linear(self.student.feature_dim, self.teacher.module.feature_dim)

    def forward(self, batch):
        out = self.student(batch)
        t_out = self.teacher(batch)
        losses = {} if self.hint_only else self.logit_losses(out["logits"], t_out["logits"], batch["label"])
        if self.w_hint > 0:
            losses["hint"] = self.w_hint * hint_mse(self.regressor(out["features"]), t_out["features"])
        return out, losses
