"""Collaborative initialisation (MST-Distill stage 1): deep mutual learning (Zhang et al., CVPR 2018) for N
networks."""

from __future__ import annotations

from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.losses import cross_entropy, kd_kl
from crossmodal_kd.methods.base import Method
from crossmodal_kd.params import NetworkName, NonNegativeFloat, Params as BaseParams, PositiveFloat
from crossmodal_kd.registry import METHODS
from torch import nn


@METHODS.register("collaborative")
class Collaborative(Method):
    """Train several networks together: ``L_m = CE(z_m, y) + w_kd * sum_{n != m} tau^2 KL(p_n || p_m)``.

    ``networks`` maps a model name (e.g. ``teacher_mm``) to a network under ``networks:``. With
    ``detach_peers`` (default) each network only learns from its peers' predictions (deep mutual
    learning); without it, the KL terms also push the peers (the public MST-Distill code).
    """

    class Params(BaseParams):
        networks: dict[str, NetworkName]
        tau: PositiveFloat = 4.0
        w_kd: NonNegativeFloat = 1.0
        detach_peers: bool = True

    def __init__(self, ctx: BuildContext, params: Collaborative.Params) -> None:
        super().__init__(ctx)
        if len(params.networks) < 2:
            raise ValueError(f"{ctx.where}.networks: collaborative training needs at least two networks")
        self.nets = nn.ModuleDict({name: ctx.network(net) for name, net in params.networks.items()})
        self.tau, self.w_kd, self.detach_peers = params.tau, params.w_kd, params.detach_peers

    def forward(self, batch):
        logits = {name: net(batch)["logits"] for name, net in self.nets.items()}
        losses = {}
        for m, z_m in logits.items():
            losses[f"ce/{m}"] = cross_entropy(z_m, batch["label"])
            peers = [z.detach() if self.detach_peers else z for n, z in logits.items() if n != m]
            losses[f"kd/{m}"] = self.w_kd * sum(kd_kl(z_m, z_n, self.tau) for z_n in peers)
        return logits, losses

    def models(self):
        return dict(self.nets)
