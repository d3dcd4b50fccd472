"""Optimizers and learning-rate schedules. Schedules are defined in optimizer steps (not batches/processes)."""

from __future__ import annotations

import math

import torch

from crossmodal_kd.params import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, Probability
from crossmodal_kd.registry import OPTIMIZERS, SCHEDULERS

# torch's own classes and defaults; the config types of their parameters are declared here
ADAM_TYPES = {
    "lr": PositiveFloat,
    "betas": tuple[Fraction, Fraction],
    "eps": PositiveFloat,
    "weight_decay": NonNegativeFloat,
    "amsgrad": bool,
}
OPTIMIZERS.register("adamw", types=ADAM_TYPES)(torch.optim.AdamW)
OPTIMIZERS.register("adam", types=ADAM_TYPES)(torch.optim.Adam)
OPTIMIZERS.register("sgd", types={
    "lr": PositiveFloat, "momentum": Fraction, "dampening": NonNegativeFloat,
    "weight_decay": NonNegativeFloat, "nesterov": bool,
})(torch.optim.SGD)


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


@SCHEDULERS.register("constant")
def constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: NonNegativeInt = 0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup(s, warmup_steps))


@SCHEDULERS.register("cosine")
def cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: NonNegativeInt = 0, min_factor: Probability = 0.0
):
    """Linear warm-up, then cosine decay from the base rate to ``min_factor`` of it at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@SCHEDULERS.register("multistep")
def multistep(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    milestones: tuple[Probability, ...] = (0.5, 0.75),
    gamma: PositiveFloat = 0.1,
):
    """Multiply the rate by ``gamma`` at each milestone, given as fractions of the run."""
    steps = sorted(int(m * total_steps) for m in milestones)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: gamma ** sum(s >= m for m in steps))
