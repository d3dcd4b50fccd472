"""Multi-process training on CPU through ``accelerate launch`` (gloo): it runs, and it matches one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ACCELERATE, REPO, TEST_CONFIGS, accelerate_launch, read_json, stable_metrics
from crossmodal_kd.engine.report import read_jsonl

pytestmark = pytest.mark.slow


def launch(num_processes: int, config: Path, out: Path, *extra: str):
    # `accelerate launch --cpu --num_processes 2` starts ONE process (its CPU launcher expects mpirun);
    # `--multi_gpu` goes through torchrun, and with ACCELERATE_USE_CPU=1 and no GPU the processes use gloo.
    mode = ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    return accelerate_launch(
        [*mode, "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
        ["tools/train.py", str(config), "--no-progress", "--output-dir", str(out), *extra],
    )


@pytest.fixture(scope="module", autouse=True)
def _needs_accelerate():
    if not ACCELERATE.exists():
        pytest.skip("accelerate launcher not installed in this environment")


def test_two_process_fast_dev_run(tmp_path):
    out = tmp_path / "run"
    launch(2, TEST_CONFIGS / "synthetic_kd.yaml", out, "--fast-dev-run")
    metrics = read_json(out / "metrics.json")
    assert list(metrics["stages"]) == ["teacher_mm", "student_only", "kd_mm"]
    assert metrics["stages"]["kd_mm"]["models"]["student"]["test"]["accuracy"] >= 0.0
    env = read_json(out / "environment.json")
    assert env["world_size"] == 2 and env["global_batch_size"] == 32
    for stage in metrics["stages"]:
        assert (out / "stages" / stage / "result.json").is_file()
        assert [r["epoch"] for r in read_jsonl(out / "stages" / stage / "log.jsonl")] == [0]


def test_two_processes_match_one_process(tmp_path):
    """Same global batch, no dropout or batch norm: DDP's averaged gradient equals the single-process one
    up to float rounding, so predictions agree; every sample is evaluated exactly once."""
    config = TEST_CONFIGS / "synthetic_mlp_ddp.yaml"
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, config, one)
    launch(2, config, two)
    m1, m2 = stable_metrics(read_json(one / "metrics.json")), stable_metrics(read_json(two / "metrics.json"))
    assert read_json(two / "environment.json")["world_size"] == 2
    for stage, model in (("teacher", "model"), ("kd", "student")):
        r1, r2 = m1["stages"][stage]["models"][model], m2["stages"][stage]["models"][model]
        # 31 samples with a global eval batch of 16 across 2 processes: padding must not be counted
        assert r1["test"]["n"] == r2["test"]["n"] == 31 and r1["val"]["n"] == r2["val"]["n"] == 31
        assert r2["test"]["accuracy"] == r1["test"]["accuracy"]
        assert r2["val"]["accuracy"] == pytest.approx(r1["val"]["accuracy"], abs=1 / 31 + 1e-9)
        assert r2["val"]["macro_f1"] == pytest.approx(r1["val"]["macro_f1"], abs=0.05)
        assert r2["best_epoch"] == r1["best_epoch"]
        rows1 = read_jsonl(one / "stages" / stage / "log.jsonl")
        rows2 = read_jsonl(two / "stages" / stage / "log.jsonl")
        assert [r["epoch"] for r in rows2] == [0, 1, 2]
        for a, b in zip(rows1, rows2):
            assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)  # same number of optimizer steps
            assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
    assert m1["stages"]["teacher"]["parameters"] == m2["stages"]["teacher"]["parameters"]


def test_two_process_fast_dev_run_of_shipped_kd_multimodal_config(tmp_path):
    """The README's command on the shipped config (data swapped for the tiny synthetic set)."""
    out = tmp_path / "run"
    launch(2, REPO / "configs/avdigits/kd_multimodal.yaml", out, "--fast-dev-run",
           "--set", "data.name=synthetic", "--set", "data.eval_batch_size=64")
    metrics = read_json(out / "metrics.json")
    assert list(metrics["stages"]) == ["teacher_mm", "kd_mm"]
    assert read_json(out / "environment.json")["world_size"] == 2
    assert (out / "stages/kd_mm/models/student.pt").is_file()
