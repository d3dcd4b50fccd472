"""Distillation losses: plain functions that methods import, weight and name as their own terms (no registry).
Every loss casts to fp32 first, so mixed precision cannot overflow it."""

from crossmodal_kd.losses.contrastive import nce_loss, text_anchored_contrastive
from crossmodal_kd.losses.decoupled import drop_target, non_target_kl, target_kl
from crossmodal_kd.losses.feature import hint_mse, pairwise_distances, perturbed_feature_mse, rkd_angle, rkd_distance
from crossmodal_kd.losses.kd import cross_entropy, kd_kl, load_balance_kl
from crossmodal_kd.losses.relaxed import cosine_distance, hierarchical_terms

__all__ = [
    "cosine_distance",
    "cross_entropy",
    "drop_target",
    "hierarchical_terms",
    "hint_mse",
    "kd_kl",
    "load_balance_kl",
    "nce_loss",
    "non_target_kl",
    "pairwise_distances",
    "perturbed_feature_mse",
    "rkd_angle",
    "rkd_distance",
    "target_kl",
    "text_anchored_contrastive",
]
