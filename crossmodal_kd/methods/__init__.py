"""Training methods (``METHODS``): supervised training, KD baselines, MST-Distill stages."""

from crossmodal_kd.methods.base import Method
from crossmodal_kd.methods import (  # noqa: F401
    c2kd,
    collaborative,
    crd,
    dkd,
    fitnets,
    kd,
    masking,
    mgdfr,
    mst_distill,
    rkd,
    supervised,
)

__all__ = ["Method"]
