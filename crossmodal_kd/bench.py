"""Benchmarks: run configs x (sweep point x data draw x seed) x student variants, then tabulate (Markdown,
CSV, PNG, HTML) under one protocol.

A benchmark file::

    output_dir: runs/bench
    seeds: [0, 1, 2, 3, 4]
    draws: [0, 1]                   # optional: data draws, each one --set <draw_key>=<draw> (default data.params.seed)
    sweep:                          # optional: one recipe knob, e.g. the dose-response of avdigits' `shared`
      {name: shared, key: data.params.shared, values: [0.0, 0.25, 0.5, 0.75], default: 0.0}   # default: sets nothing
    reference: [student only (no KD), student only (no KD), 40 epochs]   # the no-KD student at each budget
    tuning: {seeds: [100], budget: 6}                                    # optional: per-row tuning on validation
    variants:                       # name -> --set overrides (e.g. which modality the student sees)
      image: []
      audio: [networks.student=audio_net, networks.crossmodal_teacher=image_net]
    experiments:
      - config: configs/avdigits/compare.yaml
        seeds: [0]                  # optional: this experiment's own seeds
        variant_overrides:          # optional: extra --set overrides of one variant, for this experiment only
          audio: [stages.mask_cm_1.method.params.layer=encoder.fc1.1]
        rows:                       # which (stage, model) of the run is reported, under which label
          - label: KD from T_mm
            stage: kd_mm
            model: student
            tune: {method.params.tau: [2, 4, 8], method.params.w_kd: [0.5, 1]}   # keys relative to the stage

The protocol the tables enforce:

- **Budget**: each row's *student epochs* are counted from the config (its stage's epochs plus those of the
  stages its student starts from, ``student_init``, e.g. MST-Distill's stage 1 + stage 3). A row is compared
  only with the reference row (the no-KD student) that has the same student epochs; without one, the table
  says so instead of giving a difference. Rows whose optimizer family or selection metric differ from their
  reference's are listed under the table.
- **Statistics**: n, mean ± std and the 95 % t interval of the test accuracy; the paired difference to the
  budget-matched reference over the (draw, seed) pairs both have (mean, 95 % CI, paired t-test p), and p
  adjusted by Holm's method over every such test of the table (the ``comparisons``, paired lines between
  any two rows, are a second family; two rows of different student epochs are compared budget-adjusted, each
  less its own budget-matched reference). ``*`` (outside the noise) needs both the interval to exclude 0 and the
  Holm-adjusted p below 0.05; ``nominal`` marks an interval that excludes 0 by itself, one test among many;
  ``n.s.`` (no measurable difference) otherwise.
- **Tuning on validation only**: a row's ``tune`` grid (at most ``tuning.budget`` configurations, the same
  budget for every method) is trained on the tuning seeds, as copies of the row's stage in one run per
  (variant, sweep point, tuning seed) on the first draw; the configuration with the best mean validation
  accuracy (ties: the first) is used for every benchmark run of that row. Test accuracies of tuning runs
  are never read. Rows are tuned independently: a copy's upstream stages keep their defaults.

Every run lives in ``<output_dir>/<experiment>/<variant>[/<sweep><value>][/draw<d>]/seed<k>`` and tuning runs
in ``<output_dir>/tuning/...``; an interrupted benchmark resumes (finished stages and runs are skipped).
Several bench processes may work on one benchmark at once: each claims the run it trains (:func:`_claim`).
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import logging
import os
import statistics
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from crossmodal_kd.config import (
    ConfigError, RunConfig, Strict, apply_override, folder_name, load_config, load_raw, read_dotted, validate_config,
)
from crossmodal_kd.engine.fingerprint import upstream
from crossmodal_kd.engine.html_report import write_report
from crossmodal_kd.engine.results_archive import ResultsArchive
from crossmodal_kd.engine.trainer import Runner
from crossmodal_kd.io import atomic_write_text, exclusive
from crossmodal_kd.stats import estimate, holm, paired

log = logging.getLogger(__name__)

TUNED_COPY = "{stage}__t{index}"
METRICS = ("test_accuracy", "test_macro_f1", "val_accuracy", "train_time_s", "samples_per_s", "peak_memory_mb", "gate_entropy")


class Row(Strict):
    label: str = Field(description="a label in parentheses, e.g. '(teacher) multimodal', marks a context row "
                                   "(is_context): tabulated and tested like any other, left out of the dose-response gains")
    stage: str
    model: str = "student"
    cost_stages: list[str] = Field(default_factory=list, description="earlier stages whose training time the method also pays")
    tune: dict[str, list[Any]] = Field(
        default_factory=dict, description="stage-relative --set key (method.params.tau) -> candidate values, tuned on validation"
    )

    def grid(self) -> list[dict[str, Any]]:
        """Every configuration of ``tune``, in order (the first value of every key first)."""
        keys = list(self.tune)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.tune[k] for k in keys))]


class Experiment(Strict):
    config: str
    name: str | None = Field(None, description="run folder name; default: the config's file name")
    rows: list[Row] = Field(min_length=1)
    overrides: list[str] = Field(default_factory=list)
    variant_overrides: dict[str, list[str]] = Field(
        default_factory=dict, description="variant -> --set overrides for this experiment only, applied after the variant's"
    )
    seeds: list[int] | None = Field(None, description="this experiment's seeds (default: the benchmark's)")

    @property
    def folder(self) -> str:
        return self.name or Path(self.config).stem


class Comparison(Strict):
    a: str = Field(description="row label")
    b: str = Field(description="row label it is compared with (a - b, paired by draw and seed)")


class Sweep(Strict):
    name: str = Field(description="column and folder label, e.g. shared")
    key: str = Field(description="--set key the values go to, e.g. data.params.shared")
    values: list[Any] = Field(min_length=1)
    default: Any = Field(
        None, description="the value the configs have without the override (e.g. the dataset's default): that point "
        "sets nothing, so its stages keep the fingerprints of tables that never set the key and share their stage cache"
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return folder_name(v, "sweep name")


class Tuning(Strict):
    seeds: list[int] = Field(min_length=1, description="tuning seeds (validation only); keep them apart from the benchmark's")
    budget: int = Field(6, ge=1, description="most configurations any row may try: the same budget for every method")


class BenchConfig(Strict):
    output_dir: str = "runs/bench"
    stage_cache: str | None = Field(None, description="directory of finished stages shared by benchmarks (engine/stage_cache.py)")
    archive: str | None = Field(
        None, description="committed directory of finished runs' metrics, reused while their fingerprints match (engine/results_archive.py)"
    )
    reference: list[str] = Field(
        default_factory=list, description="row label(s) of the no-KD student, one per student budget; every row is compared with the one of its budget"
    )
    comparisons: list[Comparison] = Field(default_factory=list, description="further paired comparisons between rows")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    draws: list[int] | None = Field(None, description="data draws; each run gets --set <draw_key>=<draw>")
    draw_key: str = "data.params.seed"
    sweep: Sweep | None = None
    tuning: Tuning | None = None
    variants: dict[str, list[str]] = Field(default_factory=lambda: {"default": []})
    experiments: list[Experiment] = Field(min_length=1)
    _source: str = PrivateAttr("benchmark")  # the file it was loaded from, for error messages

    @field_validator("reference", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [] if v is None else [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent(self) -> "BenchConfig":
        names = [e.folder for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError(f"experiments share a run folder name {names}; give them distinct 'name's")
        for e in self.experiments:
            unknown = sorted(set(e.variant_overrides) - set(self.variants))
            if unknown:
                raise ValueError(f"experiment '{e.config}': variant_overrides names unknown variants {unknown}; variants: {sorted(self.variants)}")
        labels = [row.label for e in self.experiments for row in e.rows]
        for label in [*self.reference, *(x for c in self.comparisons for x in (c.a, c.b))]:
            if label not in labels:
                raise ValueError(f"'{label}' is not a row label; labels: {', '.join(dict.fromkeys(labels))}")
        for e in self.experiments:
            for row in e.rows:
                if not row.tune:
                    continue
                if self.tuning is None:
                    raise ValueError(f"row '{row.label}' has 'tune' but the benchmark has no 'tuning' section (seeds, budget)")
                if (n := len(row.grid())) > self.tuning.budget:
                    raise ValueError(f"row '{row.label}': its tune grid has {n} configurations, the budget is {self.tuning.budget}")
        return self


def load_bench(path: str | Path) -> BenchConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark file not found: {path}")
    try:
        bench = BenchConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    except ValidationError as exc:
        lines = [f"{path}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid benchmark\n  " + "\n  ".join(lines)) from None
    bench._source = str(path)
    return bench


@dataclass(frozen=True)
class Cell:
    """One run of a benchmark: experiment x variant x sweep point x data draw x seed."""

    exp: Experiment
    variant: str
    point: Any
    draw: int | None
    seed: int

    def run_dir(self, bench: BenchConfig, root: Path | None = None) -> Path:
        out = (root or Path(bench.output_dir)) / self.exp.folder / self.variant
        if bench.sweep is not None:
            out /= f"{bench.sweep.name}{self.point}"
        if self.draw is not None:
            out /= f"draw{self.draw}"
        return out / f"seed{self.seed}"

    def overrides(self, bench: BenchConfig) -> list[str]:
        out = [*self.exp.overrides, *bench.variants[self.variant], *self.exp.variant_overrides.get(self.variant, [])]
        if bench.sweep is not None and not (bench.sweep.default is not None and self.point == bench.sweep.default):
            out.append(f"{bench.sweep.key}={json.dumps(self.point)}")
        if self.draw is not None:
            out.append(f"{bench.draw_key}={self.draw}")
        return [*out, f"seed={self.seed}"]


def preflight(bench: BenchConfig) -> None:
    """Before anything trains: every experiment's config loads under every variant and has every row's stage,
    and none sets a swept key to another value than the sweep's ``default``; :class:`ConfigError` otherwise."""
    for exp in bench.experiments:
        for variant in bench.variants:
            cfg = load_config(exp.config, [*exp.overrides, *bench.variants[variant], *exp.variant_overrides.get(variant, [])])
            names = {s.name for s in cfg.stages}
            for row in exp.rows:
                if row.stage not in names:
                    raise ConfigError(f"benchmark row '{row.label}': no stage '{row.stage}' in {exp.config}")
            if bench.sweep is not None and bench.sweep.default is not None:
                node = read_dotted(cfg.model_dump(mode="json"), bench.sweep.key)
                if node is not None and node != bench.sweep.default:
                    raise ConfigError(f"{exp.config}: {bench.sweep.key} is {node!r}, but the sweep's default "
                                      f"(the point that sets nothing) is {bench.sweep.default!r}")


