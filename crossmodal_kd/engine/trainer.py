"""The one training loop. A run is a list of stages; each stage trains one method with Accelerate.

Run directory::

    config.yaml          resolved config          metrics.json   {"stages": {stage: {"models": {m: {"val", "test"}}}}}
    environment.json     seed, world size, versions
    log.jsonl            every epoch of every stage (also sent to the config's trackers: trackers/)
    stages/<stage>/      fingerprint.json (what determines the stage; checked by --resume),
                         log.jsonl, curves.png, result.json (marks the stage done),
                         models/<model>.pt (best on validation), checkpoints/epoch_*/ (while training)
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from crossmodal_kd.config import ConfigError, RunConfig, StageConfig, dump_config
from crossmodal_kd.data import DataSplits, EpochSampler, build_dataset, collate_batch
from crossmodal_kd.engine.checkpoint import latest_good_checkpoint, load_trainer_state, save_checkpoint
from crossmodal_kd.methods.base import Method
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.models.io import load_model, model_path, save_model, stage_dir
from crossmodal_kd.engine.fingerprint import (
    differences,
    flatten,
    mismatch_message,
    stage_fingerprints,
    started_stages,
    with_dependents,
)
from crossmodal_kd.engine.launch import warn_launch_mismatch
from crossmodal_kd.engine.metrics import classification_metrics
from crossmodal_kd.engine.preflight import check_trackers, preflight
from crossmodal_kd.engine.crossfit import fill_out_of_fold
from crossmodal_kd.engine.seeding import stage_seed
from crossmodal_kd.engine.results_archive import code_version
from crossmodal_kd.engine.stage_cache import StageCache
from crossmodal_kd.engine.targets import attach_targets, live_batches
from crossmodal_kd.engine.report import plot_curves, read_jsonl, results_table, write_jsonl
from crossmodal_kd.io import atomic_write_json, atomic_write_text
from crossmodal_kd.registry import METHODS, OPTIMIZERS, SCHEDULERS, import_plugins
from crossmodal_kd.data.augment import AugmentSet
from crossmodal_kd.data.views import ViewSet

log = logging.getLogger(__name__)
FAST_DEV_BATCHES = 2
MIN_FREE_BYTES = 200 * 2**20
TRACKER_PROJECT = "crossmodal_kd"  # the trackers' project / experiment name; runs are named by their directory


class TrainingError(RuntimeError):
    """A run cannot go on (non-finite loss, unusable output directory, ...); the message says why."""


def make_accelerator(cfg: RunConfig, run_dir: Path | None = None) -> Accelerator:
    """An Accelerator for ``cfg``. Accelerate keeps one process-wide state: runs in one process (a
    benchmark) share its device and precision, and a run asking for another precision is refused clearly.
    With ``run_dir``, the config's ``trackers`` (checked first) keep their local files in ``<run_dir>/trackers``."""
    acc = cfg.accelerator
    trackers = check_trackers(cfg.trackers) if run_dir is not None else []
    try:
        accelerator = Accelerator(
            mixed_precision=acc.mixed_precision,
            gradient_accumulation_steps=acc.gradient_accumulation_steps,
            cpu=acc.cpu,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=acc.find_unused_parameters)],
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "trackers"))
            if trackers else None,
        )
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        raise ConfigError(
            f"accelerator: this process already trained with other accelerator settings; run configs with "
            f"mixed_precision={acc.mixed_precision!r}, cpu={acc.cpu} in their own process ({' '.join(str(exc).split())})"
        ) from None
    if acc.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate would silently train in fp32 (it has no fp16 autocast/grad scaler on CPU)
        raise ConfigError(
            "accelerator.mixed_precision=fp16 needs a GPU; on CPU use bf16 (CPU autocast) or 'no'"
        )
    warn_launch_mismatch(accelerator.num_processes)
    return accelerator


def build_training(ctx: BuildContext, index: int, stage: StageConfig, total_steps: int) -> tuple[Any, Any, Any]:
    """A stage's method, optimizer and scheduler, built from its config (not yet prepared)."""
    method = METHODS.build(stage.method.name, stage.method.params, where=ctx.where, ctx=ctx)
    if ctx.config.accelerator.channels_last:
        method.to(memory_format=torch.channels_last)
        for module in method.frozen_modules().values():
            module.to(memory_format=torch.channels_last)
    params = [p for p in method.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"stage '{stage.name}': method '{stage.method.name}' has no trainable parameters")
    optimizer = OPTIMIZERS.build(stage.optimizer.name, stage.optimizer.params, where=f"stages[{index}].optimizer.params", params=params)
    scheduler = SCHEDULERS.build(
        stage.scheduler.name,
        stage.scheduler.params,
        where=f"stages[{index}].scheduler.params",
        optimizer=optimizer,
        total_steps=total_steps,
    )
    return method, optimizer, scheduler


