"""CLIP-style image/text encoders behind one interface, :class:`ClipBackend`, chosen by name.

Every backend maps images and texts into one ``embed_dim``-wide space, L2-normalised, and owns its
image preprocessing, so callers hand it dataset tensors as they come out of a loader.

Registered backends (``CLIP_BACKENDS``):

``open_clip``
    Any open_clip architecture. Weights: a pretrained tag (downloaded, so online only, or from the
    Hugging Face cache with ``HF_HUB_OFFLINE=1``), a local checkpoint file, or ``null`` for random
    weights (tests and smoke runs only; it warns). The package ships small configs in
    ``crossmodal_kd/clip/model_configs`` (``tiny_open_clip``: builds offline in a second).

``text_aligned``
    The offline stand-in for CLIP (pretrained CLIP weights cannot be fetched on an offline machine): a real
    pretrained text encoder (``text_model``, default ``minilm`` = all-MiniLM-L6-v2, mean-pooled,
    frozen) and an image network trained into its space on the *training split* with the text tower
    locked (LiT-style), by an ``align_to_text`` stage; ``image_model`` is that stage's saved model
    file (a ``text_aligned_image`` network). Its image embeddings are therefore supervised by the
    training labels (through the class prompts), not open-world: use it to exercise the pipeline and
    as an honest, clearly-labelled substitute, and swap in ``open_clip`` with a real checkpoint
    where one can be downloaded.

Adding a backend takes a subclass and a name::

    @CLIP_BACKENDS.register("my_clip")
    class MyBackend(ClipBackend):
        def __init__(self, checkpoint: str, input_mean=None, input_std=None):
            super().__init__(image_size=224, mean=..., std=..., input_mean=input_mean, input_std=input_std)
            self.embed_dim = ...                  # width of the shared space
            self.cache_key = "my_clip:..."        # names encoder *and* weights (e.g. a checkpoint sha256)

        def _image_features(self, pixels):        # (B, 3, S, S), already resized and normalised
            return ...                            # (B, embed_dim), any norm

        def _text_features(self, texts):          # list[str] of at most the caller's batch size
            return ...                            # (N, embed_dim), any norm

The base class adds batching, grad control, device placement and the final L2 normalisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal_kd.io import sha256_file
from crossmodal_kd.models.frozen import FrozenHolder
from crossmodal_kd.models.aligned import TextAlignedImageNet, TextTower, text_model_id
from crossmodal_kd.models.io import load_model
from crossmodal_kd.registry import CLIP_BACKENDS

log = logging.getLogger(__name__)

MODEL_CONFIGS = Path(__file__).with_name("model_configs")
"""open_clip architecture configs shipped with the package (``<name>.json`` -> model name ``<name>``)."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


