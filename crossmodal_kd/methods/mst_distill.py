"""MST-Distill stage 3: routed distillation from a mixture of specialised (masked) teachers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crossmodal_kd.config import ConfigError
from crossmodal_kd.engine.context import BuildContext
from crossmodal_kd.engine.distributed import global_mean
from crossmodal_kd.losses import cross_entropy, kd_kl, load_balance_kl
from crossmodal_kd.masks import attached
from crossmodal_kd.methods.base import Frozen, Method
from crossmodal_kd.methods.kd import build_student
from crossmodal_kd.registry import METHODS, ROUTERS


class SpecialisedTeacher:
    """A frozen teacher network with at most one frozen mask hooked in while it runs."""

    def __init__(self, name: str, network: Frozen, layer: str | None = None, mask: nn.Module | None = None) -> None:
        self.name, self.network, self.layer, self.mask = name, network, layer, mask

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        if self.mask is None:
            return self.network(batch)["logits"]
        with attached(self.network.module, self.layer, self.mask):
            return self.network(batch)["logits"]


@METHODS.register("mst_distill")
class MSTDistill(Method):
    """``w_ce CE + w_kd sum_e weight_e tau^2 KL(p_e || p_s) + w_lb KL(U || mean_batch g)``.

    ``teachers``: a list of entries, each either ``{mask_stage: <stage>}`` (the teacher, layer and
    mask trained by that ``mask`` stage) or ``{model: <ref>}`` (an unmasked teacher), with an optional
    ``name``. ``schedules``: ``{weight: {every: N, factor: f}}`` multiplies a loss weight by ``f``
    every ``N`` epochs (public code: ``w_lb`` x0.9 every 10, ``w_kd`` x0.5 every 30).
    """

    def __init__(
        self,
        ctx: BuildContext,
        student: str,
        teachers: list[dict[str, Any]],
        router: dict[str, Any] | None = None,
        student_init: dict | None = None,
        tau: float = 4.0,
        w_ce: float = 1.0,
        w_kd: float = 1.0,
        w_lb: float = 0.5,
        schedules: dict[str, dict[str, float]] | None = None,
    ) -> None:
        super().__init__(ctx)
        if not teachers:
            raise ConfigError(f"{ctx.where}.teachers: at least one teacher is required")
        self.student = build_student(ctx, student, student_init)
        self._networks: dict[str, Frozen] = {}
        self.teachers = [self._teacher(ctx, i, entry) for i, entry in enumerate(teachers)]
        router = router or {"name": "gate"}
        self.router = ROUTERS.build(
            router["name"], router.get("params"), where=f"{ctx.where}.router.params",
            num_teachers=len(self.teachers), num_classes=ctx.num_classes, feature_dim=self.student.feature_dim,
        )
        self.tau = tau
        self.base_weights = {"w_ce": w_ce, "w_kd": w_kd, "w_lb": w_lb}
        self.schedules = schedules or {}
        for key, sched in self.schedules.items():
            if key not in self.base_weights or set(sched) != {"every", "factor"}:
                raise ConfigError(
                    f"{ctx.where}.schedules.{key}: expected one of {', '.join(self.base_weights)} with keys every, factor"
                )
        self.weights = dict(self.base_weights)

    def _teacher(self, ctx: BuildContext, i: int, entry: dict[str, Any]) -> SpecialisedTeacher:
        where = f"teachers.{i}"
        unknown = set(entry) - {"name", "mask_stage", "model"}
        if unknown or ("mask_stage" in entry) == ("model" in entry):
            raise ConfigError(f"{ctx.where}.{where}: give exactly one of mask_stage or model (and optionally name); got {sorted(entry)}")
        if "model" in entry:
            return SpecialisedTeacher(entry.get("name", f"teacher{i}"), self._network(ctx, entry["model"], f"{where}.model"))
        stage = ctx.config.stage(entry["mask_stage"])
        if stage.method.name != "mask":
            raise ConfigError(f"{ctx.where}.{where}.mask_stage: stage '{stage.name}' is a '{stage.method.name}' stage, not 'mask'")
        p = stage.method.params
        name = entry.get("name", stage.name)
        net = self._network(ctx, p["teacher"], f"{where} (teacher of {stage.name})")
        mask = ctx.load({"stage": stage.name, "model": "mask"}, key=f"{where}.mask_stage")
        self.freeze(f"{name}/mask", mask)
        return SpecialisedTeacher(name, net, p["layer"], mask)

    def _network(self, ctx: BuildContext, ref: Any, key: str) -> Frozen:
        """Each distinct teacher network is loaded once, however many masks it carries."""
        path = str(ctx.resolve(ref, key))
        if path not in self._networks:
            self._networks[path] = self.freeze(f"net{len(self._networks)}", ctx.load(ref, key))
        return self._networks[path]

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        for key, base in self.base_weights.items():
            s = self.schedules.get(key)
            self.weights[key] = base * (s["factor"] ** (epoch // int(s["every"])) if s else 1.0)

    def epoch_info(self) -> dict[str, float]:
        return dict(self.weights)

    def forward(self, batch):
        out = self.student(batch)
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
            losses["load_balance"] = w["w_lb"] * load_balance_kl(global_mean(routing.probs))
        self._record_routing(routing)
        return out, losses

    def _record_routing(self, routing) -> None:
        e = len(self.teachers)
        b = routing.weights.shape[0]
        self.record("route/share", torch.nn.functional.one_hot(routing.top1, e).float().sum(0), b)
        if routing.probs is not None:
            p = routing.probs.detach()
            self.record("route/entropy", -(p * p.clamp_min(1e-12).log()).sum(1).sum(), b)

    def summarize_stats(self, stats):
        out = super().summarize_stats(stats)
        names = [t.name for t in self.teachers]
        return {(f"route/share/{names[int(k.rsplit('/', 1)[1])]}" if k.startswith("route/share/") else k): v for k, v in out.items()}

    def models(self):
        return {"student": self.student}

    def parameter_counts(self):
        counts = {"student": sum(p.numel() for p in self.student.parameters()),
                  "router": sum(p.numel() for p in self.router.parameters())}
        for t in self.teachers:
            if t.mask is not None:
                counts[f"mask/{t.name}"] = sum(p.numel() for p in t.mask.parameters())
        return counts
