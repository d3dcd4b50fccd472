"""Plain supervised training of one network: teachers of the zoo and the no-KD student baseline."""

from __future__ import annotations

from torch import nn

from crossmodal_kd.augment import AugmentSet
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.losses import cross_entropy
from crossmodal_kd.methods.base import Method
from crossmodal_kd.params import AugmentationSpec, NetworkName, Params as BaseParams, Probability
from crossmodal_kd.registry import METHODS


@METHODS.register("supervised")
class Supervised(Method):
    """Cross-entropy on one network named under ``networks:`` (saved as model ``model``).

    ``augment``: ``{modality: {name, params}}`` from ``AUGMENTATIONS`` (``weak``, ``strong``, ...),
    applied to training batches only (see :mod:`crossmodal_kd.augment`), e.g. the strongly and weakly
    augmented visual teachers of the WordNet-relaxed CLIP recipe (Guo et al., arXiv 2503.24017).
    """

    class Params(BaseParams):
        network: NetworkName
        label_smoothing: Probability = 0.0
        augment: dict[str, AugmentationSpec] | None = None

    def __init__(self, ctx: BuildContext, params: Supervised.Params) -> None:
        super().__init__(ctx)
        self.model = self.build_model(ctx, params.network)
        self.label_smoothing = params.label_smoothing
        self.augment = AugmentSet(params.augment, ctx.input_shapes, where=f"{ctx.where}.augment")

    def build_model(self, ctx: BuildContext, network: str) -> nn.Module:
        """The network to train: ``networks.<network>`` as configured (subclasses may resolve references first)."""
        return ctx.network(network)

    def forward(self, batch):
        if self.training and self.augment:
            batch = self.augment(batch)
        out = self.model(batch)
        return out, {"ce": cross_entropy(out["logits"], batch["label"], self.label_smoothing)}

    def models(self):
        return {"model": self.model}
