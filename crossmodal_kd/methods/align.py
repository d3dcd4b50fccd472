"""``align_to_text``: train an image tower into a frozen text encoder's space (the ``text_aligned`` backend).

LiT-style locked-tower contrastive tuning (Zhai et al., 2022), text side locked: the image network
(``encoder`` -> linear projection -> L2 norm, a ``text_aligned_image`` network) learns on the training
split so that each image's embedding is closest to the frozen text embedding of its own class prompt.
With class prompts the text side of a batch holds only the ``C`` class prompts (repeated), so the
InfoNCE candidates are those ``C`` prompts: per template ``k``::

    L_k = CE( cos(e_i, t_{c,k}) / temperature over c , y_i )        L = mean_k L_k

(``t_{c,k}``: the frozen embedding of template ``k`` filled with class name ``c``). The saved network's
logits are the cosines to the template-averaged class prompts over the same temperature, so the stage
is selected on validation accuracy like every stage.

This makes an offline stand-in for CLIP: pretrained CLIP weights cannot be downloaded here, the only
offline pretrained text model is all-MiniLM-L6-v2 (``minilm``). Its image tower knows only this
dataset's training images; see :mod:`crossmodal_kd.models.aligned`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from crossmodal_kd.config import ConfigError
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.models.io import attach_spec
from crossmodal_kd.losses import text_anchored_contrastive
from crossmodal_kd.methods.base import Method
from crossmodal_kd.models.aligned import TextTower, prompt_embeddings
from crossmodal_kd.params import Params as BaseParams, PositiveFloat
from crossmodal_kd.registry import METHODS, NETWORKS

DIGIT_TEMPLATES = ("a photo of the number {}.", "a handwritten digit {}.", "the number {}.")
"""Default class prompts (digits datasets); set ``templates`` for other data."""


@METHODS.register("align_to_text")
class AlignToText(Method):
    """Train a ``text_aligned_image`` network against a locked text tower (saved as model ``model``).

    ``text``: ``{model: minilm | <dir> | <hub name>, pooling: mean, max_length: 64, allow_download: false}``.
    ``image``: ``{encoder: {name, params}, modality: image}``: the image tower. ``templates``: class
    prompts with one ``{}`` each. ``temperature``: of the contrastive softmax and of the saved logits.
    ``class_names``: override the dataset's (e.g. to spell digit labels as words).
    """

    class Params(BaseParams):
        image: dict[str, Any]
        text: dict[str, Any] | None = None
        templates: Sequence[str] = DIGIT_TEMPLATES
        temperature: PositiveFloat = 0.07
        class_names: Sequence[str] | None = None

    def __init__(self, ctx: BuildContext, params: AlignToText.Params) -> None:
        super().__init__(ctx)
        image, templates, temperature = params.image, params.templates, params.temperature
        text = {"model": "minilm", "pooling": "mean", "max_length": 64, **(params.text or {})}
        unknown = set(text) - {"model", "pooling", "max_length", "allow_download"}
        if unknown:
            raise ConfigError(f"{ctx.where}.text: unknown key(s) {', '.join(sorted(unknown))}; valid: model, pooling, max_length, allow_download")
        unknown = set(image) - {"encoder", "modality"}
        if unknown or "encoder" not in image:
            raise ConfigError(f"{ctx.where}.image: expected {{encoder: {{name, params}}, modality: image}}, got {image!r}")
        names = ctx.class_names_or(params.class_names)
        tower = TextTower(**text)
        with torch.no_grad():
            prompts = prompt_embeddings(tower, names, templates)  # (C, K, D), frozen
        del tower  # the text tower is no longer needed: the prompts are all the stage reads
        self.register_buffer("prompts", prompts, persistent=False)
        net_params = {
            "encoder": dict(image["encoder"]),
            "modality": image.get("modality", "image"),
            "embed_dim": int(prompts.shape[-1]),
            "text": {k: text[k] for k in ("model", "pooling", "max_length")},
            "temperature": float(temperature),
        }
        context = {"input_shapes": ctx.input_shapes, "num_classes": ctx.num_classes}
        net = NETWORKS.build("text_aligned_image", net_params, where=f"{ctx.where}.image", **context)
        self.model = attach_spec(net, "networks", "text_aligned_image", net_params, context)
        with torch.no_grad():
            self.model.class_text.copy_(torch.nn.functional.normalize(prompts.mean(1), dim=-1))
        self.temperature = float(temperature)

    def forward(self, batch):
        out = self.model(batch)
        labels = batch["label"]
        k = self.prompts.shape[1]
        loss = sum(
            text_anchored_contrastive(out["embedding"], self.prompts[:, j], labels, self.temperature) for j in range(k)
        ) / k
        return out, {"infonce": loss}

    def models(self):
        return {"model": self.model}
