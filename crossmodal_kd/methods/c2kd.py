"""C2KD (Huo et al., CVPR 2024): proxies, bidirectional non-target distillation, on-the-fly sample selection."""

from __future__ import annotations

import torch
from torch import nn

from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.losses import drop_target, kd_kl, non_target_kl
from crossmodal_kd.methods.kd import Distiller
from crossmodal_kd.params import NonNegativeFloat, PositiveFloat
from crossmodal_kd.registry import METHODS


def kendall_tau(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b between the rows of ``x`` and ``y`` (``(B, n) -> (B,)``), ties handled; 0 for a constant row."""
    sx = torch.sign(x.unsqueeze(2) - x.unsqueeze(1))  # (B, n, n): the order of every pair
    sy = torch.sign(y.unsqueeze(2) - y.unsqueeze(1))
    denom = (sx.abs().sum((1, 2)) * sy.abs().sum((1, 2))).sqrt()
    return (sx * sy).sum((1, 2)) / denom.clamp_min(1e-12)


def proxy_head(in_dim: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.LeakyReLU(0.1), nn.Linear(in_dim, num_classes))


@METHODS.register("c2kd")
class C2KD(Distiller):
    """Our reading of C2KD, after the paper and its public code (huofushuo/C2KD):

    - **Proxies.** A small trainable head on each side's features: ``proxy_s`` on the student's,
      ``proxy_t`` on the (frozen) teacher's. Each proxy follows its own network's prediction
      (``KL(p_t || proxy_t)``; student and ``proxy_s`` learn from each other both ways), so the proxies
      can move towards each other while the teacher's backbone stays fixed. (The public code also
      fine-tunes the teacher backbone; here it stays frozen, only its proxy trains.)
    - **Bidirectional non-target distillation.** Target-class confidence is modality-specific, so only
      the distributions over the non-target classes are exchanged: ``proxy_s`` learns from ``proxy_t``
      and ``proxy_t`` from ``proxy_s`` (each direction with the other side detached).
    - **On-the-fly selection.** A sample enters the non-target terms only when the two proxies rank its
      non-target classes alike: Kendall's tau above ``krc_threshold`` (0 in the public code), recomputed
      on every batch. Filtered samples count as zero in the batch mean, as in the public code.

    Loss: ``w_ce CE + w_proxy (proxy terms) + w_nt (both masked non-target KLs)`` (plus ``w_kd`` KD from the
    teacher, default 0); ``tau`` is the temperature of every KL (1 in the public code). Logged: mean Kendall
    tau and the fraction kept.
    """

    class Params(Distiller.Params):
        krc_threshold: float = 0.0
        tau: PositiveFloat = 1.0
        w_proxy: NonNegativeFloat = 1.0
        w_nt: NonNegativeFloat = 1.0
        w_kd: NonNegativeFloat = 0.0

    def __init__(self, ctx: BuildContext, params: C2KD.Params) -> None:
        super().__init__(ctx, params)
        self.proxy_s = proxy_head(self.student.feature_dim, ctx.num_classes)
        self.proxy_t = proxy_head(self.teacher.module.feature_dim, ctx.num_classes)
        self.krc_threshold, self.w_proxy, self.w_nt = params.krc_threshold, params.w_proxy, params.w_nt

    def forward(self, batch):
        out = self.student(batch)
        t_out = self.teacher(batch)
        y, tau = batch["label"], self.tau
        z_s, z_ps, z_pt = out["logits"], self.proxy_s(out["features"]), self.proxy_t(t_out["features"])
        keep = self.select(z_ps.detach(), z_pt.detach(), y)
        losses = self.logit_losses(z_s, t_out["logits"], y)
        losses["proxy"] = self.w_proxy * (
            kd_kl(z_ps, z_s.detach(), tau) + kd_kl(z_s, z_ps.detach(), tau) + kd_kl(z_pt, t_out["logits"], tau)
        )
        nt = non_target_kl(z_ps, z_pt.detach(), y, tau, "none") + non_target_kl(z_pt, z_ps.detach(), y, tau, "none")
        losses["non_target"] = self.w_nt * (keep * nt).mean()
        return out, losses

    def select(self, proxy_s_logits: torch.Tensor, proxy_t_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float mask: 1 where the proxies' non-target rankings agree (Kendall tau > threshold)."""
        tau = kendall_tau(drop_target(proxy_s_logits, labels).float(), drop_target(proxy_t_logits, labels).float())
        keep = (tau > self.krc_threshold).float()
        self.record("c2kd/kendall", tau.sum(), len(tau))
        self.record("c2kd/kept", keep.sum(), len(keep))
        return keep
