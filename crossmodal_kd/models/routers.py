"""Routers: per-instance weights over E teachers (``ROUTERS``).

A router returns a :class:`Routing`: ``weights`` (B, E) that weight each teacher's per-sample KD term
(rows sum to 1), and, for learned routers, the gate distribution ``probs`` (B, E) used by the
load-balancing term and the routing statistics. ``ROUTERS.build_spec`` builds one from a ``{name, params}``
spec and hands each router the context it names (``num_teachers``, ``num_classes``, ``feature_dim``, ``views``,
``class_names``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal_kd.params import NonNegativeInt, PositiveFloat, PositiveInt
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

    def __init__(  # types and ranges are checked by the registry (ROUTERS) before this runs
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
        if not 1 <= k <= num_teachers:
            raise ValueError(f"router 'gate': k={k} must be between 1 and the number of teachers ({num_teachers})")
        if mode == "soft" and k == 1:
            raise ValueError(
                "router 'gate': mode 'soft' with k=1 cannot learn (its weight is always 1); use mode 'hard' "
                "(public code) with objective 'true_class', mode 'soft' with k >= 2, or mode 'dense'"
            )
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

    def __init__(self, num_teachers: int) -> None:
        super().__init__(num_teachers)

    def forward(self, student_out, teacher_logits: torch.Tensor, batch=None) -> Routing:
        b = teacher_logits.shape[0]
        return Routing(weights=teacher_logits.new_full((b, self.num_teachers), 1.0 / self.num_teachers).float())


@ROUTERS.register("fixed")
class FixedRouter(Router):
    """Always the teacher at ``index`` (single-teacher ablation)."""

    def __init__(self, num_teachers: int, index: NonNegativeInt = 0) -> None:
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

    def __init__(self, num_teachers: int, weights: list[float]) -> None:
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
