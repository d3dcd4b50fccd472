"""TMKD (Zhang et al., arXiv 2603.24208): a text-guided multi-view teacher distilled into an RGB student.

Two stages:

``tmkd_teacher``
    Cross-entropy training of a ``multiview`` network (one backbone shared by the views RGB, edge,
    high-frequency, derived by ``data.views``). With the ``text_guided`` router, a frozen CLIP backend
    weights the views per instance by how well each view matches its prior-aware prompt for the
    sample's class (see :class:`~crossmodal_kd.clip.router.TextGuidedRouter`): in training, the class its
    ``class_source`` names; at validation and test, the backend's zero-shot guess (``eval_class_source``),
    so checkpoint selection and the teacher's accuracies are label-free. The router's backend may
    name an earlier stage (``image_model: {stage: align}``) and its ``class_names`` default to the
    dataset's; both are resolved here, before the network is built, so the saved teacher (model
    ``model``) records file paths and names and loads by path like any other.

``tmkd``
    The RGB-only student::

        L_all = w_ce * CE + w_kd * tau^2 KL(p_t^tau || p_s^tau)                  (logged as ``ce``, ``kd``)
                          + w_crd  * CE_c( cos(P_txt f_s, a_c) / crd_temperature )  (``crd``)
                          + w_feat * MSE( P_feat f_s, F_t + s * N(0, I) )           (``feat``)

    ``f_s``: the student's features; ``a_c``: the backend's text embedding of the class prompt
    ("a photo of a {c}.", averaged over ``class_prompts``), the anchor of class ``c``; ``F_t``: the
    teacher's fused features ``sum_v w_v f_v``, perturbed by Gaussian noise on the teacher side only, of std
    ``s = sigma * RMS(F_t)`` (``sigma_scale: teacher_rms``, the root mean square of the batch's teacher
    features: the perturbation is a fraction of the signal, whatever the backbone's feature scale) or
    ``s = sigma`` (``absolute``). ``P_txt`` and ``P_feat`` are linear projection heads trained with the
    student. A weight of 0 removes its term and its head (and, for ``w_crd``, the backend). The paper's
    alpha, beta and gamma are ``w_kd``, ``w_crd`` and ``w_feat`` here (the old keys fail naming the new ones).

Label use, stated plainly: with ``class_source: label`` (the paper's) the text-guided router reads each
sample's label to fill the prompts while the teacher trains, and the ``tmkd`` stage's frozen teacher routes
the same way (:meth:`~crossmodal_kd.clip.router.TextGuidedRouter.as_trained`), so the student distils the
teacher as it was trained; its outputs feed only losses, which read the labels anyway. The teacher's own
validation/test evaluation routes by the zero-shot guess (label-free), and the student never reads labels
at evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal_kd.clip.backends import build_clip_backend
from crossmodal_kd.clip.router import TextGuidedRouter
from crossmodal_kd.config import ConfigError
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.losses import perturbed_feature_mse, text_anchored_contrastive
from crossmodal_kd.methods.kd import Distiller
from crossmodal_kd.methods.supervised import Supervised
from crossmodal_kd.params import NonNegativeFloat, PositiveFloat
from crossmodal_kd.registry import METHODS

CLASS_PROMPTS = ("a photo of a {}.",)
"""The text anchors of the contrastive term: the class prompt of TMKD (Zhang et al., arXiv 2603.24208)."""


def feature_noise_std(teacher_features: torch.Tensor, sigma: float, scale: Literal["teacher_rms", "absolute"]) -> float:
    """The std of TMKD's teacher-side feature noise: ``sigma * RMS(teacher_features)`` (over the batch and the
    feature dims) for ``teacher_rms``, ``sigma`` for ``absolute``."""
    if scale == "absolute" or sigma == 0:
        return sigma
    return sigma * teacher_features.detach().float().pow(2).mean().sqrt().item()


@METHODS.register("tmkd_teacher")
class TMKDTeacher(Supervised):
    """Train TMKD's multi-view teacher (a ``multiview`` network named ``network``) with cross-entropy.

    Parameters as ``supervised`` (``label_smoothing``, ``augment``). The network's model references (a
    router backend's ``image_model: {stage: align}``) are resolved to files when it is built, and a router
    that takes ``class_names`` gets the dataset's unless the config gives them. Logs each view's mean weight per
    epoch (``view_weight/<view>``).
    """

    def build_model(self, ctx: BuildContext, network: str) -> nn.Module:
        spec = ctx.network_spec(network)
        if spec.name != "multiview":
            raise ConfigError(f"{ctx.where}.network: '{network}' is a '{spec.name}' network; tmkd_teacher trains a 'multiview' one")
        return ctx.network(network)

    def forward(self, batch):
        out, losses = super().forward(batch)
        weights = out["view_weights"].detach()
        for i, view in enumerate(self.model.modalities):
            self.record(f"view_weight/{view}", weights[:, i].sum(), count=len(weights))
        return out, losses


@METHODS.register("tmkd")
class TMKD(Distiller):
    """The TMKD student (see the module docstring for the loss). Saved model: ``student``.

    ``student``: a network under ``networks:`` reading RGB only; ``teacher``: the ``tmkd_teacher`` stage
    (``{stage, model}`` or ``{path}``; any network with ``features`` fits). ``backend``: the CLIP backend
    ``{name, params}`` whose text tower embeds the class prompts (``image_model`` may be a ``{stage}``
    reference); needed only when ``w_crd > 0``. ``class_names``: override the dataset's.

    Defaults (the paper's values are not public): every weight 1, ``tau`` 4, ``sigma`` 0.1 (a tenth of the
    teacher features' RMS; ``sigma_scale: absolute`` makes it a std in the teacher's feature units),
    ``crd_temperature`` 0.07.

    A ``text_guided`` teacher routes with its training ``class_source`` on every split here (see the module
    docstring); the call's ``describe`` says so, so its stored targets are never shared with a plain call.
    """

    class Params(Distiller.Params):
        renamed: ClassVar[dict[str, str]] = {"alpha": "w_kd", "beta": "w_crd", "gamma": "w_feat"}
        backend: dict[str, Any] | None = None
        class_prompts: Sequence[str] = CLASS_PROMPTS
        class_names: Sequence[str] | None = None
        w_crd: NonNegativeFloat = 1.0
        w_feat: NonNegativeFloat = 1.0
        sigma: NonNegativeFloat = 0.1
        sigma_scale: Literal["teacher_rms", "absolute"] = "teacher_rms"
        crd_temperature: PositiveFloat = 0.07

    def __init__(self, ctx: BuildContext, params: TMKD.Params) -> None:
        super().__init__(ctx, params)
        self.w_crd, self.w_feat = float(params.w_crd), float(params.w_feat)
        self.sigma, self.sigma_scale = float(params.sigma), params.sigma_scale
        self.crd_temperature = float(params.crd_temperature)
        teacher = self.teacher.module
        self.teacher_views = tuple(getattr(teacher, "modalities", ()))
        router = getattr(teacher, "router", None)
        if isinstance(router, TextGuidedRouter):
            def as_trained(batch):
                with router.as_trained():
                    return teacher(batch)

            self.teacher = self.teacher_call("teacher", as_trained, [teacher], {"router_class_source": router.class_source})
        if self.w_crd > 0:
            anchors = self._class_anchors(ctx, params.backend, list(params.class_prompts), params.class_names)
            self.register_buffer("anchors", anchors, persistent=False)  # (C, D), frozen text anchors
            self.crd_head = nn.Linear(self.student.feature_dim, anchors.shape[1])
        if self.w_feat > 0:
            self.feat_head = nn.Linear(self.student.feature_dim, self.teacher.module.feature_dim)

    @staticmethod
    def _class_anchors(
        ctx: BuildContext, backend: dict[str, Any] | None, templates: list[str], class_names: Sequence[str] | None
    ) -> torch.Tensor:
        """``(C, D)``: each class's prompt embeddings averaged over ``templates``, unit norm."""
        if backend is None:
            raise ConfigError(f"{ctx.where}.backend: the text-anchored term (w_crd > 0) needs a CLIP backend {{name, params}}; or set w_crd: 0")
        if not templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
            raise ConfigError(f"{ctx.where}.class_prompts: give templates with exactly one '{{}}' each, got {templates!r}")
        names = ctx.class_names_or(class_names)
        spec = ctx.backend_spec(backend)
        clip = build_clip_backend(spec["name"], spec.get("params")).eval()
        text = clip.encode_text([t.format(c) for c in names for t in templates]).view(len(names), len(templates), -1)
        return F.normalize(text.mean(1), dim=-1)

    def forward(self, batch):
        out = self.student(batch)
        t_out = self.teacher(batch)
        labels = batch["label"]
        losses = self.logit_losses(out["logits"], t_out["logits"], labels)
        if self.w_crd > 0:
            embedded = self.crd_head(out["features"])
            losses["crd"] = self.w_crd * text_anchored_contrastive(embedded, self.anchors, labels, self.crd_temperature)
        if self.w_feat > 0:
            std = feature_noise_std(t_out["features"], self.sigma, self.sigma_scale)
            losses["feat"] = self.w_feat * perturbed_feature_mse(self.feat_head(out["features"]), t_out["features"], std)
        if "view_weights" in t_out:
            weights = t_out["view_weights"].detach()
            for i, view in enumerate(self.teacher_views):
                self.record(f"teacher_view_weight/{view}", weights[:, i].sum(), count=len(weights))
        return out, losses
