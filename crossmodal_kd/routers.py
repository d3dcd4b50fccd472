"""Routers: per-instance weights over E teachers (``ROUTERS``).

A router returns a :class:`Routing`: ``weights`` (B, E) that weight each teacher's per-sample KD term
(rows sum to 1), and, for learned routers, the gate distribution ``probs`` (B, E) used by the
load-balancing term and the routing statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal_kd.registry import ROUTERS


@dataclass
class Routing:
    weights: torch.Tensor
    probs: torch.Tensor | None = None

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
    """MST-Distill's GateNet: ``g = softmax(MLP(student logits or features))``, top-k teachers per instance.

    ``mode='hard'`` (public code): selected teachers get weight 1/k, so the KD term gives the gate no
    gradient and it learns only from load balancing. ``mode='soft'``: selected teachers are weighted by
    their renormalised gate probabilities, so the KD term teaches the gate which teacher to pick. The
    normaliser is detached: the weights have the renormalised values, but the gradient still reaches
    each selected probability when k = 1 (a fully differentiated renormalisation is constantly 1 there).
    """

    def __init__(
        self,
        num_teachers: int,
        num_classes: int,
        feature_dim: int,
        k: int = 1,
        mode: Literal["hard", "soft"] = "soft",
        input: Literal["logits", "features"] = "logits",
        hidden: int = 64,
    ) -> None:
        super().__init__(num_teachers)
        if not 1 <= k <= num_teachers:
            raise ValueError(f"router 'gate': k={k} must be between 1 and the number of teachers ({num_teachers})")
        if mode not in ("hard", "soft"):
            raise ValueError(f"router 'gate': mode must be 'hard' or 'soft', got '{mode}'")
        if input not in ("logits", "features"):
            raise ValueError(f"router 'gate': input must be 'logits' or 'features', got '{input}'")
        self.k, self.mode, self.input = k, mode, input
        in_dim = num_classes if input == "logits" else feature_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_teachers))

    def forward(self, student_out: Mapping[str, torch.Tensor], teacher_logits: torch.Tensor, batch=None) -> Routing:
        x = student_out["logits" if self.input == "logits" else "features"].detach().float()
        probs = F.softmax(self.net(x), dim=1)
        top = probs.topk(self.k, dim=1).indices
        selected = torch.zeros_like(probs).scatter_(1, top, 1.0)
        if self.mode == "hard":
            weights = selected / self.k
        else:
            masked = probs * selected
            weights = masked / masked.sum(1, keepdim=True).detach()
        return Routing(weights=weights, probs=probs)


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

    def __init__(self, num_teachers: int, num_classes: int = 0, feature_dim: int = 0, index: int = 0) -> None:
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
