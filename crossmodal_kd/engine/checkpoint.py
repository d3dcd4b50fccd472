"""Epoch checkpoints: ``accelerator.save_state`` into a temp dir, checksummed, then renamed into place.

A checkpoint directory exists under its final name only when complete; its ``manifest.json`` holds the
sha256 of every file, so a truncated or edited checkpoint is detected and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from crossmodal_kd.io import atomic_torch_save, atomic_write_json, sha256_file

log = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def save_checkpoint(accelerator: Accelerator, root: Path, epoch: int, trainer_state: dict[str, Any], keep: int) -> Path:
    """Collective: every process must call it."""
    final = root / checkpoint_name(epoch)
    tmp = root / f".tmp_{checkpoint_name(epoch)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_torch_save(trainer_state, tmp / TRAINER_STATE)
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_json(tmp / MANIFEST, {"epoch": epoch, "files": files})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("epoch_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(path: Path) -> str | None:
    """``None`` when the checkpoint is complete and intact, else what is wrong with it."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{manifest}: missing (checkpoint incomplete)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{manifest}: unreadable ({exc})"
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            return f"{f}: missing"
        if sha256_file(f) != digest:
            return f"{f}: checksum mismatch (truncated or modified)"
    return None


def latest_good_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`; corrupt ones are reported and skipped."""
    for path in sorted(root.glob("epoch_*"), reverse=True):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("skipping corrupt checkpoint: %s", problem)
    return None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
