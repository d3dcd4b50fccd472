"""The hierarchical loss of the WordNet-relaxed CLIP teacher T_x (Guo et al., arXiv 2503.24017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(a_i, b_i)`` over the rows of ``(N, D)`` tensors (fp32)."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


def hierarchical_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    relaxed: torch.Tensor,
    class_text: torch.Tensor,
    current: torch.Tensor,
    pretrained: torch.Tensor,
    w_class: float = 0.2,
    w_pre: float = 0.005,
) -> dict[str, torch.Tensor]:
    """The three weighted terms of T_x's loss ``{"ce", "class", "pretrained"}``; the loss is their sum.

    ``ce = CE(logits, labels)``; ``class = w_class * mean_i(1 - cos(n_class_i, n_relaxed_i))`` with
    ``n_class = class_text[labels]``, the class-name prompt embedding of each sample's label (``class_text``
    is ``(C, D)``; it enters the loss only, never the network); ``pretrained = w_pre * mean_j(1 -
    cos(current_j, pretrained_j))`` over paired rows: the learned noun matrix and its initial value ``(M, D)``
    in the public code, or the relaxed embeddings over both ``(B, D)``. Public code
    (``trainer_regularizerV2.py``): ``get_hierarchical_loss`` and the cosine regulariser, weights
    ``lambda_hierarchical = 0.2`` and ``lambda_cosine_reg = 0.005``.
    """
    return {
        "ce": F.cross_entropy(logits.float(), labels),
        "class": w_class * cosine_distance(class_text[labels], relaxed),
        "pretrained": w_pre * cosine_distance(current, pretrained),
    }
