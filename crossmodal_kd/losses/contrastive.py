"""Contrastive losses: the NCE objective of CRD (Tian et al., 2020) and TMKD's text-anchored loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def text_anchored_contrastive(
    embeddings: torch.Tensor, anchors: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """TMKD's contrastive term: each embedding pulled to its class's text anchor, pushed from the others.

    ``embeddings (B, D)`` and ``anchors (C, D)`` are L2-normalised here; the loss is the cross-entropy of
    ``cos(embedding, anchor_c) / temperature`` over the ``C`` class anchors.
    """
    logits = F.normalize(embeddings.float(), dim=1) @ F.normalize(anchors.float(), dim=1).t()
    return F.cross_entropy(logits / temperature, labels)
