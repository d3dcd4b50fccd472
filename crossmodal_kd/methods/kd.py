"""Classic knowledge distillation (Hinton et al., 2015) from one frozen teacher of any modality."""

from __future__ import annotations

from typing import Any

import torch

from crossmodal_kd.engine.context import BuildContext
from crossmodal_kd.losses import cross_entropy, kd_kl
from crossmodal_kd.methods.base import Method
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


@METHODS.register("kd")
class KD(Method):
    """``w_ce * CE + w_kd * tau^2 * KL(p_teacher || p_student)``; the teacher sees its own modalities."""

    def __init__(
        self,
        ctx: BuildContext,
        student: str,
        teacher: dict,
        tau: float = 4.0,
        w_ce: float = 1.0,
        w_kd: float = 1.0,
        student_init: dict | None = None,
    ) -> None:
        super().__init__(ctx)
        self.student = build_student(ctx, student, student_init)
        self.teacher = self.freeze("teacher", ctx.load(teacher, key="teacher"))
        self.tau, self.w_ce, self.w_kd = tau, w_ce, w_kd

    def forward(self, batch):
        out = self.student(batch)
        t_logits = self.teacher(batch)["logits"]
        return out, {
            "ce": self.w_ce * cross_entropy(out["logits"], batch["label"]),
            "kd": self.w_kd * kd_kl(out["logits"], t_logits, self.tau),
        }

    def models(self):
        return {"student": self.student}
