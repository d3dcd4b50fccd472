"""``synthetic``: a tiny two-modality dataset generated in memory, for tests and plumbing checks.

Each class has a fixed random pattern per modality; a sample is its class pattern in one modality
with probability ``informative`` (else another class's), plus Gaussian noise, so each modality alone
is imperfect and the pair is better than either.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import torch

from crossmodal_kd.data.base import (
    ArrayDataset,
    DataSplits,
    check_finite,
    check_labels,
    check_split_sizes,
    raise_problems,
)
from crossmodal_kd.registry import DATASETS

GENERATOR_VERSION = 1  # bump when _generate() makes other data from the same parameters


@DATASETS.register("synthetic")
class Synthetic:
    modalities = ("image", "audio")

    def __init__(
        self,
        root: str,
        num_classes: int = 4,
        n_train: int = 256,
        n_val: int = 64,
        n_test: int = 128,
        image_shape: tuple[int, ...] = (1, 12, 12),
        audio_shape: tuple[int, ...] = (1, 16, 16),
        informative: float = 0.7,
        noise: float = 1.0,
        seed: int = 0,
    ) -> None:
        for key, value in (("num_classes", num_classes), ("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if not isinstance(value, int) or value < (1 if key == "num_classes" else 0):
                raise ValueError(f"synthetic: {key} must be a {'positive' if key == 'num_classes' else 'non-negative'} "
                                 f"integer, got {value!r}")
        self.num_classes, self.informative, self.noise, self.seed = num_classes, informative, noise, seed
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.shapes = {"image": tuple(image_shape), "audio": tuple(audio_shape)}

    def input_spec(self) -> tuple[dict[str, tuple[int, ...]], int]:
        """``(input_shapes, num_classes)`` without generating the data."""
        return dict(self.shapes), self.num_classes

    def fingerprint(self) -> dict[str, Any]:
        """Generator version and default parameters: with the given parameters (``data.params``, in every run
        fingerprint already) they fix the data, so a changed default or generator is noticed."""
        defaults = {name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return {"version": GENERATOR_VERSION, "defaults": json.loads(json.dumps(defaults))}

    def check(self) -> list[str]:
        """Problems of the generated splits: an empty one, NaN/inf (e.g. from ``noise: .nan``), labels off range."""
        return self._problems(self._generate())

    def load(self) -> DataSplits:
        splits = self._generate()
        raise_problems(self._problems(splits), "synthetic")
        return DataSplits(
            **splits,
            num_classes=self.num_classes,
            class_names=[f"class{i}" for i in range(self.num_classes)],
            input_shapes=dict(self.shapes),
        )

    def _problems(self, splits: dict[str, ArrayDataset]) -> list[str]:
        problems = check_split_sizes({name: len(ds) for name, ds in splits.items()}, "synthetic")
        for name, ds in splits.items():
            if len(ds):
                source = f"synthetic ({name} split)"
                problems += check_labels(ds.labels.numpy(), self.num_classes, source)
                problems += check_finite({m: a.numpy() for m, a in ds.arrays.items()}, source)
        return problems

    def _generate(self) -> dict[str, ArrayDataset]:
        g = torch.Generator().manual_seed(self.seed)
        patterns = {m: torch.randn(self.num_classes, *s, generator=g) for m, s in self.shapes.items()}
        splits = {}
        for split, n in self.sizes.items():
            y = torch.randint(self.num_classes, (n,), generator=g)
            arrays = {}
            for m, pat in patterns.items():
                keep = torch.rand(n, generator=g) < self.informative
                shown = torch.where(keep, y, torch.randint(self.num_classes, (n,), generator=g))
                arrays[m] = pat[shown] + self.noise * torch.randn(n, *self.shapes[m], generator=g)
            splits[split] = ArrayDataset(arrays, y)
        return splits
