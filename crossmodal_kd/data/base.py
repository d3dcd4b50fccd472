"""Dataset containers shared by every dataset family: samples are ``{modality: tensor, "label", "index"}``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

if TYPE_CHECKING:
    from PIL import Image


T = TypeVar("T")


class DataError(RuntimeError):
    """Missing, corrupt or malformed data; the message names the file."""


class ArrayDataset(Dataset):
    """In-memory paired modalities. ``__getitems__`` returns a collated batch (no per-sample Python).

    Floating-point modalities come out as float32 (whatever they are stored as); integer ones (token
    ids) as int64.
    """

    def __init__(self, arrays: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        n = len(labels)
        for name, arr in arrays.items():
            if len(arr) != n:
                raise DataError(f"modality '{name}' has {len(arr)} samples but there are {n} labels")
        self.arrays = arrays
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: _as_input(v[i]) for k, v in self.arrays.items()}, "label": self.labels[i], "index": i}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {k: _as_input(v[idx]) for k, v in self.arrays.items()}
        batch["label"] = self.labels[idx]
        batch["index"] = idx
        return batch

    @property
    def modalities(self) -> list[str]:
        return list(self.arrays)


class NormalisedArrayDataset(ArrayDataset):
    """:class:`ArrayDataset` over compact arrays (uint8 images, float16 log-mels), normalised per batch by
    ``normalise(modality, tensor)`` (so the stored arrays stay small)."""

    def __init__(
        self, arrays: dict[str, torch.Tensor], labels: torch.Tensor, normalise: Callable[[str, torch.Tensor], torch.Tensor]
    ) -> None:
        super().__init__(arrays, labels)
        self.normalise = normalise

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: self.normalise(k, v[i]) for k, v in self.arrays.items()}, "label": self.labels[i], "index": i}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {**{k: self.normalise(k, v[idx]) for k, v in self.arrays.items()}, "label": self.labels[idx], "index": idx}


def decode_rgb(path: Path) -> "Image.Image":
    """One image file, fully decoded, as RGB; :class:`DataError` naming the file when it cannot be."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(f"{path}: corrupt or unreadable image ({exc})") from None


def parallel_map(
    fn: Callable[[Any], T], items: Sequence[Any], desc: str, workers: int | None, progress: bool
) -> Iterator[T]:
    """``fn`` over ``items`` in a thread pool (decoders release the GIL), in order, with a progress bar;
    the first exception is raised once the items before it are done, the rest cancelled."""
    pool = ThreadPoolExecutor(workers)
    try:
        yield from tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=None if progress else True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _as_input(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t.long()


def collate_batch(batch: Any) -> Any:
    """Collate for :class:`ArrayDataset` (already collated by ``__getitems__``) or per-sample dicts."""
    if isinstance(batch, dict):
        return batch
    return torch.utils.data.default_collate(batch)


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def split(self, name: str) -> Dataset:
        if name not in ("train", "val", "test"):
            raise KeyError(f"unknown split '{name}'; valid: train, val, test")
        return getattr(self, name)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch: the order depends only on (seed, epoch), so resumed runs replay it."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, carved) with ``fraction`` of every class carved out, deterministically."""
    rng = np.random.default_rng(seed)
    keep, carved = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(fraction * len(idx)))
        carved.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(carved))


def load_npy(path: Path, *, ndim: int | None = None, mmap: bool = False) -> np.ndarray:
    """``np.load`` with errors that name the file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable .npy file ({exc})") from None
    if ndim is not None and arr.ndim != ndim:
        raise DataError(f"{path}: expected a {ndim}-D array, got shape {tuple(arr.shape)}")
    return arr


def params_key(params: dict[str, Any]) -> str:
    """Short stable hash of a parameter dict (cache directory names)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
