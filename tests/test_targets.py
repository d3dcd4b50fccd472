"""Teacher target store: frozen teachers run once per sample, served by index, rebuilt when damaged or stale."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch
from torch import nn

from conftest import read_json, run_config, tiny_config
from crossmodal_kd.config import validate_config
from crossmodal_kd.engine.targets import attach_targets
from crossmodal_kd.engine.trainer import Runner, make_accelerator
from crossmodal_kd.targets import TargetStore, TargetTable, TeacherCall


class Counting(nn.Module):
    """A linear 'teacher' that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        return {"logits": self.fc(batch["x"]), "features": batch["x"] * 2}


def batch_of(index, x):
    return {"x": x[index], "index": torch.as_tensor(index)}


def test_lazy_table_serves_rows_after_first_pass(tmp_path):
    torch.manual_seed(0)
    teacher, x = Counting().eval(), torch.randn(10, 4)
    call = TeacherCall("t", teacher, [teacher])
    call.tables["train"] = TargetTable(tmp_path / "t.safetensors", "k", 10, torch.device("cpu"))
    call.split = "train"
    first = call(batch_of([3, 1, 7], x))
    assert teacher.calls == 1 and call.live_batches == 1
    again = call(batch_of([7, 3], x))  # every row known: no forward
    assert teacher.calls == 1
    assert torch.equal(again["logits"], first["logits"][[2, 0]]) and set(again) == {"logits", "features"}
    call(batch_of([7, 0], x))  # row 0 unknown: one live pass, written
    assert teacher.calls == 2 and bool(call.tables["train"].filled[[0, 1, 3, 7]].all())
    call.split = "val"  # no table for this split: live
    call(batch_of([0], x))
    assert teacher.calls == 3


def test_store_file_roundtrip_damage_and_staleness(tmp_path, caplog):
    teacher, x = Counting().eval(), torch.randn(6, 4)
    call = TeacherCall("teacher", teacher, [teacher])
    data = [batch_of(list(range(6)), x)]
    store = TargetStore(tmp_path, torch.device("cpu"))
    ds = torch.utils.data.TensorDataset(x)
    table = store.table(call, "train", ds, {"dataset": "d"})
    TargetStore.fill([(call, table)], data)
    table.save()
    again = store.table(call, "train", ds, {"dataset": "d"})
    assert again.complete and torch.equal(again.tensors["logits"], table.tensors["logits"])
    # another recipe or other weights: another key, nothing reused
    assert not store.table(call, "train", ds, {"dataset": "other"}).complete
    saved = teacher.fc.weight.detach().clone()
    with torch.no_grad():
        teacher.fc.weight.add_(1.0)
    assert not store.table(call, "train", ds, {"dataset": "d"}).complete
    with torch.no_grad():
        teacher.fc.weight.copy_(saved)
    # a flipped byte fails the checksum: detected, never served
    raw = bytearray(table.path.read_bytes())
    raw[-1] ^= 0xFF
    table.path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        damaged = store.table(call, "train", ds, {"dataset": "d"})
    assert not damaged.complete and "checksum mismatch" in caplog.text


def _kd_stage_config(**stage_extra):
    raw = tiny_config()
    raw["stages"][2].update(stage_extra)
    return raw


def test_kd_stage_serves_targets_and_no_teacher_forward_after_build(tmp_path, monkeypatch):
    raw = _kd_stage_config()
    run_config(raw, tmp_path / "run")  # teacher, baseline, KD
    shutil.rmtree(tmp_path / "run" / "stages" / "kd")
    shutil.rmtree(tmp_path / "run" / "targets")
    counts = {"forward": 0}
    from crossmodal_kd.models.networks import FusionNet

    original = FusionNet.forward

    def counting_forward(self, batch):
        counts["forward"] += 1
        return original(self, batch)

    monkeypatch.setattr(FusionNet, "forward", counting_forward)
    run_config(raw, tmp_path / "run", resume=True)  # only the KD stage trains (3 epochs x 4 batches)
    # the teacher ran exactly for the build: 64 training samples in eval batches of 32; never during training
    assert counts["forward"] == 2
    result = read_json(tmp_path / "run" / "stages" / "kd" / "result.json")
    assert result["targets"] == {"teacher": "served"}
    assert result["teacher_live_batches"] == {"teacher": 0}
    tables = sorted(p.name for p in (tmp_path / "run" / "targets").glob("*.safetensors"))
    assert len(tables) == 1 and tables[0].startswith("teacher-")
    manifest = json.loads((tmp_path / "run" / "targets" / tables[0]).with_suffix(".json").read_text())
    assert manifest["rows"] == 64 and set(manifest["outputs"]) == {"logits", "features"}