def train_step(
    acc: Accelerator,
    method: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    batch: dict[str, torch.Tensor],
    grad_clip_norm: float | None = None,
    check: Callable[[torch.Tensor, dict[str, torch.Tensor]], None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step (forward, summed losses, backward, clip, optimizer step, the method's
    ``after_step()``, scheduler step) under gradient accumulation; ``check(loss, losses)`` runs before
    the backward pass."""
    with acc.accumulate(method):
        _, losses = method(batch)
        loss = sum(losses.values())
        if check is not None:
            check(loss, losses)
        acc.backward(loss)
        if acc.sync_gradients and grad_clip_norm:
            acc.clip_grad_norm_(method.parameters(), grad_clip_norm)
        optimizer.step()
        if acc.sync_gradients:  # the parameters changed: constraints such as renormalisation go here
            acc.unwrap_model(method).after_step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, losses


@dataclass(frozen=True)
class StageEnv:
    """What a stage trains with, handed down by the :class:`Runner`: config, run folder, accelerator, data
    and views, and the run's flags. Cross-fitting trains a fold copy of a stage in a replaced one."""

    cfg: RunConfig
    run_dir: Path
    accelerator: Accelerator
    data: DataSplits
    views: ViewSet
    fast_dev_run: bool = False
    progress: bool = True
    resume: bool = False
    stage_cache: StageCache | None = None  # finished stages shared across runs (cross-fitting's fold copies too)
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)  # every stage's, for stage_cache keys

    def loaders(self, seed: int) -> dict[str, DataLoader]:
        cfg, data = self.cfg.data, self.data
        pin = cfg.pin_memory and torch.cuda.is_available()
        common = {"collate_fn": collate_batch, "num_workers": cfg.num_workers, "pin_memory": pin}
        return {
            "train": DataLoader(data.train, batch_size=cfg.batch_size, sampler=EpochSampler(len(data.train), seed), **common),
            "val": DataLoader(data.val, batch_size=cfg.eval_batch_size, shuffle=False, **common),
            "test": DataLoader(data.test, batch_size=cfg.eval_batch_size, shuffle=False, **common),
            # a fixed training batch for methods that size or probe modules (never validation data)
            "probe": DataLoader(data.train, batch_size=min(cfg.eval_batch_size, 512), shuffle=False, **common),
        }


@dataclass
class TrainState:
    """A stage's progress, saved in every checkpoint: the last finished epoch and, per model, the best
    validation value, its epoch and the weights then (``{value, epoch, state_dict}``)."""

    epoch: int = -1
    best: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best": self.best}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "TrainState":
        return cls(epoch=int(state["epoch"]), best=dict(state["best"]))


class Runner:
    """Runs every stage of ``cfg`` in ``run_dir``. On ``resume``, stages whose fingerprint matches are
    continued (finished ones reused) and any other started stage stops the run; ``restart_stages`` (and
    the stages depending on them) are deleted and trained afresh, which implies ``resume`` for the rest."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        fast_dev_run: bool = False,
        progress: bool = True,
        restart_stages: Sequence[str] = (),
        stage_cache: str | Path | None = None,
    ) -> None:
        import_plugins(cfg.imports)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        for name in restart_stages:
            cfg.stage(name)  # ConfigError naming the stages when there is no such stage
        self.resume, self.fast_dev_run = resume or bool(restart_stages), fast_dev_run
        self.restart = with_dependents(cfg, restart_stages)
        self.stage_cache = StageCache(stage_cache) if stage_cache else None
        self.accelerator = make_accelerator(cfg, self.run_dir)
        self.progress = progress and self.accelerator.is_local_main_process
        for key in ("batch_size", "eval_batch_size"):
            value = getattr(cfg.data, key)
            if value % self.accelerator.num_processes:
                raise TrainingError(
                    f"data.{key}={value} is a global batch size and must be divisible by the "
                    f"{self.accelerator.num_processes} processes"
                )
        self.data: DataSplits | None = None
        self.dataset_identity: dict[str, Any] = {}
        self.views = ViewSet(cfg.data.views)

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        preflight(self.cfg, self.run_dir, resume=self.resume)  # every stage's config, before anything is written
        self._prepare_run_dir()
        metrics = {"stages": {}}
        with self._trackers():
            for index, stage in enumerate(self.cfg.stages):
                metrics["stages"][stage.name] = self.run_stage(index, stage)
                if self.accelerator.is_main_process:
                    atomic_write_json(self.run_dir / "metrics.json", metrics)
                    write_jsonl(self.run_dir / "log.jsonl", [r for s in self.cfg.stages for r in read_jsonl(stage_dir(self.run_dir, s.name) / "log.jsonl")])
        if self.accelerator.is_main_process:
            print(f"\nResults ({self.run_dir}):\n{results_table(metrics)}")
        self.accelerator.wait_for_everyone()
        return metrics

    @contextmanager
    def _trackers(self) -> Iterator[None]:
        """The config's trackers (main process) for the length of the run, when a stage is left to train, with
        the resolved config, flattened to scalars, as hyper-parameters; wandb offline unless WANDB_MODE is set.
        Finished at the end, also when a stage fails; not by ``end_training()``, which also destroys the process
        group that the end of the run and the next Runner of a benchmark still use."""
        acc = self.accelerator
        pending = any(not (stage_dir(self.run_dir, s.name) / "result.json").is_file() for s in self.cfg.stages)
        if acc.log_with and acc.is_main_process and pending:
            if "wandb" in self.cfg.trackers:
                os.environ.setdefault("WANDB_MODE", "offline")
            Path(acc.logging_dir).mkdir(parents=True, exist_ok=True)
            hparams = {k: v for k, v in flatten(self.cfg.model_dump(mode="json")).items() if isinstance(v, (bool, int, float, str))}
            name = str(self.run_dir)
            acc.init_trackers(TRACKER_PROJECT, config=hparams, init_kwargs={
                "wandb": {"name": name, "dir": acc.logging_dir}, "mlflow": {"run_name": name}, "trackio": {"name": name},
            })
        try:
            yield
        finally:
            for tracker in acc.trackers:
                tracker.finish()
            acc.trackers.clear()

    def evaluate_saved(self) -> dict[str, Any]:
        """Re-evaluate the saved (best-on-validation) models of every finished stage on val and test."""
        self.data = self._load_data()
        metrics = {"stages": {}}
        for index, stage in enumerate(self.cfg.stages):
            sdir = stage_dir(self.run_dir, stage.name)
            if not (sdir / "result.json").is_file():
                log.warning("stage %s has not finished; skipped", stage.name)
                continue
            set_seed(stage_seed(self.cfg.seed, stage.name))
            metrics["stages"][stage.name] = StageTrainer(self.env, index, stage, sdir).evaluate_saved()
        return metrics

    @property
    def env(self) -> StageEnv:
        """The environment every stage of this run trains in (the data must be loaded)."""
        if self.data is None:
            raise RuntimeError("Runner.env: the data is not loaded yet")
        return StageEnv(self.cfg, self.run_dir, self.accelerator, self.data, self.views,
                        self.fast_dev_run, self.progress, self.resume, self.stage_cache,
                        self.fingerprints if self.stage_cache else {})

    def _prepare_run_dir(self) -> None:
        """Check the directory is usable and holds nothing this run must not touch, load the data, check
        the started stages' fingerprints (every process, so all decide alike), and only then remove
        restarted stages and write config.yaml (so a run that fails before training blocks nothing)."""
        acc = self.accelerator
        if acc.is_main_process:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                probe = self.run_dir / ".write_probe"
                probe.write_text("ok")
                probe.unlink()
            except OSError as exc:
                raise TrainingError(f"output directory {self.run_dir} is not writable: {exc.strerror}") from None
            free = shutil.disk_usage(self.run_dir).free
            if free < MIN_FREE_BYTES:
                raise TrainingError(f"output directory {self.run_dir}: only {free / 2**20:.0f} MiB free on its disk")
        started = self._check_started_stages()
        if self.data is None:
            self.data = self._load_data()
        self._check_fingerprints(started)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.restart:
                log.warning("--restart-stage: training %s afresh (with the stages that depend on it); their directories are removed", ", ".join(self.restart))
                for name in self.restart:
                    shutil.rmtree(stage_dir(self.run_dir, name), ignore_errors=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.cfg))
            atomic_write_json(self.run_dir / "environment.json", self._environment())
        acc.wait_for_everyone()

    def _check_started_stages(self) -> list[str]:
        """The stages of ``run_dir`` that hold training state; refused without ``resume`` or when some
        belong to another config."""
        started = started_stages(self.run_dir)
        if started and not self.resume:
            raise TrainingError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --output-dir")
        names = [s.name for s in self.cfg.stages]
        foreign = [s for s in started if s not in names]
        if foreign:
            raise TrainingError(
                f"cannot resume {self.run_dir}: it holds stage(s) {', '.join(foreign)} that this config does not have "
                f"(stages: {', '.join(names)}); use a new --output-dir"
            )
        return started

    def _check_fingerprints(self, started: list[str]) -> None:
        """Refuse to continue started stages (not being restarted) whose fingerprint differs from this run's."""
        mismatched, legacy = {}, []
        for name in (s.name for s in self.cfg.stages):
            if name not in started or name in self.restart:
                continue
            path = stage_dir(self.run_dir, name) / "fingerprint.json"
            if not path.exists():
                legacy.append(name)
                continue
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise TrainingError(f"{path}: unreadable fingerprint ({exc}); use --restart-stage {name} or a new --output-dir") from None
            if diffs := differences(old, self.fingerprints[name]):
                mismatched[name] = diffs
        if mismatched:
            raise TrainingError(mismatch_message(self.run_dir, self.cfg, mismatched))
        if legacy and self.accelerator.is_main_process:
            log.warning("stage(s) %s in %s have no fingerprint.json (trained before fingerprints were recorded); "
                        "assumed to match this config", ", ".join(legacy), self.run_dir)

    def stage_identities(self) -> dict[str, dict[str, Any]]:
        """Every stage's fingerprint, loading the data first if needed (the dataset's identity is part of it)."""
        if self.data is None:
            self.data = self._load_data()
        return self.fingerprints

    @cached_property
    def fingerprints(self) -> dict[str, dict[str, Any]]:
        """Every stage's fingerprint (needs the data loaded: it includes the dataset's identity)."""
        acc, cfg = self.accelerator, self.cfg
        run = {
            "seed": cfg.seed,
            "fast_dev_run": self.fast_dev_run,
            "world_size": acc.num_processes,
            "mixed_precision": acc.mixed_precision,
            "gradient_accumulation_steps": cfg.accelerator.gradient_accumulation_steps,
        }
        return stage_fingerprints(cfg, run, self.dataset_identity)

    def _environment(self) -> dict[str, Any]:
        import accelerate

        acc = self.accelerator
        return {
            "seed": self.cfg.seed,
            "world_size": acc.num_processes,
            "device": str(acc.device),
            "mixed_precision": acc.mixed_precision,
            "global_batch_size": self.cfg.data.batch_size,
            "effective_batch_size": self.cfg.data.batch_size * self.cfg.accelerator.gradient_accumulation_steps,
            "fast_dev_run": self.fast_dev_run,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "accelerate": accelerate.__version__},
            "code": code_version(),
        }

    def _load_data(self) -> DataSplits:
        """The data splits; also records the dataset's identity (``fingerprint()``)."""
        family = build_dataset(self.cfg.data.name, self.cfg.data.root, self.cfg.data.params)
        with self.accelerator.main_process_first():
            data = family.load()
        self.dataset_identity = family.fingerprint()
        return data

    # ------------------------------------------------------------------ one stage
    def run_stage(self, index: int, stage: StageConfig) -> dict[str, Any]:
        sdir = stage_dir(self.run_dir, stage.name)
        result_file = sdir / "result.json"
        if result_file.is_file() and self.resume:
            log.info("stage %s already finished; skipping", stage.name)
            return json.loads(result_file.read_text())
        key = self.stage_cache.key(self.fingerprints[stage.name]) if self.stage_cache else None
        # a stage that started training here finishes here; a restarted one trains afresh
        if key and not (sdir / "checkpoints").exists() and stage.name not in self.restart:
            if self.stage_cache.fetch_on_main(key, sdir, self.accelerator):
                log.info("stage %s: finished copy reused from the stage cache (%s)", stage.name, self.stage_cache.root / key)
            if result_file.is_file():
                return json.loads(result_file.read_text())
        if self.accelerator.is_main_process:  # before the first epoch: what this stage's state will come from
            atomic_write_json(sdir / "fingerprint.json", self.fingerprints[stage.name])
        set_seed(stage_seed(self.cfg.seed, stage.name))
        result = StageTrainer(self.env, index, stage, sdir).train()
        if key:
            self.stage_cache.store_on_main(key, sdir, self.accelerator)
        return result


