"""Plain supervised training of one network: teachers of the zoo and the no-KD student baseline."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.losses import cross_entropy
from crossmodal_kd.methods.base import Method
from crossmodal_kd.params import NetworkName, Params as BaseParams, Probability
from crossmodal_kd.registry import METHODS


@METHODS.register("supervised")
class Supervised(Method):
    """Cross-entropy on one network named under ``networks:`` (saved as model ``model``).

    Augmentation is a stage key (``stages[i].augment``) the engine applies to training batches, for any method.
    """

    class Params(BaseParams):
        network: NetworkName
        label_smoothing: Probability = 0.0
        renamed: ClassVar[dict[str, str]] = {"augment": "the stage key stages[i].augment (augmentation applies to any method)"}

    def __init__(self, ctx: BuildContext, params: Supervised.Params) -> None:
        super().__init__(ctx)
        self.model = self.build_model(ctx, params.network)
        self.label_smoothing = params.label_smoothing

    def build_model(self, ctx: BuildContext, network: str) -> nn.Module:
        """The network to train: ``networks.<network>`` as configured (subclasses may resolve references first)."""
        return ctx.network(network)

    def forward(self, batch):
        out = self.model(batch)
        return out, {"ce": cross_entropy(out["logits"], batch["label"], self.label_smoothing)}

    def models(self):
        return {"model": self.model}
