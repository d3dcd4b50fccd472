"""``multi_kd``: a student distilled from several frozen teachers (the recipe of the WordNet-relaxed CLIP
teacher paper, Guo et al., arXiv 2503.24017, and any teacher mix).

Per teacher ``t`` and sample ``i`` (Guo et al.'s alpha = ``w_ce`` = 0.6, ``tau = 3``)::

    L_t(i) = w_ce * CE(s_i, y_i) + (1 - w_ce) * tau^2 * KL(p_t^tau(i) || p_s^tau(i))

combined with per-sample teacher weights ``w_t(i)`` (rows sum to 1)::

    L = mean_i sum_t w_t(i) L_t(i) = w_ce * CE + (1 - w_ce) * mean_i sum_t w_t(i) KD_t(i)

logged as the terms ``ce`` and ``kd`` (plus ``load_balance`` for a learned router): ``w_ce`` is the CE share
of a convex combination, the KD term gets the rest (the key was ``alpha``). ``combine``:

- ``average``: ``w_t = 1 / T``;
- ``val_weighted``: ``w_t = a_t / sum_s a_s`` with ``a_t`` the teacher's validation accuracy: the one its
  stage recorded for that model in ``stages/<stage>/result.json`` (the best-on-validation epoch's),
  read when the teacher is loaded (for a ``{path}`` teacher, from the ``result.json`` of the run's stage
  folder around the file, :meth:`BuildContext.model_record`), or given as ``val_accuracy`` in the
  teacher's entry, which takes precedence;
- ``router``: a ``ROUTERS`` entry (``router: {name, params}``, e.g. MST-Distill's ``gate``), trained with
  the student; a router with a gate distribution adds ``w_lb * KL(U || mean gate)``, one with its own
  objective adds it as ``route``.

Each epoch logs every teacher's mean weight (``weight/<teacher>``) and, for ``val_weighted``, the
accuracies used (``val_accuracy/<teacher>``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from crossmodal_kd.config import ConfigError
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.methods.collectives import global_mean
from crossmodal_kd.losses import cross_entropy, kd_kl, load_balance_kl
from crossmodal_kd.methods.base import Method
from crossmodal_kd.methods.kd import build_student
from crossmodal_kd.params import (
    ModelRefSpec,
    NetworkName,
    NonNegativeFloat,
    Params as BaseParams,
    PositiveFloat,
    Probability,
    RouterSpec,
    TeacherEntry,
)
from crossmodal_kd.registry import METHODS, ROUTERS

TEACHER_KEYS = {"model", "name", "val_accuracy"}


def validation_accuracy(ctx: BuildContext, ref: Any, key: str) -> float:
    """The validation accuracy recorded for a trained model in its stage's ``result.json``."""
    try:
        return float(ctx.model_record(ref, key)["val"]["accuracy"])
    except FileNotFoundError as exc:
        reason = str(exc).removeprefix(f"{ctx.where}.{key}: ")
        raise FileNotFoundError(
            f"{ctx.where}.{key}: combine 'val_weighted' needs the teacher's validation accuracy, but {reason}; "
            "give val_accuracy in the teacher's entry"
        ) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{ctx.where}.{key}: no validation accuracy recorded for the teacher ({exc}); "
            "give val_accuracy in the teacher's entry"
        ) from None


def _average(method: MultiTeacherKD, ctx: BuildContext, router: dict | None) -> torch.nn.Module:
    return ROUTERS.build("uniform", {}, where=f"{ctx.where}.combine", num_teachers=len(method.names))


def _val_weighted(method: MultiTeacherKD, ctx: BuildContext, router: dict | None) -> torch.nn.Module:
    acc = [
        float(entry["val_accuracy"]) if "val_accuracy" in entry else validation_accuracy(ctx, entry["model"], f"teachers.{i}.model")
        for i, entry in enumerate(method.entries)
    ]
    method.val_accuracy = dict(zip(method.names, acc))
    return ROUTERS.build("static", {"weights": acc}, where=f"{ctx.where}.teachers (validation accuracies)", num_teachers=len(acc))


def _router(method: MultiTeacherKD, ctx: BuildContext, router: dict | None) -> torch.nn.Module:
    if router is None:
        raise ConfigError(f"{ctx.where}.router: combine 'router' needs router: {{name, params}} (a ROUTERS entry)")
    return ROUTERS.build_spec(
        router, where=f"{ctx.where}.router",
        num_teachers=len(method.names), num_classes=ctx.num_classes, feature_dim=method.student.feature_dim,
    )


