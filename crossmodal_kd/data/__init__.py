"""Datasets: each family is a registered class with ``load()`` and ``check()`` (:class:`DatasetFamily`), and
optionally ``build()`` (:class:`BuildableFamily`)."""

from crossmodal_kd.data.base import ArrayDataset, DataError, DataSplits, EpochSampler, collate_batch
from crossmodal_kd.data import avdigits, avmnist, cremad, features, images, synthetic, textdigits  # noqa: F401  (registration)
from crossmodal_kd.registry import DATASETS

__all__ = ["ArrayDataset", "DataError", "DataSplits", "EpochSampler", "collate_batch", "DATASETS", "build_dataset"]


def build_dataset(name: str, root: str, params: dict | None = None, *, where: str = "data.params"):
    """The dataset family object for ``name`` rooted at ``root`` (not yet loaded)."""
    return DATASETS.build(name, params, where=where, root=root)
