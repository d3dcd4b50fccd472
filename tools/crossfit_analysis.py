"""Cross-fitted vs plain KD targets, paired over seeds, and the fold teachers' validation accuracy, from the
finished runs of configs/bench/crossfit.yaml (run from the repository root: python tools/crossfit_analysis.py)."""

from __future__ import annotations

import json
from pathlib import Path

from crossmodal_kd.stats import estimate, paired

BENCH = Path("runs/bench/crossfit")
PLAIN, CROSS_FIT = "KD from multimodal teacher", "KD from multimodal teacher (cross-fitted targets)"


def main(variant: str = "image") -> None:
    records = json.loads((BENCH / "records.json").read_text())
    acc = {(r["method"], r["seed"]): r["test_accuracy"] for r in records if r["variant"] == variant}
    seeds = sorted(s for m, s in acc if m == CROSS_FIT and (PLAIN, s) in acc)
    cmp = paired([acc[(CROSS_FIT, s)] for s in seeds], [acc[(PLAIN, s)] for s in seeds])
    verdict = "outside the noise" if cmp.separated else "no measurable difference"
    print(f"{variant}: cross-fitted - plain KD, n={cmp.diff.n}: {100 * cmp.diff.mean:+.2f} pp "
          f"[{100 * cmp.diff.low:+.2f}, {100 * cmp.diff.high:+.2f}], p={cmp.p_value:.3f} ({verdict})")
    full, folds = [], []
    for s in seeds:
        run = BENCH / "crossfit" / variant / f"seed{s}"
        full.append(json.loads((run / "stages/teacher_mm/result.json").read_text())["models"]["model"]["val"]["accuracy"])
        folds += [json.loads(p.read_text())["models"]["model"]["val"]["accuracy"]
                  for p in sorted(run.glob("crossfit/teacher_mm/fold*/stages/teacher_mm/result.json"))]
    f, g = estimate(full), estimate(folds)
    print(f"teacher val acc: full {100 * f.mean:.2f} ± {100 * f.std:.2f} (n={f.n}); "
          f"fold copies {100 * g.mean:.2f} ± {100 * g.std:.2f} (n={g.n})")


if __name__ == "__main__":
    main()
