"""Decoupled logit losses: the target-class (TCKD) and non-target-class (NCKD) terms of DKD (Zhao et al., CVPR
2022; the ``dkd`` method weights and logs each), the non-target one shared with C2KD."""

from __future__ import annotations

import torch

from crossmodal_kd.losses.kd import kd_kl


def drop_target(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B, C) -> (B, C-1)``: each row without its target class, the other classes in their order."""
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels.view(-1, 1), False)
    return logits[keep].view(logits.shape[0], -1)


def non_target_kl(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """``tau^2 KL(q_target || q_student)`` between the distributions over the non-target classes only."""
    return kd_kl(drop_target(student_logits, labels), drop_target(target_logits, labels), tau, reduction)


def target_kl(
    student_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """``tau^2 KL(b_target || b_student)`` with ``b = (p_y, 1 - p_y)``: how sure each model is of the target class."""
    # the binary log-probabilities are their own log-softmax, so kd_kl at tau=1 is the plain KL
    return kd_kl(_binary_logits(student_logits, labels, tau), _binary_logits(target_logits, labels, tau), 1.0) * tau**2


def _binary_logits(logits: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Log-probabilities ``(log p_y, log (1 - p_y))`` at temperature ``tau``, computed stably."""
    z = logits.float() / tau
    log_total = z.logsumexp(1)
    log_target = z.gather(1, labels.view(-1, 1)).squeeze(1) - log_total
    log_rest = drop_target(z, labels).logsumexp(1) - log_total
    return torch.stack([log_target, log_rest], dim=1)
