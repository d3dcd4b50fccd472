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

from crossmodal_kd.data.base import ArrayDataset, DataError, DataSplits, load_npy, stratified_split
from crossmodal_kd.registry import DATASETS

IMAGE_SIDE = 28
AUDIO_SIDE = 112


@DATASETS.register("avmnist")
class AVMNIST:
    """MultiBench AV-MNIST; images to (1, 28, 28), spectrograms to (1, 112, 112), z-scored on train."""

    modalities = ("image", "audio")

    def __init__(self, root: str | Path, val_fraction: float = 0.1, split_seed: int = 0) -> None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"avmnist: val_fraction must be in (0, 1), got {val_fraction}")
        self.path = Path(root) / "avmnist"
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def check(self) -> list[str]:
        problems = []
        for split in ("train", "test"):
            try:
                self._read_split(split)
            except DataError as exc:
                problems.append(str(exc))
        return problems

    def load(self) -> DataSplits:
        train_img, train_aud, train_y = self._read_split("train")
        test_img, test_aud, test_y = self._read_split("test")
        keep, val = stratified_split(train_y, self.val_fraction, self.split_seed)
        stats = {"image": _stats(train_img[keep]), "audio": _stats(train_aud[keep])}

        def make(img: np.ndarray, aud: np.ndarray, y: np.ndarray) -> ArrayDataset:
            arrays = {"image": img, "audio": aud}
            return ArrayDataset(
                {m: torch.from_numpy(((a - stats[m][0]) / stats[m][1]).astype(np.float32)) for m, a in arrays.items()},
                torch.from_numpy(y.astype(np.int64)),
            )

        n_classes = int(max(train_y.max(), test_y.max())) + 1
        return DataSplits(
            train=make(train_img[keep], train_aud[keep], train_y[keep]),
            val=make(train_img[val], train_aud[val], train_y[val]),
            test=make(test_img, test_aud, test_y),
            num_classes=n_classes,
            class_names=[str(i) for i in range(n_classes)],
            input_shapes={"image": (1, IMAGE_SIDE, IMAGE_SIDE), "audio": (1, AUDIO_SIDE, AUDIO_SIDE)},
        )

    def _read_split(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img_path = self.path / "image" / f"{split}_data.npy"
        aud_path = self.path / "audio" / f"{split}_data.npy"
        lab_path = self.path / f"{split}_labels.npy"
        img = load_npy(img_path, ndim=2)
        aud = load_npy(aud_path, ndim=3)
        y = load_npy(lab_path, ndim=1)
        if img.shape[1] != IMAGE_SIDE * IMAGE_SIDE:
            raise DataError(f"{img_path}: expected shape (N, {IMAGE_SIDE * IMAGE_SIDE}), got {img.shape}")
        if aud.shape[1:] != (AUDIO_SIDE, AUDIO_SIDE):
            raise DataError(f"{aud_path}: expected shape (N, {AUDIO_SIDE}, {AUDIO_SIDE}), got {aud.shape}")
        for path, arr in ((img_path, img), (aud_path, aud)):
            if len(arr) != len(y):
                raise DataError(f"{path}: {len(arr)} rows but {lab_path.name} has {len(y)} labels")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise DataError(f"{lab_path}: labels must be non-negative integers")
        return (
            img.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE).astype(np.float32),
            aud.reshape(-1, 1, AUDIO_SIDE, AUDIO_SIDE).astype(np.float32),
            y,
        )


def _stats(a: np.ndarray) -> tuple[float, float]:
    return float(a.mean()), float(a.std() + 1e-8)
