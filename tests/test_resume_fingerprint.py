"""``--resume`` continues only stages whose fingerprint matches: a fast-dev-run directory, other settings or
another config's run are refused with the stage and the differing keys named; ``--restart-stage`` retrains
a stage and its dependents; a run that failed before training blocks nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from conftest import read_json, tiny_config, write_yaml
from crossmodal_kd.cli import main
from crossmodal_kd.config import validate_config
from crossmodal_kd.engine.fingerprint import differences, stage_fingerprints, with_dependents

RUN = {"seed": 0, "fast_dev_run": False, "world_size": 1}


def quick_config() -> dict[str, Any]:
    """teacher -> kd (depends on teacher) and an independent baseline, one epoch each."""
    raw = tiny_config()
    for stage in raw["stages"]:
        stage["epochs"] = 1
    raw["stages"][2]["method"]["params"]["tau"] = 4.0
    return raw


def run(config: Path, out: Path, *extra: str) -> int:
    return main(["run", str(config), "--output-dir", str(out), "--no-progress", *extra])


def refused(capsys, config: Path, out: Path, *extra: str) -> str:
    """Run, expect exit 1, and return the single error line."""
    capsys.readouterr()
    assert run(config, out, *extra) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: TrainingError: ") and "\n" not in err, err
    return err


def snapshot(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_fast_dev_run_directory_is_not_resumed_as_a_real_run(tmp_path, capsys):
    config, out = write_yaml(tmp_path / "c.yaml", quick_config()), tmp_path / "run"
    assert run(config, out, "--fast-dev-run") == 0
    before = snapshot(out)
    err = refused(capsys, config, out, "--resume")
    assert "stage 'teacher': fast_dev_run: true -> false" in err
    assert "--restart-stage teacher --restart-stage baseline " in err and "new --output-dir" in err
    assert snapshot(out) == before  # environment.json still says fast_dev_run: true; metrics untouched
    assert read_json(out / "environment.json")["fast_dev_run"] is True
    assert run(config, out, "--fast-dev-run", "--resume") == 0  # the same settings resume as before


def test_other_seed_and_params_are_refused_then_restart_stage_retrains_only_dependents(tmp_path, capsys, caplog):
    config, out = write_yaml(tmp_path / "c.yaml", quick_config()), tmp_path / "run"
    assert run(config, out) == 0
    before = snapshot(out)
    err = refused(capsys, config, out, "--resume", "--set", "seed=1", "--set", "stages.kd.method.params.tau=1.0")
    assert "stage 'teacher': seed: 0 -> 1" in err
    assert "stage 'kd': seed: 0 -> 1, stage.method.params.tau: 4.0 -> 1.0, depends.teacher.seed: 0 -> 1" in err
    assert snapshot(out) == before  # config.yaml still says seed 0 / tau 4

    # only tau changed: kd alone differs; restarting it keeps the teacher and the baseline
    err = refused(capsys, config, out, "--resume", "--set", "stages.kd.method.params.tau=1.0")
    assert "stage 'kd': stage.method.params.tau: 4.0 -> 1.0" in err and "'teacher'" not in err
    kept = {s: (out / f"stages/{s}/models/model.pt").stat().st_mtime_ns for s in ("teacher", "baseline")}
    with caplog.at_level(logging.WARNING):
        assert run(config, out, "--restart-stage", "kd", "--set", "stages.kd.method.params.tau=1.0") == 0
    assert any("--restart-stage: training kd afresh" in r.getMessage() for r in caplog.records)
    assert kept == {s: (out / f"stages/{s}/models/model.pt").stat().st_mtime_ns for s in kept}
    assert read_json(out / "stages/kd/fingerprint.json")["stage"]["method"]["params"]["tau"] == 1.0
    assert yaml.safe_load((out / "config.yaml").read_text())["stages"][2]["method"]["params"]["tau"] == 1.0
    capsys.readouterr()
    assert run(config, out, "--restart-stage", "nope") == 1
    assert "no stage named 'nope'; stages: teacher, baseline, kd" in capsys.readouterr().err
    # restarting the teacher takes kd with it
    assert with_dependents(validate_config(quick_config()), ["teacher"]) == ["teacher", "kd"]


def test_another_configs_run_is_refused(tmp_path, capsys):
    crossmodal = quick_config()
    for stage in crossmodal["stages"]:
        stage["name"] += "_cm"
    crossmodal["stages"][2]["method"]["params"]["teacher"] = {"stage": "teacher_cm"}
    out = tmp_path / "run"
    assert run(write_yaml(tmp_path / "cm.yaml", crossmodal), out) == 0
    before = snapshot(out)

    err = refused(capsys, write_yaml(tmp_path / "mm.yaml", quick_config()), out, "--resume")
    assert "holds stage(s) baseline_cm, kd_cm, teacher_cm that this config does not have" in err
    # same stage names, other data and teacher network: the differing keys are named
    other = dict(crossmodal, data={**crossmodal["data"], "params": {**crossmodal["data"]["params"], "n_train": 48}})
    other["networks"] = {**crossmodal["networks"], "fusion": {**crossmodal["networks"]["fusion"], "params": {**crossmodal["networks"]["fusion"]["params"], "hidden": 16}}}
    err = refused(capsys, write_yaml(tmp_path / "other.yaml", other), out, "--resume")
    assert "stage 'teacher_cm': data.params.n_train: 64 -> 48, networks.fusion.params.hidden: 8 -> 16" in err
    assert "stage 'baseline_cm': data.params.n_train: 64 -> 48" in err
    assert snapshot(out) == before


def test_a_run_that_failed_before_training_blocks_no_plain_rerun(tmp_path, capsys):
    out = tmp_path / "run"
    bad_data = quick_config()
    bad_data["data"] = {"name": "features", "root": str(tmp_path / "nowhere"), "params": {"file": "f.npz"}}
    assert run(write_yaml(tmp_path / "bad_data.yaml", bad_data), out) == 1
    assert "nowhere" in capsys.readouterr().err
    bad_method = quick_config()
    bad_method["stages"][0]["method"]["params"]["network"] = "no_such_net"  # fails building the first stage
    assert run(write_yaml(tmp_path / "bad_method.yaml", bad_method), out) == 1
    assert "no_such_net" in capsys.readouterr().err
    assert run(write_yaml(tmp_path / "good.yaml", quick_config()), out) == 0  # no --resume needed
    assert set(read_json(out / "metrics.json")["stages"]) == {"teacher", "baseline", "kd"}


def test_stages_without_fingerprint_are_assumed_to_match_with_one_warning(tmp_path, caplog):
    raw = quick_config()
    raw["stages"] = raw["stages"][1:2]
    config, out = write_yaml(tmp_path / "c.yaml", raw), tmp_path / "run"
    assert run(config, out) == 0
    (out / "stages/baseline/fingerprint.json").unlink()  # as written before fingerprints existed
    before = snapshot(out)
    with caplog.at_level(logging.WARNING):
        assert run(config, out, "--resume", "--set", "seed=5") == 0
    warnings = [r.getMessage() for r in caplog.records if "no fingerprint.json" in r.getMessage()]
    assert len(warnings) == 1 and "baseline" in warnings[0]
    assert (out / "stages/baseline/models/model.pt").read_bytes() == before[out / "stages/baseline/models/model.pt"]


def test_a_change_upstream_changes_the_fingerprints_downstream_only():
    raw = quick_config()
    base = stage_fingerprints(validate_config(raw), RUN, {})
    raw["stages"][0]["epochs"] = 2
    changed = stage_fingerprints(validate_config(raw), RUN, {})
    assert differences(base["teacher"], changed["teacher"]) == ["stage.epochs: 1 -> 2"]
    assert differences(base["kd"], changed["kd"]) == ["depends.teacher.stage.epochs: 1 -> 2"]
    assert differences(base["baseline"], changed["baseline"]) == []
    assert set(base["kd"]["networks"]) == {"image_student"}  # only the networks the stage names
    # mask_stage references nested in lists count as dependencies too
    raw["stages"].append({"name": "routed", "method": {"name": "kd", "params": {"teachers": [{"mask_stage": "kd"}]}}})
    fps = stage_fingerprints(validate_config(raw), RUN, {"checksum": "abc"})
    assert list(fps["routed"]["depends"]) == ["kd"] and list(fps["routed"]["depends"]["kd"]["depends"]) == ["teacher"]
    assert fps["routed"]["dataset"] == {"checksum": "abc"}


def test_an_option_added_since_at_its_empty_default_is_no_difference():
    """A run trained before a stage key existed resumes under code that writes the key at its default
    (null, {} or []); a non-empty value on either side is a difference."""
    new = stage_fingerprints(validate_config(quick_config()), RUN, {})["teacher"]
    old = json.loads(json.dumps(new))
    del old["stage"]["augment"]
    assert new["stage"]["augment"] == {} and differences(old, new) == []
    new["stage"]["augment"] = {"image": {"name": "flip", "params": {}}}
    assert differences(old, new) == ["stage.augment.image.name: (absent) -> \"flip\""]
