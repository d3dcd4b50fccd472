"""``report.html``: one self-contained page (PNG images embedded as base64, no external assets) for a run
directory or a benchmark directory.

A run's page holds the results table (every stage's models, val/test accuracy and macro-F1, from
``stages/*/result.json``) and an accuracy chart, each stage's training curves (``stages/*/log.jsonl``), the
routing shares and gate entropy of routed stages (``routing`` in result.json), ``environment.json`` and
``config.yaml``. A benchmark's page holds the tables of ``results.md`` and the chart ``results.png``, both
written by :func:`crossmodal_kd.bench.write_reports`, and a section per run, linked to the run's own report
(rewritten when older than the run's results and logs).
"""

from __future__ import annotations

import base64
import io
import json
import time
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from crossmodal_kd.engine.fingerprint import flatten
from crossmodal_kd.engine.report import curves_figure, read_jsonl, results_table
from crossmodal_kd.io import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT = "report.html"
NUM = ' class="num"'
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
nav a { margin-right: 1em; }
details { margin: 0.5em 0; }
.muted { color: #777; }
"""


def write_report(directory: str | Path) -> Path:
    """Write ``<directory>/report.html`` for a run directory (``stages/``) or a benchmark directory
    (``records.json``); return its path. A benchmark also writes its runs' reports, when missing or out of date."""
    directory = Path(directory)
    if (directory / "records.json").is_file():
        title, body = f"Benchmark {directory}", _bench_body(directory)
    elif (directory / "stages").is_dir():
        title, body = f"Run {directory}", _run_body(directory)
    else:
        raise FileNotFoundError(f"{directory}: neither a run directory (stages/) nor a benchmark directory (records.json)")
    path = directory / REPORT
    atomic_write_text(path, _page(title, body))
    return path


# ----------------------------------------------------------------------------- a run


def _run_body(run: Path) -> str:
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    methods = {s["name"]: s["method"]["name"] for s in (yaml.safe_load(config) or {}).get("stages", [])}
    present = sorted(p.name for p in (run / "stages").iterdir() if p.is_dir())
    names = [n for n in methods if n in present] + [n for n in present if n not in methods]  # config order first
    results = {n: json.loads(p.read_text()) for n in names if (p := run / "stages" / n / "result.json").is_file()}
    parts = [
        '<nav><a href="#results">results</a><a href="#curves">training curves</a>'
        + ('<a href="#routing">routing</a>' if any("routing" in r for r in results.values()) else "")
        + '<a href="#environment">environment</a><a href="#config">config</a></nav>',
        '<h2 id="results">Results</h2>',
        "<p>Every stage's models (teachers included), selected on validation; test evaluated once, at the end.</p>",
        _markdown(results_table({"stages": results})) if results else "<p>No stage has finished yet.</p>",
        _stages_table(run, names, methods, results),
    ]
    if results:
        parts.append(_img(_accuracy_figure(results), "validation and test accuracy of every stage's models"))
    parts.append('<h2 id="curves">Training curves</h2>')
    for name in names:
        rows = read_jsonl(run / "stages" / name / "log.jsonl")
        parts.append(f"<h3>{escape(name)}</h3>")
        parts.append(_img(curves_figure(rows, f"{name} ({methods.get(name, '?')})"), f"training curves of {name}")
                     if rows else '<p class="muted">no epoch logged yet</p>')
    routed = {n: r["routing"] for n, r in results.items() if r.get("routing")}
    if routed:
        parts.append('<h2 id="routing">Routing</h2>')
        for name, routing in routed.items():
            parts += [f"<h3>{escape(name)}</h3>", _img(_routing_figure(name, routing), f"routing of {name}")]
    parts.append('<h2 id="environment">Environment</h2>')
    env = run / "environment.json"
    parts.append(_key_values(flatten(json.loads(env.read_text()))) if env.is_file() else '<p class="muted">no environment.json</p>')
    parts += ['<h2 id="config">Config</h2>', f"<details><summary>config.yaml (resolved)</summary><pre>{escape(config)}</pre></details>"
              if config else '<p class="muted">no config.yaml</p>']
    return "\n".join(parts)


def _stages_table(run: Path, names: list[str], methods: dict[str, str], results: dict[str, Any]) -> str:
    rows = []
    for name in names:
        r = results.get(name)
        if r is None:
            logged = len(read_jsonl(run / "stages" / name / "log.jsonl"))
            rows.append([name, methods.get(name, "?"), "in progress", f"{logged} logged", "-", "-", "-"])
        else:
            rows.append([name, methods.get(name, "?"), "finished", str(r.get("epochs", "?")), _num(r.get("train_time_s")),
                         _num(r.get("train_samples_per_s")), _num(r.get("peak_memory_mb"))])
    head = ["stage", "method", "status", "epochs", "train time (s)", "samples/s", "peak mem (MB)"]
    return _table(head, rows, [False, False, False, True, True, True, True])


def _accuracy_figure(results: dict[str, Any]) -> Figure:
    plt = _pyplot()
    labels = [f"{s} / {m}" for s, r in results.items() for m in r["models"]]
    splits = {split: [100 * v[split]["accuracy"] for r in results.values() for v in r["models"].values()] for split in ("val", "test")}
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    y = range(len(labels))
    for i, (split, values) in enumerate(splits.items()):
        ax.barh([k + 0.4 * i - 0.2 for k in y], values, height=0.4, label=split)
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _routing_figure(name: str, routing: dict[str, Any]) -> Figure:
    """Top-1 share of each teacher per epoch; gate entropy over its maximum ln E and the best-teacher hit rate."""
    plt = _pyplot()
    gate = {k: v for k, v in (("gate entropy / ln E", [e / routing["max_entropy"] for e in routing.get("entropy", [])]),
                               ("top-1 = best teacher", routing.get("best_hit", []))) if v}
    fig, axes = plt.subplots(1, 1 + bool(gate), figsize=(5 * (1 + bool(gate)), 3.6), squeeze=False)
    for teacher, shares in routing.get("shares", {}).items():
        axes[0][0].plot(range(len(shares)), [float("nan") if s is None else s for s in shares], marker=".", label=teacher)
    for label, values in gate.items():
        axes[0][1].plot(range(len(values)), values, marker=".", label=label)
    for ax, title in zip(axes[0], ("top-1 routing share", "gate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{name}: routing")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- a benchmark


def _bench_body(bench: Path) -> str:
    records = json.loads((bench / "records.json").read_text())
    runs = sorted(p.parent for p in bench.rglob("metrics.json") if (p.parent / "stages").is_dir())
    parts = [
        '<nav><a href="#results">results</a><a href="#runs">runs</a></nav>',
        '<h2 id="results">Results</h2>',
        (f"<p>{len(records)} records (row x variant x seed); test accuracy mean ± std over seeds, its 95 % t confidence "
         "interval, and paired differences where the benchmark names a reference or comparisons.</p>"),
        _markdown((bench / "results.md").read_text()) if (bench / "results.md").is_file() else '<p class="muted">no results.md</p>',
    ]
    if (bench / "results.png").is_file():
        parts.append(_img((bench / "results.png").read_bytes(), "test accuracy per method and student"))
    parts.append(f'<h2 id="runs">Runs ({len(runs)})</h2>')
    for run in runs:
        if _stale(run):
            write_report(run)
        rel = run.relative_to(bench).as_posix()
        metrics = json.loads((run / "metrics.json").read_text())
        parts.append(f'<details><summary><a href="{escape(rel)}/{REPORT}">{escape(rel)}</a></summary>'
                     f"{_markdown(results_table(metrics))}</details>")
    return "\n".join(parts)


def _stale(run: Path) -> bool:
    """The run has no report, or one older than its metrics, results or logs."""
    report = run / REPORT
    inputs = [run / "metrics.json", *run.glob("stages/*/*.json*")]
    return not report.is_file() or report.stat().st_mtime_ns < max(p.stat().st_mtime_ns for p in inputs)


# ----------------------------------------------------------------------------- HTML pieces


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _page(title: str, body: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{escape(title)}</h1>\n"
            f'<p class="muted">written by crossmodal-kd report, {stamp}</p>\n{body}\n</body>\n</html>\n')


def _img(image: Figure | bytes, alt: str) -> str:
    """An ``<img>`` holding ``image`` (a figure, closed here, or PNG bytes) as a base64 data URI."""
    if not isinstance(image, bytes):
        buffer = io.BytesIO()
        image.savefig(buffer, format="png", dpi=90)
        _pyplot().close(image)
        image = buffer.getvalue()
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(image).decode("ascii")}">'


def _markdown(text: str) -> str:
    """Markdown tables (``| a | b |`` lines; ``---:`` right-aligns a column) as HTML tables, other lines as paragraphs."""
    out: list[str] = []
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in block]
            out.append(_table(cells[0], cells[2:], [a.endswith(":") for a in cells[1]]))
            block = []
        if line.strip():
            out.append(f"<p>{escape(line)}</p>")
    return "\n".join(out)


def _table(head: list[str], rows: list[list[str]], numeric: list[bool]) -> str:
    def cells(tag: str, values: list[str]) -> str:
        return "".join(f"<{tag}{NUM if num else ''}>{escape(v)}</{tag}>" for v, num in zip(values, numeric))

    return "<table><thead><tr>" + cells("th", head) + "</tr></thead><tbody>" + "".join(
        f"<tr>{cells('td', row)}</tr>" for row in rows) + "</tbody></table>"


def _key_values(values: dict[str, Any]) -> str:
    return _table(["key", "value"], [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in values.items()], [False, False])


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:g}"
