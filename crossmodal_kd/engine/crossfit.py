"""Cross-fitted (out-of-fold) teacher targets: no training sample is distilled from a teacher that saw it.

A teacher's soft labels on its own training samples are memorised (near one-hot, over-confident), unlike
its outputs on samples it never saw. With ``targets: {cross_fit: K}`` on a distillation stage, the stage
that trained each of its teachers is trained K more times, copy k on the training split minus fold k,
and copy k's outputs for the samples of fold k fill the training table of the target store. Validation
and test targets still come from the teacher trained on the whole split (the one the config names).

Folds are stratified by class and, when the training split declares ``groups`` (e.g. avdigits' source
image of each pair), grouped, so one source item never sits on both sides of a fold
(``sklearn.model_selection.StratifiedGroupKFold``). A masked teacher (MST-Distill) keeps its masks,
which were trained on the full teacher; only the network's weights are swapped per fold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Subset

from crossmodal_kd.config import ConfigError
from crossmodal_kd.data import collate_batch
from crossmodal_kd.methods.context import FAST_DEV_SAMPLES
from crossmodal_kd.models.io import load_model, model_path, stage_dir
from crossmodal_kd.engine.fingerprint import direct_dependencies
from crossmodal_kd.engine.seeding import stage_seed
from crossmodal_kd.engine.targets import main_decides
from crossmodal_kd.targets import TargetStore, TargetTable, TeacherCall

log = logging.getLogger(__name__)


def fold_assignment(labels: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) of every sample: stratified by class, grouped by ``groups`` when given."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    splitter = (StratifiedGroupKFold(k, shuffle=True, random_state=seed) if groups is not None
                else StratifiedKFold(k, shuffle=True, random_state=seed))
    folds = np.full(len(labels), -1, dtype=np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[held_out] = fold
    return folds


def source_stage(call: TeacherCall) -> tuple[str, str]:
    """The (stage, model) of this run that trained the call's network."""
    ref = getattr(call.module, "source_ref", None)
    if not ref or ref.get("stage") is None:
        raise ConfigError(
            f"targets.cross_fit: teacher '{call.name}' comes from a model file, not a stage of this run; "
            "cross-fitting retrains the teacher's stage, so reference it as {stage: NAME}"
        )
    return ref["stage"], ref.get("model", "model")


def fill_out_of_fold(trainer: Any, k: int) -> dict[str, Any]:
    """Train the K fold copies of every teacher stage of ``trainer``'s served calls (reused when already
    trained) and replace each call's training table by the out-of-fold outputs. Returns what was done."""
    env, acc = trainer.env, trainer.acc
    calls = [c for c in trainer.calls.values() if "train" in c.tables]
    if not calls:
        return {}
    train = env.data.train
    labels = np.asarray(train.labels)
    groups = getattr(train, "groups", None)
    folds = fold_assignment(labels, None if groups is None else np.asarray(groups), k, env.cfg.seed)
    info: dict[str, Any] = {"k": k, "grouped": groups is not None, "stages": {}, "fold_val_accuracy": {}}
    started = time.perf_counter()
    store = TargetStore(Path(env.run_dir) / "targets", acc.device)
    for call in calls:
        stage_name, model = source_stage(call)
        stage = env.cfg.stage(stage_name)
        identity = {"cross_fit": k, "folds": folds.tolist(), "teacher_stage": stage.model_dump(mode="json")}
        table = store.table(call, "train", train, {"base": call.tables["train"].key, **identity})
        if main_decides(acc, not table.complete):  # every rank trains the folds, or none does
            fold_files = [train_fold(trainer, stage, f, np.flatnonzero(folds != f), model) for f in range(k)]
            if acc.is_main_process:
                for f, path in enumerate(fold_files):
                    rows = np.flatnonzero(folds == f)  # a fast-dev-run fills a few rows; the rest fill lazily
                    _fill_fold(call, table, load_model(path), rows[:FAST_DEV_SAMPLES] if trainer.fast else rows, trainer)
                if not trainer.fast:
                    table.save()
            acc.wait_for_everyone()
            if not trainer.fast and not table.complete and not table.load():
                raise RuntimeError(f"cross-fitted target table {table.path} built by the main process is unreadable")
        call.tables["train"] = table
        info["stages"][call.name] = stage_name
        info["fold_val_accuracy"][stage_name] = _fold_val_accuracies(env.run_dir, stage_name, k)
    info["build_s"] = round(time.perf_counter() - started, 3)  # fold training + out-of-fold passes
    return info


