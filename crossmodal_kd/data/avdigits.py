"""``avdigits``: the embedded AV-MNIST-style default, built offline from sklearn digits and espeak-ng."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossmodal_kd.data.avdigits_build import (
    AVDIGITS_VERSION,
    CLASS_NAMES,
    build_avdigits,
    resolve_params,
    verify_avdigits,
)
from crossmodal_kd.data.array_folder import CorruptDatasetError, array_folder_checksum, content_problems
from crossmodal_kd.data.base import (
    ArrayDataset,
    DataSplits,
    NormalisedArrayDataset,
    ZScore,
    load_npy,
    params_key,
    raise_problems,
)
from crossmodal_kd.registry import DATASETS

log = logging.getLogger(__name__)
SPLITS = {"train": 0, "val": 1, "test": 2}


def recorded_zscore(recorded: dict[str, dict[str, Any]]) -> ZScore:
    """The z-score of ``manifest.json``'s ``normalisation``: per-modality statistics in the stored, raw units,
    shaped as recorded (one value for images, one per mel bin for audio)."""
    return ZScore({
        modality: tuple(torch.tensor(s[k], dtype=torch.float32).view(s["shape"]) for k in ("mean", "std"))
        for modality, s in recorded.items()
    })


@DATASETS.register("avdigits")
class AVDigits:
    """Paired handwritten-digit images and spoken-digit log-mels; built on first use, cached, checksummed.

    ``seed`` (``data.params.seed`` in a run config) is the draw: pools, pairs, deformations, noise. The
    cache lives in ``<root>/avdigits/v<version>-<hash of seed and every recipe knob>``; a truncated or
    edited cache fails its checksums and is rebuilt (it is generated data, so nothing is lost). The
    arrays are stored raw (grey levels, log-mels) and z-scored per batch with the training statistics
    recorded in the manifest (the splits' ``normalise``).
    """

    modalities = ("image", "audio")

    def __init__(self, root: str | Path, seed: int = 0, **recipe: Any) -> None:
        self.seed = seed
        self.recipe = resolve_params(recipe)
        key = params_key({"seed": seed, **self.recipe})
        self.path = Path(root) / "avdigits" / f"v{AVDIGITS_VERSION}-{key}"

    def input_spec(self) -> tuple[dict[str, tuple[int, ...]], int]:
        """``(input_shapes, num_classes)`` the recipe produces, without building or reading the data."""
        r = self.recipe
        frames = round(r["sample_rate"] * r["clip_seconds"]) // r["hop_length"] + 1  # centred STFT frames
        return {"image": (1, 28, 28), "audio": (1, r["n_mels"], frames)}, len(CLASS_NAMES)

    def build(self, progress: bool = True, force: bool = False) -> Path:
        if not force and self._is_valid():
            return self.path
        if self.path.exists():
            log.warning("avdigits cache at %s is incomplete or corrupt; rebuilding", self.path)
            shutil.rmtree(self.path)
        else:
            older = sorted(p.name for p in self.path.parent.glob("v*-*")
                           if (m := re.fullmatch(r"v(\d+)-\w+", p.name)) and int(m[1]) != AVDIGITS_VERSION)
            if older:
                log.warning("avdigits: building recipe v%d at %s; the caches of other recipe versions "
                            "beside it (%s) are no longer read and may be deleted",
                            AVDIGITS_VERSION, self.path, ", ".join(older))
        return build_avdigits(self.path, seed=self.seed, progress=progress, **self.recipe)

    def fingerprint(self) -> dict[str, str]:
        """Recipe (cache folder name) and content checksum of the built cache, for run fingerprints."""
        return {"cache": self.path.name, "checksum": array_folder_checksum(self.path)}

    def check(self) -> list[str]:
        """Checksums of every file, then the contents: labels within the 10 digits, no NaN/inf, no empty split."""
        try:
            verify_avdigits(self.path)
        except CorruptDatasetError as exc:
            return [str(exc)]
        return self._content_problems(*self._read(mmap=True))

    def load(self) -> DataSplits:
        """The splits, z-scored with the recorded training statistics (a hand-made cache without them is
        served as stored)."""
        self.build()
        arrays, labels, split = self._read()
        raise_problems(self._content_problems(arrays, labels, split), "avdigits")
        image_id = load_npy(self.path / "image_id.npy", ndim=1)
        recorded = json.loads((self.path / "manifest.json").read_text()).get("normalisation")
        parts = {}
        for name, code in SPLITS.items():
            idx = np.flatnonzero(split == code)
            inputs = {m: torch.from_numpy(np.ascontiguousarray(a[idx])) for m, a in arrays.items()}
            targets = torch.from_numpy(labels[idx])
            groups = torch.from_numpy(image_id[idx].astype(np.int64))  # source image: cross-fitting folds
            if recorded is None:
                parts[name] = ArrayDataset(inputs, targets, groups=groups)
            else:
                parts[name] = NormalisedArrayDataset(inputs, targets, recorded_zscore(recorded), groups=groups)
        return DataSplits(
            **parts,
            num_classes=len(CLASS_NAMES),
            class_names=list(CLASS_NAMES),
            input_shapes={m: tuple(a.shape[1:]) for m, a in arrays.items()},
        )

    def _read(self, mmap: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        arrays = {m: load_npy(self.path / f"{m}.npy", mmap=mmap) for m in self.modalities}
        labels, split = (load_npy(self.path / f"{name}.npy", ndim=1, mmap=mmap) for name in ("label", "split"))
        return arrays, labels, split

    def _content_problems(self, arrays: dict[str, np.ndarray], labels: np.ndarray, split: np.ndarray) -> list[str]:
        return content_problems(self.path, arrays, labels, split, len(CLASS_NAMES))

    def _is_valid(self) -> bool:
        """The cache's files match their checksums (its contents are checked when loaded)."""
        if not (self.path / "manifest.json").is_file():
            return False
        try:
            verify_avdigits(self.path)
        except CorruptDatasetError:
            return False
        return True
