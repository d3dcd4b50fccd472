"""Datasets: each family is a registered class with ``load()``, ``check()``, ``input_spec()`` and
``fingerprint()`` (:class:`DatasetFamily`), and optionally ``build()`` (:class:`BuildableFamily`)."""

from crossmodal_kd.data.base import (
    ArrayDataset,
    DataError,
    DataSplits,
    DatasetFamily,
    EpochSampler,
    collate_batch,
)
from crossmodal_kd.data import avdigits, avmnist, cremad, features, images, synthetic, textdigits  # noqa: F401  (registration)
from crossmodal_kd.registry import DATASETS

__all__ = ["ArrayDataset", "DataError", "DataSplits", "EpochSampler", "collate_batch", "DATASETS", "build_dataset"]


def build_dataset(
    name: str, root: str, params: dict | None = None, *, where: str = "data.params"
) -> DatasetFamily:
    """The dataset family object for ``name`` rooted at ``root`` (not yet loaded); ``TypeError`` naming the
    missing methods when a (plug-in) family does not implement :class:`DatasetFamily`."""
    family = DATASETS.build(name, params, where=where, root=root)
    if not isinstance(family, DatasetFamily):
        methods = [m for m, v in vars(DatasetFamily).items() if callable(v) and not m.startswith("_")]
        missing = [m for m in methods if not callable(getattr(family, m, None))]
        raise TypeError(f"dataset '{name}' ({type(family).__module__}.{type(family).__qualname__}) lacks "
                        f"{', '.join(missing)}: every dataset family implements "
                        "crossmodal_kd.data.base.DatasetFamily")
    return family
