"""Training methods (``METHODS``): supervised training, KD baselines, MST-Distill stages, the WordNet-relaxed
CLIP teacher (``align_to_text``, ``wordnet_clip``), multi-teacher distillation (``multi_kd``) and TMKD
(``tmkd_teacher``, ``tmkd``)."""

from crossmodal_kd.methods.base import Method
from crossmodal_kd.methods import (  # noqa: F401
    align,
    c2kd,
    collaborative,
    crd,
    dkd,
    fitnets,
    kd,
    masking,
    mgdfr,
    mst_distill,
    multi_teacher,
    rkd,
    supervised,
    tmkd,
    wordnet_clip,
)

__all__ = ["Method"]
