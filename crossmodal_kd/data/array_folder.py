"""Checksummed array folders: one ``.npy`` per array plus ``manifest.json``, written atomically.

Every generated or decoded dataset cache (``avdigits``, ``textdigits``, and the ``cremad`` and
``imagefolder`` decoding caches of :mod:`~crossmodal_kd.data.decoded_cache`) is such a folder. It is written into a temporary sibling and renamed into place, so an interrupted
build never leaves a half-written folder; :func:`verify_array_folder` checks each file against the
manifest (presence, shape, dtype, size, sha256) and names the first bad one; :func:`content_problems`
checks what a valid folder holds (labels, NaN/inf, empty splits).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from crossmodal_kd.data.base import DataError, check_finite, check_labels, check_split_sizes
from crossmodal_kd.io import sha256_file


class CorruptDatasetError(DataError):
    """A dataset file is missing, truncated, edited or inconsistent with its manifest."""


def write_array_folder(out_dir: str | Path, arrays: Mapping[str, np.ndarray], manifest: Mapping[str, Any]) -> Path:
    """Write ``<name>.npy`` for each array and ``manifest.json`` (``manifest`` plus a ``files`` entry with
    each file's shape, dtype and sha256), then swap the folder in for ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a dataset cache is meant to be shared
    try:
        files = {}
        for name, arr in arrays.items():
            path = tmp / f"{name}.npy"
            np.save(path, arr)
            files[path.name] = {"sha256": sha256_file(path), "shape": list(arr.shape), "dtype": str(arr.dtype)}
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "files": files}, indent=1) + "\n")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "data")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def array_folder_checksum(out_dir: str | Path) -> str:
    """sha256 over the per-file checksums, shapes and dtypes in ``manifest.json`` (the folder's contents)."""
    files = json.loads((Path(out_dir) / "manifest.json").read_text())["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def verify_array_folder(out_dir: str | Path, name: str, arrays: Iterable[str]) -> dict[str, Any]:
    """The manifest of a valid folder made for dataset ``name`` holding ``arrays``; otherwise
    :class:`CorruptDatasetError` naming the first bad or missing file."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptDatasetError(f"{manifest_path}: unreadable manifest ({exc})") from None
    missing = [f"{a}.npy" for a in arrays if f"{a}.npy" not in files]
    if missing or manifest.get("name") != name:
        raise CorruptDatasetError(f"{manifest_path}: not a {name} manifest (missing entries {missing})")
    for filename, meta in files.items():
        path = out_dir / filename
        if not path.is_file():
            raise CorruptDatasetError(f"{path}: missing")
        try:
            arr = np.load(path, mmap_mode="r")
            expected_size = arr.offset + arr.nbytes
        except (OSError, ValueError) as exc:
            raise CorruptDatasetError(f"{path}: unreadable ({exc})") from None
        if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
            raise CorruptDatasetError(
                f"{path}: shape {list(arr.shape)} dtype {arr.dtype}, manifest says {meta['shape']} {meta['dtype']}"
            )
        del arr
        if path.stat().st_size != expected_size:
            raise CorruptDatasetError(f"{path}: {path.stat().st_size} bytes, expected {expected_size}")
        if sha256_file(path) != meta["sha256"]:
            raise CorruptDatasetError(f"{path}: sha256 mismatch (file edited or damaged)")
    return manifest


def content_problems(
    out_dir: str | Path, inputs: Mapping[str, np.ndarray], labels: np.ndarray, split: np.ndarray, num_classes: int
) -> list[str]:
    """Problems of a generated folder's contents: labels outside the declared classes, NaN/inf in an input
    (``name -> array``, stored as ``<name>.npy``), an empty train/val/test split (codes 0/1/2 in ``split.npy``)."""
    out_dir = Path(out_dir)
    problems = check_labels(labels, num_classes, out_dir / "label.npy")
    for name, array in inputs.items():
        problems += check_finite({name: array}, out_dir / f"{name}.npy")
    sizes = {name: int(np.count_nonzero(split == code)) for code, name in enumerate(("train", "val", "test"))}
    return problems + check_split_sizes(sizes, out_dir / "split.npy")
