"""Logit-level losses: cross-entropy, Hinton KD, and the router's load-balancing term."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def kd_kl(student_logits: torch.Tensor, target_logits: torch.Tensor, tau: float = 4.0, reduction: str = "mean") -> torch.Tensor:
    """``tau^2 * KL(p_target^tau || p_student^tau)`` (Hinton et al.); ``reduction='none'`` gives one value per sample."""
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(target_logits.float() / tau, dim=-1)
    per_sample = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * tau**2
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"kd_kl: reduction must be 'mean' or 'none', got '{reduction}'")


def load_balance_kl(mean_gate: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """``KL(U || mean_gate)``: zero when the batch-averaged gate is uniform over the E experts.

    ``reduction='batchmean'`` divides by E: the public MST-Distill code's ``nn.KLDivLoss(reduction='batchmean')``
    applied to the 1-D mean gate (github Gray-OREO/MST-Distill, ``load_balancing_loss``).
    """
    if reduction not in ("sum", "batchmean"):
        raise ValueError(f"load_balance_kl: reduction must be 'sum' or 'batchmean', got '{reduction}'")
    e = mean_gate.shape[-1]
    kl = (torch.log(torch.tensor(1.0 / e)) - torch.log(mean_gate.float().clamp_min(1e-12))).mean()
    return kl / e if reduction == "batchmean" else kl
