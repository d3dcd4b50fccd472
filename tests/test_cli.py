"""``crossmodal-kd``: list, run (incl. --fast-dev-run, --set, --resume), eval, data check, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, one_stage_config, read_json, tiny_config, write_yaml
from crossmodal_kd.cli import main
from crossmodal_kd.engine.report import read_jsonl
from test_data import write_avmnist

CLI = [sys.executable, "-m", "crossmodal_kd.cli"]


def test_list_prints_every_registry(capsys):
    assert main(["list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert set(listed) == {"datasets", "encoders", "networks", "methods", "routers", "masks", "optimizers", "schedulers", "views", "clip_backends", "augmentations"}
    assert {"synthetic", "avmnist"} <= set(listed["datasets"])
    assert {"supervised", "kd"} <= set(listed["methods"])
    assert {"small_cnn", "lenet5", "mlp"} <= set(listed["encoders"])
    assert {"cosine", "constant"} <= set(listed["schedulers"])
    assert listed["methods"] == sorted(listed["methods"])


def test_run_fast_dev_run_with_overrides(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config())
    out = tmp_path / "run"
    argv = ["run", str(cfg), "--fast-dev-run", "--no-progress", "--output-dir", str(out), "--set", "stages.1.epochs=5", "--set", "seed=3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"Results ({out})" in printed and "| kd | student |" in printed
    metrics = read_json(out / "metrics.json")
    assert list(metrics["stages"]) == ["teacher", "baseline", "kd"]
    assert all(r["epochs"] == 1 for r in metrics["stages"].values())  # --fast-dev-run: one epoch per stage
    assert [r["epoch"] for r in read_jsonl(out / "stages" / "baseline" / "log.jsonl")] == [0]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["seed"] == 3 and saved["stages"][1]["epochs"] == 5  # the resolved config, overrides applied
    env = read_json(out / "environment.json")
    assert env["fast_dev_run"] is True and env["seed"] == 3
    # a second run into the same directory is refused with one line; --resume skips the finished stages
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: TrainingError: ") and "pass --resume" in err
    assert main([*argv, "--resume"]) == 0


def test_output_dir_defaults_to_the_config_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = one_stage_config()
    raw["output_dir"] = "somewhere/run1"
    cfg = write_yaml(tmp_path / "c.yaml", raw)
    assert main(["run", str(cfg), "--fast-dev-run", "--no-progress"]) == 0
    assert (tmp_path / "somewhere" / "run1" / "metrics.json").is_file()
    del raw["output_dir"]
    cfg = write_yaml(tmp_path / "named.yaml", raw)
    assert main(["run", str(cfg), "--fast-dev-run", "--no-progress"]) == 0
    assert (tmp_path / "runs" / "named" / "metrics.json").is_file()


def test_bad_config_is_one_error_line_without_traceback(tmp_path):
    raw = one_stage_config()
    raw["stages"][0]["method"]["nme"] = "x"
    cfg = write_yaml(tmp_path / "bad.yaml", raw)
    proc = subprocess.run([*CLI, "run", str(cfg), "--output-dir", str(tmp_path / "r")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ConfigError: invalid config")
    assert f"{cfg}: stages.0.method.nme: Extra inputs are not permitted" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "{tmp}/absent.yaml"], "error: ConfigError: config file not found: {tmp}/absent.yaml"),
        (["run", "{cfg}", "--set", "stages.7.epochs=1"], "error: ConfigError: --set: 'stages.7': list index '7' out of range"),
        (["run", "{cfg}", "--set", "data.name=nope"], "error: RegistryError: unknown dataset 'nope'; valid: "),
        (["run", "{cfg}", "--set", "stages.0.method.params.netwrk=x"], "unknown parameter(s) netwrk"),
    ],
)
def test_user_errors_print_one_line_and_exit_1(tmp_path, capsys, argv, needle):
    cfg = write_yaml(tmp_path / "c.yaml", one_stage_config())
    argv = [a.format(tmp=tmp_path, cfg=cfg) for a in argv] + ["--no-progress", "--output-dir", str(tmp_path / "r")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert needle.format(tmp=tmp_path) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="config file not found"):
        main(["-v", "run", str(tmp_path / "absent.yaml")])


def test_eval_reprints_the_metrics_of_a_run(tmp_path, capsys):
    raw = one_stage_config(epochs=2)
    cfg = write_yaml(tmp_path / "c.yaml", raw)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--no-progress", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "config.yaml"}
    assert main(["eval", str(out)]) == 0
    table = capsys.readouterr().out
    m = read_json(out / "metrics.json")["stages"]["baseline"]["models"]["model"]
    row = next(line for line in table.splitlines() if line.startswith("| baseline | model |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:6] == [f"{100 * m[s][k]:.2f}" for s in ("val", "test") for k in ("accuracy", "macro_f1")]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "config.yaml"} == before


def test_eval_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 1
    assert "config file not found" in capsys.readouterr().err


def test_data_check_reports_missing_files_with_their_path(tmp_path, capsys):
    assert main(["data", "check", "avmnist", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'avmnist' / 'image' / 'train_data.npy'}: file not found" in out
    assert f"{tmp_path / 'avmnist' / 'image' / 'test_data.npy'}: file not found" in out
    assert out.strip().endswith("avmnist: 6 problem(s)")  # all six files, not the first of each split

    write_avmnist(tmp_path)
    assert main(["data", "check", "avmnist", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "avmnist: OK"
    (tmp_path / "avmnist" / "test_labels.npy").unlink()
    assert main(["data", "check", "avmnist", "--root", str(tmp_path), "--set", "val_fraction=0.2"]) == 1
    assert f"{tmp_path / 'avmnist' / 'test_labels.npy'}: file not found" in capsys.readouterr().out


def test_data_check_rejects_unknown_dataset_parameters(tmp_path, capsys):
    assert main(["data", "check", "avmnist", "--root", str(tmp_path), "--set", "val_frac=0.2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: TypeError: ") and "unknown parameter(s) val_frac; valid: val_fraction, split_seed" in err


@pytest.mark.slow
def test_installed_console_script_runs(tmp_path):
    exe = Path(sys.executable).with_name("crossmodal-kd")
    if not exe.exists():
        pytest.skip("console script not installed")
    cfg = write_yaml(tmp_path / "c.yaml", one_stage_config())
    proc = subprocess.run(
        [str(exe), "run", str(cfg), "--fast-dev-run", "--no-progress", "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    assert read_json(tmp_path / "run" / "metrics.json")["stages"]["baseline"]["epochs"] == 1
