"""Experiment trackers through Accelerate: TensorBoard by default, the same scalars as log.jsonl under
``<stage>/<key>`` at the run-global epoch, the config as hyper-parameters, one-line errors before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TEST_CONFIGS, accelerate_launch, one_stage_config, run_config, tiny_config
from crossmodal_kd.config import ConfigError, validate_config
from crossmodal_kd.engine.report import read_jsonl
from crossmodal_kd.engine.trainer import StageTrainer

EVENTS = "events.out.tfevents.*"


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag the run's TensorBoard writer logged: ``{tag: [(step, value), ...]}``."""
    acc = EventAccumulator(str(run_dir / "trackers" / "crossmodal_kd"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def logged(run_dir: Path, stages: list[str], epochs: dict[str, int]) -> dict[str, list[tuple[int, float]]]:
    """What the trackers should hold: every numeric value of every log.jsonl row, at the run-global epoch."""
    out: dict[str, list[tuple[int, float]]] = {}
    first = 0
    for stage in stages:
        for row in read_jsonl(run_dir / "stages" / stage / "log.jsonl"):
            for key, value in row.items():
                if isinstance(value, (int, float)):
                    out.setdefault(f"{stage}/{key}", []).append((first + row["epoch"], value))
        first += epochs[stage]
    return out


def test_fast_dev_run_logs_every_log_jsonl_scalar_to_tensorboard(tmp_path):
    run_dir = tmp_path / "run"
    run_config(tiny_config(), run_dir, fast_dev_run=True)
    got, want = scalars(run_dir), logged(run_dir, ["teacher", "baseline", "kd"], {"teacher": 1, "baseline": 1, "kd": 1})
    for tag in ("teacher/train/loss", "teacher/val/model/accuracy", "teacher/lr", "kd/train/kd", "kd/val/student/macro_f1"):
        assert tag in got
    assert set(got) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-7), tag  # float32
    hparams = yaml.safe_load(next((run_dir / "trackers").rglob("hparams.yml")).read_text())
    assert hparams["stages.2.method.name"] == "kd" and hparams["data.batch_size"] == 16 and hparams["trackers.0"] == "tensorboard"


class Interrupt(Exception):
    """Stands in for a kill, raised inside the training loop."""


def test_step_is_the_run_global_epoch_across_an_interruption_and_resume(tmp_path, monkeypatch):
    raw = tiny_config()
    raw["stages"] = [dict(raw["stages"][1], epochs=2), dict(raw["stages"][1], name="again", epochs=2)]
    run_dir = tmp_path / "run"
    original = StageTrainer._check_finite

    def check(self, loss, losses, epoch, step):
        if (self.stage.name, epoch) == ("again", 1):
            raise Interrupt
        return original(self, loss, losses, epoch, step)

    with monkeypatch.context() as mp:
        mp.setattr(StageTrainer, "_check_finite", check)
        with pytest.raises(Interrupt):
            run_config(raw, run_dir)
    run_config(raw, run_dir, resume=True)
    got = scalars(run_dir)
    assert [s for s, _ in got["baseline/train/loss"]] == [0, 1]
    assert [s for s, _ in got["again/train/loss"]] == [2, 3]  # epoch 0 before the interruption, epoch 1 after
    assert [v for _, v in got["again/epoch"]] == [0, 1]
    assert set(got) == set(logged(run_dir, ["baseline", "again"], {"baseline": 2, "again": 2}))
    files = sorted(run_dir.rglob(EVENTS))
    run_config(raw, run_dir, resume=True)  # nothing left to train: no tracker run is started
    assert sorted(run_dir.rglob(EVENTS)) == files


def test_unknown_or_uninstalled_tracker_is_one_line_before_training(tmp_path, monkeypatch):
    raw = dict(one_stage_config(epochs=1), trackers=["nope"])
    with pytest.raises(ConfigError) as err:
        run_config(raw, tmp_path / "run")
    assert str(err.value) == "trackers: unknown tracker 'nope'; valid: tensorboard, wandb, mlflow, aim, trackio (or [] for none)"
    assert not (tmp_path / "run").exists()

    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: [])
    with pytest.raises(ConfigError, match=r"^trackers: 'wandb' is not installed; pip install wandb \(or remove it from trackers\)$"):
        run_config(dict(raw, trackers=["wandb"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_no_trackers_write_no_event_files(tmp_path):
    run_dir = tmp_path / "run"
    run_config(dict(one_stage_config(epochs=1), trackers=[]), run_dir, fast_dev_run=True)
    assert (run_dir / "stages" / "baseline" / "result.json").is_file()
    assert not list(run_dir.rglob(EVENTS)) and not (run_dir / "trackers").exists()


@pytest.mark.slow
def test_two_processes_log_once_from_the_main_process(tmp_path):
    run_dir = tmp_path / "run"
    accelerate_launch(
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
        ["tools/train.py", str(TEST_CONFIGS / "synthetic_kd.yaml"), "--no-progress", "--fast-dev-run", "--output-dir", str(run_dir)],
    )
    assert len(list((run_dir / "trackers" / "crossmodal_kd").glob(EVENTS))) == 1  # one writer: the main process's
    stages = ["teacher_mm", "student_only", "kd_mm"]
    got = scalars(run_dir)
    assert set(got) == set(logged(run_dir, stages, dict.fromkeys(stages, 1)))
    assert all(len(points) == 1 for points in got.values())


def test_trackers_default_to_tensorboard():
    assert validate_config(one_stage_config()).trackers == ["tensorboard"]
