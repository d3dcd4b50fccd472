"""The shipped multi-stage avdigits pipelines run end to end (fast-dev-run, on synthetic data of
avdigits' shapes) for both student modalities, exactly as the benchmark files configure them."""

from __future__ import annotations

import pytest

from conftest import REPO
from crossmodal_kd.bench import load_bench
from crossmodal_kd.config import load_config
from crossmodal_kd.engine.trainer import Runner
from conftest import AVDIGITS_ON_SYNTHETIC

pytestmark = pytest.mark.slow
BENCH = load_bench(REPO / "configs/bench/avdigits.yaml")


@pytest.mark.parametrize("variant", list(BENCH.variants))
def test_compare_pipeline_for_each_student(tmp_path, variant):
    cfg = load_config(REPO / "configs/avdigits/compare.yaml", [*AVDIGITS_ON_SYNTHETIC, *BENCH.variants[variant]])
    metrics = Runner(cfg, tmp_path / variant, fast_dev_run=True, progress=False).run()
    rows = BENCH.experiments[0].rows
    assert all(r.model in metrics["stages"][r.stage]["models"] for r in rows)
    routed = metrics["stages"]["routed"]["parameters"]
    assert sorted(k for k in routed if k.startswith("mask/")) == [f"mask/mask_{t}_{i}" for t in ("cm", "mm") for i in (1, 2)]
    assert all(v < 1_000_000 for k, v in routed.items() if k.startswith("mask/"))


def test_mst_ablations_pipeline(tmp_path):
    cfg = load_config(REPO / "configs/avdigits/mst_ablations.yaml", AVDIGITS_ON_SYNTHETIC)
    metrics = Runner(cfg, tmp_path / "abl", fast_dev_run=True, progress=False).run()
    for stage in ("routed_hard", "routed_k2", "routed_uniform", "routed_no_masks", "routed_mm_only", "routed_cm_only"):
        assert "student" in metrics["stages"][stage]["models"]
    assert metrics["stages"]["routed_uniform"]["parameters"]["router"] == 0  # averaging learns nothing
