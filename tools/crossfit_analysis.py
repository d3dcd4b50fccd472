"""Validation accuracy of the teachers behind cross-fitted targets: each model of the full teacher stage next to
its K fold copies (each trained without one fold), from the finished runs of a cross-fitting benchmark. The
paired cross-fitted - plain comparisons are in the benchmark's own table (its ``comparisons:``).

    python tools/crossfit_analysis.py                                   # configs/bench/crossfit.yaml: teacher_mm
    python tools/crossfit_analysis.py runs/bench/crossfit_mst collab    # configs/bench/crossfit_mst.yaml: stage 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crossmodal_kd.stats import estimate


def val_accuracies(result: Path) -> dict[str, float]:
    return {m: r["val"]["accuracy"] for m, r in json.loads(result.read_text())["models"].items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_dir", nargs="?", default="runs/bench/crossfit", type=Path)
    parser.add_argument("stage", nargs="?", default="teacher_mm", help="the cross-fitted teacher stage")
    args = parser.parse_args(argv)
    runs = sorted(p.parents[1] for p in args.bench_dir.glob(f"**/seed*/crossfit/{args.stage}"))
    if not runs:
        print(f"no finished cross-fitted runs of stage '{args.stage}' under {args.bench_dir}")
        return 1
    by_variant: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for run in runs:
        variant = run.relative_to(args.bench_dir).parts[1]  # <experiment>/<variant>/[draw<d>/]seed<k>
        full = val_accuracies(run / "stages" / args.stage / "result.json")
        folds = [val_accuracies(p) for p in sorted(run.glob(f"crossfit/{args.stage}/fold*/stages/{args.stage}/result.json"))]
        for model, acc in full.items():
            pooled = by_variant.setdefault(variant, {}).setdefault(model, ([], []))
            pooled[0].append(acc)
            pooled[1].extend(f[model] for f in folds if model in f)
    print("| student | model | full teacher val acc (%) | fold copies val acc (%) |\n|---|---|---:|---:|")
    for variant, models in by_variant.items():
        for model, (full, folds) in models.items():
            f, g = estimate(full), estimate(folds)
            print(f"| {variant} | {model} | {100 * f.mean:.2f} ± {100 * f.std:.2f} (n={f.n}) | "
                  f"{100 * g.mean:.2f} ± {100 * g.std:.2f} (n={g.n}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
