"""Training methods (``METHODS``): supervised training, KD baselines, MST-Distill stages."""

from crossmodal_kd.methods.base import Method
from crossmodal_kd.methods import collaborative, kd, masking, mst_distill, supervised  # noqa: F401

__all__ = ["Method"]