class ClipBackend(FrozenHolder):
    """Base class: preprocessing, batching and normalisation around two encoder hooks.

    Subclasses call ``super().__init__`` with the model's input ``image_size`` and normalisation
    ``mean``/``std``, set ``embed_dim`` and ``cache_key``, and implement :meth:`_image_features` and
    :meth:`_text_features`.

    Input images are either in [0, 1] (``input_mean``/``input_std`` unset; uint8 in [0, 255] is also
    accepted) or normalised by the dataset as ``(x - input_mean) / input_std`` (per channel, or one
    value for all), which :meth:`preprocess` undoes first.
    """

    embed_dim: int
    cache_key: str
    """Identifies encoder and weights; embedding caches are keyed by it."""

    def __init__(
        self,
        *,
        image_size: int | Sequence[int],
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        input_mean: float | Sequence[float] | None = None,
        input_std: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        if (input_mean is None) != (input_std is None):
            raise ValueError(
                "clip backend: give both input_mean and input_std (the dataset normalisation) or neither"
            )
        self.register_buffer("clip_mean", _channels(mean), persistent=False)
        self.register_buffer("clip_std", _channels(std), persistent=False)
        self.register_buffer(
            "input_mean", None if input_mean is None else _channels(input_mean), persistent=False
        )
        self.register_buffer(
            "input_std", None if input_std is None else _channels(input_std), persistent=False
        )

    @property
    def device(self) -> torch.device:
        return self.clip_mean.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), C in {1, 3} -> (B, 3, S, S) as the model expects: undo the dataset's
        normalisation, replicate grey to RGB, resize the short side to S (bilinear, antialiased),
        centre-crop, normalise with the model's mean/std. Runs batched on the backend's device."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"clip backend: expected images (B, 1 or 3, H, W), got shape {tuple(images.shape)}"
            )
        x = images.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.input_mean is not None:
            x = x * self.input_std + self.input_mean
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = _resize_centre_crop(x, self.image_size)
        return (x - self.clip_mean) / self.clip_std

    def encode_image(self, images: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """Images (see :meth:`preprocess`) -> (B, embed_dim), unit norm; no autograd graph unless ``grad``."""
        with torch.set_grad_enabled(grad):
            return F.normalize(self._image_features(self.preprocess(images)).float(), dim=-1)

    def encode_text(self, texts: Sequence[str], *, batch_size: int = 256, grad: bool = False) -> torch.Tensor:
        """Texts -> (N, embed_dim), unit norm, encoded ``batch_size`` at a time; no graph unless ``grad``."""
        if isinstance(texts, str):
            raise TypeError("clip backend: encode_text takes a list of strings, not one string")
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        with torch.set_grad_enabled(grad):
            parts = [self._text_features(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
            return F.normalize(torch.cat(parts).float(), dim=-1)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, 3, S, S) -> (B, embed_dim) features, not necessarily normalised."""
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (N, embed_dim) features on the backend's device, not necessarily normalised."""
        raise NotImplementedError


def build_clip_backend(name: str, params: dict[str, Any] | None = None) -> ClipBackend:
    """The backend registered as ``name``, built from config ``params`` (keys checked)."""
    return CLIP_BACKENDS.build(name, params, where=f"clip backend '{name}'")


@CLIP_BACKENDS.register("open_clip")
class OpenClipBackend(ClipBackend):
    """An open_clip model (``open_clip.create_model``) and its tokenizer.

    ``pretrained``: an open_clip tag such as ``"openai"`` (downloads; offline the error says so at
    once), a local checkpoint file (an open_clip/OpenAI state dict, ``.pt``/``.bin``/``.safetensors``),
    or ``None``: random weights drawn with ``seed``, which warns loudly; the embeddings then mean
    nothing (tests, smoke runs). ``model_config``: an extra open_clip config file or folder whose
    ``<name>.json`` files become model names. ``hub_cache_dir``: where tagged downloads go.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        model_config: str | None = None,
        seed: int = 0,
        input_mean: float | Sequence[float] | None = None,
        input_std: float | Sequence[float] | None = None,
        hub_cache_dir: str | None = None,
    ) -> None:
        open_clip = _open_clip()
        if model_config is not None:
            if not Path(model_config).exists():
                raise FileNotFoundError(f"open_clip backend: model_config {model_config} does not exist")
            open_clip.add_model_config(model_config)
        arch = open_clip.get_model_config(model_name)
        if arch is None:
            raise ValueError(
                f"open_clip backend: unknown model_name '{model_name}'; use one of open_clip.list_models() "
                f"(e.g. ViT-B-32, or tiny_open_clip shipped in {MODEL_CONFIGS}), "
                "or give model_config=<file.json>"
            )
        weights = _weights_id(open_clip, model_name, pretrained, seed)
        if pretrained is None:
            message = (
                f"open_clip backend: '{model_name}' has RANDOM weights (pretrained=null, seed {seed}); its "
                "embeddings are meaningless for real use; set pretrained to a tag or a local checkpoint file"
            )
            warnings.warn(message, stacklevel=2)
            log.warning(message)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = open_clip.create_model(model_name, pretrained=None)
        else:
            model = _create_pretrained(open_clip, model_name, pretrained, hub_cache_dir)
        preprocess_cfg = model.visual.preprocess_cfg
        super().__init__(
            image_size=preprocess_cfg["size"],
            mean=preprocess_cfg["mean"],
            std=preprocess_cfg["std"],
            input_mean=input_mean,
            input_std=input_std,
        )
        self.hold_frozen("model", model)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.embed_dim = int(arch["embed_dim"])
        arch_hash = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:10]
        self.cache_key = f"open_clip:{model_name}:{arch_hash}:{weights}"

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.visual.parameters()).dtype  # fp16/bf16 weights get matching pixels
        return self.model.encode_image(pixels.to(dtype))

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


@cache
def _open_clip():
    """open_clip, imported on first use (it takes seconds) with the shipped configs registered."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIGS)
    return open_clip


def _weights_id(open_clip, model_name: str, pretrained: str | None, seed: int) -> str:
    """The weights part of ``cache_key``; checks the value before anything is built or downloaded."""
    if pretrained is None:
        return f"random-seed{seed}"
    if os.path.isfile(pretrained):
        return f"file-{sha256_file(pretrained)[:16]}"
    if open_clip.get_pretrained_cfg(model_name, pretrained):
        return f"tag-{pretrained}"
    if os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"open_clip backend: pretrained checkpoint file not found: {pretrained}")
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
    raise ValueError(
        f"open_clip backend: pretrained '{pretrained}' is neither a local checkpoint file nor a known tag "
        f"for '{model_name}' (tags: {tags}); give a checkpoint path, a tag, or null for random weights"
    )


def _create_pretrained(open_clip, model_name: str, pretrained: str, hub_cache_dir: str | None) -> nn.Module:
    if not os.path.isfile(pretrained):  # a tag: needs the network unless the hub cache holds it
        offline_hint = (
            f"download the checkpoint for '{model_name}' / '{pretrained}' on a machine with internet and set "
            "pretrained to that local file path (or, when the Hugging Face cache already holds it, set "
            "HF_HUB_OFFLINE=1)"
        )
        host = _download_host(open_clip.get_pretrained_cfg(model_name, pretrained))
        if (
            host
            and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false")
            and not _reachable(host)
        ):
            raise ConnectionError(
                f"open_clip backend: this machine is offline (cannot reach {host}); {offline_hint}"
            )
        try:
            return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=hub_cache_dir)
        except (RuntimeError, OSError) as exc:
            raise RuntimeError(f"open_clip backend: could not fetch weights ({exc}); {offline_hint}") from exc
    return open_clip.create_model(model_name, pretrained=pretrained)


