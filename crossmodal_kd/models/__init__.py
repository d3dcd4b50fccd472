"""Modality encoders (``ENCODERS``), the networks built from them (``NETWORKS``: students and teachers), the
routers and masks that act on them (``ROUTERS``, ``MASKS``), and model files (:mod:`~crossmodal_kd.models.io`)."""

from crossmodal_kd.models import aligned, encoders, masks, networks, routers, text  # noqa: F401  (registration)
from crossmodal_kd.models.io import load_model, save_model
from crossmodal_kd.models.networks import Network, build_network

__all__ = ["Network", "build_network", "load_model", "save_model"]
