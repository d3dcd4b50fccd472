"""MST-Distill stage 3: routed distillation from a mixture of specialised (masked) teachers."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import torch
from torch import nn

from crossmodal_kd.config import ConfigError
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.methods.collectives import global_mean
from crossmodal_kd.losses import cross_entropy, kd_kl, load_balance_kl
from crossmodal_kd.models.masks import attached
from crossmodal_kd.methods.base import Method
from crossmodal_kd.methods.kd import build_student
from crossmodal_kd.params import ModelRefSpec, NetworkName, NonNegativeFloat, Params as BaseParams, PositiveFloat, RouterSpec, TeacherEntry
from crossmodal_kd.registry import METHODS, ROUTERS


class SpecialisedTeacher:
    """A frozen teacher network with frozen masks hooked in while it runs (exactly one in our design; the
    public code's cumulative hooks give several). Calls go through ``call``, a
    :class:`~crossmodal_kd.targets.TeacherCall`, so the target store serves its logits by sample index."""

    def __init__(self, method: Method, name: str, network: nn.Module, hooks: list[tuple[str, nn.Module]] = ()) -> None:
        self.name, self.network, self.hooks = name, network, list(hooks)
        self.mask = self.hooks[-1][1] if self.hooks else None
        self.call = method.teacher_call(
            name, self._logits, [network, *(m for _, m in self.hooks)], {"layers": [layer for layer, _ in self.hooks]}
        )

    def _logits(self, batch) -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            for layer, mask in self.hooks:
                stack.enter_context(attached(self.network, layer, mask))
            return self.network(batch)["logits"]

    def __call__(self, batch) -> torch.Tensor:
        return self.call(batch)


def schedule_factor(epoch: int, schedule: dict[str, Any]) -> float:
    """``factor ** (epoch // every)``; with ``include_epoch_0``, the public code's ``w *= factor if epoch %
    every == 0`` after each epoch, epoch 0 included: ``factor ** ceil(epoch / every)``."""
    n = int(schedule["every"])
    return schedule["factor"] ** (math.ceil(epoch / n) if schedule.get("include_epoch_0") else epoch // n)


@METHODS.register("mst_distill")
class MSTDistill(Method):
    """``w_ce CE + w_kd sum_e weight_e tau^2 KL(p_e || p_s) + w_lb KL(U || mean_batch g) + w_route L_router``
    (Li et al., MST-Distill, ACM MM 2025; public code Gray-OREO/MST-Distill, ``main-MST-Distill.py``).

    ``teachers``: a list of entries, each either ``{mask_stage: <stage>}`` (the teacher, layer and
    mask trained by that ``mask`` stage) or ``{model: <ref>}`` (an unmasked teacher), with an optional
    ``name``. ``mask_hooks``: ``single`` (each specialised teacher runs with its own mask only) or
    ``parity`` (the public code's cumulative hooks: a teacher also keeps the masks of the teachers before
    it in the list on the same network). ``router``: a ``ROUTERS`` entry; ``L_router`` is its own loss
    (``gate`` with ``objective: true_class``). ``lb_reduction``: ``sum`` (KL) or ``batchmean`` (KL / E,
    public code). ``schedules``: ``{weight: {every: N, factor: f}}`` multiplies a loss weight by ``f``
    every ``N`` epochs, from epoch N on (``factor ** (epoch // N)``); with ``include_epoch_0: true``, after
    every epoch with ``epoch % N == 0``, epoch 0 included, as the public code does (``factor ** ceil(epoch
    / N)``: public ``w_kd`` x0.5 every 30 is 1 in epoch 0 only). ``val_loss``: what ``select: {metric:
    loss}`` minimises, the whole ``objective`` or the student's plain ``ce`` (public stage-3 selection).
    Per epoch the log holds ``route/entropy`` (mean gate entropy), ``route/share/<teacher>`` (top-1
    shares) and ``route/best_hit`` (how often the top-1 teacher is the one putting the most mass on the
    true class); ``result.json`` repeats them under ``routing``.
    """

    class Params(BaseParams):
        student: NetworkName
        teachers: list[TeacherEntry]
        router: RouterSpec | None = None
        student_init: ModelRefSpec | None = None
        tau: PositiveFloat = 4.0
        w_ce: NonNegativeFloat = 1.0
        w_kd: NonNegativeFloat = 1.0
        w_lb: NonNegativeFloat = 0.5
        w_route: NonNegativeFloat = 1.0
        schedules: dict[str, dict[str, float]] | None = None
        mask_hooks: Literal["single", "parity"] = "single"
        lb_reduction: Literal["sum", "batchmean"] = "sum"
        val_loss: Literal["objective", "ce"] = "objective"

    def __init__(self, ctx: BuildContext, params: MSTDistill.Params) -> None:
        super().__init__(ctx)
        if not params.teachers:
            raise ConfigError(f"{ctx.where}.teachers: at least one teacher is required")
        self.mask_hooks, self.lb_reduction, self.val_loss = params.mask_hooks, params.lb_reduction, params.val_loss
        self.student = build_student(ctx, params.student, params.student_init)
        self._networks: dict[str, nn.Module] = {}
        self._hooks_on: dict[int, list[tuple[str, nn.Module]]] = {}  # network id -> masks hooked so far (parity)
        self.teachers = [self._teacher(ctx, i, entry) for i, entry in enumerate(params.teachers)]
        router = params.router or {"name": "gate"}
        try:
            self.router = ROUTERS.build_spec(
                router, where=f"{ctx.where}.router",
                num_teachers=len(self.teachers), num_classes=ctx.num_classes, feature_dim=self.student.feature_dim,
            )
        except ValueError as exc:
            raise ConfigError(f"{ctx.where}.router.params: {exc}") from None
        self.tau = params.tau
        self.base_weights = {"w_ce": params.w_ce, "w_kd": params.w_kd, "w_lb": params.w_lb, "w_route": params.w_route}
        self.schedules = params.schedules or {}
        for key, sched in self.schedules.items():
            if key not in self.base_weights or not {"every", "factor"} <= set(sched) <= {"every", "factor", "include_epoch_0"} or int(sched["every"]) < 1:
                raise ConfigError(
                    f"{ctx.where}.schedules.{key}: expected one of {', '.join(self.base_weights)} with keys every (>= 1), "
                    f"factor and optionally include_epoch_0; got {dict(sched)}"
                )
        self.weights = dict(self.base_weights)

    def _teacher(self, ctx: BuildContext, i: int, entry: dict[str, Any]) -> SpecialisedTeacher:
        where = f"teachers.{i}"
        unknown = set(entry) - {"name", "mask_stage", "model"}
        if unknown or ("mask_stage" in entry) == ("model" in entry):
            raise ConfigError(f"{ctx.where}.{where}: give exactly one of mask_stage or model (and optionally name); got {sorted(entry)}")
        if "model" in entry:
            return SpecialisedTeacher(self, entry.get("name", f"teacher{i}"), self._network(ctx, entry["model"], f"{where}.model"))
        stage = ctx.config.stage(entry["mask_stage"])
        if stage.method.name != "mask":
            raise ConfigError(f"{ctx.where}.{where}.mask_stage: stage '{stage.name}' is a '{stage.method.name}' stage, not 'mask'")
        p = stage.method.params
        name = entry.get("name", stage.name)
        net = self._network(ctx, p["teacher"], f"{where} (teacher of {stage.name})")
        mask = ctx.load({"stage": stage.name, "model": "mask"}, key=f"{where}.mask_stage")
        self.freeze(f"{name}/mask", mask, serve=False)
        hooks = self._hooks_on.setdefault(id(net), [])
        hooks.append((p["layer"], mask))
        return SpecialisedTeacher(self, name, net, list(hooks) if self.mask_hooks == "parity" else hooks[-1:])

    def _network(self, ctx: BuildContext, ref: Any, key: str) -> nn.Module:
        """Each distinct teacher network is loaded once, however many masks it carries."""
        path = str(ctx.resolve(ref, key))
        if path not in self._networks:
            self._networks[path] = self.freeze(f"net{len(self._networks)}", ctx.load(ref, key), serve=False).module
        return self._networks[path]

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        for key, base in self.base_weights.items():
            self.weights[key] = base * schedule_factor(epoch, self.schedules[key]) if key in self.schedules else base

    def epoch_info(self) -> dict[str, float]:
        return dict(self.weights)

    def forward(self, batch):
        out = self.student(batch)
        if not self.training and self.val_loss == "ce":
            return out, {"ce": cross_entropy(out["logits"], batch["label"])}
        t_logits = torch.stack([t(batch) for t in self.teachers], dim=1)  # (B, E, C)
        routing = self.router(out, t_logits, batch)
        per_teacher = torch.stack(
            [kd_kl(out["logits"], t_logits[:, e], self.tau, reduction="none") for e in range(len(self.teachers))], dim=1
        )
        w = self.weights
        losses = {
            "ce": w["w_ce"] * cross_entropy(out["logits"], batch["label"]),
            "kd": w["w_kd"] * (routing.weights * per_teacher).sum(1).mean(),
        }
        if routing.probs is not None:
            losses["load_balance"] = w["w_lb"] * load_balance_kl(global_mean(routing.probs), self.lb_reduction)
        if routing.loss is not None:
            losses["route"] = w["w_route"] * routing.loss
        self._record_routing(routing, t_logits, batch["label"])
        return out, losses

    def _record_routing(self, routing, t_logits: torch.Tensor, labels: torch.Tensor) -> None:
        e = len(self.teachers)
        b = routing.weights.shape[0]
        self.record("route/share", torch.nn.functional.one_hot(routing.top1, e).float().sum(0), b)
        true_mass = torch.log_softmax(t_logits.float() / self.tau, -1).gather(2, labels.view(-1, 1, 1).expand(-1, e, 1))
        self.record("route/best_hit", (routing.top1 == true_mass.squeeze(2).argmax(1)).float().sum(), b)
        if routing.probs is not None:
            p = routing.probs.detach()
            self.record("route/entropy", -(p * p.clamp_min(1e-12).log()).sum(1).sum(), b)

    def summarize_stats(self, stats):
        out = super().summarize_stats(stats)
        names = [t.name for t in self.teachers]
        return {(f"route/share/{names[int(k.rsplit('/', 1)[1])]}" if k.startswith("route/share/") else k): v for k, v in out.items()}

    def result_info(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Routing per epoch for result.json: gate entropy (and its maximum, ln E), top-1 shares, best-teacher hits."""
        routing: dict[str, Any] = {"max_entropy": math.log(len(self.teachers))}
        for key in ("route/entropy", "route/best_hit"):
            if rows and key in rows[0]:
                routing[key.split("/")[1]] = [r[key] for r in rows]
        routing["shares"] = {t.name: [r.get(f"route/share/{t.name}") for r in rows] for t in self.teachers}
        return {"routing": routing}

    def models(self):
        return {"student": self.student}

    def parameter_counts(self):
        counts = {"student": sum(p.numel() for p in self.student.parameters()),
                  "router": sum(p.numel() for p in self.router.parameters())}
        for t in self.teachers:
            if t.mask is not None:
                counts[f"mask/{t.name}"] = sum(p.numel() for p in t.mask.parameters())
        return counts
