"""Routers: per-instance weights over E teachers (``ROUTERS``).

A router returns a :class:`Routing`: ``weights`` (B, E) that weight each teacher's per-sample KD term
(rows sum to 1), and, for learned routers, the gate distribution ``probs`` (B, E) used by the
load-balancing term and the routing statistics. :func:`build_router` builds one from a ``{name, params}``
spec and hands optional context (``views``) to the routers that take it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal_kd.models.frozen import FrozenHolder
from crossmodal_kd.params import NonNegativeInt, PositiveFloat, PositiveInt, Supplied
from crossmodal_kd.registry import ROUTERS


@dataclass
class Routing:
    """``weights`` (B, E) on the per-teacher KD terms; ``probs`` (B, E), the gate distribution (load balance,
    statistics); ``loss``, the router's own training objective (added by the method), when it has one."""

    weights: torch.Tensor
    probs: torch.Tensor | None = None
    loss: torch.Tensor | None = None

    @property
    def top1(self) -> torch.Tensor:
        return self.weights.argmax(dim=1)


class Router(nn.Module):
    """``forward(student_out, teacher_logits (B, E, C), batch) -> Routing``."""

    def __init__(self, num_teachers: int) -> None:
        super().__init__()
        self.num_teachers = num_teachers


@ROUTERS.register("gate")
class GateRouter(Router):
    """MST-Distill's GateNet (Li et al., MST-Distill, ACM MM 2025; public code Gray-OREO/MST-Distill,
    ``KD_methods/MST.py``): ``g = softmax(net(student logits or features))`` over the E teachers.

    ``mode``, the weights on the per-teacher KD terms:

    - ``hard``: the top-k teachers, 1/k each (public code, k = 1). The KD term gives the gate no gradient.
    - ``soft``: the top-k teachers (k >= 2), ``g_i / sum_selected g``, fully differentiated: the gradient on
      ``g_i`` is ``(KL_i - sum_j w_j KL_j) / sum_selected g``, so it raises the selected teachers that beat the
      selected average and lowers the others. k = 1 is refused: the renormalised weight is constantly 1
      (no gradient), and a detached normaliser gives ``KL_i / g_i > 0`` on the chosen teacher at every step,
      which drives the gate to uniform.
    - ``dense``: every teacher, weighted by ``g``.

    ``objective``, what trains the gate besides load balancing:

    - ``kd``: the weighted KD term itself (soft, dense; hard has no gradient from it). Minimising
      ``sum_e w_e KL(p_e || p_s)`` favours the teacher that already agrees with the student, i.e. the least
      informative one.
    - ``true_class``: the gate's own loss ``Routing.loss = CE(gate logits, e*)``, where ``e*`` is the teacher
      whose soft label at ``target_tau`` (the distillation temperature) puts the most mass on the true class.
      The gate learns to predict, from the student's view of an instance, which specialised teacher is most
      right about it, whatever the student currently believes; the weights are detached from the gate, so
      the KD term cannot reward agreement. Needs ``batch['label']`` (training and validation loss only).

    ``linear``: no nonlinearity between the two layers (public GateNet: ``Linear(C, 2C) -> Linear(2C, E)``,
    i.e. ``hidden: 2C``). ``detach_input``: off in the public code, where the load-balancing gradient
    reaches the student through its logits.
    """

    def __init__(
        self,
        num_teachers: int,
        num_classes: int,
        feature_dim: int,
        k: PositiveInt = 1,
        mode: Literal["hard", "soft", "dense"] = "hard",
        objective: Literal["kd", "true_class"] = "true_class",
        input: Literal["logits", "features"] = "logits",
        hidden: PositiveInt = 64,
        linear: bool = False,
        detach_input: bool = True,
        target_tau: PositiveFloat = 4.0,
    ) -> None:
        super().__init__(num_teachers)
        if mode not in ("hard", "soft", "dense"):
            raise ValueError(f"router 'gate': mode must be 'hard', 'soft' or 'dense', got '{mode}'")
        if not 1 <= k <= num_teachers:
            raise ValueError(f"router 'gate': k={k} must be between 1 and the number of teachers ({num_teachers})")
        if mode == "soft" and k == 1:
            raise ValueError(
                "router 'gate': mode 'soft' with k=1 cannot learn (its weight is always 1); use mode 'hard' "
                "(public code) with objective 'true_class', mode 'soft' with k >= 2, or mode 'dense'"
            )
        if objective not in ("kd", "true_class"):
            raise ValueError(f"router 'gate': objective must be 'kd' or 'true_class', got '{objective}'")
        if input not in ("logits", "features"):
            raise ValueError(f"router 'gate': input must be 'logits' or 'features', got '{input}'")
        if target_tau <= 0:
            raise ValueError(f"router 'gate': target_tau must be > 0, got {target_tau}")
        self.k, self.mode, self.objective, self.input = k, mode, objective, input
        self.detach_input, self.target_tau = detach_input, float(target_tau)
        in_dim = num_classes if input == "logits" else feature_dim
        act = nn.Identity() if linear else nn.ReLU()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), act, nn.Linear(hidden, num_teachers))

    def forward(self, student_out: Mapping[str, torch.Tensor], teacher_logits: torch.Tensor, batch=None) -> Routing:
        x = student_out["logits" if self.input == "logits" else "features"].float()
        gate_logits = self.net(x.detach() if self.detach_input else x)
        probs = F.softmax(gate_logits, dim=1)
        g = probs.detach() if self.objective == "true_class" else probs
        if self.mode == "dense":
            weights = g
        else:
            selected = torch.zeros_like(probs).scatter_(1, probs.topk(self.k, dim=1).indices, 1.0)
            weights = selected / self.k if self.mode == "hard" else g * selected / (g * selected).sum(1, keepdim=True)
        loss = None
        if self.objective == "true_class":
            if batch is None or "label" not in batch:
                raise KeyError("router 'gate': objective 'true_class' reads batch['label'], which this batch lacks")
            loss = F.cross_entropy(gate_logits, self.best_teacher(teacher_logits, batch["label"]))
        return Routing(weights=weights, probs=probs, loss=loss)

    def best_teacher(self, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per instance, the teacher whose soft label at ``target_tau`` puts the most mass on the true class."""
        log_p = F.log_softmax(teacher_logits.detach().float() / self.target_tau, dim=-1)  # (B, E, C)
        return log_p.gather(2, labels.view(-1, 1, 1).expand(-1, log_p.shape[1], 1)).squeeze(2).argmax(1)


@ROUTERS.register("uniform")
class UniformRouter(Router):
    """Plain average of all teachers (ablation baseline)."""

    def __init__(self, num_teachers: int, num_classes: int = 0, feature_dim: int = 0) -> None:
        super().__init__(num_teachers)

    def forward(self, student_out, teacher_logits: torch.Tensor, batch=None) -> Routing:
        b = teacher_logits.shape[0]
        return Routing(weights=teacher_logits.new_full((b, self.num_teachers), 1.0 / self.num_teachers).float())


@ROUTERS.register("fixed")
class FixedRouter(Router):
    """Always the teacher at ``index`` (single-teacher ablation)."""

    def __init__(self, num_teachers: int, num_classes: int = 0, feature_dim: int = 0, index: NonNegativeInt = 0) -> None:
        super().__init__(num_teachers)
        if not 0 <= index < num_teachers:
            raise ValueError(f"router 'fixed': index {index} out of range for {num_teachers} teachers")
        self.index = index

    def forward(self, student_out, teacher_logits: torch.Tensor, batch=None) -> Routing:
        b = teacher_logits.shape[0]
        w = teacher_logits.new_zeros((b, self.num_teachers)).float()
        w[:, self.index] = 1.0
        return Routing(weights=w)


@ROUTERS.register("static")
class StaticRouter(Router):
    """The same weights for every instance: ``weights`` (one non-negative value per teacher), normalised
    to sum to 1 (validation-weighted ensembles, hand-set mixtures)."""

    def __init__(self, num_teachers: int, weights: list[float], num_classes: int = 0, feature_dim: int = 0) -> None:
        super().__init__(num_teachers)
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.numel() != num_teachers or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"router 'static': weights must be {num_teachers} non-negative values, not all zero; got {list(weights)}"
            )
        self.register_buffer("weights", w / w.sum())

    def forward(self, student_out, teacher_logits: torch.Tensor, batch=None) -> Routing:
        b = teacher_logits.shape[0]
        return Routing(weights=self.weights.to(teacher_logits.device).expand(b, -1).clone())


def build_router(
    spec: Mapping[str, Any],
    *,
    where: str,
    num_teachers: int,
    num_classes: int = 0,
    feature_dim: int = 0,
    views: Sequence[str] | None = None,
) -> Router:
    """The router ``spec`` (``{name, params}``) over ``num_teachers`` teachers (or views).

    Optional context goes only to routers whose constructor names it: ``views``, the modality names of
    the inputs being weighted, in order (the ``multiview`` network passes its views; ``text_guided``
    needs them, the other routers ignore them).
    """
    if not isinstance(spec, Mapping) or "name" not in spec or set(spec) - {"name", "params"}:
        raise ValueError(f"{where}: expected {{name: <{', '.join(ROUTERS.list())}>, params: {{...}}}}, got {spec!r}")
    context: dict[str, Any] = {"num_teachers": num_teachers, "num_classes": num_classes, "feature_dim": feature_dim}
    if views is not None and "views" in inspect.signature(ROUTERS.get(spec["name"])).parameters:
        context["views"] = tuple(views)
    return ROUTERS.build(spec["name"], spec.get("params"), where=where, **context)


TEXT_GUIDED_PROMPTS = (
    "a photo of a {}.",
    "an edge enhanced image of a {}.",
    "a high-frequency enhanced image of a {}.",
)
"""TMKD's prior-aware prompts for the views RGB, edge-enhanced and high-frequency, in that order (SPEC 4)."""


@ROUTERS.register("text_guided")
class TextGuidedRouter(FrozenHolder, Router):
    """TMKD's text teacher (SPEC 4): per-instance view weights from a frozen CLIP backend.

    For a sample of class ``c`` and its views ``x_v`` (the modalities ``views``, in order)::

        w_v = softmax_v( cos(image_emb(x_v), text_emb(prompts[v].format(c))) / temperature )

    ``prompts``: one template per view, in view order; the default, :data:`TEXT_GUIDED_PROMPTS`, fits
    exactly three views (RGB, edge, high-frequency), any other view set must name its own.
    ``class_names``: one per class, index = label (the ``tmkd_teacher`` method fills in the dataset's).
    ``temperature``: default 0.01, the scale at which CLIP's own image-text softmax is calibrated (its
    learned logit scale, 100); a backend trained at another temperature (``text_aligned``: its ``align``
    stage's, e.g. 0.07) should use that one. Lower is sharper.

    ``class_source``: which class ``c`` fills the prompts.

    - ``label`` (default, the paper's): the sample's true label, ``batch["label"]``. The teacher is then
      usable only where labels exist (training its head, distilling on the training split), and its
      validation/test accuracy reads the label through the weights: an optimistic number, not a
      label-free one.
    - ``zero_shot``: the backend's own guess, ``argmax_c sum_v cos(image_emb(x_v), text_emb(prompt_v(c)))``;
      never reads the label (label-free evaluation).

    ``backend``: a CLIP backend ``{name, params}`` (``CLIP_BACKENDS``) with every file reference already
    a path. It is frozen and kept *outside* the module tree (not in ``state_dict()`` nor ``parameters()``),
    rebuilt from the spec when a saved teacher is loaded, and follows ``.to()``; the prompt embeddings
    ``(V, C, D)`` are computed once, when the router is built.
    """

    def __init__(
        self,
        num_teachers: int,
        views: Sequence[str],
        backend: Mapping[str, Any],
        class_names: Annotated[Sequence[str], Supplied()],
        prompts: Sequence[str] | None = None,
        temperature: PositiveFloat = 0.01,
        class_source: Literal["label", "zero_shot"] = "label",
        num_classes: int = 0,
        feature_dim: int = 0,
    ) -> None:
        from crossmodal_kd.clip.backends import build_clip_backend

        super().__init__(num_teachers)
        views = tuple(views)
        prompts = tuple(TEXT_GUIDED_PROMPTS if prompts is None else prompts)
        if len(views) != num_teachers:
            raise ValueError(f"router 'text_guided': {len(views)} view names for {num_teachers} views")
        if len(prompts) != len(views):
            raise ValueError(
                f"router 'text_guided': prompts must give one template per view, in view order; views {list(views)}, "
                f"prompts {list(prompts)}" + (" (the defaults are for RGB, edge, high-frequency)" if prompts == TEXT_GUIDED_PROMPTS else "")
            )
        bad = [p for p in prompts if not isinstance(p, str) or p.count("{}") != 1]
        if bad:
            raise ValueError(f"router 'text_guided': each prompt needs exactly one '{{}}' for the class name; got {bad}")
        if num_classes and len(class_names) != num_classes:
            raise ValueError(f"router 'text_guided': {len(class_names)} class names for {num_classes} classes")
        if temperature <= 0:
            raise ValueError(f"router 'text_guided': temperature must be > 0, got {temperature}")
        if class_source not in ("label", "zero_shot"):
            raise ValueError(f"router 'text_guided': class_source must be 'label' or 'zero_shot', got '{class_source}'")
        if not isinstance(backend, Mapping) or "name" not in backend or set(backend) - {"name", "params"}:
            raise ValueError(f"router 'text_guided': backend must be {{name, params}}, got {backend!r}")
        clip = build_clip_backend(backend["name"], backend.get("params"))
        self.hold_frozen("_backend", clip)
        self.views, self.prompts, self.class_names = views, prompts, list(class_names)
        self.temperature, self.class_source = float(temperature), class_source
        texts = [p.format(c) for p in prompts for c in self.class_names]
        text = clip.encode_text(texts).view(len(views), len(self.class_names), -1)
        self.register_buffer("prompt_embeddings", text, persistent=False)  # (V, C, D), unit norm

    @property
    def backend(self):
        """The frozen CLIP backend (not a submodule)."""
        return self._backend

    def forward(self, student_out, teacher_logits: torch.Tensor, batch: Mapping[str, torch.Tensor] | None = None) -> Routing:
        if batch is None or any(v not in batch for v in self.views):
            raise KeyError(f"router 'text_guided': needs the batch with the views {list(self.views)}")
        b = batch[self.views[0]].shape[0]
        images = self._backend.encode_image(torch.cat([batch[v] for v in self.views]))  # one call for all views, no graph
        images = images.float().view(len(self.views), b, -1).transpose(0, 1)  # (B, V, D), unit norm
        text = self.prompt_embeddings.float()
        with torch.no_grad(), torch.autocast(text.device.type, enabled=False):  # similarities / 0.01: fp32
            if self.class_source == "label":
                if "label" not in batch:
                    raise KeyError("router 'text_guided': class_source 'label' reads batch['label'], which this batch lacks")
                classes = batch["label"].to(text.device)
            else:
                classes = torch.einsum("bvd,vcd->bc", images, text).argmax(1)
            sims = torch.einsum("bvd,vbd->bv", images, text[:, classes])  # cos(view v, its prompt for the class)
            weights = F.softmax(sims / self.temperature, dim=1)
        return Routing(weights=weights)

