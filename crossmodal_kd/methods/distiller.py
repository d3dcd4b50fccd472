"""Shared base of the single-teacher baselines: a student, one frozen teacher, CE plus optional Hinton KD."""

from __future__ import annotations

from typing import Any

import torch

from crossmodal_kd.engine.context import BuildContext
from crossmodal_kd.losses import cross_entropy, kd_kl
from crossmodal_kd.methods.base import Method
from crossmodal_kd.methods.kd import build_student


class Distiller(Method):
    """``student`` (a name under ``networks:``) learns from ``teacher`` (a ``{stage, model}`` or ``{path}`` ref).

    :meth:`logit_losses` gives ``w_ce * CE`` and, when ``w_kd > 0``, ``w_kd * tau^2 KL(p_t || p_s)``;
    subclasses add their own terms. Saved model: ``student``.
    """

    def __init__(
        self,
        ctx: BuildContext,
        student: str,
        teacher: dict,
        student_init: dict | None,
        tau: float,
        w_ce: float,
        w_kd: float,
    ) -> None:
        super().__init__(ctx)
        self.student = build_student(ctx, student, student_init)
        self.teacher = self.freeze("teacher", ctx.load(teacher, key="teacher"))
        self.tau, self.w_ce, self.w_kd = tau, w_ce, w_kd

    def logit_losses(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        losses = {"ce": self.w_ce * cross_entropy(student_logits, labels)}
        if self.w_kd > 0:
            losses["kd"] = self.w_kd * kd_kl(student_logits, teacher_logits, self.tau)
        return losses

    def models(self) -> dict[str, Any]:
        return {"student": self.student}