def cells(bench: BenchConfig, draws: list[int] | None = None) -> list[Cell]:
    """Every run, seed-major, so an interrupted benchmark has whole seeds of every experiment and variant;
    ``draws``: only these of the file's data draws."""
    seeds = sorted({s for e in bench.experiments for s in (e.seeds or bench.seeds)})
    points = bench.sweep.values if bench.sweep else [None]
    if draws is not None and (unknown := sorted(set(draws) - set(bench.draws or []))):
        raise ConfigError(f"{bench._source}: no data draw {', '.join(map(str, unknown))}; draws: {bench.draws or 'none (no draws key)'}")
    return [
        Cell(e, v, p, d, s)
        for s in seeds for d in (draws or bench.draws or [None]) for p in points
        for e in bench.experiments if s in (e.seeds or bench.seeds) for v in bench.variants
    ]


def run_bench(
    bench: BenchConfig, *, fast_dev_run: bool = False, progress: bool = True, report_only: bool = False,
    draws: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the tuning and then every run of the benchmark; one record per (row, run).

    ``report_only``: train nothing, collect the runs that have finished (``metrics.json`` with every
    reported stage), e.g. to tabulate a benchmark that is still running elsewhere. ``draws``: run only these
    data draws; tuning stays on the file's first draw, so a restricted run chooses what the whole one does.
    """
    runs = cells(bench, draws)
    preflight(bench)
    chosen = tune(bench, runs, fast_dev_run=fast_dev_run, progress=progress, report_only=report_only)
    records, claimed_elsewhere = [], []
    for i, cell in enumerate(runs, 1):
        run_dir = cell.run_dir(bench)
        tuned = [chosen.get((cell.exp.folder, row.label, cell.variant, cell.point)) for row in cell.exp.rows]
        if any(row.tune and t is None for row, t in zip(cell.exp.rows, tuned)):
            continue  # report-only, tuning unfinished
        overrides = cell.overrides(bench) + [o for row, t in zip(cell.exp.rows, tuned) if t for o in _stage_overrides(row.stage, t)]
        cfg = load_config(cell.exp.config, overrides)
        if progress:
            print(f"[{i}/{len(runs)}] {cell.exp.config} variant={cell.variant} {_where(bench, cell)} -> {run_dir}", flush=True)
        try:
            metrics = _finished_run(bench, cfg, run_dir, [row.stage for row in cell.exp.rows], fast_dev_run=fast_dev_run,
                                    progress=progress, report_only=report_only, wait=False)
        except RunClaimed as exc:
            log.info("%s; going on with the next run, its result is collected at the end", exc)
            claimed_elsewhere.append((cell, cfg, tuned))
            continue
        records += [_record(bench, cell, cfg, metrics, row, t) for row, t in zip(cell.exp.rows, tuned)] if metrics else []
    for cell, cfg, tuned in claimed_elsewhere:  # wait for the other process; finish the run if it died first
        metrics = _finished_run(bench, cfg, cell.run_dir(bench), [row.stage for row in cell.exp.rows],
                                fast_dev_run=fast_dev_run, progress=progress, report_only=False)
        records += [_record(bench, cell, cfg, metrics, row, t) for row, t in zip(cell.exp.rows, tuned)]
    return records


class RunClaimed(Exception):
    """Another bench process is training this run (its directory's claim is held)."""


def _claim(run_dir: Path, wait: bool) -> AbstractContextManager[bool]:
    """The exclusive claim on a run directory, so that several bench processes on one file system share a
    benchmark's runs (each trains the runs nobody else holds). Under ``accelerate launch`` every rank trains the
    same run, so nothing is claimed there (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return nullcontext(True)
    return exclusive(run_dir.parent / f".{run_dir.name}.claim", wait=wait)


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def _where(bench: BenchConfig, cell: Cell) -> str:
    parts = [f"{bench.sweep.name}={cell.point}"] if bench.sweep else []
    parts += [f"draw={cell.draw}"] if cell.draw is not None else []
    return " ".join([*parts, f"seed={cell.seed}"])


def _record(bench: BenchConfig, cell: Cell, cfg: RunConfig, metrics: dict[str, Any], row: Row,
            tuned: dict[str, Any] | None) -> dict[str, Any]:
    stage = metrics["stages"][row.stage]  # preflight() checked the config has it
    m = stage["models"][row.model]
    train_time = sum(  # a stage's cost includes the one-time build of its teachers' target tables
        metrics["stages"][s]["train_time_s"] + metrics["stages"][s].get("target_build_s", 0.0) for s in (row.stage, *row.cost_stages)
    )
    routing = stage.get("routing") or {}
    stage_cfg = cfg.stage(row.stage)
    return {
        "method": row.label, "variant": cell.variant, "point": cell.point, "draw": cell.draw, "seed": cell.seed,
        "run": cell.run_dir(bench, Path()).as_posix(),
        "student_epochs": student_epochs(cfg, row.stage), "optimizer": stage_cfg.optimizer.name,
        "selection": stage_cfg.select.metric, "tuned": tuned, "tune_configs": len(row.grid()) if row.tune else 0,
        "gate_entropy": routing["entropy"][-1] / routing["max_entropy"] if routing.get("entropy") else None,
        # top-1 shares mean something only where a gate chooses (a uniform average has no argmax)
        "routing_shares": {t: v[-1] for t, v in routing["shares"].items()} if routing.get("shares") and routing.get("entropy") else None,
        "best_hit": routing["best_hit"][-1] if routing.get("best_hit") else None,
        "test_accuracy": m["test"]["accuracy"], "test_macro_f1": m["test"]["macro_f1"],
        "val_accuracy": m["val"]["accuracy"], "train_time_s": train_time,
        "samples_per_s": stage["train_samples_per_s"], "peak_memory_mb": stage["peak_memory_mb"],
    }


def student_epochs(cfg: RunConfig, stage: str) -> int:
    """Epochs the student of ``stage`` trains in all: the stage's own plus those of the stage it starts from
    (``student_init: {stage}``), recursively (MST-Distill: stage 1 + stage 3; FitNets: hint + KD)."""
    s = cfg.stage(stage)
    init = s.method.params.get("student_init")
    return s.epochs + (student_epochs(cfg, init["stage"]) if isinstance(init, dict) and "stage" in init else 0)


def _stage_overrides(stage: str, config: dict[str, Any]) -> list[str]:
    return [f"stages.{stage}.{key}={json.dumps(value)}" for key, value in config.items()]


def _finished_run(bench: BenchConfig, cfg: RunConfig, run_dir: Path, stages: list[str], *, fast_dev_run: bool,
                  progress: bool, report_only: bool, wait: bool = True) -> dict[str, Any] | None:
    """The metrics of the run in ``run_dir``: read from the results archive when it holds the run with the same
    fingerprints, else trained (or resumed) and archived; with ``report_only``, only what has finished (in
    ``run_dir``, then archived too, else in the archive with the same resolved config), None otherwise.
    Fast-dev-runs bypass the archive. Training holds the run's claim (:func:`_claim`): another process's
    claim is waited for, or with ``wait=False`` raises :class:`RunClaimed`."""
    archive = ResultsArchive(bench.archive) if bench.archive and not fast_dev_run else None
    name = run_dir.relative_to(bench.output_dir).as_posix()
    config = cfg.model_dump(mode="json")
    if report_only:
        if (metrics := _finished_metrics(run_dir, stages)) is not None:
            if archive is not None:
                archive.store(name, run_dir, config)
            return metrics
        metrics = archive.fetch_by_config(name, config) if archive is not None else None
        return metrics if metrics is not None and all(s in metrics["stages"] for s in stages) else None
    with _claim(run_dir, wait) as mine:
        if not mine:
            raise RunClaimed(f"run {run_dir} is claimed by another bench process")
        runner = Runner(cfg, run_dir, resume=True, fast_dev_run=fast_dev_run, progress=progress, stage_cache=bench.stage_cache)
        if archive is not None and (metrics := archive.fetch(name, runner.stage_identities())) is not None:
            if progress:
                print(f"  (archived: {archive.path(name)})", flush=True)
            return metrics
        metrics = runner.run()
        if archive is not None:
            archive.store(name, run_dir, config)
        return metrics


def _finished_metrics(run_dir: Path, stages: list[str]) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if all(s in metrics["stages"] for s in stages) else None


# ------------------------------------------------------------------------------------------------ tuning


def tune(bench: BenchConfig, runs: list[Cell], *, fast_dev_run: bool, progress: bool, report_only: bool
         ) -> dict[tuple[str, str, str, Any], dict[str, Any]]:
    """The chosen configuration of every tuned row: ``{(experiment, label, variant, sweep point): config}``;
    writes ``tuning.md`` (every configuration's mean validation accuracy)."""
    if bench.tuning is None or not any(row.tune for e in bench.experiments for row in e.rows):
        return {}
    first_draw = bench.draws[0] if bench.draws else None
    jobs = list(dict.fromkeys((c.exp.folder, c.variant, c.point) for c in runs))
    by_folder = {e.folder: e for e in bench.experiments}
    chosen, lines = {}, []
    for folder, variant, point in jobs:
        exp = by_folder[folder]
        rows = [row for row in exp.rows if row.tune]
        if not rows:
            continue
        scores: dict[tuple[str, int], list[float]] = {}
        for seed in bench.tuning.seeds:
            cell = Cell(exp, variant, point, first_draw, seed)
            run_dir = cell.run_dir(bench, Path(bench.output_dir) / "tuning")
            cfg = _tuning_config(cell.exp, cell.overrides(bench), rows)
            if progress and not report_only:
                print(f"[tuning] {exp.config} variant={variant} {_where(bench, cell)} -> {run_dir}", flush=True)
            metrics = _finished_run(bench, cfg, run_dir, [s.name for s in cfg.stages],
                                    fast_dev_run=fast_dev_run, progress=progress, report_only=report_only)
            if metrics is None:
                continue
            for row in rows:
                for i in range(len(row.grid())):
                    stage = metrics["stages"][TUNED_COPY.format(stage=row.stage, index=i)]
                    scores.setdefault((row.label, i), []).append(stage["models"][row.model]["val"]["accuracy"])
        for row in rows:
            grid = row.grid()
            means = [statistics.fmean(scores[(row.label, i)]) if (row.label, i) in scores else None for i in range(len(grid))]
            if any(m is None for m in means):
                continue
            best = max(range(len(grid)), key=lambda i: (means[i], -i))
            chosen[(folder, row.label, variant, point)] = grid[best]
            for i, (config, mean) in enumerate(zip(grid, means)):
                where = f"| {bench.sweep.name}={point} " if bench.sweep else ""
                lines.append(f"| {variant} {where}| {row.label} | {_show(config)} | {100 * mean:.2f} | {'chosen' if i == best else ''} |")
    if lines:
        sweep_col = "| " if bench.sweep else ""
        header = (f"Tuned on validation ({len(bench.tuning.seeds)} tuning seed(s) {bench.tuning.seeds}, budget "
                  f"{bench.tuning.budget} configurations per row; mean validation accuracy):\n\n"
                  f"| student {sweep_col}| method | configuration | val acc (%) | |\n|---|{'---|' if bench.sweep else ''}---|---|---:|---|")
        atomic_write_text(Path(bench.output_dir) / "tuning.md", header + "\n" + "\n".join(lines) + "\n")
    return chosen


def _tuning_config(exp: Experiment, overrides: list[str], rows: list[Row]) -> RunConfig:
    """The experiment's config cut down to what tuning ``rows`` needs: the stages their stages depend on, and
    one copy of each row's stage per configuration of its grid (``<stage>__t<i>``)."""
    raw = load_raw(exp.config, overrides)
    cfg = validate_config(raw, source=exp.config)
    keep = {u for row in rows for u in upstream(cfg, row.stage)}
    stages = [s for s in raw["stages"] if s["name"] in keep]
    for row in rows:
        original = next(s for s in raw["stages"] if s["name"] == row.stage)
        for i, config in enumerate(row.grid()):
            stage = copy.deepcopy(original)
            stage["name"] = TUNED_COPY.format(stage=row.stage, index=i)
            for key, value in config.items():
                apply_override(stage, f"{key}={json.dumps(value)}")
            stages.append(stage)
    raw["stages"] = stages
    return validate_config(raw, source=f"{exp.config} (tuning)")


def _show(config: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in config.items())


# ------------------------------------------------------------------------------------------------ tables


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, str, Any], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["variant"], r.get("point")), []).append(r)
    return groups


