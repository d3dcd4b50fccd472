"""``avmnist``: the real AV-MNIST in the MultiBench layout (official test split; validation carved from train).

Layout under ``<root>/avmnist``::

    image/train_data.npy  (N, 784)        image/test_data.npy
    audio/train_data.npy  (N, 112, 112)   audio/test_data.npy
    train_labels.npy      (N,)            test_labels.npy
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from crossmodal_kd.data.base import (
    ArrayDataset,
    DataError,
    DataSplits,
    carve_validation,
    check_finite,
    check_labels,
    files_checksum,
    load_npy,
    raise_problems,
)
from crossmodal_kd.registry import DATASETS

IMAGE_SIDE = 28
AUDIO_SIDE = 112
INPUT_SHAPES = {"image": (1, IMAGE_SIDE, IMAGE_SIDE), "audio": (1, AUDIO_SIDE, AUDIO_SIDE)}


def split_files(split: str) -> dict[str, tuple[str, int]]:
    """``{array: (path relative to <root>/avmnist, ndim)}`` of one split's three files."""
    return {"image": (f"image/{split}_data.npy", 2), "audio": (f"audio/{split}_data.npy", 3),
            "label": (f"{split}_labels.npy", 1)}


@DATASETS.register("avmnist")
class AVMNIST:
    """MultiBench AV-MNIST; images to (1, 28, 28), spectrograms to (1, 112, 112), z-scored on train.

    ``num_classes`` (10 digits) is declared, never inferred: a label outside it is an error naming file and row.
    """

    modalities = ("image", "audio")

    def __init__(self, root: str | Path, val_fraction: float = 0.1, split_seed: int = 0, num_classes: int = 10) -> None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"avmnist: val_fraction must be in (0, 1), got {val_fraction}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"avmnist: num_classes must be a positive integer, got {num_classes!r}")
        self.path = Path(root) / "avmnist"
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_classes = num_classes

    def input_spec(self) -> tuple[dict[str, tuple[int, ...]], int]:
        """``(input_shapes, num_classes)``: the layout's fixed shapes, the declared classes; reads nothing."""
        return dict(INPUT_SHAPES), self.num_classes

    def fingerprint(self) -> dict[str, str]:
        """sha256 over the six files' names and contents."""
        names = [name for split in ("train", "test") for name, _ in split_files(split).values()]
        return {"checksum": files_checksum(self.path, names)}

    def check(self) -> list[str]:
        """Every problem of the six files (missing, unreadable, shapes, row counts, labels, NaN/inf), by path."""
        return [p for split in ("train", "test") for p in self._read_split(split)[1]]

    def load(self) -> DataSplits:
        (train, train_problems), (test, test_problems) = self._read_split("train"), self._read_split("test")
        raise_problems(train_problems + test_problems, "avmnist")
        (train_img, train_aud, train_y), (test_img, test_aud, test_y) = train, test
        keep, val = carve_validation(train_y, self.val_fraction, self.split_seed, self.path / "train_labels.npy")
        stats = {"image": _stats(train_img[keep]), "audio": _stats(train_aud[keep])}

        def make(img: np.ndarray, aud: np.ndarray, y: np.ndarray) -> ArrayDataset:
            arrays = {"image": img, "audio": aud}
            return ArrayDataset(
                {m: torch.from_numpy(((a - stats[m][0]) / stats[m][1]).astype(np.float32)) for m, a in arrays.items()},
                torch.from_numpy(y.astype(np.int64)),
            )

        return DataSplits(
            train=make(train_img[keep], train_aud[keep], train_y[keep]),
            val=make(train_img[val], train_aud[val], train_y[val]),
            test=make(test_img, test_aud, test_y),
            num_classes=self.num_classes,
            class_names=[str(i) for i in range(self.num_classes)],
            input_shapes=dict(INPUT_SHAPES),
        )

    def _read_split(self, split: str) -> tuple[tuple[np.ndarray, ...], list[str]]:
        """``((images, spectrograms, labels), problems)``; the arrays are only usable when there are no problems."""
        paths = {key: (self.path / name, ndim) for key, (name, ndim) in split_files(split).items()}
        arrays: dict[str, np.ndarray] = {}
        problems: list[str] = []
        for key, (path, ndim) in paths.items():
            try:
                arrays[key] = load_npy(path, ndim=ndim, mmap=True)
            except DataError as exc:
                problems.append(str(exc))
        expected = {"image": (IMAGE_SIDE * IMAGE_SIDE,), "audio": (AUDIO_SIDE, AUDIO_SIDE)}
        for key, shape in expected.items():
            if key in arrays and arrays[key].shape[1:] != shape:
                expected_shape = ", ".join(map(str, shape))
                problems.append(f"{paths[key][0]}: expected shape (N, {expected_shape}), got {arrays[key].shape}")
                del arrays[key]
        if "label" in arrays:
            lab_path, y = paths["label"][0], arrays["label"]
            problems += check_labels(y, self.num_classes, lab_path)
            for key in ("image", "audio"):
                if key in arrays and len(arrays[key]) != len(y):
                    problems.append(f"{paths[key][0]}: {len(arrays[key])} rows but {lab_path.name} has {len(y)} labels")
        for key in ("image", "audio"):
            if key in arrays:
                problems += check_finite({key: arrays[key]}, paths[key][0])
        if problems:
            return (), problems
        return (
            arrays["image"].reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE).astype(np.float32),
            arrays["audio"].reshape(-1, 1, AUDIO_SIDE, AUDIO_SIDE).astype(np.float32),
            arrays["label"],
        ), []


def _stats(a: np.ndarray) -> tuple[float, float]:
    return float(a.mean()), float(a.std() + 1e-8)