class StageTrainer:
    """Trains one stage: build the method, loop over epochs, select on validation, test once at the end."""

    def __init__(self, env: StageEnv, index: int, stage: StageConfig, sdir: Path) -> None:
        self.env, self.index, self.stage, self.dir = env, index, stage, sdir
        self.acc = env.accelerator
        self.fast = env.fast_dev_run
        self.epochs = 1 if self.fast else stage.epochs
        self.log_file = sdir / "log.jsonl"
        self.ckpt_root = sdir / "checkpoints"

    def _build(self, build_targets: bool = True) -> None:
        r, stage = self.env, self.stage
        loaders = r.loaders(stage_seed(r.cfg.seed, self.stage.name))
        ctx = BuildContext(
            config=r.cfg,
            run_dir=r.run_dir,
            input_shapes=r.views.input_shapes(r.data.input_shapes),
            num_classes=r.data.num_classes,
            sample_batch=r.views(next(iter(loaders["probe"]))),
            where=f"stages[{self.index}].method.params",
            num_train=len(r.data.train),
            class_names=list(r.data.class_names),
            train_data=r.data.train,
            views=r.views,
            fast_dev_run=self.fast,
        )
        batches = min(len(loaders["train"]), FAST_DEV_BATCHES) if self.fast else len(loaders["train"])
        self.steps_per_epoch = math.ceil(batches / r.cfg.accelerator.gradient_accumulation_steps)
        method, optimizer, scheduler = build_training(ctx, self.index, stage, self.steps_per_epoch * self.epochs)
        for module in method.frozen_modules().values():
            module.to(self.acc.device)
        self.augment = AugmentSet({m: spec.model_dump() for m, spec in stage.augment.items()}, ctx.input_shapes,
                                  where=f"stages[{self.index}].augment")
        self.calls = method.teacher_calls()
        self.targets = attach_targets(
            self.acc, self.calls, r.cfg, r.data, r.views, r.run_dir, stage=stage.name,
            enabled=stage.targets.store, augmented=bool(stage.augment), build=build_targets and not self.fast, progress=r.progress,
        )
        if stage.targets.cross_fit and build_targets:  # before prepare: the fold stages use the accelerator too
            self.targets["cross_fit"] = fill_out_of_fold(self, stage.targets.cross_fit)
            self.targets["build_s"] += self.targets["cross_fit"].get("build_s", 0.0)
        (self.method, self.optimizer, self.scheduler, self.train_loader, self.val_loader, self.test_loader) = self.acc.prepare(
            method, optimizer, scheduler, loaders["train"], loaders["val"], loaders["test"]
        )
        self.core: Any = self.acc.unwrap_model(self.method)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        self._build()
        state = TrainState()
        if self.env.resume and (ckpt := latest_good_checkpoint(self.ckpt_root)) is not None:
            self.acc.load_state(str(ckpt))
            state = TrainState.from_dict(load_trainer_state(ckpt))
            log.info("stage %s: resumed after epoch %d from %s", self.stage.name, state.epoch, ckpt)
        rows = [r for r in read_jsonl(self.log_file) if r["epoch"] <= state.epoch]
        started = time.perf_counter()
        samples = 0
        for epoch in range(state.epoch + 1, self.epochs):
            t0 = time.perf_counter()
            train_log, n = self._train_epoch(epoch)
            samples += n
            val = self.evaluate(self.val_loader, with_loss=self.stage.select.metric == "loss")
            row = {"stage": self.stage.name, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0], **train_log}
            row.update(_flatten_eval(val, "val"))
            row["time_s"] = round(time.perf_counter() - t0, 3)
            self._update_best(state, val, epoch)
            state.epoch = epoch
            rows.append(row)
            if self.acc.is_main_process:
                self.dir.mkdir(parents=True, exist_ok=True)
                write_jsonl(self.log_file, rows)
                self._track(row)
            save_checkpoint(self.acc, self.ckpt_root, epoch, state.to_dict(), self.env.cfg.accelerator.keep_checkpoints)
        train_time = time.perf_counter() - started
        return self._finish(state, rows, train_time, samples)

    def _track(self, row: dict[str, Any]) -> None:
        """The row's numbers to the run's trackers as ``<stage>/<key>``, at step = the run-global epoch (the
        epochs of the earlier stages plus this one). Cross-fitting's fold copies (another run_dir) are not tracked."""
        if not self.acc.trackers or Path(self.acc.project_dir) != self.env.run_dir:
            return
        first = sum(1 if self.fast else s.epochs for s in self.env.cfg.stages[: self.index])
        values = {f"{self.stage.name}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.acc.log(values, step=first + row["epoch"])

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], int]:
        acc, method = self.acc, self.method
        method.train()
        self.core.set_target_split("train")
        self.core.on_epoch_start(epoch)
        self.train_loader.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), device=acc.device)
        limit = FAST_DEV_BATCHES if self.fast else None
        bar = tqdm(total=limit or len(self.train_loader), desc=f"{self.stage.name} {epoch + 1}/{self.epochs}",
                   disable=None if self.env.progress else True, leave=False)  # None: off when not a TTY
        for step, batch in enumerate(self.train_loader):
            if limit is not None and step >= limit:
                break
            batch = self.augment(self.env.views(batch))
            loss, losses = train_step(
                acc, method, self.optimizer, self.scheduler, batch, self.stage.grad_clip_norm,
                check=lambda loss, losses: self._check_finite(loss, losses, epoch, step),
            )
            bs = batch["label"].shape[0]
            for k, v in {"loss": loss, **losses}.items():
                sums[k] = sums.get(k, 0) + v.detach().float() * bs
            count += bs
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        total = acc.reduce(count, "sum")
        out = {f"train/{k}": (acc.reduce(v, "sum") / total).item() for k, v in sums.items()}
        out.update(self.core.epoch_info())
        out.update(self._reduce_stats(self.core.pop_stats()))
        return out, int(total.item())

    def _check_finite(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], epoch: int, step: int) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, "sum")
        if bad.item() > 0:
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            last = latest_good_checkpoint(self.ckpt_root)
            raise TrainingError(
                f"stage '{self.stage.name}' epoch {epoch} step {step}: non-finite loss ({terms}); "
                f"stopped. Last good checkpoint: {last or 'none yet'}. Lower the learning rate or check the data."
            )

    def _reduce_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        reduced = {k: self.acc.reduce(v.to(self.acc.device), "sum") for k, v in sorted(stats.items())}
        return self.core.summarize_stats({k: v.cpu() for k, v in reduced.items()})

    # ------------------------------------------------------------------ evaluation & selection
    @torch.no_grad()
    def evaluate(self, loader: DataLoader, with_loss: bool = False) -> dict[str, Any]:
        """Every model of the method on ``loader``, and the method's mean loss when ``with_loss``."""
        core = self.core
        core.eval()
        core.set_target_split("test" if loader is self.test_loader else "val")
        loss = (lambda batch: sum(core(batch)[1].values())) if with_loss else None
        out = evaluate_predictions(self.env, loader, core.predict, loss)
        core.pop_stats()  # statistics of evaluation batches are not training statistics
        return out

    def evaluate_saved(self) -> dict[str, Any]:
        """The stage's saved models on val and test, loaded from their files (``load_model``). Only a method
        whose prediction needs more than its saved models (it overrides ``predict``: a mask is evaluated
        inside its teacher) is rebuilt, without its optimizer or target tables."""
        if METHODS.get(self.stage.method.name).predict is not Method.predict:
            self._build(build_targets=False)
            for name, module in self.core.models().items():
                module.load_state_dict(load_model(model_path(self.env.run_dir, self.stage.name, name)).state_dict())
            val, test = self.evaluate(self.val_loader), self.evaluate(self.test_loader)
        else:
            names = json.loads((self.dir / "result.json").read_text())["models"]
            models = {n: load_model(model_path(self.env.run_dir, self.stage.name, n)).eval().to(self.acc.device) for n in names}
            loaders = self.env.loaders(stage_seed(self.env.cfg.seed, self.stage.name))
            val_loader, test_loader = self.acc.prepare(loaders["val"], loaders["test"])

            def predict(batch):
                return {n: m(batch)["logits"] for n, m in models.items()}

            with torch.no_grad():
                val, test = evaluate_predictions(self.env, val_loader, predict), evaluate_predictions(self.env, test_loader, predict)
        out = {name: {"val": val["models"][name], "test": test["models"][name]} for name in val["models"]}
        self.acc.free_memory()
        return {"models": out}

    def _selection_value(self, val: dict[str, Any], model: str) -> float:
        metric = self.stage.select.metric
        return val["loss"] if metric == "loss" else val["models"][model][metric]

    def _update_best(self, state: TrainState, val: dict[str, Any], epoch: int) -> None:
        sign = -1.0 if self.stage.select.mode == "min" else 1.0
        for name, module in self.core.models().items():
            value = self._selection_value(val, name)
            best = state.best.get(name)
            if best is None or sign * value > sign * best["value"]:
                state.best[name] = {
                    "value": value,
                    "epoch": epoch,
                    "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
                }

    def _finish(self, state: TrainState, rows: list[dict[str, Any]], train_time: float, samples: int) -> dict[str, Any]:
        models = self.core.models()
        for name, best in state.best.items():
            models[name].load_state_dict(best["state_dict"])
        val = self.evaluate(self.val_loader)
        test = self.evaluate(self.test_loader)
        result = {
            "models": {
                name: {"val": val["models"][name], "test": test["models"][name], "best_epoch": state.best[name]["epoch"]}
                for name in models
            },
            "selection": {"split": "val", "metric": self.stage.select.metric},
            "parameters": self.core.parameter_counts(),
            "train_time_s": round(train_time, 2),
            "train_samples_per_s": round(samples / train_time, 1) if train_time > 0 and samples else None,
            "targets": self.targets["calls"],  # per frozen-teacher call: "served" (target store) or why it ran live
            "cross_fit": self.targets.get("cross_fit"),  # {k, grouped, stages} when targets.cross_fit is set
            "target_build_s": self.targets["build_s"],
            "teacher_live_batches": live_batches(self.core.teacher_calls()),
            "peak_memory_mb": _peak_memory_mb(self.acc.device),
            "epochs": self.epochs,
            "code": code_version(),  # the code that trained this stage (result.json travels with a stage-cache copy)
            **self.core.result_info(rows),
        }
        if self.acc.is_main_process:
            for name, module in models.items():
                save_model(module, model_path(self.env.run_dir, self.stage.name, name))
            plot_curves(rows, self.dir / "curves.png", f"{self.stage.name} ({self.stage.method.name})")
            atomic_write_json(self.dir / "result.json", result)
            shutil.rmtree(self.ckpt_root, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.free_memory()
        return result


def evaluate_predictions(
    env: StageEnv, loader: DataLoader, predict: Callable[[Any], dict[str, torch.Tensor]],
    loss: Callable[[Any], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """``{"models": {model: accuracy, macro-F1, ...}}`` of ``predict(batch) -> {model: logits}`` over
    ``loader`` (views applied, gathered across processes), with ``"loss"``, the mean of ``loss(batch)``."""
    acc = env.accelerator
    preds: dict[str, list[torch.Tensor]] = {}
    labels: list[torch.Tensor] = []
    loss_sum = torch.zeros((), device=acc.device)
    n = torch.zeros((), device=acc.device)
    for step, batch in enumerate(loader):
        if env.fast_dev_run and step >= FAST_DEV_BATCHES:
            break
        batch = env.views(batch)
        with acc.autocast():
            logits = predict(batch)
            if loss is not None:
                loss_sum += loss(batch).float() * batch["label"].shape[0]
                n += batch["label"].shape[0]
        labels.append(acc.gather_for_metrics(batch["label"]).cpu())
        for name, lg in logits.items():
            preds.setdefault(name, []).append(acc.gather_for_metrics(lg.argmax(-1)).cpu())
    y = torch.cat(labels).numpy()
    nc = env.data.num_classes
    out: dict[str, Any] = {"models": {m: classification_metrics(torch.cat(p).numpy(), y, nc) for m, p in preds.items()}}
    if loss is not None:
        out["loss"] = (acc.reduce(loss_sum, "sum") / acc.reduce(n, "sum")).item()
    return out


def _flatten_eval(ev: dict[str, Any], split: str) -> dict[str, float]:
    out = {}
    for model, m in ev["models"].items():
        out[f"{split}/{model}/accuracy"] = m["accuracy"]
        out[f"{split}/{model}/macro_f1"] = m["macro_f1"]
    if "loss" in ev:
        out[f"{split}/loss"] = ev["loss"]
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process peak RSS on Linux
