"""Benchmark runner: configs x seeds x variants -> mean/std tables; resumable; report-only."""

from __future__ import annotations

import csv
import os
import statistics
import threading
import time
from pathlib import Path

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
    assert f"| audio | KD | 3 | 2 | {100 * mean:.2f} ± {100 * std:.2f} |" in table  # 3 student epochs, n = 2
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


def _record(method, seed, acc, variant="image", entropy=None, epochs=20, draw=None, optimizer="adamw"):
    return {"method": method, "variant": variant, "seed": seed, "draw": draw, "test_accuracy": acc, "test_macro_f1": acc,
            "val_accuracy": acc, "train_time_s": 1.0, "samples_per_s": 1.0, "peak_memory_mb": 1.0, "gate_entropy": entropy,
            "student_epochs": epochs, "optimizer": optimizer, "selection": "accuracy", "tune_configs": 0}


def test_paired_comparisons_and_gate_entropy_column():
    from crossmodal_kd.bench import Comparison, comparisons_table, markdown_table

    records = [_record("A", s, 0.60 + 0.01 * s + 0.02, entropy=0.8) for s in range(5)]
    records += [_record("B", s, 0.60 + 0.01 * s + (0.001 if s % 2 else -0.001)) for s in range(5)]
    records += [_record("C", s, 0.60 + 0.01 * s + 0.02 + (0.03 if s % 2 else -0.03)) for s in range(5)]
    table = comparisons_table(records, [Comparison(a="A", b="B"), Comparison(a="C", b="B")])
    a_b = next(line for line in table.splitlines() if "A - B" in line)
    assert "| 5 | +2.02 [" in a_b and a_b.endswith("outside the noise |")
    c_b = next(line for line in table.splitlines() if "C - B" in line)
    assert c_b.endswith("no measurable difference |")
    assert "p (Holm, 2 tests)" in table.splitlines()[0]
    assert c_b.split(" | ")[4] == c_b.split(" | ")[5] != "1.000"  # Holm: the largest of the 2 p-values is multiplied by 1
    assert "at least two" in comparisons_table(records[:1] + records[5:6], [Comparison(a="A", b="B")])  # one seed: said, not an empty table
    rows = markdown_table(summarize(records)).splitlines()
    assert "gate entropy (x ln E, last epoch)" in rows[0]
    assert "| 0.80 |" in next(r for r in rows if "| A |" in r) and "| - |" in next(r for r in rows if "| B |" in r)



def test_comparisons_of_different_budgets_are_budget_adjusted():
    from crossmodal_kd.bench import Comparison, comparisons_table

    # the 40-epoch rows are 3 points better than the 20-epoch rows on every seed: budget, not method
    records = [_record("ref20", s, 0.60 + 0.01 * s) for s in range(5)]
    records += [_record("ref40", s, 0.63 + 0.01 * s, epochs=40) for s in range(5)]
    records += [_record("long", s, 0.63 + 0.01 * s + (0.002 if s % 2 else -0.002), epochs=40) for s in range(5)]
    records += [_record("short", s, 0.59 + 0.01 * s, epochs=20) for s in range(5)]
    line = comparisons_table(records, [Comparison(a="long", b="short")], ["ref20", "ref40"]).splitlines()[-1]
    assert "budget-adjusted" in line and "40 / 20" in line
    assert "| 5 | +0.96 [" in line  # (long - ref40) - (short - ref20) = -0.04 - (-1) pp, not the raw +3.96
    raw = comparisons_table(records, [Comparison(a="long", b="short")]).splitlines()[-1]
    assert "NOT budget-matched" in raw and "| 5 | +3.96 [" in raw