def _epochs(rs: list[dict[str, Any]]) -> int | None:
    values = [r.get("student_epochs") for r in rs]
    return max(set(values), key=values.count) if values else None


def summarize(records: list[dict[str, Any]], reference: list[str] | str | None = None) -> list[dict[str, Any]]:
    """Per (method, variant, sweep point), in first-seen order: n, mean and sample std, the 95 % CI of the test
    accuracy, the student epochs, and the paired test-accuracy difference to the reference row of the same
    student epochs (same variant and point, over the (draw, seed) pairs both have)."""
    references = [reference] if isinstance(reference, str) else list(reference or [])
    groups = _groups(records)
    rows = []
    for (method, variant, point), rs in groups.items():
        row: dict[str, Any] = {"method": method, "variant": variant, "point": point, "seeds": len(rs),
                               "student_epochs": _epochs(rs), "optimizer": rs[0].get("optimizer"),
                               "selection": rs[0].get("selection"), "tune_configs": rs[0].get("tune_configs", 0),
                               "tuned": rs[0].get("tuned")}
        for key in METRICS:
            est = estimate([r[key] for r in rs if r.get(key) is not None])
            row[f"{key}_mean"], row[f"{key}_std"] = est.mean, est.std if est.n > 1 else 0.0
            if key == "test_accuracy":
                row["test_accuracy_ci_low"], row["test_accuracy_ci_high"] = est.low, est.high
        if references and method not in references:
            row["reference"] = ref = _budget_reference(groups, references, method, variant, point)
            if ref is not None:
                row.update({f"vs_reference_{k}": v for k, v in compare_rows(groups, method, ref, variant, point).items()})
        rows.append(row)
    _adjust([r for r in rows if "vs_reference_p" in r], prefix="vs_reference_")
    return rows


