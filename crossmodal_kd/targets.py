"""Teacher target store: a frozen teacher's outputs computed once per sample and served by sample index.

A frozen teacher's output for a training sample never changes, so running it on every batch of every
epoch is wasted work (and with large teachers it dominates a distillation stage). A :class:`TeacherCall`
is the one way a method calls a frozen teacher: ``call(batch) -> outputs``. Live, it runs the teacher.
Once the engine has attached a :class:`TargetTable` for the split being iterated, it returns the stored
rows of ``batch["index"]`` instead, and rows not stored yet are computed live and written (so a table
also fills itself lazily, e.g. in a fast-dev-run or on validation).

Tables live under ``<run_dir>/targets/<key>.safetensors`` with a ``.json`` manifest holding the file's
sha256; the key hashes everything that determines the outputs: the teacher modules' build specs and
weights (masks included), the call's description (hooked layer, ...), the dataset recipe, the views, the
split and its contents. A damaged or stale file is detected and rebuilt, never used; a complete one is
reused by later stages and by ``--resume``.

Tables are only attached when the teacher's input for a sample is deterministic: the dataset's samples
are fixed per index (``ArrayDataset`` and its subclasses) and the call is declared deterministic (no
random augmentation or views on the teacher side). Otherwise the teacher runs live and the engine says
so once in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from crossmodal_kd.io import atomic_write_json, sha256_file
from crossmodal_kd.models.frozen import frozen_state

log = logging.getLogger(__name__)
Outputs = dict[str, torch.Tensor]
TABLE_FORMAT = 1


class TeacherCall:
    """A frozen teacher call site: ``fn(batch) -> tensor | {name: tensor}`` (leading dim = batch), run
    without gradients; served from the attached table of the current split when there is one.

    ``modules``: every module whose weights determine the output (the network, a hooked mask, ...);
    ``describe``: anything else that does (hooked layer names, ...), JSON-serialisable.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[Mapping[str, torch.Tensor]], Any],
        modules: Sequence[nn.Module],
        describe: Mapping[str, Any] | None = None,
        deterministic: bool = True,
    ) -> None:
        self.name, self.fn, self.modules = name, fn, list(modules)
        self.describe = dict(describe or {})
        self.deterministic = deterministic
        self.tables: dict[str, TargetTable] = {}
        self.split: str | None = None
        self.live_batches = 0  # teacher passes run live, i.e. not served from a table nor run by a build

    @property
    def module(self) -> nn.Module:
        """The teacher network (the first module)."""
        return self.modules[0]

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> Any:
        table = self.tables.get(self.split) if self.split is not None else None
        if table is None or "index" not in batch:
            return self.live(batch)
        index = batch["index"]
        rows = table.rows(index)
        if rows is None:
            out = self.live(batch)
            table.write(index, _as_dict(out))
            return out
        return rows["_"] if set(rows) == {"_"} else rows

    @torch.no_grad()
    def live(self, batch: Mapping[str, torch.Tensor]) -> Any:
        self.live_batches += 1
        return self.fn(batch)

    def identity(self) -> dict[str, Any]:
        """What determines the outputs, apart from the data: module specs and weight hashes, ``describe``."""
        return {
            "call": self.name,
            "describe": self.describe,
            "modules": [module_fingerprint(m) for m in self.modules],
        }


def _as_dict(out: Any) -> Outputs:
    if isinstance(out, torch.Tensor):
        return {"_": out}
    if isinstance(out, Mapping):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    raise TypeError(f"a teacher call must return a tensor or a mapping of tensors, got {type(out).__name__}")


