"""A decoded-array cache: raw files decoded once into a checksummed array folder, reused while intact.

Families that decode media (``cremad`` clips, ``imagefolder`` images) keep the decoded arrays in an
:mod:`~crossmodal_kd.data.array_folder` whose ``manifest.json`` also records the *source*: what the
arrays were decoded from and with which parameters (a JSON mapping the family describes). The cache
serves a source only when every file matches its checksum and the recorded source equals it; otherwise
it is decoded again, with one warning naming the bad file or the changed source key when a cache was
there. A damaged cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from crossmodal_kd.data.array_folder import CorruptDatasetError, verify_array_folder, write_array_folder
from crossmodal_kd.data.base import load_npy

log = logging.getLogger(__name__)
RESERVED = ("name", "files")  # manifest keys of the array folder itself

Decode = Callable[[], Mapping[str, np.ndarray]]


class DecodedCache:
    """The cache folder ``folder`` of dataset ``name``, holding ``<array>.npy`` for each of ``arrays``."""

    def __init__(self, folder: str | Path, name: str, arrays: Sequence[str]) -> None:
        self.folder, self.name, self.arrays = Path(folder), name, tuple(arrays)

    def problem(self, source: Mapping[str, Any]) -> str | None:
        """Why the cache cannot serve ``source`` (missing, damaged, from another source); ``None`` if it can."""
        try:
            manifest = verify_array_folder(self.folder, self.name, self.arrays)
        except CorruptDatasetError as exc:
            return str(exc)
        changed = [key for key, value in _as_json(source).items() if manifest.get(key) != value]
        if changed:
            changes = ", ".join(changed)
            return f"{self.folder / 'manifest.json'}: cache made from another source ({changes} changed)"
        return None

    def load(self, source: Mapping[str, Any], decode: Decode) -> dict[str, np.ndarray]:
        """The arrays for ``source``: read from the verified cache, or decoded with ``decode()`` and cached."""
        problem = self.problem(source)
        if problem is None:
            return {a: load_npy(self.folder / f"{a}.npy") for a in self.arrays}
        return self._write(source, decode, problem)

    def build(self, source: Mapping[str, Any], decode: Decode, *, force: bool = False) -> Path:
        """Make the cache serve ``source``, decoding only if it cannot (always with ``force``); returns the folder."""
        problem = None if force else self.problem(source)
        if force or problem is not None:
            self._write(source, decode, problem)
        return self.folder

    def fingerprint(self, source: Mapping[str, Any]) -> dict[str, str]:
        """Cache folder (named by the decoding parameters) and sha256 of ``source``, for run fingerprints."""
        digest = hashlib.sha256(json.dumps(_as_json(source), sort_keys=True).encode()).hexdigest()
        return {"cache": self.folder.name, "source": digest}

    def _write(self, source: Mapping[str, Any], decode: Decode, problem: str | None) -> dict[str, np.ndarray]:
        if reserved := sorted(set(RESERVED) & set(source)):
            raise ValueError(f"{self.name}: cache source key(s) {', '.join(reserved)} are the manifest's own")
        if problem is not None and (self.folder / "manifest.json").is_file():  # a first build is no news
            log.warning("%s; rebuilding the cache", problem)
        arrays = dict(decode())
        missing = sorted(set(self.arrays) - set(arrays))
        if missing:
            raise ValueError(f"{self.name}: decode() returned no array(s) {', '.join(missing)}")
        write_array_folder(self.folder, arrays, {"name": self.name, **source})
        return arrays


def _as_json(source: Mapping[str, Any]) -> dict[str, Any]:
    """``source`` as it reads back from ``manifest.json`` (tuples become lists)."""
    return json.loads(json.dumps(dict(source)))
