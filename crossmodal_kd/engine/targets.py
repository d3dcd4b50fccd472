"""The engine's side of the teacher target store: attach tables to a stage's teacher calls and build them."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from crossmodal_kd.config import RunConfig
from crossmodal_kd.data import DataSplits, collate_batch
from crossmodal_kd.targets import TargetStore, TeacherCall, is_deterministic

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def data_identity(cfg: RunConfig, acc: Accelerator) -> dict[str, Any]:
    """What, besides a split's contents, determines a teacher's input: the dataset recipe, the views, the
    precision the teacher runs in."""
    return {
        "dataset": cfg.data.name,
        "params": cfg.data.params,
        "views": {k: v.model_dump() for k, v in cfg.data.views.items()},
        "mixed_precision": acc.mixed_precision,
    }


def attach_targets(
    acc: Accelerator,
    calls: dict[str, TeacherCall],
    cfg: RunConfig,
    data: DataSplits,
    views: Any,
    run_dir: Path,
    *,
    stage: str,
    enabled: bool = True,
    augmented: bool = False,
    build: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Attach a table per (teacher call, split) and build the training split's tables once.

    The main process builds and saves the tables; the others wait and read them, so every rank serves the
    same targets. ``build=False`` (a fast-dev-run) only attaches: rows are then computed live the first
    time a sample is seen. Returns what happened, for ``result.json``: per call ``served`` or the reason it
    runs live, and ``build_s`` (the one-time build, measured apart from training).
    """
    info: dict[str, Any] = {"calls": {}, "build_s": 0.0}
    if not calls:
        return info
    identity = data_identity(cfg, acc)
    store = TargetStore(Path(run_dir) / "targets", acc.device)
    served: list[TeacherCall] = []
    for name, call in calls.items():
        reason = _live_reason(call, data, enabled, augmented)
        info["calls"][name] = reason or "served"
        if reason:
            log.warning("stage %s: teacher '%s' runs live on every batch (%s)", stage, name, reason)
            continue
        for split in SPLITS:
            call.tables[split] = store.table(call, split, data.split(split), identity)
        served.append(call)
    if not (build and served):
        return info
    # the main process decides what to build: another rank may already read a table the main has just saved,
    # and every rank must take the same path through the barrier below
    pending = main_decides(acc, [call.name for call in served if not call.tables["train"].complete])
    if not pending:
        return info
    started = time.perf_counter()
    building = [call for call in served if call.name in pending]
    if acc.is_main_process:
        loader = DataLoader(data.train, batch_size=cfg.data.eval_batch_size, shuffle=False, collate_fn=collate_batch)
        bar = tqdm(loader, desc=f"{stage}: teacher targets ({', '.join(pending)})",
                   disable=None if progress else True, leave=False)
        with acc.autocast():
            TargetStore.fill(
                [(c, c.tables["train"]) for c in building],
                (views({k: v.to(acc.device) for k, v in batch.items()}) for batch in bar),
            )
        for call in building:
            call.tables["train"].save()
    acc.wait_for_everyone()
    for call in building:
        if not call.tables["train"].complete and not call.tables["train"].load():
            raise RuntimeError(f"stage {stage}: the target table {call.tables['train'].path} built by the main process is unreadable")
    info["build_s"] = round(time.perf_counter() - started, 3)
    return info


def main_decides(acc: Accelerator, value: Any) -> Any:
    """The main process's ``value``, on every process (a picklable object)."""
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _live_reason(call: TeacherCall, data: DataSplits, enabled: bool, augmented: bool = False) -> str | None:
    if not enabled:
        return "targets.store is off for this stage"
    if augmented:
        return "the stage augments its training batches, so a sample's teacher input changes every epoch"
    if not call.deterministic:
        return "its output for a sample is not fixed (randomised or batch-dependent input)"
    if not all(is_deterministic(data.split(s)) for s in SPLITS):
        return "the dataset does not return the same tensors for a sample index every time"
    return None


def live_batches(calls: dict[str, TeacherCall]) -> dict[str, int]:
    """Teacher forward passes run live per call (after a complete build: only those not served)."""
    return {name: call.live_batches for name, call in calls.items()}