def _budget_reference(groups: dict[tuple[str, str, Any], list[dict[str, Any]]], references: list[str], method: str,
                      variant: str, point: Any) -> str | None:
    """The first reference row with the student epochs of ``method`` (same variant and sweep point), if any."""
    epochs = _epochs(groups.get((method, variant, point), []))
    return next((ref for ref in references if (ref, variant, point) in groups and _epochs(groups[(ref, variant, point)]) == epochs), None)


def _accuracies(groups: dict[tuple[str, str, Any], list[dict[str, Any]]], method: str, variant: str, point: Any,
                minus: str | None = None) -> dict[tuple[Any, int], float]:
    """Test accuracy of ``method`` by (draw, seed); less that of row ``minus`` where given (pairs both have)."""
    acc = {(r.get("draw"), r["seed"]): r["test_accuracy"] for r in groups.get((method, variant, point), [])}
    if minus is None:
        return acc
    base = _accuracies(groups, minus, variant, point)
    return {k: v - base[k] for k, v in acc.items() if k in base}


def compare_rows(groups: dict[tuple[str, str, Any], list[dict[str, Any]]], a: str, b: str, variant: str, point: Any = None,
                 minus_a: str | None = None, minus_b: str | None = None) -> dict[str, Any]:
    """Test accuracy of row ``a`` minus row ``b`` (one variant and sweep point), paired over the (draw, seed)
    pairs both have: ``n``, ``diff``, ``ci_low``, ``ci_high``, ``p``, ``separated``; empty with fewer than two pairs.
    With ``minus_a`` / ``minus_b``, each side is first taken relative to that row (a difference of differences)."""
    xs, ys = _accuracies(groups, a, variant, point, minus_a), _accuracies(groups, b, variant, point, minus_b)
    pairs = [(x, ys[k]) for k, x in xs.items() if k in ys]
    if len(pairs) < 2:
        return {}
    cmp = paired([x for x, _ in pairs], [y for _, y in pairs])
    return {"n": cmp.diff.n, "diff": cmp.diff.mean, "ci_low": cmp.diff.low, "ci_high": cmp.diff.high,
            "p": cmp.p_value, "separated": cmp.separated}


