"""Feature-level losses: FitNets hints, TMKD's perturbed feature KD, RKD's relational (distance and angle) terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hint_mse(regressed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al., 2015): mean squared error between regressed student and teacher features."""
    return F.mse_loss(regressed.float(), target.float())


def perturbed_feature_mse(
    student_features: torch.Tensor, teacher_features: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """TMKD's feature KD: MSE to the teacher's features plus Gaussian noise of std ``sigma`` (teacher side only).

    The noise is drawn fresh per call (``generator`` for reproducibility) and carries no gradient.
    """
    target = teacher_features.detach().float()
    if sigma > 0:
        noise = torch.randn(target.shape, generator=generator, dtype=target.dtype, device="cpu" if generator else target.device)
        target = target + sigma * noise.to(target.device)
    return F.mse_loss(student_features.float(), target)


def pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(B, D) -> (B, B)`` Euclidean distances; zero on the diagonal, with a finite gradient everywhere."""
    sq = x.pow(2).sum(1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * x @ x.t()).clamp_min(eps)
    return d2.sqrt() * (1 - torch.eye(len(x), device=x.device, dtype=x.dtype))


def _mean_normalised_distances(x: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(x.flatten(1).float())
    return d / d[d > 0].mean()


def rkd_distance(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """RKD-D (Park et al., 2019): smooth-L1 between pairwise distances, each divided by its mean positive distance."""
    with torch.no_grad():
        t = _mean_normalised_distances(teacher_features)
    return F.smooth_l1_loss(_mean_normalised_distances(student_features), t)


def _angles(x: torch.Tensor) -> torch.Tensor:
    """``(B, D) -> (B, B, B)``: ``cos`` of the angle at vertex ``j`` between ``x_i - x_j`` and ``x_k - x_j``."""
    x = x.flatten(1).float()
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # e[j, i] = unit(x_i - x_j)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """RKD-A (Park et al., 2019): smooth-L1 between the cosines of all triplet angles (``O(B^3)`` memory)."""
    with torch.no_grad():
        t = _angles(teacher_features)
    return F.smooth_l1_loss(_angles(student_features), t)