def test_variant_overrides_reach_their_variant_only(tmp_path, monkeypatch):
    import crossmodal_kd.bench as bench_module

    seen = []

    class FakeRunner:
        def __init__(self, cfg, run_dir, **kwargs):
            seen.append((run_dir.parent.name, cfg.networks["image_student"]))

        def run(self):
            stage = {"models": {m: {"test": {"accuracy": 0.5, "macro_f1": 0.5}, "val": {"accuracy": 0.5}} for m in ("model", "student")},
                     "train_time_s": 1.0, "train_samples_per_s": 1.0, "peak_memory_mb": 1.0}
            return {"stages": {"student_only": stage, "kd_mm": stage, "teacher_mm": stage}}

    monkeypatch.setattr(bench_module, "Runner", FakeRunner)
    path = bench_file(tmp_path, seeds=[0])
    seen.clear()
    spec = yaml.safe_load(path.read_text())
    spec["variants"]["audio"] = []
    spec["experiments"][0]["variant_overrides"] = {"audio": ["networks.image_student=audio_net"]}
    path.write_text(yaml.safe_dump(spec))
    run_bench(load_bench(path), progress=False)
    networks = dict(seen)
    assert set(networks) == {"image", "audio"}
    assert networks["image"] != "audio_net" and networks["audio"] == "audio_net"  # an alias only in the audio variant
    spec["experiments"][0]["variant_overrides"] = {"video": []}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"variant_overrides names unknown variants \['video'\]"):
        load_bench(path)
    spec["experiments"][0].pop("variant_overrides")
    spec["comparisons"] = [{"a": "KD", "b": "no such row"}]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="'no such row' is not a row label"):
        load_bench(path)


