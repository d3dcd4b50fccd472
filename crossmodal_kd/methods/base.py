"""The method contract: an ``nn.Module`` that owns what it trains, keeps teachers frozen, and returns named losses."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping

import torch
from torch import nn

from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.models.frozen import FrozenHolder
from crossmodal_kd.targets import TeacherCall


class Method(FrozenHolder):
    """Base class of every training stage.

    Subclasses build their trainable modules as attributes (they are optimised and checkpointed) and
    register teachers with :meth:`freeze` (held frozen as every frozen module is,
    :class:`~crossmodal_kd.models.frozen.FrozenHolder`: eval mode, no gradients, outside the module tree,
    so neither wrapped in DDP nor saved in training checkpoints). A frozen teacher is called
    through a :class:`~crossmodal_kd.targets.TeacherCall` (what :meth:`freeze` returns, or
    :meth:`teacher_call` for a call with hooks), whose outputs the engine's target store serves by
    sample index once computed: methods never cache teacher outputs themselves.

    - ``forward(batch) -> (outputs, {term: weighted loss})``; the engine sums and logs the terms.
    - ``predict(batch) -> {model: logits}``: what is evaluated (accuracy, macro-F1) and selected on val.
    - ``models() -> {model: module}``: what is saved, with the same keys as ``predict``.
    - hooks: ``on_epoch_start(epoch)``, ``after_step()`` (after each optimizer step), ``epoch_info()``.
    """

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        object.__setattr__(self, "ctx", ctx)
        object.__setattr__(self, "_calls", {})
        object.__setattr__(self, "_stats", defaultdict(lambda: torch.zeros(())))
        self.epoch = 0

    # ---------------------------------------------------------------- teachers
    def freeze(self, name: str, module: nn.Module, serve: bool = True) -> TeacherCall:
        """Register a teacher: eval mode, no gradients; the engine moves it to the device. The returned call
        runs it (``call(batch)``, ``call.module``); ``serve=False`` when the method only runs the module itself
        (e.g. with a trainable mask hooked in), so the store does not compute targets nobody reads."""
        self.hold_frozen(name, module, attribute=False)
        call = TeacherCall(name, module, [module])
        if serve:
            self._calls[name] = call
        return call

    def teacher_call(
        self, name: str, fn, modules: list[nn.Module], describe: dict[str, Any] | None = None, deterministic: bool = True
    ) -> TeacherCall:
        """Register a frozen call ``fn(batch)`` over already frozen ``modules`` (e.g. a teacher with a frozen
        mask hooked at ``describe['layer']``); ``deterministic=False`` when its input is randomised."""
        call = TeacherCall(name, fn, modules, describe, deterministic)
        self._calls[name] = call
        return call

    def teacher_calls(self) -> dict[str, TeacherCall]:
        return dict(self._calls)

    def set_target_split(self, split: str | None) -> None:
        """Which split's stored targets the teacher calls serve (set by the engine before iterating one)."""
        for call in self._calls.values():
            call.split = split

    # ---------------------------------------------------------------- contract
    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: model(batch)["logits"] for name, model in self.models().items()}

    def models(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (loss-weight schedules live here)."""
        self.epoch = epoch

    def after_step(self) -> None:
        """Called by the engine after each optimizer step that updated the parameters (not on the
        accumulation steps in between): projections and constraints, e.g. renormalising a matrix."""

    def epoch_info(self) -> dict[str, float]:
        """Scalars to log each epoch besides the losses (e.g. current loss weights)."""
        return {}

    def result_info(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Extra entries for the stage's result.json, from its per-epoch log rows (e.g. routing statistics)."""
        return {}

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.models().items()}

    # ---------------------------------------------------------------- per-epoch statistics
    def record(self, name: str, value_sum: torch.Tensor, count: float | None = None) -> None:
        """Accumulate a statistic (summed over the epoch and over processes; ``count`` is summed as ``name/n``)."""
        self._stats[name] = self._stats[name].to(value_sum.device) + value_sum.detach().float()
        if count is not None:
            self._stats[f"{name}/n"] = self._stats[f"{name}/n"].to(value_sum.device) + count

    def summarize_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Epoch statistics (already summed over processes) -> scalars for the log: ``name / name/n``."""
        out = {}
        for key, value in stats.items():
            if key.endswith("/n"):
                continue
            n = stats.get(f"{key}/n")
            value = value / n if n is not None else value
            if value.dim() == 0:
                out[key] = value.item()
            else:
                out.update({f"{key}/{i}": v for i, v in enumerate(value.flatten().tolist())})
        return out

    def pop_stats(self) -> dict[str, torch.Tensor]:
        stats = dict(self._stats)
        self._stats.clear()
        return stats
