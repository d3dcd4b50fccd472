"""Image classification sets for TMKD (Zhang et al., arXiv 2603.24208): ImageFolder trees (``imagefolder``)
and CIFAR-100 (``cifar100``).

Samples are ``{"image": (3, S, S) float32, "label", "index"}``, z-scored per RGB channel with the mean and
std (in [0, 1] pixel units) of the *training* part only; the family object keeps them as ``stats`` after
``load()`` (e.g. a CLIP backend's ``input_mean``/``input_std``, so it can undo the normalisation). Images
are held as uint8 and normalised per batch. Class names are made to read well in prompts
("a photo of a {}."): underscores become spaces.

``imagefolder``: ``<root>/<name>/{train,val,test}/<class>/*.jpg|jpeg|png`` (CUB-200, DTD, Stanford Dogs,
RAF-DB style; ``val`` optional). Classes are the ``train`` sub-folders in sorted order (index = label);
``val``/``test`` may hold a subset of them. Every image is decoded once with PIL (RGB), scaled so its
short side is ``image_size`` and centre-cropped to a square, into a checksummed uint8 array folder
``<root>/<name>/.cache/<hash of the decoding parameters>/`` (:mod:`~crossmodal_kd.data.array_folder`),
rebuilt when damaged or when any file is added, removed or resized. Without ``val``, validation is
carved from train, stratified (``val_fraction``, ``split_seed``). Folder names become class names after
dropping a numeric or WordNet-id prefix (``001.Black_footed_Albatross`` -> "Black footed Albatross",
``n02085620-Chihuahua`` -> "Chihuahua"); ``class_names: {folder: name}`` overrides any (RAF-DB's "1".."7").

``cifar100``: the python pickle layout ``<root>/cifar-100-python/{train,test,meta}``; fine labels (100),
names from ``meta`` (``aquarium_fish`` -> "aquarium fish"), the official test split kept, validation carved
from train. The files are Python pickles, which can run code when read: load only a copy you trust (the
official archive).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from crossmodal_kd.data.base import (
    DataError,
    DataSplits,
    NormalisedArrayDataset,
    carve_validation,
    check_labels,
    decode_rgb,
    files_checksum,
    parallel_map,
    params_key,
    raise_problems,
)
from crossmodal_kd.data.decoded_cache import DecodedCache
from crossmodal_kd.registry import DATASETS

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_VERSION = 1
SPLITS = ("train", "val", "test")
_PREFIX = re.compile(r"^(n\d{8}-|\d+[._-](?=\D))")  # WordNet id ("n02085620-") or number ("001.") before a name


def prompt_name(folder: str) -> str:
    """A class folder's name as it reads in a prompt: prefix dropped, underscores to spaces."""
    return _PREFIX.sub("", folder).replace("_", " ").strip() or folder


def decode_image(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 ``(3, size, size)``: RGB, short side scaled to ``size``, centre-cropped."""
    img = ImageOps.fit(decode_rgb(path), (size, size), method=Image.Resampling.BICUBIC)
    return np.asarray(img).transpose(2, 0, 1).copy()


class ChannelNormaliser:
    """``(x / 255 - mean) / std`` per RGB channel for uint8 images ``(..., 3, H, W)``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std


def channel_stats(images: np.ndarray, chunk: int = 256) -> dict[str, list[float]]:
    """Mean and std per channel of uint8 ``(N, 3, H, W)`` images in [0, 1] units, in float64 chunk by chunk."""
    if not len(images):
        raise DataError("no training images to compute normalisation statistics from")
    sums = np.zeros((2, 3))
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].astype(np.float64) / 255.0
        sums += [x.sum(axis=(0, 2, 3)), (x * x).sum(axis=(0, 2, 3))]
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = sums[0] / n
    std = np.sqrt(np.maximum(sums[1] / n - mean**2, 0.0)) + 1e-6
    return {"mean": mean.tolist(), "std": std.tolist()}


def make_splits(
    images: np.ndarray, labels: np.ndarray, parts: Mapping[str, np.ndarray], class_names: list[str]
) -> tuple[DataSplits, dict[str, list[float]]]:
    """Datasets for the ``train``/``val``/``test`` row indices ``parts``, normalised with train statistics."""
    stats = channel_stats(images[parts["train"]])
    normalise = ChannelNormaliser(stats["mean"], stats["std"])
    datasets = {
        split: NormalisedArrayDataset(
            {"image": torch.from_numpy(np.ascontiguousarray(images[idx]))}, torch.from_numpy(labels[idx].astype(np.int64)), normalise
        )
        for split, idx in parts.items()
    }
    shapes = {"image": tuple(int(d) for d in images.shape[1:])}
    return DataSplits(**datasets, num_classes=len(class_names), class_names=class_names, input_shapes=shapes), stats


