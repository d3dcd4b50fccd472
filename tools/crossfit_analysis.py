"""Validation accuracy of the teachers behind cross-fitted targets: each full teacher stage next to its K fold
copies (each trained without one fold), pooled over the finished runs of a cross-fitting benchmark, read from
its results archive (or its run tree). The paired cross-fitted - plain comparisons are in the benchmark's own
table (its ``comparisons:``).

    python tools/crossfit_analysis.py                         # results/crossfit and results/crossfit_mst
    python tools/crossfit_analysis.py runs/bench/crossfit     # a run tree (each run's metrics.json)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from crossmodal_kd.engine.results_archive import ResultsArchive
from crossmodal_kd.stats import estimate


def run_metrics(root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(variant, stage metrics) of every finished run under ``root``: a results archive's entries
    (``<experiment>/<variant>/[draw<d>/]seed<k>``), or a run tree's ``.../seed<k>/metrics.json``."""
    trees = [(p.relative_to(root).parent.as_posix(), json.loads(p.read_text())) for p in sorted(root.glob("**/metrics.json"))]
    return [(run.split("/")[1], metrics["stages"]) for run, metrics in trees or ResultsArchive(root).entries()]


def pooled(root: Path) -> dict[tuple[str, str, str], tuple[list[float], list[float]]]:
    """{(variant, teacher stage, model): (full teacher val accuracies, fold copies' val accuracies)}, each
    teacher stage counted once per run however many stages read its cross-fitted targets."""
    table: dict[tuple[str, str, str], tuple[list[float], list[float]]] = {}
    for variant, stages in run_metrics(root):
        folds_of = {}
        for metrics in stages.values():
            folds_of.update((metrics.get("cross_fit") or {}).get("fold_val_accuracy", {}))
        for teacher, folds in folds_of.items():
            for model, result in stages.get(teacher, {}).get("models", {}).items():
                full, copies = table.setdefault((variant, teacher, model), ([], []))
                full.append(result["val"]["accuracy"])
                copies.extend(f[model] for f in folds if model in f)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", type=Path, default=[Path("results/crossfit"), Path("results/crossfit_mst")])
    args = parser.parse_args(argv)
    lines = []
    for root in args.roots:
        for (variant, teacher, model), (full, copies) in pooled(root).items():
            f, g = estimate(full), estimate(copies)
            lines.append(f"| {root} | {variant} | {teacher} | {model} | {100 * f.mean:.2f} ± {100 * f.std:.2f} (n={f.n}) | "
                         f"{100 * g.mean:.2f} ± {100 * g.std:.2f} (n={g.n}) |")
    if not lines:
        print(f"no finished runs with cross-fitted targets under {', '.join(map(str, args.roots))}")
        return 1
    print("| runs | student | teacher stage | model | full teacher val acc (%) | fold copies val acc (%) |\n"
          "|---|---|---|---|---:|---:|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
