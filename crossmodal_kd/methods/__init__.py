"""Training methods (``METHODS``): supervised training, KD baselines, MST-Distill stages."""

from crossmodal_kd.methods.base import Method
from crossmodal_kd.methods import supervised, kd  # noqa: F401

__all__ = ["Method"]