def _check_fraction(name: str, val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise ValueError(f"{name}: val_fraction must be in (0, 1), got {val_fraction}")


@DATASETS.register("imagefolder")
class ImageFolder:
    """An ImageFolder tree under ``<root>/<name>`` (see the module docstring), decoded once into a cache.

    ``image_size``: side of the square images. ``class_names``: ``{folder: prompt name}`` overrides.
    ``decode_workers``: decoding threads (default: up to 8).
    """

    modalities = ("image",)

    def __init__(
        self,
        root: str | Path,
        name: str,
        image_size: int = 224,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        class_names: Mapping[str, str] | None = None,
        decode_workers: int | None = None,
        progress: bool = True,
    ) -> None:
        _check_fraction("imagefolder", val_fraction)
        if image_size <= 0:
            raise ValueError(f"imagefolder: image_size must be positive, got {image_size}")
        self.base = Path(root) / name
        self.image_size = int(image_size)
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.name_overrides = dict(class_names or {})
        self.workers = decode_workers or min(8, os.cpu_count() or 1)
        self.progress = progress
        self.cache_dir = self.base / ".cache" / params_key({"version": CACHE_VERSION, "image_size": self.image_size})
        self.decoded = DecodedCache(self.cache_dir, "imagefolder", ("images",))
        self.stats: dict[str, list[float]] | None = None

    def input_spec(self) -> tuple[dict[str, tuple[int, ...]], int]:
        """``(input_shapes, num_classes)`` from ``image_size`` and the train class folders; decodes nothing."""
        classes, _ = self._tree()
        return {"image": (3, self.image_size, self.image_size)}, len(classes)

    def fingerprint(self) -> dict[str, str]:
        """The decoding cache's identity: ``image_size``, the classes and every file with its size."""
        return self.decoded.fingerprint(self._source(*self._tree()))

    # ---- the tree
    def _tree(self) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
        """``(class folders, {split: [(path relative to the base, label)]})``; :class:`DataError` with the
        first problem."""
        classes, files, problems = self._scan()
        raise_problems(problems, "imagefolder")
        return classes, files

    @staticmethod
    def _rows(files: dict[str, list[tuple[str, int]]]) -> list[tuple[str, str, int]]:
        """``(split, path relative to the base, label)`` of every image, in the order of the cache's rows."""
        return [(split, rel, label) for split in SPLITS for rel, label in files.get(split, [])]

    def _scan(self) -> tuple[list[str], dict[str, list[tuple[str, int]]], list[str]]:
        """``(class folders, {split: [(path relative to the base, label)]}, problems)``; a missing ``val`` is no problem."""
        problems: list[str] = []
        files: dict[str, list[tuple[str, int]]] = {}
        classes: list[str] = []
        for split in SPLITS:
            folder = self.base / split
            if not folder.is_dir():
                if split != "val":
                    problems.append(f"{folder}: split folder not found")
                continue
            found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
            if split == "train":
                classes = found
            if not found:
                problems.append(f"{folder}: no class folders")
            files[split] = []
            for cls in found:
                if cls not in classes:
                    problems.append(f"{folder / cls}: class folder not in {self.base / 'train'}")
                    continue
                images = sorted(f for f in (folder / cls).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
                if not images:
                    problems.append(f"{folder / cls}: empty class folder (no {'/'.join(IMAGE_SUFFIXES)} files)")
                files[split] += [(str(f.relative_to(self.base)), classes.index(cls)) for f in images]
        unknown = sorted(set(self.name_overrides) - set(classes))
        if unknown and classes:
            problems.append(f"class_names: no class folder(s) {', '.join(unknown)} in {self.base / 'train'}")
        return classes, files, problems

    def check(self) -> list[str]:
        """Every problem of the tree (missing splits, empty or unknown class folders, unreadable images), by path."""
        _, files, problems = self._scan()
        paths = [self.base / rel for split in files.values() for rel, _ in split]
        for problem in parallel_map(self._image_problem, paths, "imagefolder: checking", self.workers, self.progress):
            if problem:
                problems.append(problem)
        return problems

    def _image_problem(self, path: Path) -> str | None:
        try:
            decode_rgb(path)
        except DataError as exc:
            return str(exc)
        return None

    # ---- loading
    def load(self) -> DataSplits:
        classes, files = self._tree()
        images = self.decoded.load(self._source(classes, files), partial(self._decode, files))["images"]
        labels = np.array([label for _, _, label in self._rows(files)], dtype=np.int64)
        rows: dict[str, np.ndarray] = {}
        offset = 0
        for split in SPLITS:
            rows[split] = np.arange(offset, offset + len(files.get(split, [])))
            offset += len(rows[split])
        if "val" not in files:
            keep, val = carve_validation(labels[rows["train"]], self.val_fraction, self.split_seed, self.base / "train", "images")
            rows["val"], rows["train"] = rows["train"][val], rows["train"][keep]
        names = [self.name_overrides.get(c, prompt_name(c)) for c in classes]
        splits, self.stats = make_splits(images, labels, rows, names)
        log.info("imagefolder %s: %s; train normalisation %s", self.base, {s: len(r) for s, r in rows.items()}, self.stats)
        return splits

    # ---- the decoding cache
    def build(self, progress: bool | None = None, force: bool = False) -> Path:
        """Decode every image into the cache (unless a valid one exists); returns its folder."""
        if progress is not None:
            self.progress = progress
        classes, files = self._tree()
        return self.decoded.build(self._source(classes, files), partial(self._decode, files), force=force)

    def _source(self, classes: list[str], files: dict[str, list[tuple[str, int]]]) -> dict[str, Any]:
        """What the cache is decoded from: parameters, classes, every file (in row order) with its size."""
        tree = [[split, rel, (self.base / rel).stat().st_size] for split, rel, _ in self._rows(files)]
        return {"version": CACHE_VERSION, "image_size": self.image_size, "classes": classes, "tree": tree}

    def _decode(self, files: dict[str, list[tuple[str, int]]]) -> dict[str, np.ndarray]:
        paths = [self.base / rel for _, rel, _ in self._rows(files)]
        images = np.empty((len(paths), 3, self.image_size, self.image_size), dtype=np.uint8)
        decode = partial(decode_image, size=self.image_size)
        for i, image in enumerate(parallel_map(decode, paths, "imagefolder: decoding", self.workers, self.progress)):
            images[i] = image
        return {"images": images}


@DATASETS.register("cifar100")
class Cifar100:
    """CIFAR-100 from its python pickles (``<root>/<subdir>/{train,test,meta}``), fine labels, 32 x 32 RGB."""

    modalities = ("image",)
    side = 32
    num_classes = 100  # the fine labels; ``meta`` names them (checked against when it is unreadable)

    def __init__(self, root: str | Path, subdir: str = "cifar-100-python", val_fraction: float = 0.1, split_seed: int = 0) -> None:
        _check_fraction("cifar100", val_fraction)
        self.base = Path(root) / subdir
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.stats: dict[str, list[float]] | None = None

    def input_spec(self) -> tuple[dict[str, tuple[int, ...]], int]:
        """``(input_shapes, num_classes)``: 32 x 32 RGB and the classes ``meta`` names (the only file read)."""
        return {"image": (3, self.side, self.side)}, len(self._class_names())

    def fingerprint(self) -> dict[str, str]:
        """sha256 over the three pickles' names and contents."""
        return {"checksum": files_checksum(self.base, ["train", "test", "meta"])}

    def check(self) -> list[str]:
        problems = []
        try:
            names = self._class_names()
        except DataError as exc:
            problems.append(str(exc))
            names = None
        for split in ("train", "test"):
            try:
                self._read_split(split, names)
            except DataError as exc:
                problems.append(str(exc))
        return problems

    def load(self) -> DataSplits:
        names = self._class_names()
        train_x, train_y = self._read_split("train", names)
        test_x, test_y = self._read_split("test", names)
        keep, val = carve_validation(train_y, self.val_fraction, self.split_seed, self.base / "train", "images")
        images, labels = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
        rows = {"train": keep, "val": val, "test": np.arange(len(train_y), len(labels))}
        splits, self.stats = make_splits(images, labels, rows, names)
        return splits

    def _unpickle(self, name: str) -> dict[str, Any]:
        path = self.base / name
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        try:
            with open(path, "rb") as f:
                blob = pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
            raise DataError(f"{path}: unreadable pickle ({type(exc).__name__}: {exc})") from None
        if not isinstance(blob, dict):
            raise DataError(f"{path}: expected a pickled dict, got {type(blob).__name__}")
        return blob

    def _class_names(self) -> list[str]:
        names = self._unpickle("meta").get("fine_label_names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise DataError(f"{self.base / 'meta'}: no 'fine_label_names' list of strings")
        return [n.replace("_", " ") for n in names]

    def _read_split(self, split: str, names: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(N, 3, 32, 32)`` images and int64 fine labels; errors name the file."""
        path = self.base / split
        blob = self._unpickle(split)
        if "data" not in blob or "fine_labels" not in blob:
            raise DataError(f"{path}: missing 'data' or 'fine_labels' (keys: {', '.join(sorted(map(str, blob)))})")
        data, labels = np.asarray(blob["data"]), np.asarray(blob["fine_labels"])
        pixels = 3 * self.side * self.side
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
            raise DataError(f"{path}: 'data' must be uint8 (N, {pixels}), got {data.dtype} {tuple(data.shape)}")
        if not len(data):
            raise DataError(f"{path}: empty (no images)")
        if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: 'fine_labels' must hold {len(data)} integers, got {labels.dtype} {tuple(labels.shape)}")
        problems = check_labels(labels, len(names) if names is not None else self.num_classes, path, "fine label")
        if problems:
            raise DataError(problems[0])
        return data.reshape(-1, 3, self.side, self.side), labels.astype(np.int64)
