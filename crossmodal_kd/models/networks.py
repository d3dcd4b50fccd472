"""Networks: a whole classifier that reads a batch dict and returns ``{"logits", "features"}``.

Students and teachers of every kind (unimodal, cross-modal, multimodal fusion) are networks; a
"cross-modal teacher" is simply a unimodal network on the other modality.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from crossmodal_kd.params import EncoderSpec, Fraction, PositiveInt, Probability, RouterSpec
from crossmodal_kd.models.routers import ROUTERS
from crossmodal_kd.registry import ENCODERS, NETWORKS


class Network(nn.Module):
    """Base class: ``forward(batch) -> {"logits": (B, C), "features": (B, D)}``; ``modalities`` it reads."""

    modalities: tuple[str, ...] = ()
    feature_dim: int = 0

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def build_network(
    name: str, params: dict[str, Any], input_shapes: Mapping[str, Sequence[int]], num_classes: int, where: str = "",
    class_names: Sequence[str] = (),
) -> Network:
    return NETWORKS.build(
        name, params, where=where or f"networks.{name}", input_shapes=input_shapes, num_classes=num_classes, class_names=tuple(class_names)
    )


def _build_encoder(spec: Mapping[str, Any], modality: str, input_shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    if modality not in input_shapes:
        raise KeyError(f"modality '{modality}' is not in this dataset; available: {', '.join(input_shapes)}")
    enc = ENCODERS.build_spec(spec, where=f"encoder for '{modality}'", input_shape=tuple(input_shapes[modality]))
    if not isinstance(getattr(enc, "out_dim", None), int):
        raise TypeError(f"encoder '{spec['name']}' must set an integer .out_dim on the module it returns")
    return enc


@NETWORKS.register("unimodal")
class UnimodalNet(Network):
    """One encoder on one modality, then a linear head."""

    def __init__(
        self,
        input_shapes: Mapping[str, Sequence[int]],
        num_classes: int,
        modality: str,
        encoder: EncoderSpec,
        dropout: Fraction = 0.0,
    ) -> None:
        super().__init__()
        self.modalities = (modality,)
        self.encoder = _build_encoder(encoder, modality, input_shapes)
        self.feature_dim = self.encoder.out_dim
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, num_classes))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = self.encoder(batch[self.modalities[0]])
        return {"logits": self.head(features), "features": features}


@NETWORKS.register("fusion")
class FusionNet(Network):
    """Intermediate fusion: one encoder per modality, concatenated features -> MLP -> logits.

    ``modality_dropout``: during training, each sample has this probability of having one randomly
    chosen modality's features zeroed, so one strong branch cannot drown the others.
    """

    def __init__(
        self,
        input_shapes: Mapping[str, Sequence[int]],
        num_classes: int,
        encoders: Mapping[str, EncoderSpec],
        hidden: PositiveInt = 128,
        dropout: Fraction = 0.2,
        modality_dropout: Probability = 0.0,
    ) -> None:
        super().__init__()
        if len(encoders) < 2:
            raise ValueError(f"network 'fusion' needs at least two modalities, got {list(encoders)}")
        self.modalities = tuple(encoders)
        self.encoders = nn.ModuleDict({m: _build_encoder(spec, m, input_shapes) for m, spec in encoders.items()})
        in_dim = sum(e.out_dim for e in self.encoders.values())
        self.fusion = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden
        self.modality_dropout = modality_dropout

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feats = [self.encoders[m](batch[m]) for m in self.modalities]
        if self.training and self.modality_dropout > 0:
            feats = self._drop_modalities(feats)
        fused = self.fusion(torch.cat(feats, dim=1))
        return {"logits": self.head(fused), "features": fused}

    def _drop_modalities(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        b, n = feats[0].shape[0], len(feats)
        drop = torch.rand(b, device=feats[0].device) < self.modality_dropout
        which = torch.randint(n, (b,), device=feats[0].device)
        return [f * ~(drop & (which == i)).unsqueeze(1) for i, f in enumerate(feats)]


@NETWORKS.register("multiview")
class MultiViewNet(Network):
    """TMKD's multi-view visual teacher: one backbone shared by all views, per-view features fused by a router.

    ``views`` are modalities (usually derived by ``data.views``), all of one shape. Per instance, the router
    (``ROUTERS``: ``uniform`` = plain averaging, ``text_guided`` = CLIP prompt similarity) weights the views'
    features, ``F = sum_v w_v f_v``, and one head classifies ``F``. The router is called with per-view
    logits ``(B, V, C)`` of the shared head and the batch, and built with the view names (``views``) when it
    takes them; ``view_weights`` (B, V) are returned for logging.
    """

    def __init__(
        self,
        input_shapes: Mapping[str, Sequence[int]],
        num_classes: int,
        views: Sequence[str],
        encoder: EncoderSpec,
        router: RouterSpec | None = None,
        dropout: Fraction = 0.0,
        class_names: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not views:
            raise ValueError("network 'multiview' needs at least one view")
        shapes = {tuple(input_shapes[v]) if v in input_shapes else None for v in views}
        self.modalities = tuple(views)
        self.encoder = _build_encoder(encoder, views[0], input_shapes)
        if len(shapes) != 1 or None in shapes:
            raise ValueError(f"network 'multiview': views {list(views)} must be modalities of one shape; have {dict(input_shapes)}")
        self.feature_dim = self.encoder.out_dim
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.router = ROUTERS.build_spec(
            router or {"name": "uniform"}, where="network 'multiview' router", num_teachers=len(views),
            num_classes=num_classes, feature_dim=self.feature_dim, views=self.modalities, class_names=tuple(class_names),
        )

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        b = batch[self.modalities[0]].shape[0]
        stacked = torch.cat([batch[v] for v in self.modalities])  # one backbone call for all views
        view_features = self.encoder(stacked).reshape(len(self.modalities), b, -1).transpose(0, 1)  # (B, V, D)
        view_logits = self.head(view_features)
        mean_out = {"logits": view_logits.mean(1), "features": view_features.mean(1)}
        weights = self.router(mean_out, view_logits, batch).weights.to(view_features.dtype)
        fused = (weights.unsqueeze(-1) * view_features).sum(1)
        return {"logits": self.head(self.dropout(fused)), "features": fused, "view_weights": weights}
