"""A tiny random BERT that tokenises any lower-case English text (for tests of text towers, offline).

Its WordPiece vocabulary holds a few whole words plus every letter and digit both as a word start and as
a ``##`` continuation, so each word is spelt out piece by piece: different words get different token
ids (hence different embeddings) without a real vocabulary. Weights are random (seed 0): embeddings are
meaningless but deterministic, which is all plumbing tests need.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "photo", "picture", "of", "the", "number", "class", "digit", "handwritten"]


def make_tiny_bert(path: Path, hidden: int = 32, words: list[str] | tuple[str, ...] = ()) -> Path:
    """Save a 2-layer BERT (``hidden`` wide) and its tokenizer in ``path`` (``save_pretrained`` layout)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    chars = list(string.ascii_lowercase + string.digits)
    punctuation = list(".,'-?!:;()/&")
    vocab = list(dict.fromkeys([*SPECIALS, *WORDS, *words, *chars, *[f"##{c}" for c in chars], *punctuation]))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=2 * hidden, max_position_embeddings=64)
        BertModel(config).save_pretrained(path)
    BertTokenizer(vocab=str(path / "vocab.txt")).save_pretrained(path)
    return path