ALPHA = 0.05  # family-wise error rate of the Holm-adjusted tests


def _adjust(tests: list[dict[str, Any]], prefix: str = "") -> None:
    """Add the Holm-adjusted p (``p_holm``), the family size (``tests``) and the verdict (``significant``:
    the CI excludes 0 and the adjusted p is below ALPHA) to each test dict of one family, in place."""
    adjusted = holm([t[f"{prefix}p"] for t in tests])
    for t, p in zip(tests, adjusted):
        t[f"{prefix}p_holm"], t[f"{prefix}tests"] = p, len(tests)
        t[f"{prefix}significant"] = bool(t[f"{prefix}separated"] and p < ALPHA)


def _verdict(separated: bool, significant: bool, short: bool = False) -> str:
    if significant:
        return "*" if short else "outside the noise"
    if separated:
        return "nominal" if short else "nominal only (not after Holm)"
    return "n.s." if short else "no measurable difference"


def _comparison(groups: dict[tuple[str, str, Any], list[dict[str, Any]]], c: Comparison, references: list[str],
                variant: str, point: Any) -> dict[str, Any]:
    """One comparison line's test. Rows of different student epochs are compared budget-adjusted, each less its
    own budget-matched reference (a raw difference would credit the longer budget to the method); without such
    references the raw difference is kept and the line says the budgets differ."""
    epochs = (_epochs(groups.get((c.a, variant, point), [])), _epochs(groups.get((c.b, variant, point), [])))
    refs = (None, None)
    if epochs[0] != epochs[1]:
        refs = (_budget_reference(groups, references, c.a, variant, point), _budget_reference(groups, references, c.b, variant, point))
    if not (d := compare_rows(groups, c.a, c.b, variant, point, *refs)):
        return {}
    label = f"{c.a} - {c.b}"
    if epochs[0] != epochs[1]:
        label += (f" (budget-adjusted: each less its no-KD student of the same epochs, {epochs[0]} / {epochs[1]})" if all(refs)
                  else f" (NOT budget-matched: {epochs[0]} vs {epochs[1]} student epochs)")
    return {**d, "where": variant if point is None else f"{variant} @ {point}", "label": label}


