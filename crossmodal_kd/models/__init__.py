"""Modality encoders (``ENCODERS``) and the networks built from them (``NETWORKS``: students and teachers)."""

from crossmodal_kd.models import aligned, encoders, networks, relaxed, text  # noqa: F401  (registration)
from crossmodal_kd.models.networks import Network, build_network

__all__ = ["Network", "build_network"]
