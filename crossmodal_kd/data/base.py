"""Dataset containers shared by every dataset family: samples are ``{modality: tensor, "label", "index"}``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, Sequence, TypeVar, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from crossmodal_kd.io import sha256_file

if TYPE_CHECKING:
    from PIL import Image


T = TypeVar("T")


class DataError(RuntimeError):
    """Missing, corrupt or malformed data; the message names the file."""


@runtime_checkable
class DatasetFamily(Protocol):
    """What every registered dataset family provides, and all the rest of the code calls on one
    (:func:`crossmodal_kd.data.build_dataset` refuses a family that lacks any of it)."""

    def load(self) -> DataSplits:
        """The train/val/test splits; :class:`DataError` naming the file at fault."""

    def check(self) -> list[str]:
        """Every problem of the data, each naming its file (empty when there are none)."""

    def input_spec(self) -> tuple[dict[str, tuple[int, ...]], int]:
        """``(input_shapes, num_classes)`` without loading the splits (at most a listing or a small read)."""

    def fingerprint(self) -> dict[str, Any]:
        """JSON identity of the data beyond the family's parameters (which run fingerprints hold beside it):
        file checksums, cache recipe, generator version; a resume refuses other data. A family built on
        first use answers once it is built."""


@runtime_checkable
class BuildableFamily(DatasetFamily, Protocol):
    """A family whose data (or decoding cache) this tool builds."""

    def build(self, *, force: bool = False) -> Path: ...


class ArrayDataset(Dataset):
    """In-memory paired modalities. ``__getitems__`` returns a collated batch (no per-sample Python).

    Floating-point modalities come out as float32 (whatever they are stored as); integer ones (token
    ids) as int64. ``groups`` (optional, one id per sample): the source item a sample was made from (e.g.
    avdigits' source image), so that cross-fitting folds never split a source item.
    """

    def __init__(self, arrays: dict[str, torch.Tensor], labels: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        n = len(labels)
        for name, arr in arrays.items():
            if len(arr) != n:
                raise DataError(f"modality '{name}' has {len(arr)} samples but there are {n} labels")
        if groups is not None and len(groups) != n:
            raise DataError(f"groups has {len(groups)} entries but there are {n} labels")
        self.arrays = arrays
        self.labels = labels.long()
        self.groups = groups

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


class ZScore:
    """``(x - mean) / std`` per modality, the statistics in the stored (raw) units and shaped to broadcast over
    one sample (``stats[modality] = (mean, std)``). ``export`` records them in a model's spec, so ``predict``
    preprocesses a raw file as training did."""

    def __init__(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.stats = stats

    def __call__(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats[modality]
        return (x.float() - mean) / std


class NormalisedArrayDataset(ArrayDataset):
    """:class:`ArrayDataset` over compact arrays (uint8 images, float16 log-mels), normalised per batch by
    ``normalise(modality, tensor)`` (so the stored arrays stay small)."""

    def __init__(
        self, arrays: dict[str, torch.Tensor], labels: torch.Tensor, normalise: Callable[[str, torch.Tensor], torch.Tensor],
        groups: torch.Tensor | None = None,
    ) -> None:
        super().__init__(arrays, labels, groups=groups)
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

    def __post_init__(self) -> None:
        """Last guard for any family (plug-ins too): in-memory labels must lie within ``num_classes``."""
        for name in ("train", "val", "test"):
            labels = getattr(self.split(name), "labels", None)
            problems = check_labels(labels.numpy(), self.num_classes, f"{name} split") if torch.is_tensor(labels) else []
            if problems:
                raise DataError(problems[0])

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
    keep, carved = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
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


def files_checksum(base: Path, names: Sequence[str]) -> str:
    """sha256 over the name (relative to ``base``) and sha256 of each file: the identity of data files
    that come without a manifest; :class:`DataError` naming a missing file."""
    digest = hashlib.sha256()
    for name in names:
        path = base / name
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        digest.update(f"{name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def params_key(params: dict[str, Any]) -> str:
    """Short stable hash of a parameter dict (cache directory names)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- content checks
# Shared by every family's ``check()`` and ``load()``; rows are 0-based indices into the named file.

FINITE_CHUNK_BYTES = 64 << 20


def describe_rows(rows: np.ndarray, shown: int = 5, unit: str = "row") -> str:
    """``row 17``, ``rows 3, 8 (2 rows)`` or ``rows 3, 8, 9, 11, 20, ... (40 rows)``."""
    if len(rows) == 1:
        return f"{unit} {int(rows[0])}"
    head = ", ".join(str(int(r)) for r in rows[:shown])
    return f"{unit}s {head}{', ...' if len(rows) > shown else ''} ({len(rows)} {unit}s)"


def check_labels(labels: np.ndarray, num_classes: int, source: str | Path, what: str = "label") -> list[str]:
    """Problems of a label array: empty, not 1-D integers, or values outside ``0..num_classes-1`` (rows named)."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        return [f"{source}: {what}s must be non-negative integers in a 1-D array, "
                f"got shape {labels.shape} dtype {labels.dtype}"]
    if not len(labels):
        return [f"{source}: empty (no {what}s)"]
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if not len(bad):
        return []
    values = np.unique(labels[bad]).tolist()
    shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
    return [f"{source}: {describe_rows(bad)}: {what}{'s' if len(values) > 1 else ''} {shown} outside the "
            f"{num_classes} classes 0..{num_classes - 1}"]


def nonfinite_rows(array: np.ndarray) -> np.ndarray:
    """Rows of ``array`` holding NaN or inf, checked a chunk of rows at a time (memory-mapped arrays stay on disk)."""
    if not np.issubdtype(array.dtype, np.inexact) or not len(array):
        return np.zeros(0, dtype=np.int64)
    row_size = max(1, array[:1].size)
    step = max(1, FINITE_CHUNK_BYTES // (row_size * array.itemsize))
    bad = [i + np.flatnonzero(~np.isfinite(array[i : i + step].reshape(-1, row_size)).all(axis=1))
           for i in range(0, len(array), step)]
    return np.concatenate(bad)


def check_finite(arrays: Mapping[str, np.ndarray], source: str | Path) -> list[str]:
    """One problem per array (``name -> array``, rows first) that is empty or holds NaN/inf, naming the rows."""
    problems = []
    for name, array in arrays.items():
        if not len(array):
            problems.append(f"{source}: '{name}' is empty (0 rows)")
        elif len(bad := nonfinite_rows(array)):
            problems.append(f"{source}: {describe_rows(bad)}: NaN/inf in '{name}'")
    return problems


def check_split_sizes(sizes: Mapping[str, int], source: str | Path) -> list[str]:
    """A problem for each split (``name -> number of rows``) that is empty."""
    return [f"{source}: the {name} split is empty (0 rows)" for name, n in sizes.items() if n == 0]


def raise_problems(problems: Sequence[str], family: str) -> None:
    """:class:`DataError` with the first problem (and how many more) when there are any."""
    if problems:
        more = f" (and {len(problems) - 1} more; `crossmodal-kd data check {family}` lists them)"
        raise DataError(problems[0] + (more if len(problems) > 1 else ""))


def carve_validation(train_labels: np.ndarray, val_fraction: float, split_seed: int, where: str | Path,
                     unit: str = "samples") -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices, ``val_fraction`` of every class carved out; :class:`DataError` if either is empty."""
    keep, val = stratified_split(train_labels, val_fraction, split_seed)
    if not len(val) or not len(keep):
        raise DataError(
            f"{where}: val_fraction {val_fraction} leaves {len(keep)} training and {len(val)} validation {unit} of "
            f"{len(train_labels)}; change val_fraction"
        )
    return keep, val
