"""crossmodal_kd: cross-modal, multi-teacher knowledge distillation on HuggingFace Accelerate."""

from crossmodal_kd.registry import load_components

__version__ = "0.1.0"
__all__ = ["load_components"]
