"""Every registered dataset family implements :class:`DatasetFamily` (on a tiny copy written here), and the
decoded-array cache builds once, is reused, and is rebuilt when its source changes or it is damaged."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from crossmodal_kd.data import DataSplits, build_dataset
from crossmodal_kd.data.array_folder import write_array_folder
from crossmodal_kd.data.base import DatasetFamily
from crossmodal_kd.data.cremad import synthesise_tree
from crossmodal_kd.data.decoded_cache import DecodedCache
from crossmodal_kd.registry import DATASETS
from test_cremad import SMALL as CREMAD_SMALL
from test_data import write_avmnist
from test_image_datasets import write_cifar, write_tree
from tiny_text import make_tiny_bert

# ----------------------------------------------------------------------------- tiny copies of every family


def tiny_avdigits(root: Path) -> dict[str, Any]:
    """A checksummed cache with the shapes the default recipe declares, where the family looks (no espeak)."""
    family = build_dataset("avdigits", str(root))
    shapes, classes = family.input_spec()
    n, rng = 30, np.random.default_rng(0)
    arrays = {
        "image": rng.normal(size=(n, *shapes["image"])).astype(np.float32),
        "audio": rng.normal(size=(n, *shapes["audio"])).astype(np.float16),
        "label": np.arange(n) % classes,
        "split": np.repeat(np.arange(3, dtype=np.int8), n // 3),
        "image_id": np.arange(n),
        "voice_id": np.arange(n),
    }
    write_array_folder(family.path, arrays, {"name": "avdigits"})
    return {}


def tiny_textdigits(root: Path) -> dict[str, Any]:
    tokenizer = make_tiny_bert(root / "tiny_bert")
    return {"n_train": 40, "n_val": 20, "n_test": 20, "tokenizer": str(tokenizer), "max_length": 12}


def tiny_avmnist(root: Path) -> dict[str, Any]:
    write_avmnist(root)
    return {"val_fraction": 0.2}


def tiny_cremad(root: Path) -> dict[str, Any]:
    synthesise_tree(root / "cremad", 4, 1)
    return dict(CREMAD_SMALL)


def tiny_imagefolder(root: Path) -> dict[str, Any]:
    write_tree(root / "birds", {"train": 10, "test": 2})
    return {"name": "birds", "image_size": 8, "progress": False}


def tiny_cifar100(root: Path) -> dict[str, Any]:
    write_cifar(root)
    return {"val_fraction": 0.2}


def tiny_features(root: Path) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    np.savez(root / "f.npz", image=rng.normal(size=(30, 4)), text=rng.normal(size=(30, 3)), label=np.arange(30) % 3,
             class_names=np.array(["a", "b", "c"]))
    return {"file": "f.npz"}


def tiny_synthetic(root: Path) -> dict[str, Any]:
    return {"n_train": 16, "n_val": 8, "n_test": 8, "num_classes": 3}


TINY: dict[str, Callable[[Path], dict[str, Any]]] = {
    "avdigits": tiny_avdigits, "textdigits": tiny_textdigits, "avmnist": tiny_avmnist, "cremad": tiny_cremad,
    "imagefolder": tiny_imagefolder, "cifar100": tiny_cifar100, "features": tiny_features, "synthetic": tiny_synthetic,
}


def test_every_registered_family_has_a_tiny_copy_here():
    assert sorted(DATASETS.list()) == sorted(TINY)  # a new family must be added to TINY (and so tested below)


@pytest.mark.parametrize("name", sorted(TINY))
def test_family_implements_the_protocol(name, tmp_path):
    params = TINY[name](tmp_path)
    family = build_dataset(name, str(tmp_path), params)
    assert isinstance(family, DatasetFamily)

    shapes, num_classes = family.input_spec()
    assert isinstance(shapes, dict) and isinstance(num_classes, int)
    assert all(isinstance(s, tuple) and all(isinstance(d, int) for d in s) for s in shapes.values())

    splits = family.load()
    assert isinstance(splits, DataSplits)
    assert (splits.input_shapes, splits.num_classes) == (shapes, num_classes)  # input_spec() tells what load() gives
    assert family.check() == []

    fingerprint = family.fingerprint()
    assert isinstance(fingerprint, dict) and fingerprint
    assert json.loads(json.dumps(fingerprint)) == fingerprint  # as a run fingerprint reads it back
    assert build_dataset(name, str(tmp_path), params).fingerprint() == fingerprint  # stable across instances


def test_fingerprints_follow_the_data(tmp_path):
    synthetic = build_dataset("synthetic", str(tmp_path), {"seed": 1}).fingerprint()
    assert synthetic["defaults"]["seed"] == 0 and synthetic["defaults"]["image_shape"] == [1, 12, 12]

    tiny_avmnist(tmp_path)
    before = build_dataset("avmnist", str(tmp_path)).fingerprint()
    np.save(tmp_path / "avmnist" / "test_labels.npy", np.zeros(12, dtype=np.int64))
    assert build_dataset("avmnist", str(tmp_path)).fingerprint() != before

    params = tiny_imagefolder(tmp_path)
    before = build_dataset("imagefolder", str(tmp_path), params).fingerprint()
    write_tree(tmp_path / "birds", {"test": 3})  # one more test image per class
    assert build_dataset("imagefolder", str(tmp_path), params).fingerprint() != before

    params = tiny_cremad(tmp_path)
    cached, lazy = (build_dataset("cremad", str(tmp_path), {**params, "cache": c}) for c in (True, False))
    assert cached.fingerprint() == lazy.fingerprint()  # both modes give the same tensors


def test_a_family_without_the_protocol_is_refused_by_name(tmp_path, clean_registries):
    @DATASETS.register("half_done")
    class HalfDone:
        def __init__(self, root: str) -> None:
            self.root = root

        def load(self) -> DataSplits: ...

        def check(self) -> list[str]:
            return []

    with pytest.raises(TypeError, match=r"dataset 'half_done' \(.*HalfDone\) lacks input_spec, fingerprint"):
        build_dataset("half_done", str(tmp_path))


# ----------------------------------------------------------------------------- the decoded-array cache


class Decoder:
    """``decode()`` that counts its calls; the arrays depend on ``offset``."""

    def __init__(self, offset: int = 0) -> None:
        self.calls, self.offset = 0, offset

    def __call__(self) -> dict[str, np.ndarray]:
        self.calls += 1
        return {"x": np.arange(12, dtype=np.float32).reshape(3, 4) + self.offset, "y": np.arange(3) + self.offset}


def source(**changes: Any) -> dict[str, Any]:
    return {"version": 1, "params": {"size": 4}, "items": ["a", "b", "c"], **changes}


def test_cache_is_decoded_once_and_reused(tmp_path, caplog):
    cache, decode = DecodedCache(tmp_path / "cache", "toy", ("x", "y")), Decoder()
    with caplog.at_level(logging.WARNING):
        first = cache.load(source(), decode)
        again = DecodedCache(tmp_path / "cache", "toy", ("x", "y")).load(source(), decode)
    assert decode.calls == 1 and not caplog.records  # a first build is no news
    assert all(np.array_equal(first[k], again[k]) for k in ("x", "y"))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("name", "version", "params", "items")} == {"name": "toy", **source()}
    assert cache.build(source(), decode) == tmp_path / "cache" and decode.calls == 1
    cache.build(source(), decode, force=True)
    assert decode.calls == 2


def test_cache_is_rebuilt_when_its_source_changes(tmp_path, caplog):
    cache, decode = DecodedCache(tmp_path / "cache", "toy", ("x", "y")), Decoder()
    cache.load(source(), decode)
    assert cache.fingerprint(source()) == cache.fingerprint(source()) != cache.fingerprint(source(items=["a", "b"]))
    decode.offset = 5
    with caplog.at_level(logging.WARNING, logger="crossmodal_kd.data.decoded_cache"):
        arrays = cache.load(source(items=["a", "b", "d"]), decode)
    assert decode.calls == 2 and arrays["y"].tolist() == [5, 6, 7]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'cache' / 'manifest.json'}: cache made from another source (items changed); rebuilding the cache"]
    assert cache.load(source(items=["a", "b", "d"]), decode)["y"].tolist() == [5, 6, 7] and decode.calls == 2


def test_damaged_cache_is_rebuilt_never_read(tmp_path, caplog):
    cache, decode = DecodedCache(tmp_path / "cache", "toy", ("x", "y")), Decoder()
    good = cache.load(source(), decode)
    path = tmp_path / "cache" / "x.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # one value edited in place: same size, shape and dtype
    path.write_bytes(bytes(raw))
    assert cache.problem(source()) == f"{path}: sha256 mismatch (file edited or damaged)"
    with caplog.at_level(logging.WARNING, logger="crossmodal_kd.data.decoded_cache"):
        arrays = cache.load(source(), decode)
    assert decode.calls == 2 and np.array_equal(arrays["x"], good["x"])
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: sha256 mismatch (file edited or damaged); rebuilding the cache"]
    assert cache.problem(source()) is None and np.array_equal(np.load(path), good["x"])


def test_cache_source_must_not_use_manifest_keys(tmp_path):
    with pytest.raises(ValueError, match="toy: cache source key\\(s\\) files are the manifest's own"):
        DecodedCache(tmp_path / "cache", "toy", ("x", "y")).load(source(files=[]), Decoder())
