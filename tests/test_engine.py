"""Engine: run directory contents, selection on validation, resume equivalence, checkpoint integrity,
failure modes, the learning-rate schedule under gradient accumulation, frozen teachers, saved models."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import (
    assert_same_weights,
    load_state_dict,
    one_stage_config,
    read_json,
    run_config,
    stable_metrics,
    tiny_config,
)
from crossmodal_kd.config import validate_config
from crossmodal_kd.data import build_dataset
from crossmodal_kd.engine.checkpoint import latest_good_checkpoint, verify_checkpoint
from crossmodal_kd.models.io import load_model, model_path, stage_dir
from crossmodal_kd.engine.report import read_jsonl
from crossmodal_kd.engine.trainer import Runner, StageTrainer, TrainingError
from crossmodal_kd.methods.supervised import Supervised
from crossmodal_kd.registry import METHODS

STAGE_MODELS = {"teacher": "model", "baseline": "model", "kd": "student"}


class Interrupt(Exception):
    """Stands in for a kill: raised from inside the training loop."""


def interrupt_at(monkeypatch, stage: str, epoch: int, step: int) -> None:
    """Raise :class:`Interrupt` mid-epoch (after ``step`` optimizer steps) of ``stage``."""
    original = StageTrainer._check_finite

    def check(self, loss, losses, ep, st):
        if (self.stage.name, ep, st) == (stage, epoch, step):
            raise Interrupt(f"{stage} {epoch} {step}")
        return original(self, loss, losses, ep, st)

    monkeypatch.setattr(StageTrainer, "_check_finite", check)


def record_epochs(monkeypatch) -> list[tuple[str, int]]:
    """Which (stage, epoch) pairs are trained from now on."""
    ran: list[tuple[str, int]] = []
    original = StageTrainer._train_epoch

    def train_epoch(self, epoch):
        ran.append((self.stage.name, epoch))
        return original(self, epoch)

    monkeypatch.setattr(StageTrainer, "_train_epoch", train_epoch)
    return ran


def log_rows(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_jsonl(stage_dir(run_dir, stage) / "log.jsonl")]


def assert_equivalent_runs(a: Path, b: Path) -> None:
    assert stable_metrics(read_json(a / "metrics.json")) == stable_metrics(read_json(b / "metrics.json"))
    for stage, model in STAGE_MODELS.items():
        assert_same_weights(model_path(a, stage, model), model_path(b, stage, model))
        assert log_rows(a, stage) == log_rows(b, stage)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 3-stage run; the best models it evaluated are kept for comparison."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    kept: dict[str, dict[str, torch.nn.Module]] = {}
    original = StageTrainer._finish

    def finish(self, *args):
        out = original(self, *args)
        kept[self.stage.name] = self.core.models()
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StageTrainer, "_finish", finish)
        metrics = run_config(tiny_config(), run_dir)
    return run_dir, metrics, kept


# ----------------------------------------------------------------------------- run directory


def test_run_writes_config_metrics_logs_curves_and_models(reference):
    run_dir, metrics, _ = reference
    assert validate_config(yaml.safe_load((run_dir / "config.yaml").read_text())) == validate_config(tiny_config())
    on_disk = read_json(run_dir / "metrics.json")
    assert on_disk == json.loads(json.dumps(metrics))
    for stage, model in STAGE_MODELS.items():
        m = on_disk["stages"][stage]["models"][model]
        for split, n in (("val", 32), ("test", 32)):
            assert 0.0 <= m[split]["accuracy"] <= 1.0 and 0.0 <= m[split]["macro_f1"] <= 1.0
            assert m[split]["n"] == n
        sdir = stage_dir(run_dir, stage)
        epochs = tiny_config()["stages"][list(STAGE_MODELS).index(stage)]["epochs"]
        rows = read_jsonl(sdir / "log.jsonl")
        assert [r["epoch"] for r in rows] == list(range(epochs))
        assert all(math.isfinite(r["train/loss"]) and f"val/{model}/accuracy" in r for r in rows)
        assert (sdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert model_path(run_dir, stage, model).is_file()
        assert not (sdir / "checkpoints").exists()  # removed once the stage is done
        assert read_json(sdir / "result.json") == on_disk["stages"][stage]
    kd_row = read_jsonl(stage_dir(run_dir, "kd") / "log.jsonl")[0]
    assert kd_row["train/loss"] == pytest.approx(kd_row["train/ce"] + kd_row["train/kd"], rel=1e-5)
    merged = read_jsonl(run_dir / "log.jsonl")
    assert [(r["stage"], r["epoch"]) for r in merged] == [("teacher", 0), ("teacher", 1), ("teacher", 2), ("baseline", 0), ("baseline", 1), ("kd", 0), ("kd", 1), ("kd", 2)]
    env = read_json(run_dir / "environment.json")
    assert env["seed"] == 0 and env["world_size"] == 1
    assert env["global_batch_size"] == 16 and env["effective_batch_size"] == 16
    assert {"python", "torch", "accelerate"} <= set(env["versions"])


def test_selection_happens_on_validation(reference):
    run_dir, metrics, _ = reference
    bests = []
    for stage, model in STAGE_MODELS.items():
        rows = read_jsonl(stage_dir(run_dir, stage) / "log.jsonl")
        val_acc = [r[f"val/{model}/accuracy"] for r in rows]
        result = metrics["stages"][stage]
        assert result["selection"] == {"split": "val", "metric": "accuracy"}
        best = result["models"][model]["best_epoch"]
        assert best == int(np.argmax(val_acc))  # the first epoch reaching the best validation accuracy
        assert result["models"][model]["val"]["accuracy"] == val_acc[best]  # the saved model is that epoch's
        bests.append(best == len(rows) - 1)
    assert not all(bests), "every stage peaked at its last epoch; selection is not exercised"


def test_selection_on_validation_loss(tmp_path):
    raw = one_stage_config(epochs=3)
    raw["stages"][0]["select"] = {"metric": "loss"}
    result = run_config(raw, tmp_path / "run")["stages"]["baseline"]
    rows = read_jsonl(stage_dir(tmp_path / "run", "baseline") / "log.jsonl")
    losses = [r["val/loss"] for r in rows]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert result["selection"] == {"split": "val", "metric": "loss"}
    assert result["models"]["model"]["best_epoch"] == int(np.argmin(losses))


def test_saved_model_loads_by_path_and_gives_the_same_logits(reference):
    run_dir, metrics, kept = reference
    data = build_dataset("synthetic", "unused", tiny_config()["data"]["params"]).load()
    batch = data.test.__getitems__(list(range(len(data.test))))
    for stage, model in STAGE_MODELS.items():
        loaded = load_model(model_path(run_dir, stage, model)).eval()
        trained = kept[stage][model].eval()
        with torch.no_grad():
            logits = loaded(batch)["logits"]
            assert torch.equal(logits, trained(batch)["logits"])
        acc = (logits.argmax(-1) == batch["label"]).float().mean().item()
        assert acc == pytest.approx(metrics["stages"][stage]["models"][model]["test"]["accuracy"], abs=1e-9)
    assert type(load_model(model_path(run_dir, "teacher", "model"))).__name__ == "FusionNet"


def test_load_model_works_in_a_fresh_interpreter(reference):
    """A model file is usable from a bare ``load_model`` call: the registries fill themselves."""
    import subprocess
    import sys

    path = model_path(reference[0], "teacher", "model")
    code = f"from crossmodal_kd.models.io import load_model; print(type(load_model({str(path)!r})).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "FusionNet"


def test_load_model_errors(tmp_path, reference):
    run_dir = reference[0]
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_model(tmp_path / "none.pt")
    bad = tmp_path / "cut.pt"
    bad.write_bytes(model_path(run_dir, "kd", "student").read_bytes()[:100])
    with pytest.raises(RuntimeError, match=rf"{bad}: unreadable model file"):
        load_model(bad)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(RuntimeError, match="not a crossmodal_kd model file"):
        load_model(tmp_path / "other.pt")


def test_existing_run_dir_needs_resume_and_is_left_intact(tmp_path, reference):
    run_dir = reference[0]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    raw = tiny_config()
    raw["seed"] = 1
    with pytest.raises(TrainingError, match=rf"{run_dir} already holds a run; pass --resume"):
        run_config(raw, run_dir)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_unwritable_output_dir_fails_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")

    def no_data(self):
        raise AssertionError("data was loaded before the output directory was checked")

    monkeypatch.setattr(Runner, "_load_data", no_data)
    with pytest.raises(TrainingError, match=rf"output directory {blocker / 'run'} is not writable"):
        run_config(one_stage_config(), blocker / "run")


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_after_interruption_is_identical_to_an_uninterrupted_run(tmp_path, monkeypatch, reference):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as mp:
        # mid-epoch, after two optimizer steps; the teacher has dropout, so its RNG state must be restored too
        interrupt_at(mp, "teacher", epoch=1, step=2)
        with pytest.raises(Interrupt):
            run_config(tiny_config(), run_dir)
    assert not (run_dir / "metrics.json").exists()
    assert [p.name for p in (stage_dir(run_dir, "teacher") / "checkpoints").glob("epoch_*")] == ["epoch_0000"]

    ran = record_epochs(monkeypatch)
    run_config(tiny_config(), run_dir, resume=True)
    assert ran == [("teacher", 1), ("teacher", 2), ("baseline", 0), ("baseline", 1), ("kd", 0), ("kd", 1), ("kd", 2)]
    assert_equivalent_runs(reference[0], run_dir)

    # a finished run resumed again trains nothing and reports the same metrics
    ran.clear()
    run_config(tiny_config(), run_dir, resume=True)
    assert ran == []
    assert_equivalent_runs(reference[0], run_dir)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_skipped_for_the_previous_one(tmp_path, monkeypatch, caplog, reference):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as mp:
        interrupt_at(mp, "kd", epoch=2, step=1)  # after the other stages finished
        with pytest.raises(Interrupt):
            run_config(tiny_config(), run_dir)
    assert set(read_json(run_dir / "metrics.json")["stages"]) == {"teacher", "baseline"}
    ckpts = stage_dir(run_dir, "kd") / "checkpoints"
    assert [p.name for p in sorted(ckpts.glob("epoch_*"))] == ["epoch_0000", "epoch_0001"]
    weights = ckpts / "epoch_0001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert "checksum mismatch" in verify_checkpoint(ckpts / "epoch_0001")
    assert latest_good_checkpoint(ckpts) == ckpts / "epoch_0000"

    ran = record_epochs(monkeypatch)
    with caplog.at_level(logging.WARNING):
        run_config(tiny_config(), run_dir, resume=True)
    assert ran == [("kd", 1), ("kd", 2)]
    assert any("skipping corrupt checkpoint" in r.getMessage() and "epoch_0001" in r.getMessage() for r in caplog.records)
    assert_equivalent_runs(reference[0], run_dir)


def test_only_the_newest_checkpoints_are_kept(tmp_path, monkeypatch):
    raw = one_stage_config(epochs=5)
    raw["accelerator"]["keep_checkpoints"] = 2
    interrupt_at(monkeypatch, "baseline", epoch=4, step=0)
    with pytest.raises(Interrupt):
        run_config(raw, tmp_path / "run")
    ckpts = stage_dir(tmp_path / "run", "baseline") / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_0002", "epoch_0003"]  # no temp dirs left either
    assert json.loads((ckpts / "epoch_0003" / "manifest.json").read_text())["epoch"] == 3
    assert all(verify_checkpoint(p) is None for p in ckpts.iterdir())


def test_incomplete_checkpoints_are_not_used(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "epoch_0003").mkdir(parents=True)  # no manifest: the process died while writing it
    (root / ".tmp_epoch_0004").mkdir()
    assert "missing (checkpoint incomplete)" in verify_checkpoint(root / "epoch_0003")
    assert latest_good_checkpoint(root) is None
    (root / "epoch_0002").mkdir()
    (root / "epoch_0002" / "a.bin").write_bytes(b"x")
    (root / "epoch_0002" / "manifest.json").write_text(json.dumps({"epoch": 2, "files": {"a.bin": "0" * 64, "b.bin": "0"}}))
    assert "checksum mismatch" in verify_checkpoint(root / "epoch_0002")
    (root / "epoch_0002" / "a.bin").unlink()
    assert verify_checkpoint(root / "epoch_0002").endswith("a.bin: missing")


# ----------------------------------------------------------------------------- failures


class NanLater(Supervised):
    """Supervised training whose loss turns NaN from the second epoch on."""

    def forward(self, batch):
        out, losses = super().forward(batch)
        if self.epoch >= 1:
            losses["ce"] = losses["ce"] * float("nan")
        return out, losses


def test_non_finite_loss_stops_with_stage_and_epoch_and_keeps_the_checkpoint(tmp_path, clean_registries):
    METHODS.register("test_nan_later")(NanLater)
    raw = one_stage_config(epochs=3)
    raw["stages"][0]["method"]["name"] = "test_nan_later"
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        run_config(raw, run_dir)
    ckpts = stage_dir(run_dir, "baseline") / "checkpoints"
    msg = str(info.value)
    assert "stage 'baseline' epoch 1 step 0: non-finite loss (ce=nan)" in msg
    assert f"Last good checkpoint: {ckpts / 'epoch_0000'}" in msg
    assert verify_checkpoint(ckpts / "epoch_0000") is None
    assert [r["epoch"] for r in read_jsonl(stage_dir(run_dir, "baseline") / "log.jsonl")] == [0]
    assert not (stage_dir(run_dir, "baseline") / "result.json").exists()


# ----------------------------------------------------------------------------- schedule


def test_lr_follows_the_cosine_schedule_in_optimizer_steps_with_accumulation(tmp_path, monkeypatch):
    raw = one_stage_config(epochs=3, n_train=56)  # 7 batches of 8 -> 4 optimizer steps per epoch
    raw["data"]["batch_size"] = 8
    raw["accelerator"]["gradient_accumulation_steps"] = 2
    raw["stages"][0]["optimizer"] = {"name": "adamw", "params": {"lr": 0.01}}
    raw["stages"][0]["scheduler"] = {"name": "cosine", "params": {"warmup_steps": 2, "min_factor": 0.1}}
    steps_taken: list[int] = []
    original = StageTrainer._finish

    def finish(self, *args):
        steps_taken.extend(int(s["step"]) for s in self.optimizer.optimizer.state.values())
        return original(self, *args)

    monkeypatch.setattr(StageTrainer, "_finish", finish)
    run_config(raw, tmp_path / "run")

    def expected(step: int, total: int = 12, warmup: int = 2, floor: float = 0.1) -> float:
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 0.01 * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    rows = read_jsonl(stage_dir(tmp_path / "run", "baseline") / "log.jsonl")
    assert [r["lr"] for r in rows] == pytest.approx([expected(4), expected(8), expected(12)], rel=1e-9)
    assert rows[-1]["lr"] == pytest.approx(0.001)
    assert steps_taken and set(steps_taken) == {12}
    assert read_json(tmp_path / "run" / "environment.json")["effective_batch_size"] == 16


# ----------------------------------------------------------------------------- teachers


def test_teachers_are_frozen_in_eval_mode_and_not_optimised(tmp_path, monkeypatch):
    checked: list[int] = []
    original = StageTrainer._train_epoch

    def train_epoch(self, epoch):
        out = original(self, epoch)  # calls method.train() and runs optimizer steps
        if self.stage.name == "kd":
            teacher = self.core.frozen_modules()["teacher"]
            saved = load_state_dict(model_path(self.env.run_dir, "teacher", "model"))
            assert self.core.training and self.core.student.training
            assert not teacher.training and not any(m.training for m in teacher.modules())
            assert not any(p.requires_grad for p in teacher.parameters())
            teacher_ids = {id(p) for p in teacher.parameters()}
            assert teacher_ids and not teacher_ids & {id(p) for p in self.core.parameters()}
            optimised = {id(p) for g in self.optimizer.optimizer.param_groups for p in g["params"]}
            assert not teacher_ids & optimised
            assert optimised == {id(p) for p in self.core.student.parameters()}
            assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())  # BN stats included
            assert not any(k.startswith("teacher") for k in self.core.state_dict())
            checked.append(epoch)
        return out

    monkeypatch.setattr(StageTrainer, "_train_epoch", train_epoch)
    run_config(tiny_config(), tmp_path / "run", fast_dev_run=True)
    assert checked == [0]