def comparisons_table(records: list[dict[str, Any]], comparisons: list[Comparison],
                      references: list[str] | str | None = None) -> str:
    """One line per (comparison, variant, sweep point): the paired test-accuracy difference, its CI and p-value;
    budget-adjusted where the two rows train their students for different epochs (see :func:`_comparison`)."""
    references = [references] if isinstance(references, str) else list(references or [])
    groups = _groups(records)
    cases = list(dict.fromkeys((r["variant"], r.get("point")) for r in records))
    tests = [d for c in comparisons for v, point in cases if (d := _comparison(groups, c, references, v, point))]
    if not tests:
        return "(none yet: a paired comparison needs at least two (draw, seed) pairs)"
    _adjust(tests)
    lines = [f"| student | comparison (a - b) | n | Δ test acc (pp): mean [95 % CI] | p | p (Holm, {len(tests)} tests) | |",
             "|---|---|---:|---|---:|---:|---|"]
    for d in tests:
        lines.append(f"| {d['where']} | {d['label']} | {d['n']} | {100 * d['diff']:+.2f} [{100 * d['ci_low']:+.2f}, "
                     f"{100 * d['ci_high']:+.2f}] | {d['p']:.3f} | {d['p_holm']:.3f} | {_verdict(d['separated'], d['significant'])} |")
    return "\n".join(lines)


def markdown_table(summary: list[dict[str, Any]], reference: list[str] | str | None = None, sweep: str | None = None) -> str:
    references = [reference] if isinstance(reference, str) else list(reference or [])
    vs = ("Δ test acc vs " + (references[0] if len(references) == 1 else "the no-KD student of the same budget")
          + " (pp, paired: mean [95 % CI], p)")
    gate = any(r["gate_entropy_mean"] == r["gate_entropy_mean"] for r in summary)  # some row routes (not NaN)
    lines = [
        f"| student {f'| {sweep} ' if sweep else ''}| method | student epochs | n | test acc (%) | 95 % CI | {vs} "
        "| test macro-F1 (%) | val acc (%) " + ("| gate entropy (x ln E, last epoch) " if gate else "")
        + "| train time (s, incl. teachers) | samples/s | peak mem (MB) |",
        "|---|" + ("---:|" if sweep else "") + "---|---:|---:|---:|---|---|---:|---:|" + ("---:|" if gate else "") + "---:|---:|---:|",
    ]
    for r in summary:
        pct = lambda key: f"{100 * r[key + '_mean']:.2f}" + (f" ± {100 * r[key + '_std']:.2f}" if r["seeds"] > 1 else "")
        ci = f"[{100 * r['test_accuracy_ci_low']:.2f}, {100 * r['test_accuracy_ci_high']:.2f}]" if r["seeds"] > 1 else "-"
        point = f"| {r['point']} " if sweep else ""
        epochs = r["student_epochs"] if r["student_epochs"] is not None else "-"
        entropy = "" if not gate else f"| {r['gate_entropy_mean']:.2f} " if r["gate_entropy_mean"] == r["gate_entropy_mean"] else "| - "
        lines.append(
            f"| {r['variant']} {point}| {r['method']} | {epochs} | {r['seeds']} | {pct('test_accuracy')} | {ci} "
            f"| {_versus(r, references)} | {pct('test_macro_f1')} | {pct('val_accuracy')} {entropy}"
            f"| {r['train_time_s_mean']:.1f} | {r['samples_per_s_mean']:.0f} | {r['peak_memory_mb_mean']:.0f} |"
        )
    notes = protocol_notes(summary, references)
    if tests := next((r["vs_reference_tests"] for r in summary if "vs_reference_tests" in r), 0):
        notes.insert(0, f"p: paired t-test; Holm: p adjusted over the {tests} comparisons with a reference in this table; "
                        f"* = outside the noise (95 % CI excludes 0 and Holm p < {ALPHA}), nominal = the CI alone excludes 0, "
                        "n.s. = no measurable difference")
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def _versus(r: dict[str, Any], references: list[str]) -> str:
    if references and r["method"] not in references and r.get("reference") is None:
        # a context row (a teacher) trains no student: without a reference of its epochs it is simply not compared
        return "-" if is_context(r["method"]) else f"no budget-matched reference ({r['student_epochs']} student epochs)"
    if r.get("vs_reference_n", 0) < 2:
        return "-"
    verdict = _verdict(r["vs_reference_separated"], r["vs_reference_significant"], short=True)
    versus = f" vs {r['reference']}" if len(references) > 1 else ""
    return (f"{100 * r['vs_reference_diff']:+.2f} [{100 * r['vs_reference_ci_low']:+.2f}, "
            f"{100 * r['vs_reference_ci_high']:+.2f}], p={r['vs_reference_p']:.3f} (Holm {r['vs_reference_p_holm']:.3f}) "
            f"{verdict} (n={r['vs_reference_n']}){versus}")


