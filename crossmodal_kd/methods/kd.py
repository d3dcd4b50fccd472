"""Classic knowledge distillation (Hinton et al., 2015) from one frozen teacher of any modality."""

from __future__ import annotations

from typing import Any

import torch

from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.losses import cross_entropy, kd_kl
from crossmodal_kd.methods.base import Method
from crossmodal_kd.params import ModelRefSpec, NetworkName, NonNegativeFloat, Params as BaseParams, PositiveFloat
from crossmodal_kd.registry import METHODS


def build_student(ctx: BuildContext, student: str, init: Any | None) -> torch.nn.Module:
    """A fresh student network, optionally initialised from a trained model (``{stage, model}`` or ``{path}``)."""
    net = ctx.network(student)
    if init is not None:
        trained = ctx.load(init, key="student_init")
        try:
            net.load_state_dict(trained.state_dict())
        except RuntimeError as exc:
            raise RuntimeError(f"{ctx.where}.student_init: does not fit network '{student}': {exc}") from None
    return net


class Distiller(Method):
    """``student`` (a name under ``networks:``) learns from ``teacher`` (a ``{stage, model}`` or ``{path}`` ref).

    :meth:`logit_losses` gives ``w_ce * CE`` and, when ``w_kd > 0``, ``w_kd * tau^2 KL(p_t || p_s)``;
    subclasses add their own terms and parameters (``class Params(Distiller.Params)``, overriding defaults
    where theirs differ). ``student_init``: start the student from a trained model. Saved model: ``student``.
    """

    class Params(BaseParams):
        student: NetworkName
        teacher: ModelRefSpec
        student_init: ModelRefSpec | None = None
        tau: PositiveFloat = 4.0
        w_ce: NonNegativeFloat = 1.0
        w_kd: NonNegativeFloat = 1.0

    def __init__(self, ctx: BuildContext, params: Distiller.Params) -> None:
        super().__init__(ctx)
        self.student = build_student(ctx, params.student, params.student_init)
        self.teacher = self.freeze("teacher", ctx.load(params.teacher, key="teacher"))
        self.tau, self.w_ce, self.w_kd = params.tau, params.w_ce, params.w_kd

    def logit_losses(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        losses = {"ce": self.w_ce * cross_entropy(student_logits, labels)}
        if self.w_kd > 0:
            losses["kd"] = self.w_kd * kd_kl(student_logits, teacher_logits, self.tau)
        return losses

    def models(self) -> dict[str, Any]:
        return {"student": self.student}


@METHODS.register("kd")
class KD(Distiller):
    """Classic KD (Hinton et al., 2015): ``w_ce * CE + w_kd * tau^2 * KL(p_teacher || p_student)``; the parameters
    are :class:`Distiller`'s."""

    def forward(self, batch):
        out = self.student(batch)
        return out, self.logit_losses(out["logits"], self.teacher(batch)["logits"], batch["label"])
