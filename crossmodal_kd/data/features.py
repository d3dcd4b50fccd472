"""``features``: precomputed per-sample features (CrisisMMD / VGGSound-feature style) in one file.

One ``.pt`` (a dict saved with ``torch.save``) or ``.npz`` file at ``<root>/<file>`` holds::

    <modality>    (N, D_m)  float   one array per modality, any key names ("image", "text", ...)
    label         (N,)      int     0 .. C-1
    split         (N,)      optional: "train" / "val" / "test" strings, or 0 / 1 / 2
    class_names   (C,)      strings; without them the ``num_classes`` parameter gives C (never max(label) + 1)

Splits the file lacks (all but train without ``split``; often val) are carved from the train rows,
stratified by class: first ``test_fraction`` of them, then ``val_fraction`` of the rest. Each
feature dimension is z-scored with train statistics. See datasets/features/README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from crossmodal_kd.data.base import (
    ArrayDataset,
    DataError,
    DataSplits,
    check_finite,
    check_labels,
    files_checksum,
    raise_problems,
    stratified_split,
)
from crossmodal_kd.registry import DATASETS

RESERVED = ("label", "split", "class_names")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@DATASETS.register("features")
class Features:
    """Feature arrays per modality plus labels, from one file; ``check()`` names the file and key at fault."""

    def __init__(
        self,
        root: str | Path,
        file: str,
        modalities: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        normalize: bool = True,
        num_classes: int | None = None,
    ) -> None:
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"features: num_classes must be a positive integer, got {num_classes!r}")
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < value < 1:
                raise ValueError(f"features: {key} must be in (0, 1), got {value}")
        self.path = Path(root) / file
        self.modalities = list(modalities) if modalities is not None else None
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed, self.normalize = split_seed, normalize
        self.num_classes = num_classes

    def input_spec(self) -> tuple[dict[str, tuple[int, ...]], int]:
        """``(input_shapes, num_classes)`` of the file's feature arrays (read and checked, not split)."""
        raw = self._read()
        raise_problems(self._problems(raw), "features")
        return {m: tuple(raw[m].shape[1:]) for m in self._feature_keys(raw)}, self._declared_classes(raw)

    def fingerprint(self) -> dict[str, str]:
        """sha256 of the file's name and contents."""
        return {"checksum": files_checksum(self.path.parent, [self.path.name])}

    def check(self) -> list[str]:
        try:
            return self._problems(self._read())
        except DataError as exc:
            return [str(exc)]

    def load(self) -> DataSplits:
        raw = self._read()
        raise_problems(self._problems(raw), "features")
        labels = raw["label"].astype(np.int64)
        codes = _split_codes(raw["split"])[0] if "split" in raw else np.zeros(len(labels), dtype=np.int64)
        rows = {name: np.flatnonzero(codes == code) for name, code in SPLIT_CODES.items()}
        for name, fraction in (("test", self.test_fraction), ("val", self.val_fraction)):
            if len(rows[name]) == 0:
                keep, carved = stratified_split(labels[rows["train"]], fraction, self.split_seed)
                rows[name], rows["train"] = rows["train"][carved], rows["train"][keep]
        for name, idx in rows.items():
            if len(idx) == 0:
                raise DataError(f"{self.path}: the {name} split is empty ({len(labels)} samples in all)")

        arrays = {m: raw[m].astype(np.float32) for m in self._feature_keys(raw)}
        if self.normalize:
            for m, a in arrays.items():
                train = a[rows["train"]]
                std = train.std(axis=0)
                arrays[m] = (a - train.mean(axis=0)) / np.where(std > 1e-8, std, 1)
        num_classes = self._declared_classes(raw)
        names = [str(c) for c in raw["class_names"]] if "class_names" in raw else None
        return DataSplits(
            **{
                name: ArrayDataset({m: torch.from_numpy(np.ascontiguousarray(a[idx])) for m, a in arrays.items()},
                                   torch.from_numpy(labels[idx]))
                for name, idx in rows.items()
            },
            num_classes=num_classes,
            class_names=names or [str(i) for i in range(num_classes)],
            input_shapes={m: tuple(a.shape[1:]) for m, a in arrays.items()},
        )

    # ------------------------------------------------------------------ reading and checking
    def _read(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        try:
            if self.path.suffix == ".npz":
                with np.load(self.path, allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
            if self.path.suffix == ".pt":
                blob = torch.load(self.path, map_location="cpu", weights_only=True)
                if not isinstance(blob, dict):
                    raise DataError(f"{self.path}: expected a dict of arrays, got {type(blob).__name__}")
                return {str(k): _to_numpy(v) for k, v in blob.items()}
        except DataError:
            raise
        except Exception as exc:  # zip, pickle and torch errors come in many types
            raise DataError(f"{self.path}: unreadable ({type(exc).__name__}: {exc})") from None
        raise DataError(f"{self.path}: unknown file type '{self.path.suffix}'; use .pt or .npz")

    def _feature_keys(self, raw: dict[str, np.ndarray]) -> list[str]:
        return self.modalities if self.modalities is not None else [k for k in raw if k not in RESERVED]

    def _declared_classes(self, raw: dict[str, np.ndarray]) -> int | None:
        """The class count: ``len(class_names)`` of the file, else the ``num_classes`` parameter."""
        return len(raw["class_names"]) if "class_names" in raw else self.num_classes

    def _problems(self, raw: dict[str, np.ndarray]) -> list[str]:
        at = f"{self.path}:"
        keys = ", ".join(raw) or "(none)"
        problems = []
        n = None
        label = raw.get("label")
        num_classes = self._declared_classes(raw)
        if "class_names" in raw and self.num_classes is not None and self.num_classes != num_classes:
            problems.append(f"{at} {num_classes} 'class_names' but num_classes is {self.num_classes}")
        if label is None:
            problems.append(f"{at} missing key 'label' (keys: {keys})")
        else:
            if num_classes is not None:
                problems += check_labels(label, num_classes, self.path)
            n = len(label) if label.ndim == 1 and len(label) else None

        features = self._feature_keys(raw)
        if not features:
            problems.append(f"{at} no feature arrays besides {', '.join(RESERVED)} (keys: {keys})")
        for m in features:
            a = raw.get(m)
            if a is None:
                problems.append(f"{at} missing modality key '{m}' (keys: {keys})")
            elif a.ndim < 2 or not np.issubdtype(a.dtype, np.number):
                problems.append(f"{at} '{m}' must be a numeric (N, D) array, got shape {a.shape} dtype {a.dtype}")
            elif n is not None and len(a) != n:
                problems.append(f"{at} '{m}' has {len(a)} rows but 'label' has {n}")
            else:
                problems += check_finite({m: a}, self.path)

        if "split" in raw:
            split = raw["split"]
            if split.ndim != 1 or (n is not None and len(split) != n):
                problems.append(f"{at} 'split' must be 1-D with one entry per label, got shape {split.shape}")
            else:
                codes, unknown = _split_codes(split)
                if unknown:
                    problems.append(
                        f"{at} 'split' has unknown value(s) {unknown}; valid: train, val, test or 0, 1, 2"
                    )
                elif not (codes == SPLIT_CODES["train"]).any():
                    problems.append(f"{at} 'split' marks no row as train")
        if label is not None and num_classes is None:
            problems.append(f"{at} the number of classes is not declared: add 'class_names' to the file or set num_classes")
        return problems


def _to_numpy(value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return (value.float() if value.is_floating_point() else value).numpy()
    return np.asarray(value)


def _split_codes(split: np.ndarray) -> tuple[np.ndarray, list]:
    """Split codes 0/1/2 per row (-1 where unknown) and the sorted unknown values."""
    if split.dtype.kind in "US":
        names = split.astype(str).tolist()
        codes = np.array([SPLIT_CODES.get(s, -1) for s in names], dtype=np.int64)
        return codes, sorted(set(names) - set(SPLIT_CODES))
    if split.dtype.kind in "iu":
        codes = split.astype(np.int64)
        return codes, sorted(set(codes.tolist()) - set(SPLIT_CODES.values()))
    return np.full(len(split), -1, dtype=np.int64), [f"(values of dtype {split.dtype})"]
