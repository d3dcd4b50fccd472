"""crossmodal_kd: cross-modal, multi-teacher knowledge distillation on HuggingFace Accelerate."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossmodal_kd.registry import load_components

if TYPE_CHECKING:
    from torch import nn

__version__ = "0.1.0"
__all__ = ["load_components", "load_student"]


def load_student(run_dir: str | Path, stage: str | None = None, model: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The eval-mode network of a finished run (default: its final student) and its input spec
    (:func:`crossmodal_kd.export.load_student`, imported on first use: the package import stays light)."""
    return importlib.import_module("crossmodal_kd.export").load_student(run_dir, stage, model)
