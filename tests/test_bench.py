"""Benchmark runner: configs x seeds x variants -> mean/std tables; resumable; report-only."""

from __future__ import annotations

import csv
import statistics

import pytest
import yaml

from conftest import TEST_CONFIGS
from crossmodal_kd.bench import load_bench, run_bench, summarize, write_reports
from crossmodal_kd.config import ConfigError

pytestmark = pytest.mark.slow


def bench_file(tmp_path, **extra):
    spec = {
        "output_dir": str(tmp_path / "bench"),
        "seeds": [0, 1],
        "variants": {"image": [], "audio": ["networks.image_student=audio_net"]},
        "experiments": [{
            "config": str(TEST_CONFIGS / "synthetic_kd.yaml"),
            "rows": [
                {"label": "student only", "stage": "student_only", "model": "model"},
                {"label": "KD", "stage": "kd_mm", "model": "student", "cost_stages": ["teacher_mm"]},
            ],
        }],
        **extra,
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bench_tables_resume_and_report_only(tmp_path):
    bench = load_bench(bench_file(tmp_path))
    records = run_bench(bench, progress=False)
    assert len(records) == 2 * 2 * 2  # rows x variants x seeds
    run = tmp_path / "bench/synthetic_kd/audio/seed1"
    assert (run / "metrics.json").is_file()
    teacher = run / "stages/teacher_mm/models/model.pt"
    mtime = teacher.stat().st_mtime_ns

    table = write_reports(bench, records)
    kd_audio = [r for r in records if r["method"] == "KD" and r["variant"] == "audio"]
    mean = statistics.fmean(r["test_accuracy"] for r in kd_audio)
    std = statistics.stdev(r["test_accuracy"] for r in kd_audio)
    assert f"| audio | KD | 2 | {100 * mean:.2f} ± {100 * std:.2f} |" in table
    with open(tmp_path / "bench/results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and float(rows[0]["test_accuracy_mean"]) > 0
    assert (tmp_path / "bench/results.png").stat().st_size > 0
    # KD's time includes its teacher's
    assert kd_audio[0]["train_time_s"] > 0

    again = run_bench(bench, progress=False)  # a finished benchmark trains nothing again
    assert teacher.stat().st_mtime_ns == mtime
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in records]
    (run / "metrics.json").unlink()  # an unfinished run is left out of report-only tables
    partial = run_bench(bench, progress=False, report_only=True)
    assert len(partial) == len(records) - 2
    assert {r["seeds"] for r in summarize(partial) if r["variant"] == "audio"} == {1}


def test_bench_file_errors_name_the_key(tmp_path):
    path = bench_file(tmp_path, sedes=[0])
    with pytest.raises(ConfigError, match="sedes"):
        load_bench(path)
    bad = tmp_path / "dup.yaml"
    spec = yaml.safe_load(path.read_text())
    spec.pop("sedes")
    spec["experiments"] = spec["experiments"] * 2
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="distinct"):
        load_bench(bad)