COMBINERS: dict[str, Callable[[MultiTeacherKD, BuildContext, dict | None], torch.nn.Module]] = {
    "average": _average,
    "val_weighted": _val_weighted,
    "router": _router,
}


@METHODS.register("multi_kd")
class MultiTeacherKD(Method):
    """``student`` (a ``networks:`` name) distilled from ``teachers``: a list of ``{model: <ref>, name, val_accuracy}``
    (``model``: ``{stage, model}`` or ``{path}``; ``name`` defaults to the stage or file name). Saved model: ``student``.
    See the module docstring for the loss, ``w_ce`` and ``combine``."""

    class Params(BaseParams):
        renamed: ClassVar[dict[str, str]] = {"alpha": "w_ce"}
        student: NetworkName
        teachers: list[TeacherEntry]
        combine: str = "average"
        router: RouterSpec | None = None
        w_ce: Probability = 0.6
        tau: PositiveFloat = 3.0
        w_lb: NonNegativeFloat = 0.5
        student_init: ModelRefSpec | None = None

    def __init__(self, ctx: BuildContext, params: MultiTeacherKD.Params) -> None:
        super().__init__(ctx)
        combine, router, teachers = params.combine, params.router, params.teachers
        if combine not in COMBINERS:
            raise ConfigError(f"{ctx.where}.combine: unknown '{combine}'; valid: {', '.join(COMBINERS)}")
        if router is not None and combine != "router":
            raise ConfigError(f"{ctx.where}.router: only used with combine: router (combine is '{combine}')")
        if not teachers:
            raise ConfigError(f"{ctx.where}.teachers: at least one teacher is required")
        self.student = build_student(ctx, params.student, params.student_init)
        self.entries, self.names, self.teachers = [], [], []
        for i, entry in enumerate(teachers):
            if not isinstance(entry, dict) or "model" not in entry or set(entry) - TEACHER_KEYS:
                raise ConfigError(
                    f"{ctx.where}.teachers.{i}: expected {{model: {{stage: ...}} or {{path: ...}}, name, val_accuracy}}, got {entry!r}"
                )
            ref = ctx.ref(entry["model"], f"teachers.{i}.model")
            name = entry.get("name") or ref.stage or Path(ref.path).stem
            if name in self.names:
                raise ConfigError(f"{ctx.where}.teachers.{i}: duplicate teacher name '{name}'; set name")
            self.entries.append(entry)
            self.names.append(name)
            self.teachers.append(self.freeze(name, ctx.load(entry["model"], key=f"teachers.{i}.model")))
        self.val_accuracy: dict[str, float] = {}
        self.combine = combine
        self.router = COMBINERS[combine](self, ctx, router)
        self.w_ce, self.tau, self.w_lb = float(params.w_ce), float(params.tau), float(params.w_lb)

    def forward(self, batch):
        out = self.student(batch)
        t_logits = torch.stack([t(batch)["logits"].float() for t in self.teachers], dim=1)  # (B, T, C)
        routing = self.router(out, t_logits, batch)
        per_teacher = torch.stack(
            [kd_kl(out["logits"], t_logits[:, t], self.tau, reduction="none") for t in range(len(self.teachers))], dim=1
        )
        losses = {
            "ce": self.w_ce * cross_entropy(out["logits"], batch["label"]),
            "kd": (1 - self.w_ce) * (routing.weights * per_teacher).sum(1).mean(),
        }
        if routing.probs is not None:
            losses["load_balance"] = self.w_lb * load_balance_kl(global_mean(routing.probs))
        if routing.loss is not None:  # a router with its own objective (gate, objective: true_class)
            losses["route"] = routing.loss
        self.record("weight", routing.weights.detach().float().sum(0), routing.weights.shape[0])
        return out, losses

    def summarize_stats(self, stats):
        out = super().summarize_stats(stats)
        return {(f"weight/{self.names[int(k.rsplit('/', 1)[1])]}" if k.startswith("weight/") else k): v for k, v in out.items()}

    def epoch_info(self) -> dict[str, float]:
        return {f"val_accuracy/{k}": v for k, v in self.val_accuracy.items()}

    def models(self):
        return {"student": self.student}

    def parameter_counts(self):
        counts = {"student": sum(p.numel() for p in self.student.parameters())}
        trainable = sum(p.numel() for p in self.router.parameters() if p.requires_grad)
        if trainable:
            counts["router"] = trainable
        return counts