class TargetTable:
    """One teacher call's outputs for every sample of one split (``n`` rows), kept on ``device``."""

    def __init__(self, path: Path, key: str, n: int, device: torch.device) -> None:
        self.path, self.key, self.n, self.device = Path(path), key, n, torch.device(device)
        self.tensors: Outputs = {}
        self.filled = torch.zeros(n, dtype=torch.bool, device=self.device)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def rows(self, index: torch.Tensor) -> Outputs | None:
        """The stored rows of ``index``, or None when any of them is missing."""
        idx = index.to(self.device, non_blocking=True)
        if not self.tensors or not bool(self.filled[idx].all()):
            return None
        return {k: v[idx] for k, v in self.tensors.items()}

    def write(self, index: torch.Tensor, outputs: Outputs) -> None:
        idx = index.to(self.device)
        for k, v in outputs.items():
            if k not in self.tensors:
                self.tensors[k] = torch.zeros((self.n, *v.shape[1:]), dtype=v.dtype, device=self.device)
            self.tensors[k][idx] = v.detach().to(self.device, self.tensors[k].dtype)
        self.filled[idx] = True

    # ------------------------------------------------------------------ disk
    @property
    def manifest_path(self) -> Path:
        return self.path.with_suffix(".json")

    def save(self) -> None:
        """Write the complete table atomically with its checksum manifest."""
        from safetensors.torch import save_file

        if not self.complete:
            raise RuntimeError(f"{self.path}: refusing to save an incomplete target table")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        save_file({k: v.contiguous().cpu() for k, v in self.tensors.items()}, str(tmp), metadata={"key": self.key})
        os.replace(tmp, self.path)
        atomic_write_json(self.manifest_path, {
            "format": TABLE_FORMAT, "key": self.key, "rows": self.n, "sha256": sha256_file(self.path),
            "outputs": {k: [list(v.shape), str(v.dtype)] for k, v in self.tensors.items()},
        })

    def load(self) -> bool:
        """Read a complete table saved under this key; False (with a warning when damaged) otherwise."""
        from safetensors.torch import load_file

        if not self.manifest_path.is_file():
            return False
        problem = None
        try:
            manifest = json.loads(self.manifest_path.read_text())
            if manifest.get("format") != TABLE_FORMAT or manifest.get("key") != self.key or manifest.get("rows") != self.n:
                problem = "manifest does not match"
            elif not self.path.is_file() or sha256_file(self.path) != manifest["sha256"]:
                problem = "checksum mismatch"
            else:
                tensors = load_file(str(self.path))
                if any(v.shape[0] != self.n for v in tensors.values()):
                    problem = "row count mismatch"
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            problem = f"unreadable ({type(exc).__name__}: {exc})"
        if problem:
            log.warning("target store %s is damaged (%s); rebuilding it", self.path, problem)
            return False
        self.tensors = {k: v.to(self.device) for k, v in tensors.items()}
        self.filled[:] = True
        return True


# ---------------------------------------------------------------------- fingerprints
def _update_with_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def module_fingerprint(module: nn.Module) -> dict[str, Any]:
    """Build spec and a sha256 of every weight, buffer and frozen helper's weights of ``module``."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        _update_with_tensor(h, t)
    for name, t in sorted(frozen_state(module)):  # frozen modules held outside the tree (CLIP backends, transformers)
        h.update(name.encode())
        _update_with_tensor(h, t)
    return {"class": type(module).__name__, "spec": getattr(module, "build_spec", None), "weights": h.hexdigest()}


def dataset_fingerprint(dataset: Any) -> str:
    """A sha256 of a split's contents: every array of an in-memory dataset (labels included)."""
    h = hashlib.sha256()
    h.update(str(len(dataset)).encode())
    for name, arr in sorted(getattr(dataset, "arrays", {}).items()):
        h.update(name.encode())
        _update_with_tensor(h, torch.as_tensor(arr))
    if hasattr(dataset, "labels"):
        _update_with_tensor(h, torch.as_tensor(dataset.labels))
    return h.hexdigest()


def is_deterministic(dataset: Any) -> bool:
    """Whether a dataset's sample ``i`` is the same tensor every time it is read."""
    from crossmodal_kd.data.base import ArrayDataset

    return bool(getattr(dataset, "deterministic", isinstance(dataset, ArrayDataset)))


def table_key(call: TeacherCall, data_identity: Mapping[str, Any]) -> str:
    blob = json.dumps({"teacher": call.identity(), "data": data_identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class TargetStore:
    """The run's target tables (``<run_dir>/targets``): finds, builds, verifies and attaches them."""

    def __init__(self, root: Path, device: torch.device) -> None:
        self.root, self.device = Path(root), device

    def table(self, call: TeacherCall, split: str, dataset: Any, data_identity: Mapping[str, Any]) -> TargetTable:
        key = table_key(call, {**data_identity, "split": split, "contents": dataset_fingerprint(dataset)})
        table = TargetTable(self.root / f"{call.name.replace('/', '_')}-{key}.safetensors", key, len(dataset), self.device)
        table.load()
        return table

    @staticmethod
    def fill(calls_tables: Iterable[tuple[TeacherCall, TargetTable]], batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Run each call over ``batches`` (the whole split, in order) and write its rows."""
        pending = [(c, t) for c, t in calls_tables if not t.complete]
        if not pending:
            return
        with torch.no_grad():
            for batch in batches:
                for call, table in pending:
                    table.write(batch["index"], _as_dict(call.fn(batch)))