def test_cli_bench_variants_filter_names_unknown_ones(tmp_path, capsys):
    from crossmodal_kd.cli import main

    assert main(["bench", str(bench_file(tmp_path)), "--variants", "video", "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "bench.yaml: no variant video; variants: " in err and {"image", "audio"} <= set(err.split("variants: ")[1].strip().split(", "))
    assert main(["bench", str(bench_file(tmp_path)), "--draws", "1", "--report-only"]) == 1  # the file has no draws key
    assert "bench.yaml: no data draw 1; draws: none (no draws key)" in capsys.readouterr().err


def test_rows_are_compared_with_the_reference_of_their_student_budget():
    """A 40-epoch method is paired with the 40-epoch no-KD student, never the 20-epoch one; a budget without a
    reference is said, not computed; another optimizer family is listed under the table."""
    from crossmodal_kd.bench import markdown_table

    records = [_record("none20", s, 0.60 + 0.01 * s) for s in range(4)]
    records += [_record("none40", s, 0.62 + 0.01 * s, epochs=40) for s in range(4)]
    records += [_record("mst", s, 0.63 + 0.01 * s + (0.001 if s % 2 else -0.001), epochs=40) for s in range(4)]
    records += [_record("official", s, 0.50, epochs=101, optimizer="adam") for s in range(4)]
    records += [_record("kd", s, 0.605 + 0.01 * s, optimizer="adam") for s in range(4)]
    records += [_record("(teacher) views", s, 0.70, epochs=15) for s in range(4)]
    rows = {r["method"]: r for r in summarize(records, ["none20", "none40"])}
    assert rows["mst"]["reference"] == "none40" and abs(rows["mst"]["vs_reference_diff"] - 0.01) < 1e-9
    assert rows["kd"]["reference"] == "none20" and abs(rows["kd"]["vs_reference_diff"] - 0.005) < 1e-9
    assert rows["official"]["reference"] is None and "vs_reference_diff" not in rows["official"]
    table = markdown_table(list(rows.values()), ["none20", "none40"])
    assert "| official | 101 | 4 |" in table and "no budget-matched reference (101 student epochs)" in table
    assert "| (teacher) views | 15 | 4 | 70.00 ± 0.00 | [70.00, 70.00] | - |" in table  # a context row is not a student
    assert "| mst | 40 | 4 | 64.50 ± " in table and "vs none40" in table
    assert "- image: 'kd' uses optimizer adam, its reference adamw" in table


def test_draws_and_sweep_points_pair_by_draw_and_seed_and_plot_the_dose_response(tmp_path, monkeypatch):
    import crossmodal_kd.bench as bench_module

    seen = []

    class FakeRunner:
        def __init__(self, cfg, run_dir, **kwargs):
            self.cfg, self.run_dir = cfg, run_dir
            seen.append((run_dir.relative_to(tmp_path / "bench"), cfg.data.params, cfg.seed))

        def run(self):
            p = self.cfg.data.params
            base = 0.5 + 0.2 * p["shared"] + 0.03 * p["seed"] + 0.01 * self.cfg.seed
            stage = lambda acc: {"models": {m: {"test": {"accuracy": acc, "macro_f1": acc}, "val": {"accuracy": acc}} for m in ("model", "student")},
                                 "train_time_s": 1.0, "train_samples_per_s": 1.0, "peak_memory_mb": 1.0}
            return {"stages": {"student_only": stage(base), "kd_mm": stage(base + 0.1 * p["shared"]), "teacher_mm": stage(0.9)}}

    monkeypatch.setattr(bench_module, "Runner", FakeRunner)
    rows = [{"label": "student only", "stage": "student_only", "model": "model"},
            {"label": "KD", "stage": "kd_mm", "model": "student"},
            {"label": "(teacher) multimodal", "stage": "teacher_mm", "model": "model"}]
    bench = load_bench(bench_file(tmp_path, seeds=[0, 1], draws=[0, 1], reference="student only",
                                  sweep={"name": "shared", "key": "data.params.shared", "values": [0.0, 0.5]},
                                  variants={"image": []},
                                  experiments=[{"config": str(TEST_CONFIGS / "synthetic_kd.yaml"), "rows": rows}]))
    records = run_bench(bench, progress=False)
    assert len(seen) == 2 * 2 * 2 and len(records) == 3 * len(seen)
    assert (Path("synthetic_kd/image/shared0.5/draw1/seed0"), {"shared": 0.5, "seed": 1}, 0) in seen
    rows = {(r["method"], r["point"]): r for r in summarize(records, bench.reference)}
    kd = rows[("KD", 0.5)]
    assert kd["seeds"] == 4 and kd["vs_reference_n"] == 4 and abs(kd["vs_reference_diff"] - 0.05) < 1e-9
    assert rows[("KD", 0.0)]["vs_reference_diff"] == 0.0 and not rows[("KD", 0.0)]["vs_reference_separated"]
    table = write_reports(bench, records)
    assert "| student | shared | method |" in table.splitlines()[0]
    dose = table.split("Dose-response")[1]
    assert "| image | KD | " in dose and "shared = 0.0 | shared = 0.5" in dose
    assert "| image | (teacher) multimodal | 90.00 [" in dose.split("gain over")[0]
    gain = table.split("gain over the no-KD student of the same budget")[1]
    kd_gain = next(line for line in gain.splitlines() if line.startswith("| image | KD |"))
    assert kd_gain.split(" | ")[2].startswith("+0.00 [+0.00, +0.00]") and kd_gain.split(" | ")[3].startswith("+5.00 [")
    assert "| image | student only |" not in gain  # the reference has no gain over itself
    assert "(teacher)" not in gain  # a context row is not a method: no gain row, no gain curve
    assert (tmp_path / "bench/dose_response.png").stat().st_size > 0


def test_tuning_trains_stage_copies_on_validation_and_runs_the_benchmark_with_the_best(tmp_path, monkeypatch):
    import crossmodal_kd.bench as bench_module

    seen = {}

    class FakeRunner:
        def __init__(self, cfg, run_dir, **kwargs):
            self.cfg = cfg
            seen[run_dir.relative_to(tmp_path / "bench").as_posix()] = cfg

        def run(self):
            def stage(s):
                tau = s.method.params.get("tau", 4.0)
                val = {1.0: 0.70, 2.0: 0.80, 8.0: 0.60}.get(tau, 0.65)
                return {"models": {m: {"test": {"accuracy": 1 - val, "macro_f1": 0.5}, "val": {"accuracy": val}} for m in ("model", "student")},
                        "train_time_s": 1.0, "train_samples_per_s": 1.0, "peak_memory_mb": 1.0}
            return {"stages": {s.name: stage(s) for s in self.cfg.stages}}

    monkeypatch.setattr(bench_module, "Runner", FakeRunner)
    path = bench_file(tmp_path, seeds=[0], variants={"image": []}, tuning={"seeds": [100, 101], "budget": 3})
    spec = yaml.safe_load(path.read_text())
    spec["experiments"][0]["rows"][1]["tune"] = {"method.params.tau": [1.0, 2.0, 8.0]}
    path.write_text(yaml.safe_dump(spec))
    records = run_bench(load_bench(path), progress=False)
    tuning = seen["tuning/synthetic_kd/image/seed100"]
    assert [s.name for s in tuning.stages] == ["teacher_mm", "kd_mm__t0", "kd_mm__t1", "kd_mm__t2"]  # upstream + copies
    assert [s.method.params["tau"] for s in tuning.stages[1:]] == [1.0, 2.0, 8.0] and tuning.seed == 100
    assert "tuning/synthetic_kd/image/seed101" in seen
    assert seen["synthetic_kd/image/seed0"].stage("kd_mm").method.params["tau"] == 2.0  # best on validation
    kd = next(r for r in records if r["method"] == "KD")
    assert kd["tuned"] == {"method.params.tau": 2.0} and kd["tune_configs"] == 3
    assert next(r for r in records if r["method"] == "student only")["tune_configs"] == 0  # no grid: not tuned
    from crossmodal_kd.bench import protocol_notes
    assert any("not tuned: student only" in n for n in protocol_notes(summarize(records), []))
    text = (tmp_path / "bench/tuning.md").read_text()
    assert "| image | KD | tau=2.0 | 80.00 | chosen |" in text and "| image | KD | tau=8.0 | 60.00 |  |" in text
    spec["experiments"][0]["rows"][1]["tune"] = {"method.params.tau": [1.0, 2.0], "method.params.w_kd": [0.5, 1.0]}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="row 'KD': its tune grid has 4 configurations, the budget is 3"):
        load_bench(path)



def test_a_run_restricted_to_some_draws_still_tunes_on_the_files_first_draw(tmp_path, monkeypatch):
    import crossmodal_kd.bench as bench_module
    from crossmodal_kd.bench import cells

    seen = []

    class FakeRunner:
        def __init__(self, cfg, run_dir, **kwargs):
            self.cfg = cfg
            seen.append(run_dir.relative_to(tmp_path / "bench").as_posix())

        def run(self):
            stage = {"models": {m: {"test": {"accuracy": 0.5, "macro_f1": 0.5}, "val": {"accuracy": 0.5}} for m in ("model", "student")},
                     "train_time_s": 1.0, "train_samples_per_s": 1.0, "peak_memory_mb": 1.0}
            return {"stages": {s.name: stage for s in self.cfg.stages}}

    monkeypatch.setattr(bench_module, "Runner", FakeRunner)
    path = bench_file(tmp_path, seeds=[0], draws=[0, 1], variants={"image": []}, tuning={"seeds": [100], "budget": 2})
    spec = yaml.safe_load(path.read_text())
    spec["experiments"][0]["rows"][1]["tune"] = {"method.params.tau": [1.0, 2.0]}
    path.write_text(yaml.safe_dump(spec))
    bench = load_bench(path)
    records = run_bench(bench, progress=False, draws=[1])
    assert seen == ["tuning/synthetic_kd/image/draw0/seed100", "synthetic_kd/image/draw1/seed0"]
    assert {r["draw"] for r in records} == {1}
    with pytest.raises(ConfigError, match=r"bench.yaml: no data draw 2; draws: \[0, 1\]"):
        cells(bench, [2])

def test_routing_table_averages_the_last_epoch_shares_of_routed_rows():
    from crossmodal_kd.bench import routing_table

    records = [{**_record("MST", s, 0.6, entropy=0.5 + 0.1 * s), "best_hit": 0.4 + 0.2 * s,
                "routing_shares": {"mm": 0.6 + 0.2 * s, "cm": 0.4 - 0.2 * s}} for s in range(2)]
    records += [_record("KD", s, 0.6) for s in range(2)]
    records += [{**_record("uniform", s, 0.6), "routing_shares": {"mm": 0.5, "cm": 0.5}} for s in range(2)]  # no gate
    lines = routing_table(records).splitlines()
    assert lines[2] == "| image | MST | 2 | 0.55 | 0.50 | mm 0.70, cm 0.30 |" and len(lines) == 4
    assert lines[3] == "| image | uniform | 2 | - | - | mm 0.50, cm 0.50 |"
    assert routing_table(records[2:4]) == ""  # KD does not route


def test_results_archive_replaces_finished_runs_and_notices_a_changed_stage(tmp_path, monkeypatch):
    import json

    from crossmodal_kd.engine import trainer

    archive = tmp_path / "results"
    bench = load_bench(bench_file(tmp_path, archive=str(archive), seeds=[0]))
    bench.variants = {"image": []}
    bench.archive = None
    records = run_bench(bench, progress=False)
    bench.archive = str(archive)
    assert run_bench(bench, progress=False, report_only=True) == records  # a finished run directory is archived
    entry = json.loads((archive / "synthetic_kd/image/seed0.json").read_text())
    assert set(entry["fingerprints"]) == {"teacher_mm", "student_only", "kd_mm"} and entry["code"]
    assert entry["metrics"]["stages"]["kd_mm"]["models"]["student"]["test"]["accuracy"] == records[1]["test_accuracy"]
    # each stage names the code that trained it; a run resumed by another commit counts under both
    from crossmodal_kd.engine.results_archive import ResultsArchive, trained_by
    assert {s["code"]["code"] for s in entry["metrics"]["stages"].values()} == {entry["code"]}
    this = trained_by(entry)
    assert len(this) == 1 and ResultsArchive(archive).provenance(["synthetic_kd/image/seed0"]) == {this[0]: 1}
    resumed = json.loads(json.dumps(entry))
    resumed["metrics"]["stages"]["kd_mm"]["code"] = {"code": "0123456789ab", "commit": "abc1234"}
    del resumed["metrics"]["stages"]["teacher_mm"]["code"]  # archived before stages recorded it: the run's own
    assert trained_by(resumed) == sorted([this[0], "abc1234"])

    # a clean clone: no run directories, only the archive -> nothing trains, same numbers, provenance listed
    import shutil
    shutil.rmtree(tmp_path / "bench")
    trained = []
    real_run = trainer.Runner.run
    monkeypatch.setattr(trainer.Runner, "run", lambda self: trained.append(self.run_dir) or real_run(self))
    again = run_bench(bench, progress=False)
    assert trained == [] and [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in records]
    assert "Archived runs" in write_reports(bench, again)
    assert [r["test_accuracy"] for r in run_bench(bench, progress=False, report_only=True)] == [r["test_accuracy"] for r in records]

    # one stage's config changes: the entry is stale, the run trains again and the entry is replaced
    bench.experiments[0].overrides = ["stages.kd_mm.epochs=2"]
    assert run_bench(bench, progress=False, report_only=True) == []  # report-only never reads a stale entry
    run_bench(bench, progress=False)
    assert len(trained) == 1
    changed = json.loads((archive / "synthetic_kd/image/seed0.json").read_text())
    assert changed["fingerprints"]["kd_mm"] != entry["fingerprints"]["kd_mm"]
    assert changed["fingerprints"]["teacher_mm"] == entry["fingerprints"]["teacher_mm"]

    # fast-dev-runs neither read nor write it
    shutil.rmtree(archive)
    bench.output_dir = str(tmp_path / "fast")
    run_bench(bench, progress=False, fast_dev_run=True)
    assert not archive.exists()


def test_results_archive_skips_a_run_without_stage_fingerprints(tmp_path, caplog):
    import json

    from crossmodal_kd.engine.results_archive import ResultsArchive

    run = tmp_path / "run"
    (run / "stages/a").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"stages": {"a": {}}}))
    archive = ResultsArchive(tmp_path / "results")
    archive.store("exp/seed0", run, {"seed": 0})
    assert not archive.path("exp/seed0").exists() and "no fingerprint.json" in caplog.text
    (run / "stages/a/fingerprint.json").write_text(json.dumps({"seed": 0}))
    archive.store("exp/seed0", run, {"seed": 0})
    assert archive.fetch("exp/seed0", {"a": {"seed": 0}}) == {"stages": {"a": {}}}
    assert archive.fetch("exp/seed0", {"a": {"seed": 1}}) is None and "stale" in caplog.text
    assert archive.fetch_by_config("exp/seed0", {"seed": 0}) is not None and archive.fetch_by_config("exp/seed0", {"seed": 1}) is None


