"""The method contract: an ``nn.Module`` that owns what it trains, keeps teachers frozen, and returns named losses."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping

import torch
from torch import nn

from crossmodal_kd.engine.context import BuildContext


class Frozen:
    """A frozen teacher held outside the module tree; calling it runs the module without gradients."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)


class Method(nn.Module):
    """Base class of every training stage.

    Subclasses build their trainable modules as attributes (they are optimised and checkpointed) and
    register teachers with :meth:`freeze` (kept in eval mode, no gradients, outside the module tree,
    so they are neither wrapped in DDP nor saved in training checkpoints).

    - ``forward(batch) -> (outputs, {term: weighted loss})``; the engine sums and logs the terms.
    - ``predict(batch) -> {model: logits}``: what is evaluated (accuracy, macro-F1) and selected on val.
    - ``models() -> {model: module}``: what is saved, with the same keys as ``predict``.
    - hooks: ``on_epoch_start(epoch)``, ``after_step()`` (after each optimizer step), ``epoch_info()``.
    """

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        object.__setattr__(self, "ctx", ctx)
        object.__setattr__(self, "_frozen", {})
        object.__setattr__(self, "_stats", defaultdict(lambda: torch.zeros(())))
        self.epoch = 0

    # ---------------------------------------------------------------- teachers
    def freeze(self, name: str, module: nn.Module) -> Frozen:
        """Register a teacher: eval mode, no gradients; the engine moves it to the device."""
        module.eval()
        module.requires_grad_(False)
        self._frozen[name] = module
        return Frozen(module)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return dict(self._frozen)

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        for m in self._frozen.values():
            m.eval()
        return self

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
