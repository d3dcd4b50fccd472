"""Benchmarks: run configs x seeds x student variants, then tabulate mean and std (Markdown, CSV, PNG).

A benchmark file::

    output_dir: runs/bench
    seeds: [0, 1, 2]
    variants:                       # name -> --set overrides (e.g. which modality the student sees)
      image: []
      audio: [networks.student=audio_net, networks.crossmodal_teacher=image_net]
    experiments:
      - config: configs/avdigits/compare.yaml
        seeds: [0]                  # optional: this experiment's own seeds
        variant_overrides:          # optional: extra --set overrides of one variant, for this experiment only
          audio: [stages.mask_cm_1.method.params.layer=encoder.fc1.1]
        rows:                       # which (stage, model) of the run is reported, under which label
          - {label: KD from T_mm, stage: kd_mm, model: student}

Rows with the same label (and variant) are pooled across experiments: two configs whose stages are
identical (stage seeds depend only on the run seed and the stage name) can share a row.

Tables give n, mean ± std and the 95 % t confidence interval of the test accuracy; with ``reference:
<row label>`` (e.g. the no-KD student), also each row's paired difference to the reference over the seeds
both have (mean, 95 % CI, paired t-test p-value), marked ``*`` when the interval excludes 0 and ``n.s.``
(no measurable difference) otherwise.

Every run lives in ``<output_dir>/<experiment>/<variant>/seed<k>``; an interrupted benchmark resumes
(finished stages and runs are skipped).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from crossmodal_kd.config import ConfigError, Strict, load_config
from crossmodal_kd.engine.html_report import write_report
from crossmodal_kd.engine.trainer import Runner
from crossmodal_kd.io import atomic_write_text
from crossmodal_kd.stats import estimate, paired


class Row(Strict):
    label: str
    stage: str
    model: str = "student"
    cost_stages: list[str] = Field(default_factory=list, description="earlier stages whose training time the method also pays")


class Experiment(Strict):
    config: str
    name: str | None = Field(None, description="run folder name; default: the config's file name")
    rows: list[Row] = Field(min_length=1)
    overrides: list[str] = Field(default_factory=list)
    variant_overrides: dict[str, list[str]] = Field(
        default_factory=dict, description="variant -> --set overrides for this experiment only, applied after the variant's"
    )
    seeds: list[int] | None = Field(None, description="this experiment's seeds (default: the benchmark's)")


class Comparison(Strict):
    a: str = Field(description="row label")
    b: str = Field(description="row label it is compared with (a - b, paired by seed)")


class BenchConfig(Strict):
    output_dir: str = "runs/bench"
    reference: str | None = Field(None, description="row label every row is compared with, paired by seed")
    comparisons: list[Comparison] = Field(default_factory=list, description="further paired comparisons between rows")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    variants: dict[str, list[str]] = Field(default_factory=lambda: {"default": []})
    experiments: list[Experiment] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_run_folders(self) -> "BenchConfig":
        names = [e.name or Path(e.config).stem for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError(f"experiments share a run folder name {names}; give them distinct 'name's")
        for e in self.experiments:
            unknown = sorted(set(e.variant_overrides) - set(self.variants))
            if unknown:
                raise ValueError(f"experiment '{e.config}': variant_overrides names unknown variants {unknown}; variants: {sorted(self.variants)}")
        labels = [row.label for e in self.experiments for row in e.rows]
        for label in [self.reference, *(x for c in self.comparisons for x in (c.a, c.b))]:
            if label is not None and label not in labels:
                raise ValueError(f"'{label}' is not a row label; labels: {', '.join(dict.fromkeys(labels))}")
        return self


def load_bench(path: str | Path) -> BenchConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark file not found: {path}")
    try:
        return BenchConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    except ValidationError as exc:
        lines = [f"{path}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid benchmark\n  " + "\n  ".join(lines)) from None


def run_bench(
    bench: BenchConfig, *, fast_dev_run: bool = False, progress: bool = True, report_only: bool = False
) -> list[dict[str, Any]]:
    """Run (or resume) every run of the benchmark; return one record per (row, variant, seed).

    ``report_only``: train nothing, collect the runs that have finished (``metrics.json`` with every
    reported stage), e.g. to tabulate a benchmark that is still running elsewhere.
    """
    out = Path(bench.output_dir)
    records = []
    # seed-major, so an interrupted benchmark has whole seeds of every experiment and variant
    seeds = sorted({s for e in bench.experiments for s in (e.seeds or bench.seeds)})
    runs = [(e, v, s) for s in seeds for e in bench.experiments if s in (e.seeds or bench.seeds) for v in bench.variants]
    for i, (exp, variant, seed) in enumerate(runs, 1):
        run_dir = out / (exp.name or Path(exp.config).stem) / variant / f"seed{seed}"
        if progress:
            print(f"[{i}/{len(runs)}] {exp.config} variant={variant} seed={seed} -> {run_dir}", flush=True)
        if report_only:
            metrics = _finished_metrics(run_dir, [row.stage for row in exp.rows])
            if metrics is None:
                continue
        else:
            overrides = [*exp.overrides, *bench.variants[variant], *exp.variant_overrides.get(variant, []), f"seed={seed}"]
            cfg = load_config(exp.config, overrides)
            metrics = Runner(cfg, run_dir, resume=True, fast_dev_run=fast_dev_run, progress=progress).run()
        for row in exp.rows:
            if row.stage not in metrics["stages"]:
                raise ConfigError(f"benchmark row '{row.label}': no stage '{row.stage}' in {exp.config}")
            stage = metrics["stages"][row.stage]
            m = stage["models"][row.model]
            train_time = sum(  # a stage's cost includes the one-time build of its teachers' target tables
                metrics["stages"][s]["train_time_s"] + metrics["stages"][s].get("target_build_s", 0.0)
                for s in (row.stage, *row.cost_stages)
            )
            routing = stage.get("routing") or {}
            records.append({
                "method": row.label, "variant": variant, "seed": seed,
                "gate_entropy": routing["entropy"][-1] / routing["max_entropy"] if routing.get("entropy") else None,
                "test_accuracy": m["test"]["accuracy"], "test_macro_f1": m["test"]["macro_f1"],
                "val_accuracy": m["val"]["accuracy"], "train_time_s": train_time,
                "samples_per_s": stage["train_samples_per_s"], "peak_memory_mb": stage["peak_memory_mb"],
            })
    return records


def _finished_metrics(run_dir: Path, stages: list[str]) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if all(s in metrics["stages"] for s in stages) else None


def summarize(records: list[dict[str, Any]], reference: str | None = None) -> list[dict[str, Any]]:
    """Per (method, variant), in first-seen order: mean and (sample) std over seeds, the 95 % CI of the test
    accuracy, and with ``reference`` the paired test-accuracy difference to that row (same variant, same seeds)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["variant"]), []).append(r)
    rows = []
    for (method, variant), rs in groups.items():
        row = {"method": method, "variant": variant, "seeds": len(rs)}
        for key in ("test_accuracy", "test_macro_f1", "val_accuracy", "train_time_s", "samples_per_s", "peak_memory_mb", "gate_entropy"):
            values = [r[key] for r in rs if r.get(key) is not None]
            row[f"{key}_mean"] = statistics.fmean(values) if values else float("nan")
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        acc = estimate([r["test_accuracy"] for r in rs])
        row["test_accuracy_ci_low"], row["test_accuracy_ci_high"] = acc.low, acc.high
        if reference is not None and method != reference:
            row.update({f"vs_reference_{k}": v for k, v in compare_rows(groups, method, reference, variant).items()})
        rows.append(row)
    return rows