def test_results_archive_matches_the_same_recipe_built_with_other_bytes(tmp_path):
    import json

    from crossmodal_kd.engine.results_archive import ResultsArchive

    def fingerprint(checksum: str, cache: str = "v2-abc", seed: int = 0) -> dict:
        dataset = {"cache": cache, "checksum": checksum}
        return {"seed": seed, "dataset": dataset, "depends": {"teacher": {"seed": seed, "dataset": dataset, "depends": {}}}}

    run = tmp_path / "run"
    (run / "stages/kd").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"stages": {"kd": {"acc": 0.5}}}))
    (run / "stages/kd/fingerprint.json").write_text(json.dumps(fingerprint("aaaa")))
    archive = ResultsArchive(tmp_path / "results")
    archive.store("exp/seed0", run, {"seed": 0})
    assert json.loads(archive.path("exp/seed0").read_text())["data"] == ["aaaa"]
    # the same recipe built on another CPU (other float rounding): reused, and counted as another build
    assert archive.fetch("exp/seed0", {"kd": fingerprint("bbbb")}) == {"stages": {"kd": {"acc": 0.5}}}
    assert archive.data_builds(["exp/seed0"]) == {"aaaa": 1}
    # another recipe (cache name) or seed, here or upstream: stale
    assert archive.fetch("exp/seed0", {"kd": fingerprint("aaaa", cache="v2-def")}) is None
    changed_upstream = fingerprint("aaaa")
    changed_upstream["depends"]["teacher"]["seed"] = 1
    assert archive.fetch("exp/seed0", {"kd": changed_upstream}) is None