def _fold_val_accuracies(run_dir: str | Path, stage: str, k: int) -> list[dict[str, float]]:
    """Each fold copy's validation accuracy per model, in fold order (copies not trained here are left out), so
    the run's metrics (and a benchmark's archive) say how much weaker the teachers behind the targets are."""
    accuracies = []
    for fold in range(k):
        result = stage_dir(Path(run_dir) / "crossfit" / stage / f"fold{fold}", stage) / "result.json"
        if result.is_file():
            models = json.loads(result.read_text())["models"]
            accuracies.append({m: r["val"]["accuracy"] for m, r in models.items() if "val" in r})
    return accuracies


def train_fold(trainer: Any, stage: Any, fold: int, train_idx: np.ndarray, model: str) -> Path:
    """Stage ``stage`` trained on ``train_idx`` under ``<run>/crossfit/<stage>/fold<k>``; the model file.
    Reused when that fold has finished before (``result.json``). The caller's random state is kept.
    ``trainer``: the stage trainer that needs the targets; the fold copy is trained by one of its kind."""
    env = trainer.env
    depends = direct_dependencies(env.cfg)[stage.name]
    if depends:
        raise ConfigError(f"targets.cross_fit: teacher stage '{stage.name}' depends on stage(s) {', '.join(depends)}; "
                          "only stages trained from scratch can be cross-fitted")
    fold_dir = Path(env.run_dir) / "crossfit" / stage.name / f"fold{fold}"
    path, sdir = model_path(fold_dir, stage.name, model), stage_dir(fold_dir, stage.name)
    if (sdir / "result.json").is_file() and path.is_file():
        return path
    key = _fold_key(env, stage.name, fold, train_idx)
    if key and not (sdir / "checkpoints").exists():  # a fold copy that started training here finishes here
        if env.stage_cache.fetch_on_main(key, sdir, trainer.acc):
            log.info("cross-fitting: %s fold %d reused from the stage cache (%s)", stage.name, fold, env.stage_cache.root / key)
        if (sdir / "result.json").is_file() and path.is_file():
            return path
    fold_env = dataclasses.replace(
        env, run_dir=fold_dir, data=dataclasses.replace(env.data, train=Subset(env.data.train, train_idx.tolist()))
    )
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    set_seed(stage_seed(env.cfg.seed, f"{stage.name}/fold{fold}"))
    index = [s.name for s in env.cfg.stages].index(stage.name)
    log.info("cross-fitting: training %s on folds other than %d", stage.name, fold)
    type(trainer)(fold_env, index, stage, sdir).train()
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    if key:
        env.stage_cache.store_on_main(key, sdir, trainer.acc)
    return path


def _fold_key(env: Any, stage: str, fold: int, train_idx: np.ndarray) -> str | None:
    """The stage-cache key of a fold copy: its stage's fingerprint (config, networks, data, run seed, ...), the
    fold and the exact training rows, so runs that train the same teacher on the same folds share the copy
    (e.g. the image and audio students' runs of one seed). None without a stage cache."""
    if env.stage_cache is None or stage not in env.fingerprints:
        return None
    rows = hashlib.sha256(np.ascontiguousarray(train_idx, dtype=np.int64).tobytes()).hexdigest()
    return env.stage_cache.key({"cross_fit_copy": env.fingerprints[stage], "fold": fold, "train_rows": rows})


def _fill_fold(call: TeacherCall, table: TargetTable, fold_model: torch.nn.Module, rows: np.ndarray, trainer: Any) -> None:
    """Rows ``rows`` of ``table`` from ``call`` with its network's weights replaced by ``fold_model``'s."""
    env, acc = trainer.env, trainer.acc
    network = call.module
    original = {k: v.detach().clone() for k, v in network.state_dict().items()}
    network.load_state_dict(fold_model.state_dict())
    try:
        loader = DataLoader(Subset(env.data.train, rows.tolist()), batch_size=env.cfg.data.eval_batch_size,
                            shuffle=False, collate_fn=collate_batch)
        with acc.autocast():
            TargetStore.fill([(call, table)], (env.views({k: v.to(acc.device) for k, v in b.items()}) for b in loader))
    finally:
        network.load_state_dict(original)

