"""Contrastive losses: the NCE objective of CRD (Tian et al., 2020)."""

from __future__ import annotations

import torch

from crossmodal_kd.registry import LOSSES


@LOSSES.register("nce")
def nce_loss(scores: torch.Tensor, noise_prob: float, eps: float = 1e-7) -> torch.Tensor:
    """Noise-contrastive estimation on ``(B, 1 + K)`` unnormalised probabilities, positive in column 0.

    With ``m = K * noise_prob`` (``noise_prob = 1 / N`` for uniform negatives over a bank of ``N``):
    ``-(1/B) sum_b [log(s_pos / (s_pos + m)) + sum_k log(m / (s_k + m))]``.
    """
    scores = scores.float()
    m = (scores.shape[1] - 1) * noise_prob
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + m + eps))
    log_neg = torch.log(m / (scores[:, 1:] + m + eps))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]