def protocol_notes(summary: list[dict[str, Any]], references: list[str]) -> list[str]:
    """Where a row departs from the protocol: another optimizer family or selection metric than its
    reference's, or a tuning budget other rows did not get."""
    by_key = {(r["method"], r["variant"], r["point"]): r for r in summary}
    notes = []
    for r in summary:
        ref = by_key.get((r.get("reference"), r["variant"], r["point"]))
        if ref is None:
            continue
        for key, what in (("optimizer", "optimizer"), ("selection", "selection metric")):
            if r.get(key) != ref.get(key):
                notes.append(f"{r['variant']}: '{r['method']}' uses {what} {r.get(key)}, its reference {ref.get(key)}")
    budgets = {r["tune_configs"] for r in summary}
    if len(budgets) > 1:
        untuned = sorted({r["method"] for r in summary if r["tune_configs"] == 0})
        notes.append(f"tuning configurations differ across rows ({sorted(budgets)})" + (f"; not tuned: {', '.join(untuned)}" if untuned else ""))
    return list(dict.fromkeys(notes))


def routing_table(records: list[dict[str, Any]]) -> str:
    """Rows that route: the gate's last-epoch entropy (x ln E), how often the chosen teacher was the one most
    right about the label (``best_hit``), and each teacher's share of the top-1 choices, averaged over runs."""
    lines = ["| student | method | n | gate entropy (x ln E) | best hit | top-1 share per teacher |", "|---|---|---:|---:|---:|---|"]
    for (method, variant, point), rs in _groups(records).items():
        rs = [r for r in rs if r.get("routing_shares")]
        if not rs:
            continue
        teachers = list(dict.fromkeys(t for r in rs for t in r["routing_shares"]))
        shares = ", ".join(f"{t} {statistics.fmean(r['routing_shares'].get(t, 0.0) for r in rs):.2f}" for t in teachers)
        mean = lambda key: (f"{statistics.fmean(v):.2f}" if (v := [r[key] for r in rs if r.get(key) is not None]) else "-")
        where = variant if point is None else f"{variant} @ {point}"
        lines.append(f"| {where} | {method} | {len(rs)} | {mean('gate_entropy')} | {mean('best_hit')} | {shares} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def is_context(method: str) -> bool:
    """A context row (its label in parentheses, e.g. '(teacher) multimodal'): tabulated and tested like any other
    row, but not a method, so the dose-response gain table and plot leave it out."""
    return method.startswith("(")


def _mark(r: dict[str, Any]) -> str:
    return " *" if r.get("vs_reference_significant") else " °" if r.get("vs_reference_separated") else ""


def _accuracy_cell(r: dict[str, Any] | None) -> str | None:
    if r is None:
        return None
    if r["seeds"] < 2:
        return f"{100 * r['test_accuracy_mean']:.2f} (n=1)"
    return (f"{100 * r['test_accuracy_mean']:.2f} [{100 * r['test_accuracy_ci_low']:.2f}, "
            f"{100 * r['test_accuracy_ci_high']:.2f}]" + _mark(r))


def _gain_cell(r: dict[str, Any] | None) -> str | None:
    if r is None or is_context(r["method"]) or r.get("vs_reference_n", 0) < 2:
        return None
    return (f"{100 * r['vs_reference_diff']:+.2f} [{100 * r['vs_reference_ci_low']:+.2f}, "
            f"{100 * r['vs_reference_ci_high']:+.2f}]" + _mark(r))


def dose_response_table(summary: list[dict[str, Any]], sweep: str, gain: bool = False) -> str:
    """Method rows x sweep-point columns, one block per student variant: test accuracy mean [95 % CI], or with
    ``gain`` the paired difference from the row's budget-matched no-KD student (pp, mean [95 % CI]). A row with
    no cell to show (context rows and the references, for gains) is left out. ``*``: outside the noise after
    Holm, ``°``: nominal (the CI alone excludes 0)."""
    cell_text = _gain_cell if gain else _accuracy_cell
    points = list(dict.fromkeys(r["point"] for r in summary))
    lines = [f"| student | method | " + " | ".join(f"{sweep} = {p}" for p in points) + " |",
             "|---|---|" + "---|" * len(points)]
    cell = {(r["method"], r["variant"], r["point"]): r for r in summary}
    for variant in dict.fromkeys(r["variant"] for r in summary):
        for method in dict.fromkeys(r["method"] for r in summary if r["variant"] == variant):
            values = [cell_text(cell.get((method, variant, p))) for p in points]
            if any(v is not None for v in values):
                lines.append(f"| {variant} | {method} | " + " | ".join(v or "-" for v in values) + " |")
    return "\n".join(lines)


def write_reports(bench: BenchConfig, records: list[dict[str, Any]]) -> str:
    out = Path(bench.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, bench.reference)
    sweep = bench.sweep.name if bench.sweep else None
    table = markdown_table(summary, bench.reference, sweep)
    if bench.comparisons:
        table += "\n\nPaired comparisons:\n\n" + comparisons_table(records, bench.comparisons, bench.reference)
    if routing := routing_table(records):
        table += "\n\nRouting (last epoch of the routed stage):\n\n" + routing
    if sweep:
        table += ("\n\nDose-response (test accuracy, %, mean [95 % CI]; vs the no-KD student of the same budget: * outside "
                  "the noise after Holm, ° nominal):\n\n" + dose_response_table(summary, sweep)
                  + "\n\nDose-response, gain over the no-KD student of the same budget (pp, paired over (draw, seed): "
                  "mean [95 % CI]):\n\n" + dose_response_table(summary, sweep, gain=True))
        _dose_response_plot(summary, sweep, out / "dose_response.png")
    if (out / "tuning.md").is_file():
        table += "\n\n" + (out / "tuning.md").read_text().strip()
    archive, archived = (ResultsArchive(bench.archive), sorted({r["run"] for r in records})) if bench.archive else (None, [])
    if archive is not None and (versions := archive.provenance(archived)):
        table += (f"\n\nArchived runs ({bench.archive}) by the code that trained their stages: "
                  + ", ".join(f"{v} ({_runs(n)})" for v, n in sorted(versions.items())))
        if builds := archive.data_builds(archived):
            table += ("; by the dataset build they read (byte checksums: each data draw is its own build, and the same "
                      "recipe built on another CPU differs in float rounding): "
                      + ", ".join(f"{c} ({_runs(n)})" for c, n in sorted(builds.items())))
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "records.json", json.dumps(records, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in summary for k in row)))
        writer.writeheader()
        writer.writerows(summary)
    _bar_chart(summary, out / "results.png")
    write_report(out)
    return table


