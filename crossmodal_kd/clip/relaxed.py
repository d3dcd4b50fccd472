"""T_x, the WordNet-relaxed CLIP teacher (Guo et al., arXiv 2503.24017), as a network of the zoo: ``relaxed_clip``.

For an image, a frozen CLIP backend gives its unit-norm embedding ``v``. The relaxed text embedding is a
soft mixture of the noun rows ``N`` (M, D) (WordNet nouns chosen by the ``wordnet_clip`` method; never
the class names when those are excluded)::

    a = softmax(v N^T / temperature)          (temperature 0.005)
    r = normalize(a N)

(public code, ``trainer_regularizerV2.py``: ``retrieve_text_v2``, ``tau = 0.005``) and a small MLP classifies
``[v, r]``. ``N`` is a learnable parameter initialised from the nouns' prompt embeddings (the method
renormalises its rows after each optimizer step, as the public code); the initial matrix is kept as the
buffer ``pretrained_nouns`` for the hierarchical loss's third term (row-wise against ``N``, the public
code's; or through ``relaxed_pretrained``, the mixture over it, with ``pretrained_term: relaxed``).

``label_oracle`` (ablation only, off by default): the naive leaky text teacher of the paper's ablation.
The nouns must be the class names in label order, and the "relaxed" embedding is replaced by the row of
each sample's *true label*, read from ``batch["label"]``: the teacher then reads its answer and is
(near) 100 % accurate on every split. Without it T_x never reads a label.

The backend is *not* part of the module tree: not in ``state_dict()``, ``parameters()`` nor the optimizer,
never trained; it is rebuilt from ``backend`` (a ``{name, params}`` spec saved in the model file, so the
teacher loads by path like any other) and follows the network's ``.to()``/``.half()`` calls. The noun
list is a parameter too, so a saved teacher says exactly which nouns it reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal_kd.clip.backends import build_clip_backend
from crossmodal_kd.models.frozen import FrozenHolder
from crossmodal_kd.models.networks import Network
from crossmodal_kd.params import Fraction, PositiveFloat, PositiveInt
from crossmodal_kd.registry import NETWORKS


def relaxed_embedding(
    image_embeddings: torch.Tensor, nouns: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normalize(softmax(v N^T / t) N), softmax weights (B, M))``: the noun mixture describing each image.

    Always in fp32, autocast off: at ``t = 0.005`` the similarities are scaled by 200, beyond half precision."""
    with torch.autocast(image_embeddings.device.type, enabled=False):
        weights = F.softmax(image_embeddings.float() @ nouns.float().T / temperature, dim=-1)
        return F.normalize(weights @ nouns.float(), dim=-1), weights


@NETWORKS.register("relaxed_clip")
class RelaxedClipTeacher(FrozenHolder, Network):
    """T_x: ``MLP([v, r])`` with ``v`` the frozen backend's image embedding and ``r`` the relaxed text one.

    Outputs ``logits``, ``features`` (the MLP's hidden layer), ``relaxed`` (r), ``relaxed_pretrained``
    (the same mixture over the initial, pretrained noun matrix; no gradient), ``image_embedding`` (v) and
    ``noun_weights`` (the softmax weights over the nouns).
    """

    def __init__(
        self,
        input_shapes: Mapping[str, Sequence[int]],
        num_classes: int,
        backend: Mapping[str, Any],
        nouns: Sequence[str],
        modality: str = "image",
        hidden: PositiveInt = 256,
        dropout: Fraction = 0.1,
        temperature: PositiveFloat = 0.005,
        label_oracle: bool = False,
    ) -> None:
        super().__init__()
        if modality not in input_shapes:
            raise KeyError(f"network 'relaxed_clip': modality '{modality}' is not in this dataset; have {', '.join(input_shapes)}")
        if not nouns:
            raise ValueError("network 'relaxed_clip': the noun list is empty")
        if temperature <= 0:
            raise ValueError(f"network 'relaxed_clip': temperature must be > 0, got {temperature}")
        if not isinstance(backend, Mapping) or "name" not in backend or set(backend) - {"name", "params"}:
            raise ValueError(f"network 'relaxed_clip': backend must be {{name, params}}, got {backend!r}")
        clip = build_clip_backend(backend["name"], backend.get("params"))
        self.hold_frozen("_backend", clip)
        if label_oracle and len(nouns) != num_classes:
            raise ValueError(
                f"network 'relaxed_clip': label_oracle needs the {num_classes} class names as nouns, got {len(nouns)} nouns"
            )
        self.label_oracle = bool(label_oracle)
        self.modalities = (modality,)
        self.nouns = list(nouns)
        self.temperature = float(temperature)
        dim = clip.embed_dim
        self.noun_embeddings = nn.Parameter(torch.zeros(len(self.nouns), dim))
        self.register_buffer("pretrained_nouns", torch.zeros(len(self.nouns), dim))
        self.feature_dim = hidden
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)

    @property
    def backend(self):
        """The frozen CLIP backend (not a submodule)."""
        return self._backend

    @torch.no_grad()
    def set_nouns(self, embeddings: torch.Tensor) -> None:
        """Initialise the learnable noun matrix and the pretrained copy from ``(M, D)`` embeddings (normalised)."""
        if tuple(embeddings.shape) != tuple(self.noun_embeddings.shape):
            raise ValueError(
                f"network 'relaxed_clip': noun embeddings {tuple(embeddings.shape)} do not fit "
                f"{len(self.nouns)} nouns x {self.noun_embeddings.shape[1]} dims"
            )
        unit = F.normalize(embeddings.float(), dim=-1).to(self.noun_embeddings.device)
        self.noun_embeddings.copy_(unit)
        self.pretrained_nouns.copy_(unit)

    @torch.no_grad()
    def renormalize_nouns(self) -> None:
        """Project the noun rows back onto the unit sphere (after an optimizer step)."""
        self.noun_embeddings.copy_(F.normalize(self.noun_embeddings.float(), dim=-1))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = self._backend.encode_image(batch[self.modalities[0]])  # frozen: no graph
        relaxed, weights = relaxed_embedding(image, self.noun_embeddings, self.temperature)
        if self.label_oracle:  # the leak, on purpose (ablation): the true label's class-name row
            weights = F.one_hot(batch["label"], len(self.nouns)).float()
            relaxed = F.normalize(weights @ self.noun_embeddings.float(), dim=-1)
        with torch.no_grad():
            pretrained, _ = relaxed_embedding(image, self.pretrained_nouns, self.temperature)
        features = self.mlp(torch.cat([image, relaxed], dim=1))
        return {
            "logits": self.head(features),
            "features": features,
            "relaxed": relaxed,
            "relaxed_pretrained": pretrained,
            "image_embedding": image,
            "noun_weights": weights,
        }

