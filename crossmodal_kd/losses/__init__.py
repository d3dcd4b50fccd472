"""Distillation losses (``LOSSES``). Every loss casts to fp32 first, so mixed precision cannot overflow it."""

from crossmodal_kd.losses.kd import cross_entropy, kd_kl, load_balance_kl

__all__ = ["cross_entropy", "kd_kl", "load_balance_kl"]
