"""TMKD's text-guided router (Zhang et al., TMKD, arXiv 2603.24208): per-instance view weights from CLIP
prompt similarity. It lives beside the CLIP backends it needs and registers into ``ROUTERS``, so
``models/`` never imports ``clip/``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from crossmodal_kd.clip.backends import build_clip_backend
from crossmodal_kd.models.frozen import FrozenHolder
from crossmodal_kd.models.routers import Router, Routing
from crossmodal_kd.params import PositiveFloat, Supplied
from crossmodal_kd.registry import ROUTERS

TEXT_GUIDED_PROMPTS = (
    "a photo of a {}.",
    "an edge enhanced image of a {}.",
    "a high-frequency enhanced image of a {}.",
)
"""TMKD's prior-aware prompts for the views RGB, edge-enhanced and high-frequency, in that order (Zhang et al., TMKD, arXiv 2603.24208)."""


@ROUTERS.register("text_guided")
class TextGuidedRouter(FrozenHolder, Router):
    """TMKD's text teacher (Zhang et al., TMKD, arXiv 2603.24208): per-instance view weights from a frozen CLIP backend.

    For a sample of class ``c`` and its views ``x_v`` (the modalities ``views``, in order)::

        w_v = softmax_v( cos(image_emb(x_v), text_emb(prompts[v].format(c))) / temperature )

    ``prompts``: one template per view, in view order; the default, :data:`TEXT_GUIDED_PROMPTS`, fits
    exactly three views (RGB, edge, high-frequency), any other view set must name its own.
    ``class_names``: one per class, index = label (the ``tmkd_teacher`` method fills in the dataset's).
    ``temperature``: default 0.01, the scale at which CLIP's own image-text softmax is calibrated (its
    learned logit scale, 100); a backend trained at another temperature (``text_aligned``: its ``align``
    stage's, e.g. 0.07) should use that one. Lower is sharper.

    ``class_source`` (while the router is in training mode) and ``eval_class_source`` (in eval mode): which
    class ``c`` fills the prompts.

    - ``label`` (``class_source``'s default, the paper's): the sample's true label, ``batch["label"]``.
    - ``zero_shot``: the backend's own guess, ``argmax_c sum_v cos(image_emb(x_v), text_emb(prompt_v(c)))``;
      never reads the label.

    ``eval_class_source`` defaults to ``zero_shot``: validation and test run in eval mode, so the teacher's
    checkpoint selection and its reported accuracies never read the label, whatever it was trained with
    (with ``label`` at eval, the weights would carry the true class into the prediction: an optimistic,
    not a label-free, number). A saved teacher then also predicts unlabelled data. Training with ``label``
    and evaluating with ``zero_shot`` is a train/eval mismatch only where the backend's guess is wrong.
    :meth:`as_trained` routes with ``class_source`` in eval mode too: a frozen teacher distilling on its
    labelled training split (the ``tmkd`` method), as the paper's teacher does.

    ``backend``: a CLIP backend ``{name, params}`` (``CLIP_BACKENDS``) with every file reference already
    a path. It is frozen and kept *outside* the module tree (not in ``state_dict()`` nor ``parameters()``),
    rebuilt from the spec when a saved teacher is loaded, and follows ``.to()``; the prompt embeddings
    ``(V, C, D)`` are computed once, when the router is built.
    """

    def __init__(
        self,
        num_teachers: int,
        views: Sequence[str],
        backend: Mapping[str, Any],
        class_names: Annotated[Sequence[str], Supplied()],
        prompts: Sequence[str] | None = None,
        temperature: PositiveFloat = 0.01,
        class_source: Literal["label", "zero_shot"] = "label",
        eval_class_source: Literal["label", "zero_shot"] = "zero_shot",
        num_classes: int = 0,
    ) -> None:
        super().__init__(num_teachers)
        views = tuple(views)
        prompts = tuple(TEXT_GUIDED_PROMPTS if prompts is None else prompts)
        if len(views) != num_teachers:
            raise ValueError(f"router 'text_guided': {len(views)} view names for {num_teachers} views")
        if len(prompts) != len(views):
            raise ValueError(
                f"router 'text_guided': prompts must give one template per view, in view order; views {list(views)}, "
                f"prompts {list(prompts)}" + (" (the defaults are for RGB, edge, high-frequency)" if prompts == TEXT_GUIDED_PROMPTS else "")
            )
        bad = [p for p in prompts if not isinstance(p, str) or p.count("{}") != 1]
        if bad:
            raise ValueError(f"router 'text_guided': each prompt needs exactly one '{{}}' for the class name; got {bad}")
        if num_classes and len(class_names) != num_classes:
            raise ValueError(f"router 'text_guided': {len(class_names)} class names for {num_classes} classes")
        if temperature <= 0:
            raise ValueError(f"router 'text_guided': temperature must be > 0, got {temperature}")
        for key, source in (("class_source", class_source), ("eval_class_source", eval_class_source)):
            if source not in ("label", "zero_shot"):
                raise ValueError(f"router 'text_guided': {key} must be 'label' or 'zero_shot', got '{source}'")
        if not isinstance(backend, Mapping) or "name" not in backend or set(backend) - {"name", "params"}:
            raise ValueError(f"router 'text_guided': backend must be {{name, params}}, got {backend!r}")
        clip = build_clip_backend(backend["name"], backend.get("params"))
        self.hold_frozen("_backend", clip)
        self.views, self.prompts, self.class_names = views, prompts, list(class_names)
        self.temperature, self.class_source, self.eval_class_source = float(temperature), class_source, eval_class_source
        self._as_trained = False
        texts = [p.format(c) for p in prompts for c in self.class_names]
        text = clip.encode_text(texts).view(len(views), len(self.class_names), -1)
        self.register_buffer("prompt_embeddings", text, persistent=False)  # (V, C, D), unit norm

    @property
    def backend(self):
        """The frozen CLIP backend (not a submodule)."""
        return self._backend

    @property
    def active_class_source(self) -> str:
        """``class_source`` in training mode or inside :meth:`as_trained`, else ``eval_class_source``."""
        return self.class_source if self.training or self._as_trained else self.eval_class_source

    @contextmanager
    def as_trained(self) -> Iterator[None]:
        """Route with ``class_source`` in eval mode too (a frozen teacher on its labelled training split)."""
        previous, self._as_trained = self._as_trained, True
        try:
            yield
        finally:
            self._as_trained = previous

    def forward(self, student_out, teacher_logits: torch.Tensor, batch: Mapping[str, torch.Tensor] | None = None) -> Routing:
        if batch is None or any(v not in batch for v in self.views):
            raise KeyError(f"router 'text_guided': needs the batch with the views {list(self.views)}")
        b = batch[self.views[0]].shape[0]
        images = self._backend.encode_image(torch.cat([batch[v] for v in self.views]))  # one call for all views, no graph
        images = images.float().view(len(self.views), b, -1).transpose(0, 1)  # (B, V, D), unit norm
        text = self.prompt_embeddings.float()
        with torch.no_grad(), torch.autocast(text.device.type, enabled=False):  # similarities / 0.01: fp32
            if self.active_class_source == "label":
                if "label" not in batch:
                    raise KeyError("router 'text_guided': class source 'label' reads batch['label'], which this batch lacks")
                classes = batch["label"].to(text.device)
            else:
                classes = torch.einsum("bvd,vcd->bc", images, text).argmax(1)
            sims = torch.einsum("bvd,vbd->bv", images, text[:, classes])  # cos(view v, its prompt for the class)
            weights = F.softmax(sims / self.temperature, dim=1)
        return Routing(weights=weights)

