"""A committed record of finished benchmark runs (a benchmark's ``archive:``), so that a table can be built
over several sessions or machines and re-tabulated from a clean clone.

One small JSON file per run, at the run's path under the benchmark's ``output_dir`` (``<archive>/<experiment>/
<variant>/.../seed<k>.json``): the run's ``metrics.json``, a hash of every stage's fingerprint (config, networks,
data recipe, seed, precision, world size, and the stages it depends on; :mod:`crossmodal_kd.engine.fingerprint`),
the checksums of the dataset builds it read, a hash of the resolved config, and the code that produced it (the
package's source hash and, where the package sits in a git checkout, the commit; each stage's result also names
the code that trained that stage, which differs when a run was resumed by later code). No weights or checkpoints.

The hash leaves out the built dataset's byte checksum and keeps its recipe (the cache name, which hashes the
dataset version and every build parameter): a dataset built from one recipe on another CPU differs in float
rounding (BLAS, SVD and resampling kernels), which would otherwise make every archived run stale on every new
machine. Like channels-last layouts (also left out of fingerprints), that is rounding, not a different
experiment; the table names the builds it pools (:func:`provenance`). The stage cache and ``--resume`` still
compare the exact checksum.

Unlike the stage cache, an entry is *not* keyed by the source code: an archived run is reused while every
stage's fingerprint is unchanged, so a table may pool runs made by different commits; every table built
from the archive lists the commits it pools (:func:`provenance`). A run whose fingerprints changed is trained
again and its entry replaced. ``--report-only`` checks the resolved config instead (it loads no data).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from crossmodal_kd.engine.stage_cache import code_hash
from crossmodal_kd.io import atomic_write_text

log = logging.getLogger(__name__)


def digest(node: Any) -> str:
    """sha256 (first 16 hex digits) of a JSON-serialisable value, key order ignored."""
    return hashlib.sha256(json.dumps(node, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_digest(fingerprint: dict[str, Any]) -> str:
    """:func:`digest` of a stage fingerprint without the dataset's byte checksum (here and in every stage it
    depends on): the archive's key, which the same recipe built on another machine still matches."""
    return digest(_without_checksums(fingerprint))


def data_checksums(fingerprint: dict[str, Any]) -> set[str]:
    """The dataset byte checksums in a stage fingerprint and the fingerprints it depends on."""
    out = {c} if (c := (fingerprint.get("dataset") or {}).get("checksum")) else set()
    for dependency in (fingerprint.get("depends") or {}).values():
        out |= data_checksums(dependency)
    return out


def _without_checksums(fingerprint: dict[str, Any]) -> dict[str, Any]:
    out = dict(fingerprint)
    if isinstance(out.get("dataset"), dict):
        out["dataset"] = {k: v for k, v in out["dataset"].items() if k != "checksum"}
    if isinstance(out.get("depends"), dict):
        out["depends"] = {name: _without_checksums(fp) for name, fp in out["depends"].items()}
    return out