def test_sweep_default_point_sets_nothing_and_preflight_fails_before_training(tmp_path, monkeypatch):
    import crossmodal_kd.bench as bench_module

    seen = []
    monkeypatch.setattr(bench_module, "Runner", lambda cfg, run_dir, **kw: seen.append(dict(cfg.data.params)) or 1 / 0)
    sweep = {"name": "shared", "key": "data.params.shared", "values": [0.0, 0.5], "default": 0.0}
    bench = load_bench(bench_file(tmp_path, seeds=[0], draws=[0], sweep=sweep, variants={"image": []}))
    with pytest.raises(ZeroDivisionError):
        run_bench(bench, progress=False)
    assert seen == [{"seed": 0}]  # the default point: no `shared` key, as in tables that never set it
    cell = [c for c in bench_module.cells(bench) if c.point == 0.5][0]
    assert "data.params.shared=0.5" in cell.overrides(bench)

    # a config that already sets the swept key to another value, or a row naming a missing stage: one line, nothing trains
    seen.clear()
    bench.experiments[0].overrides = ["data.params.shared=0.25"]
    with pytest.raises(ConfigError, match=r"synthetic_kd.yaml: data.params.shared is 0.25, but the sweep's default .* is 0.0"):
        run_bench(bench, progress=False)
    bench.experiments[0].overrides = []
    bench.experiments[0].rows[1].stage = "kd_typo"
    with pytest.raises(ConfigError, match="benchmark row 'KD': no stage 'kd_typo' in .*synthetic_kd.yaml"):
        run_bench(bench, progress=False, report_only=True)
    assert seen == []


