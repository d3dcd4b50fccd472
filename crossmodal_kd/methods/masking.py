"""MST-Distill stage 2: train one mask on one (teacher, layer), alone, toward the student's prediction."""

from __future__ import annotations

import math

from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.models.io import attach_spec
from crossmodal_kd.losses import kd_kl
from crossmodal_kd.models.masks import attached, layer_output_shape
from crossmodal_kd.methods.base import Method
from crossmodal_kd.params import MaskSpec, ModelRefSpec, Params as BaseParams, PositiveFloat
from crossmodal_kd.registry import MASKS, METHODS


@METHODS.register("mask")
class MaskTraining(Method):
    """Only the mask is trained: ``tau^2 KL(p_student || p_masked_teacher)``; teacher and student frozen.

    ``layer``: a submodule name, or ``name:input`` to mask its input. ``mask``: a ``MASKS`` entry
    (``channel_gate``, light; ``official``, the public code's MaskNet). Use ``select: {metric: loss}`` to
    keep the mask state with the lowest validation loss.
    The saved model ``mask`` is evaluated as the teacher with this mask (and only this one) active.
    """

    class Params(BaseParams):
        teacher: ModelRefSpec
        student: ModelRefSpec
        layer: str
        mask: MaskSpec | None = None
        tau: PositiveFloat = 4.0

    def __init__(self, ctx: BuildContext, params: MaskTraining.Params) -> None:
        super().__init__(ctx)
        mask = params.mask or {"name": "channel_gate"}
        self.teacher = self.freeze("teacher", ctx.load(params.teacher, key="teacher"), serve=False)  # run with the mask below
        self.student = self.freeze("student", ctx.load(params.student, key="student"))
        self.layer, self.tau = params.layer, params.tau
        shape = layer_output_shape(self.teacher.module, self.layer, ctx.sample_batch)
        context = {"channels": shape[1], "spatial": math.prod(shape[2:]) > 1}  # `spatial`: for masks that summarise conv maps
        mask_params = mask.get("params", {})
        self.mask = attach_spec(
            MASKS.build(mask["name"], mask_params, where=f"{ctx.where}.mask.params", **context), "masks", mask["name"], mask_params, context
        )

    def masked_logits(self, batch):
        with attached(self.teacher.module, self.layer, self.mask):
            return self.teacher.module(batch)["logits"]

    def forward(self, batch):
        t_logits = self.masked_logits(batch)
        s_logits = self.student(batch)["logits"]
        return {"logits": t_logits}, {"mask_kl": kd_kl(t_logits, s_logits, self.tau)}

    def predict(self, batch):
        return {"mask": self.masked_logits(batch)}

    def models(self):
        return {"mask": self.mask}