def test_store_and_live_paths_give_identical_losses(tmp_path):
    raw = _kd_stage_config()
    run_config(raw, tmp_path / "run")
    cfg = validate_config(raw)
    runner = Runner(cfg, tmp_path / "run", resume=True, progress=False)
    runner.data = runner._load_data()
    from crossmodal_kd.engine.trainer import StageTrainer

    trainer = StageTrainer(runner.env, 2, cfg.stages[2], tmp_path / "run" / "stages" / "kd")
    trainer._build()
    assert trainer.targets["build_s"] == 0.0  # a complete table of this teacher and data is reused
    core = trainer.core
    core.eval()
    batch = runner.data.train.__getitems__(list(range(5, 21)))
    core.set_target_split("train")
    _, served = core(batch)
    assert core.teacher_calls()["teacher"].live_batches == 0
    core.set_target_split(None)
    _, live = core(batch)
    assert core.teacher_calls()["teacher"].live_batches == 1
    for key in live:
        assert served[key].item() == pytest.approx(live[key].item(), rel=1e-6, abs=1e-7), key


def test_store_off_and_nondeterministic_calls_run_live_and_say_so(tmp_path, caplog):
    raw = _kd_stage_config(targets={"store": False})
    with caplog.at_level(logging.WARNING):
        run_config(raw, tmp_path / "run")
    result = read_json(tmp_path / "run" / "stages" / "kd" / "result.json")
    assert result["targets"]["teacher"].startswith("targets.store is off")
    assert result["teacher_live_batches"]["teacher"] > 0
    assert caplog.text.count("teacher 'teacher' runs live") == 1
    assert not (tmp_path / "run" / "targets").exists()


def test_nondeterministic_call_is_never_stored(tmp_path):
    teacher = Counting().eval()
    cfg = validate_config(tiny_config())
    acc = make_accelerator(cfg)

    class Data:
        def split(self, name):
            from crossmodal_kd.data.base import ArrayDataset

            return ArrayDataset({"x": torch.randn(8, 4)}, torch.zeros(8, dtype=torch.long))

    call = TeacherCall("t", teacher, [teacher], deterministic=False)
    info = attach_targets(acc, {"t": call}, cfg, Data(), lambda b: b, tmp_path, stage="s")
    assert "not fixed" in info["calls"]["t"] and call.tables == {}


def test_resume_reuses_a_complete_store(tmp_path):
    raw = _kd_stage_config()
    run_config(raw, tmp_path / "run")
    table = next((tmp_path / "run" / "targets").glob("*.safetensors"))
    mtime = table.stat().st_mtime_ns
    # the KD stage trained again in a new run directory that already holds the store (as after a crash)
    other = copy.deepcopy(raw)
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "stages" / "kd")
    run_config(other, tmp_path / "again", resume=True)
    result = read_json(tmp_path / "again" / "stages" / "kd" / "result.json")
    assert result["target_build_s"] == 0.0 and result["targets"] == {"teacher": "served"}
    assert (tmp_path / "again" / "targets" / table.name).stat().st_mtime_ns == mtime


def test_two_processes_serve_the_same_targets_built_once(tmp_path):
    """Under DDP the main process builds the table and the other rank reads the same file: one build,
    identical targets on every rank."""
    from conftest import REPO, accelerate_launch

    accelerate_launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                       "--dynamo_backend", "no"], [str(REPO / "tests" / "scripts" / "target_store_ranks.py"), str(tmp_path)])
    ranks = [read_json(tmp_path / f"rank{r}.json") for r in (0, 1)]
    assert [r["forwards"] for r in ranks] == [3, 0]  # 40 rows in eval batches of 16, on the main process only
    assert ranks[0]["sha256"] == ranks[1]["sha256"] and all(r["complete"] and r["served"] == "served" for r in ranks)