def test_bench_processes_share_runs_by_claiming_them(tmp_path):
    from crossmodal_kd.io import exclusive

    bench = load_bench(bench_file(tmp_path))
    held = tmp_path / "bench/synthetic_kd/image/seed0"
    claim = held.parent / ".seed0.claim"
    with exclusive(claim) as mine:  # "another process" trains image/seed0
        assert mine and claim.read_text().strip() == str(os.getpid())
        with exclusive(claim, wait=False) as other:
            assert other is False  # a second claimant is refused at once
        result: dict[str, list] = {}
        worker = threading.Thread(target=lambda: result.setdefault("records", run_bench(bench, progress=False)))
        worker.start()
        last = tmp_path / "bench/synthetic_kd/audio/seed1/metrics.json"
        deadline = time.monotonic() + 600
        while not last.is_file() and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.is_file() and worker.is_alive()  # the other runs are trained, then it waits for the claimed one
        assert not (held / "metrics.json").exists()
    worker.join(timeout=600)
    assert not worker.is_alive()
    records = result["records"]
    assert len(records) == 2 * 2 * 2 and {(r["variant"], r["seed"]) for r in records} == {(v, s) for v in ("image", "audio") for s in (0, 1)}
    assert (held / "metrics.json").stat().st_mtime_ns > last.stat().st_mtime_ns  # trained last, after the claim was released
