"""Plain supervised training of one network: teachers of the zoo and the no-KD student baseline."""

from __future__ import annotations

from crossmodal_kd.engine.context import BuildContext
from crossmodal_kd.losses import cross_entropy
from crossmodal_kd.methods.base import Method
from crossmodal_kd.registry import METHODS


@METHODS.register("supervised")
class Supervised(Method):
    """Cross-entropy on one network named under ``networks:`` (saved as model ``model``)."""

    def __init__(self, ctx: BuildContext, network: str, label_smoothing: float = 0.0) -> None:
        super().__init__(ctx)
        self.model = ctx.network(network)
        self.label_smoothing = label_smoothing

    def forward(self, batch):
        out = self.model(batch)
        return out, {"ce": cross_entropy(out["logits"], batch["label"], self.label_smoothing)}

    def models(self):
        return {"model": self.model}