def _download_host(pretrained_cfg: dict[str, Any]) -> str | None:
    """The host a tagged download contacts (None when the tag names a local file)."""
    if "file" in pretrained_cfg:
        return None
    if pretrained_cfg.get("hf_hub"):
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    return urlparse(pretrained_cfg.get("url", "")).hostname


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _channels(values: float | Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() not in (1, 3):
        raise ValueError(f"clip backend: a mean/std needs 1 or 3 values, got {list(t.tolist())}")
    return t.view(1, -1, 1, 1)


def _resize_centre_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == size:
        return x
    scale = max(size[0] / h, size[1] / w)
    new = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    x = F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False)
    top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


@CLIP_BACKENDS.register("text_aligned")
class TextAlignedBackend(ClipBackend):
    """The offline CLIP stand-in: a locked pretrained text tower + an image network aligned to it.

    ``image_model``: the model file saved by an ``align_to_text`` stage (``stages/<stage>/models/model.pt``;
    methods that build a backend also accept a ``{stage: ...}`` reference there). ``text_model``: the
    text encoder (a local directory, ``minilm``, or a hub name); default, and it must equal, the one the
    image network was aligned to (recorded in its file). ``pooling``/``max_length`` likewise.

    Images are taken exactly as the dataset yields them (the image network was trained on them): no
    resizing, no CLIP normalisation. The text tower is loaded on the first :meth:`encode_text`, so a
    teacher that only embeds images never loads it. ``cache_key`` names the text tower and its weights
    only: text embeddings (the noun caches) do not depend on the image network, so they are shared by
    every image network aligned to the same text model.
    """

    def __init__(
        self,
        image_model: str,
        text_model: str | None = None,
        pooling: str | None = None,
        max_length: int | None = None,
        allow_download: bool = False,
    ) -> None:

        if not isinstance(image_model, (str, os.PathLike)):
            raise TypeError(
                f"text_aligned backend: image_model must be a model file path, got {image_model!r} "
                "(a {stage: ...} reference is resolved by the method that builds the backend)"
            )
        net = load_model(image_model)
        if not isinstance(net, TextAlignedImageNet):
            raise TypeError(
                f"text_aligned backend: {image_model} holds a '{net.build_spec['name']}' network, not a "
                "'text_aligned_image' one (the model saved by an align_to_text stage)"
            )
        aligned = {"model": "minilm", "pooling": "mean", "max_length": 64, **net.text}
        given = {"text_model": ("model", text_model), "pooling": ("pooling", pooling), "max_length": ("max_length", max_length)}
        for param, (key, value) in given.items():
            if value is not None and value != aligned[key]:
                raise ValueError(
                    f"text_aligned backend: {param}={value!r}, but {image_model} was aligned to {key}={aligned[key]!r}"
                )
        super().__init__(image_size=net.input_shape[-2:], input_mean=None, input_std=None)
        self.hold_frozen("image_net", net)
        self.text_spec = {**aligned, "allow_download": allow_download}
        self._text_tower = None
        self.embed_dim = net.embed_dim
        self.cache_key = (
            f"text_aligned:{aligned['model']}:{text_model_id(aligned['model'])}:"
            f"{aligned['pooling']}:{aligned['max_length']}"
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The dataset's tensors on the backend's device, float; shape checked against the image network."""
        if tuple(images.shape[1:]) != tuple(self.image_net.input_shape):
            raise ValueError(
                f"text_aligned backend: expected images {tuple(self.image_net.input_shape)} (what the image "
                f"network was trained on), got {tuple(images.shape[1:])}"
            )
        x = images.to(self.device)
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_net.embed(pixels)[0]

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        if self._text_tower is None:
            self.hold_frozen("_text_tower", TextTower(**self.text_spec).to(self.device))  # follows .to() from now on
        return self._text_tower(texts)
