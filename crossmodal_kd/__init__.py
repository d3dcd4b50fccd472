"""crossmodal_kd: cross-modal, multi-teacher knowledge distillation on HuggingFace Accelerate."""

__version__ = "0.1.0"


def load_components() -> None:
    """Import every built-in module so its registry entries exist."""
    from crossmodal_kd import augment, clip, data, engine, losses, masks, methods, models, routers, views  # noqa: F401
    from crossmodal_kd.engine import optim  # noqa: F401