@functools.cache
def code_version() -> dict[str, str]:
    """The package's source hash and, when it is a git checkout, its commit (``+dirty`` with local edits)."""
    out = {"code": code_hash()[:12]}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "crossmodal_kd"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        out["commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def trained_by(entry: dict[str, Any]) -> list[str]:
    """The commits (or code hashes) that trained an archived run's stages, sorted: each stage's result
    names its own (``code``); a stage from before that field counts under the entry's run-level code."""
    def name(code: dict[str, Any]) -> str:
        return code.get("commit") or f"code {code.get('code')}"

    run_level = name(entry)
    stages = (entry.get("metrics") or {}).get("stages") or {}
    return sorted({name(r["code"]) if isinstance(r.get("code"), dict) else run_level for r in stages.values()} or {run_level})


class ResultsArchive:
    """``root/<run path>.json`` per finished run."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, run: str) -> Path:
        return self.root / f"{run}.json"

    def store(self, run: str, run_dir: Path, config: dict[str, Any]) -> None:
        """Record the finished run in ``run_dir`` under ``run`` (its path relative to the benchmark's output_dir):
        its ``metrics.json`` and the ``fingerprint.json`` its stages were trained under."""
        metrics = json.loads((run_dir / "metrics.json").read_text())
        files = {stage: run_dir / "stages" / stage / "fingerprint.json" for stage in metrics["stages"]}
        if missing := [stage for stage, f in files.items() if not f.is_file()]:
            log.warning("results archive: %s not archived: stages %s have no fingerprint.json", run_dir, ", ".join(missing))
            return
        environment = run_dir / "environment.json"  # the code that trained it (runs older than this field: the current)
        run_code = json.loads(environment.read_text()).get("code") if environment.is_file() else None
        fingerprints = {stage: json.loads(f.read_text()) for stage, f in files.items()}
        entry = {
            **(run_code or code_version()),
            "config": digest(config),
            "data": sorted(set().union(*map(data_checksums, fingerprints.values()))),
            "fingerprints": {stage: recipe_digest(fp) for stage, fp in fingerprints.items()},
            "metrics": metrics,
        }
        path = self.path(run)
        if (old := self._read(path)) is not None and {k: v for k, v in old.items() if k not in ("code", "commit")} == {
            k: v for k, v in entry.items() if k not in ("code", "commit")
        }:
            return  # the same run, re-stored by later code: keep the code that trained it
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entry, sort_keys=True, indent=1) + "\n")

    def fetch(self, run: str, fingerprints: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """The archived metrics of ``run`` when every stage's fingerprint matches; None otherwise (a stale
        entry is named in the log and will be replaced when the run finishes)."""
        entry = self._read(self.path(run))
        if entry is None:
            return None
        wanted = {stage: recipe_digest(fp) for stage, fp in fingerprints.items()}
        if entry.get("fingerprints") != wanted:
            changed = sorted(s for s in wanted.keys() | entry.get("fingerprints", {}).keys()
                             if wanted.get(s) != entry.get("fingerprints", {}).get(s))
            log.warning("results archive: %s is stale (stages %s changed); training the run again", self.path(run), ", ".join(changed))
            return None
        return entry["metrics"]

    def fetch_by_config(self, run: str, config: dict[str, Any]) -> dict[str, Any] | None:
        """The archived metrics of ``run`` when its resolved config matches (``--report-only``: no data loaded,
        so the dataset's checksum is not compared)."""
        entry = self._read(self.path(run))
        return entry["metrics"] if entry is not None and entry.get("config") == digest(config) else None

    def entries(self) -> list[tuple[str, dict[str, Any]]]:
        """``(run, metrics)`` of every readable entry, sorted by run (e.g. 'crossfit/image/draw0/seed3')."""
        found = ((path.relative_to(self.root).with_suffix("").as_posix(), self._read(path)) for path in sorted(self.root.glob("**/*.json")))
        return [(run, entry["metrics"]) for run, entry in found if entry is not None and "metrics" in entry]

    def provenance(self, runs: list[str]) -> dict[str, int]:
        """``{commit or code hash: number of runs with a stage it trained}`` over the archived ``runs`` (a run
        resumed by later code counts under each commit that trained one of its stages)."""
        return self._count(runs, trained_by)

    def data_builds(self, runs: list[str]) -> dict[str, int]:
        """``{dataset byte checksum (12 digits): number of runs that read it}`` over the archived ``runs`` (entries
        archived before the checksums were recorded count as "not recorded")."""
        return self._count(runs, lambda entry: [c[:12] for c in entry.get("data", ["not recorded"])])

    def _count(self, runs: list[str], keys: Callable[[dict[str, Any]], list[str]]) -> dict[str, int]:
        entries = (self._read(self.path(run)) for run in runs)
        return dict(Counter(key for entry in entries if entry is not None for key in keys(entry)))

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("results archive: unreadable %s (%s); ignored", path, exc)
            return None
        return entry if isinstance(entry, dict) and "metrics" in entry else None
