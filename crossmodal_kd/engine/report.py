"""Run reports: per-epoch JSONL logs, PNG training curves and the results table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from crossmodal_kd.io import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a kill mid-write
                break
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """:func:`curves_figure` of ``rows`` saved as a PNG at ``path`` (nothing when there are no rows)."""
    if not rows:
        return
    fig = curves_figure(rows, title)
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def curves_figure(rows: list[dict[str, Any]], title: str) -> Figure:
    """One panel per family of logged series: train losses, validation metrics, and the rest (e.g. routing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k not in ("epoch", "time_s")})
    panels = {
        "train losses": [k for k in keys if k.startswith("train/")],
        "validation": [k for k in keys if k.startswith("val/") and not k.endswith("/n")],
        "other": [k for k in keys if not k.startswith(("train/", "val/", "lr"))],
    }
    panels = {name: ks for name, ks in panels.items() if ks}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    epochs = [r["epoch"] for r in rows]
    for ax, (name, ks) in zip(axes[0], panels.items()):
        for k in ks:
            ax.plot(epochs, [r.get(k, float("nan")) for r in rows], marker=".", label=k)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def results_table(metrics: dict[str, Any]) -> str:
    """Markdown table of val/test accuracy and macro-F1 for every stage and model of a run."""
    lines = [
        "| stage | model | val acc | val F1 | test acc | test F1 | best epoch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for stage, result in metrics.get("stages", {}).items():
        for model, m in result.get("models", {}).items():
            lines.append(
                f"| {stage} | {model} | {_pct(m['val']['accuracy'])} | {_pct(m['val']['macro_f1'])} "
                f"| {_pct(m['test']['accuracy'])} | {_pct(m['test']['macro_f1'])} | {m.get('best_epoch', '-')} |"
            )
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"