@contextmanager
def _panels(summary: list[dict[str, Any]], path: Path, width: float, height: float, rows: int = 1
            ) -> Iterator[list[tuple[Any, str, list[dict[str, Any]]]]]:
    """One matplotlib column per student variant, with that variant's summary rows; saved to ``path``. With
    ``rows`` = 1 each column is one axis, else a tuple of ``rows`` axes (top first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in summary))
    fig, axes = plt.subplots(rows, len(variants), figsize=(width * len(variants), height * rows), squeeze=False)
    try:
        columns = [axes[0, i] if rows == 1 else tuple(axes[:, i]) for i in range(len(variants))]
        yield [(ax, v, [r for r in summary if r["variant"] == v]) for ax, v in zip(columns, variants)]
        fig.tight_layout()
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)


def _bar_chart(summary: list[dict[str, Any]], path: Path) -> None:
    with _panels(summary, path, 6, 3.8) as panels:
        for ax, v, rs in panels:
            labels = [r["method"] + (f" @ {r['point']}" if r["point"] is not None else "") for r in rs]
            ax.barh(labels, [100 * r["test_accuracy_mean"] for r in rs],
                    xerr=[100 * r["test_accuracy_std"] for r in rs], color="tab:blue", alpha=0.8)
            ax.invert_yaxis()
            ax.set_xlabel("test accuracy (%)")
            ax.set_title(f"student: {v}")
            ax.grid(axis="x", alpha=0.3)


def _dose_response_plot(summary: list[dict[str, Any]], sweep: str, path: Path) -> None:
    """Top row: test accuracy vs the sweep knob; bottom row: each method's paired gain over its budget-matched
    no-KD student (context rows, labelled in parentheses, left out: a teacher's gain would set the scale)."""
    with _panels(summary, path, 6, 4.2, rows=2) as panels:
        for (top, bottom), v, rs in panels:
            methods = list(dict.fromkeys(r["method"] for r in rs))
            points = sorted({float(r["point"]) for r in rs})
            spread = 0.3 * min((b - a for a, b in zip(points, points[1:])), default=1.0)
            for i, method in enumerate(methods):
                pts = [r for r in rs if r["method"] == method]
                # one colour per method in both panels; methods side by side at each point, so the bars do not overlap
                style = {"label": method, "color": f"C{i % 10}", "shift": spread * (i / max(len(methods) - 1, 1) - 0.5)}
                _errorbar(top, pts, "test_accuracy_mean", "test_accuracy_ci_low", "test_accuracy_ci_high", **style)
                if not is_context(method) and (paired := [r for r in pts if r.get("vs_reference_n", 0) >= 2]):
                    _errorbar(bottom, paired, "vs_reference_diff", "vs_reference_ci_low", "vs_reference_ci_high", **style)
            bottom.axhline(0.0, color="black", linewidth=0.8)
            for ax, what in ((top, "test accuracy (%), mean and 95 % CI"),
                             (bottom, "gain over the no-KD student of the\nsame budget (pp, paired mean, 95 % CI)")):
                ax.set_xlabel(sweep)
                ax.set_ylabel(what)
                ax.set_title(f"student: {v}")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)


def _errorbar(ax: Any, pts: list[dict[str, Any]], mean: str, low: str, high: str, label: str, color: str,
              shift: float = 0.0) -> None:
    """``pts``' ``mean`` (a fraction) against their sweep points (+ ``shift``), in percent, with [``low``, ``high``] bars."""
    m = [100 * r[mean] for r in pts]
    err = [[v - 100 * r[low] for v, r in zip(m, pts)], [100 * r[high] - v for v, r in zip(m, pts)]]
    ax.errorbar([float(r["point"]) + shift for r in pts], m, yerr=err, marker="o", capsize=3, label=label, color=color)
