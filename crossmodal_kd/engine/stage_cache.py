"""A content-addressed cache of finished stages, shared by runs (``--stage-cache DIR``, a benchmark's
``stage_cache``), in the spirit of DVC's run cache (https://dvc.org/doc/user-guide/pipelines/run-cache).

A stage's key is the hash of its fingerprint (its config, the networks it names, data, dataset identity, run
seed, precision, world size, and its dependencies' fingerprints; :mod:`crossmodal_kd.engine.fingerprint`) and
of the package's source code. Stage seeds depend only on (run seed, stage name), so two runs that hold a stage
with the same key train the same thing: the teachers, the no-KD student or MST-Distill's stage 1 of one seed
are trained once for every benchmark table that contains them, and copied into the next run instead. A
changed line of code anywhere in ``crossmodal_kd`` changes every key (never a stale result). Entries are
written whole (copied beside, then renamed) and hold a finished stage without its epoch checkpoints.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SKIPPED = ("checkpoints",)  # resumable-training state; a finished stage does not need it


@functools.cache
def code_hash() -> str:
    """sha256 of every ``.py`` file of the installed ``crossmodal_kd`` package (path and content)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class StageCache:
    """Finished stage directories under ``root/<key>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(self, fingerprint: dict[str, Any]) -> str:
        blob = json.dumps({"fingerprint": fingerprint, "code": code_hash()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def fetch(self, key: str, stage_dir: Path) -> bool:
        """Copy the entry ``key`` into ``stage_dir`` (replacing what is there); False when there is none."""
        entry = self.root / key
        if not (entry / "result.json").is_file():
            return False
        shutil.rmtree(stage_dir, ignore_errors=True)
        _copy(entry, stage_dir)
        return True

    def fetch_on_main(self, key: str, stage_dir: Path, accelerator: Any) -> bool:
        """:meth:`fetch` on the main process while every other rank waits (they share its file system, so all
        see the copy afterwards); True on the main process when it copied an entry."""
        fetched = accelerator.is_main_process and self.fetch(key, stage_dir)
        accelerator.wait_for_everyone()
        return fetched

    def store_on_main(self, key: str, stage_dir: Path, accelerator: Any) -> None:
        """:meth:`store` from the main process only (the other ranks hold the same finished files)."""
        if accelerator.is_main_process:
            self.store(key, stage_dir)

    def store(self, key: str, stage_dir: Path) -> None:
        """Add the finished ``stage_dir`` under ``key`` (no-op when present); a failure only warns."""
        entry = self.root / key
        if (entry / "result.json").is_file():
            return
        partial = self.root / f".{key}.{os.getpid()}.partial"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            _copy(stage_dir, partial)
            os.replace(partial, entry)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            log.warning("stage cache: could not store %s in %s: %s", stage_dir, self.root, exc)


def _copy(src: Path, dst: Path) -> None:
    """Hard links where the file system allows them (entries are never modified in place), else copies."""
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*SKIPPED), copy_function=link_or_copy)
