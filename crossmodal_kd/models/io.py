"""Model files: a trained module saved with the recipe that rebuilds it (registry, name, params, context),
so a later stage, another run or a user loads it by path alone; and where a run keeps them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from crossmodal_kd.io import atomic_torch_save
from crossmodal_kd.registry import ALL_REGISTRIES

MODEL_FILE_FORMAT = 1


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "stages" / stage


def model_path(run_dir: Path, stage: str, model: str) -> Path:
    return stage_dir(run_dir, stage) / "models" / f"{model}.pt"


def stage_result_of(model_file: Path) -> Path | None:
    """The ``result.json`` of the stage that saved ``model_file`` (``<run>/stages/<stage>/models/<m>.pt``);
    ``None`` when the file is not inside that layout."""
    models = Path(model_file).parent
    return models.parent / "result.json" if models.name == "models" and models.parent.parent.name == "stages" else None


def attach_spec(module: nn.Module, registry: str, name: str, params: Mapping[str, Any], context: Mapping[str, Any]) -> nn.Module:
    """Remember how ``module`` was built so a saved file can rebuild it without the config."""
    module.build_spec = {"registry": registry, "name": name, "params": dict(params), "context": dict(context)}
    return module


def build_from_spec(spec: Mapping[str, Any], where: str) -> nn.Module:
    registry = ALL_REGISTRIES[spec["registry"]]
    context = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec["context"].items()}
    if "input_shapes" in context:
        context["input_shapes"] = {m: tuple(s) for m, s in context["input_shapes"].items()}
    module = registry.build(spec["name"], spec["params"], where=where, **context)
    return attach_spec(module, spec["registry"], spec["name"], spec["params"], spec["context"])


def save_model(module: nn.Module, path: Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    spec = getattr(module, "build_spec", None)
    if spec is None:
        raise TypeError(f"cannot save {type(module).__name__} to {path}: it was not built through a registry")
    state = {k: v.detach().cpu() for k, v in (state_dict or module.state_dict()).items()}
    atomic_torch_save({"format": MODEL_FILE_FORMAT, "spec": spec, "state_dict": state}, path)


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a saved model from its file alone (teachers are loaded by path in later stages)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt pickles
        raise RuntimeError(f"{path}: unreadable model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FILE_FORMAT:
        raise RuntimeError(f"{path}: not a crossmodal_kd model file (format {MODEL_FILE_FORMAT})")
    module = build_from_spec(blob["spec"], where=str(path))
    module.load_state_dict(blob["state_dict"])
    return module