def compare_rows(groups: dict[tuple[str, str], list[dict[str, Any]]], a: str, b: str, variant: str) -> dict[str, Any]:
    """Test accuracy of row ``a`` minus row ``b`` (one variant), paired over the seeds both have: ``n``, ``diff``,
    ``ci_low``, ``ci_high``, ``p``, ``separated``; empty with fewer than two pairs."""
    other = {r["seed"]: r["test_accuracy"] for r in groups.get((b, variant), [])}
    pairs = [(r["test_accuracy"], other[r["seed"]]) for r in groups.get((a, variant), []) if r["seed"] in other]
    if len(pairs) < 2:
        return {}
    cmp = paired([x for x, _ in pairs], [y for _, y in pairs])
    return {"n": cmp.diff.n, "diff": cmp.diff.mean, "ci_low": cmp.diff.low, "ci_high": cmp.diff.high,
            "p": cmp.p_value, "separated": cmp.separated}


def comparisons_table(records: list[dict[str, Any]], comparisons: list[Comparison]) -> str:
    """One line per (comparison, variant): the paired test-accuracy difference, its CI and p-value."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["variant"]), []).append(r)
    variants = list(dict.fromkeys(r["variant"] for r in records))
    lines = ["| student | comparison (a - b) | n | Δ test acc (pp): mean [95 % CI] | p | |", "|---|---|---:|---|---:|---|"]
    for c in comparisons:
        for v in variants:
            if not (d := compare_rows(groups, c.a, c.b, v)):
                continue
            verdict = "outside the noise" if d["separated"] else "no measurable difference"
            lines.append(f"| {v} | {c.a} - {c.b} | {d['n']} | {100 * d['diff']:+.2f} [{100 * d['ci_low']:+.2f}, "
                         f"{100 * d['ci_high']:+.2f}] | {d['p']:.3f} | {verdict} |")
    return "\n".join(lines)


def markdown_table(summary: list[dict[str, Any]], reference: str | None = None) -> str:
    vs = f"Δ test acc vs {reference} (pp, paired: mean [95 % CI], p)" if reference else "Δ vs reference"
    gate = any(r["gate_entropy_mean"] == r["gate_entropy_mean"] for r in summary)  # some row routes (not NaN)
    lines = [
        f"| student | method | seeds | test acc (%) | 95 % CI | {vs} | test macro-F1 (%) | val acc (%) "
        + ("| gate entropy (x ln E, last epoch) " if gate else "")
        + "| train time (s, incl. teachers) | samples/s | peak mem (MB) |",
        "|---|---|---:|---:|---|---|---:|---:|" + ("---:|" if gate else "") + "---:|---:|---:|",
    ]
    for r in summary:
        pct = lambda key: f"{100 * r[key + '_mean']:.2f}" + (f" ± {100 * r[key + '_std']:.2f}" if r["seeds"] > 1 else "")
        ci = f"[{100 * r['test_accuracy_ci_low']:.2f}, {100 * r['test_accuracy_ci_high']:.2f}]" if r["seeds"] > 1 else "-"
        lines.append(
            f"| {r['variant']} | {r['method']} | {r['seeds']} | {pct('test_accuracy')} | {ci} | {_versus(r)} "
            f"| {pct('test_macro_f1')} | {pct('val_accuracy')} "
            + (f"| {r['gate_entropy_mean']:.2f} " if gate and r["gate_entropy_mean"] == r["gate_entropy_mean"] else "| - " if gate else "")
            + f"| {r['train_time_s_mean']:.1f} | {r['samples_per_s_mean']:.0f} | {r['peak_memory_mb_mean']:.0f} |"
        )
    return "\n".join(lines)


def _versus(r: dict[str, Any]) -> str:
    if r.get("vs_reference_n", 0) < 2:
        return "-"
    verdict = "*" if r["vs_reference_separated"] else "n.s."
    return (f"{100 * r['vs_reference_diff']:+.2f} [{100 * r['vs_reference_ci_low']:+.2f}, "
            f"{100 * r['vs_reference_ci_high']:+.2f}], p={r['vs_reference_p']:.3f} {verdict} (n={r['vs_reference_n']})")


def write_reports(bench: BenchConfig, records: list[dict[str, Any]]) -> str:
    out = Path(bench.output_dir)
    summary = summarize(records, bench.reference)
    table = markdown_table(summary, bench.reference)
    if bench.comparisons:
        table += "\n\nPaired comparisons:\n\n" + comparisons_table(records, bench.comparisons)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "records.json", json.dumps(records, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in summary for k in row)))
        writer.writeheader()
        writer.writerows(summary)
    _bar_chart(summary, out / "results.png")
    write_report(out)
    return table


def _bar_chart(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in summary))
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 3.8), squeeze=False)
    for ax, v in zip(axes[0], variants):
        rs = [r for r in summary if r["variant"] == v]
        ax.barh([r["method"] for r in rs], [100 * r["test_accuracy_mean"] for r in rs],
                xerr=[100 * r["test_accuracy_std"] for r in rs], color="tab:blue", alpha=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy (%)")
        ax.set_title(f"student: {v}")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
