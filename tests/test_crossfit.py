"""Cross-fitted targets: folds stratified and grouped; each training sample's target comes from the fold
copy of its teacher that never saw it; validation targets from the full teacher."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, read_json, run_config, tiny_config
from crossmodal_kd.config import validate_config
from crossmodal_kd.data import build_dataset
from crossmodal_kd.models.io import load_model
from crossmodal_kd.engine.crossfit import fold_assignment
from crossmodal_kd.engine.results_archive import ResultsArchive


def test_folds_are_stratified_grouped_and_cover_every_sample():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    groups = rng.integers(0, 40, size=len(labels)) * 10 + labels  # a source item has one class, several pairs
    folds = fold_assignment(labels, groups, 3, seed=0)
    assert set(folds.tolist()) == {0, 1, 2}
    for g in np.unique(groups):  # a source item never sits on both sides of a fold
        assert len(set(folds[groups == g].tolist())) == 1
    for c in range(4):  # every class in every fold
        assert all(np.sum((folds == f) & (labels == c)) > 0 for f in range(3))
    assert np.array_equal(folds, fold_assignment(labels, groups, 3, seed=0))  # deterministic for a seed
    plain = fold_assignment(labels, None, 3, seed=1)
    assert sorted(np.bincount(plain).tolist()) == [40, 40, 40]


def test_kd_with_cross_fitted_targets(tmp_path, capsys):
    raw = tiny_config()
    raw["stages"][2]["targets"] = {"cross_fit": 2}
    run = tmp_path / "run"
    run_config(raw, run)
    result = read_json(run / "stages" / "kd" / "result.json")
    assert result["targets"] == {"teacher": "served"} and result["teacher_live_batches"] == {"teacher": 0}
    assert {k: v for k, v in result["cross_fit"].items() if k not in ("build_s", "fold_val_accuracy")} == {"k": 2, "grouped": False, "stages": {"teacher": "teacher"}}
    assert result["target_build_s"] >= result["cross_fit"]["build_s"] > 0  # fold training counted in the build
    folds_models = [load_model(run / "crossfit" / "teacher" / f"fold{f}" / "stages" / "teacher" / "models" / "model.pt")
                    for f in range(2)]
    full = load_model(run / "stages" / "teacher" / "models" / "model.pt")
    data = build_dataset("synthetic", "unused", raw["data"]["params"]).load()
    folds = fold_assignment(data.train.labels.numpy(), None, 2, seed=0)
    tables = {p.name: load_file(str(p)) for p in (run / "targets").glob("*.safetensors")}
    assert len(tables) == 2  # the full teacher's training table, and the out-of-fold one the stage used
    batch = data.train.__getitems__(list(range(len(data.train))))
    with torch.no_grad():
        oof = torch.empty(len(data.train), data.num_classes)
        for f, model in enumerate(folds_models):
            rows = np.flatnonzero(folds == f)
            oof[rows] = model.eval()(batch)["logits"][rows]
        plain = full.eval()(batch)["logits"]
    matches = {name: t["logits"] for name, t in tables.items()}
    assert any(torch.allclose(t, oof, atol=1e-5) for t in matches.values())
    assert any(torch.allclose(t, plain, atol=1e-5) for t in matches.values())
    assert not torch.allclose(oof, plain, atol=1e-3)  # out-of-fold targets are not the full teacher's

    # the stage's metrics keep each fold copy's validation accuracy, and tools/crossfit_analysis.py pools them
    # next to the full teacher's from a benchmark's run tree (or archive: the same metrics)
    fold_acc = [read_json(run / "crossfit" / "teacher" / f"fold{f}" / "stages" / "teacher" / "result.json")
                ["models"]["model"]["val"]["accuracy"] for f in range(2)]
    assert result["cross_fit"]["fold_val_accuracy"] == {"teacher": [{"model": a} for a in fold_acc]}
    full_acc = read_json(run / "stages" / "teacher" / "result.json")["models"]["model"]["val"]["accuracy"]
    bench_run = tmp_path / "bench" / "crossfit" / "image" / "draw0" / "seed0"
    bench_run.parent.mkdir(parents=True)
    run.rename(bench_run)
    spec = importlib.util.spec_from_file_location("crossfit_analysis", REPO / "tools" / "crossfit_analysis.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(tmp_path / "bench")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "| image | teacher | model |" in x)
    assert f"| {100 * full_acc:.2f} ± 0.00 (n=1) | {100 * sum(fold_acc) / 2:.2f} ± " in line and line.endswith("(n=2) |")
    ResultsArchive(tmp_path / "archive").store("crossfit/image/draw0/seed0", bench_run, {})
    assert tool.main([str(tmp_path / "archive")]) == 0  # the same pooled line from the benchmark's archive
    assert next(x for x in capsys.readouterr().out.splitlines() if "| image | teacher | model |" in x).endswith(line.split("|", 2)[2])
    assert tool.main([str(tmp_path / "nothing")]) == 1  # no finished cross-fitted runs: said, not a traceback


def test_cross_fit_needs_a_teacher_stage_of_this_run(tmp_path):
    raw = tiny_config()
    run_config({**raw, "stages": raw["stages"][:1]}, tmp_path / "first")
    raw["stages"] = [dict(raw["stages"][2], targets={"cross_fit": 2})]
    raw["stages"][0]["method"]["params"]["teacher"] = {"path": str(tmp_path / "first/stages/teacher/models/model.pt")}
    with pytest.raises(Exception, match="comes from a model file, not a stage of this run"):
        run_config(raw, tmp_path / "second")
    assert validate_config(raw).stages[0].targets.cross_fit == 2


def test_cross_fit_refuses_a_teacher_stage_that_depends_on_others(tmp_path):
    raw = tiny_config()
    second = {**raw["stages"][2], "name": "kd2", "targets": {"cross_fit": 2}}
    second["method"] = {"name": "kd", "params": {"student": "image_student", "teacher": {"stage": "kd", "model": "student"}}}
    raw["stages"].append(second)
    with pytest.raises(Exception, match="teacher stage 'kd' depends on stage\\(s\\) teacher"):
        run_config(raw, tmp_path / "run", fast_dev_run=True)


def test_cross_fit_in_a_fast_dev_run_is_bounded(tmp_path):
    raw = tiny_config(n_train=200)
    raw["stages"][2]["targets"] = {"cross_fit": 3}
    run_config(raw, tmp_path / "run", fast_dev_run=True)
    result = read_json(tmp_path / "run" / "stages" / "kd" / "result.json")
    assert result["cross_fit"]["k"] == 3
    assert not list((tmp_path / "run" / "targets").glob("*.safetensors"))  # nothing complete, nothing saved
    for f in range(3):
        fold = read_json(tmp_path / "run" / "crossfit" / "teacher" / f"fold{f}" / "stages" / "teacher" / "result.json")
        assert fold["epochs"] == 1


def test_fold_copies_are_shared_through_the_stage_cache(tmp_path, caplog):
    """A second run that cross-fits the same teacher stage on the same folds (here: another KD stage, as the
    other student's run of a benchmark seed would) reads the fold copies from the stage cache instead of
    training them again; another run seed (other folds, other weights) trains its own."""
    raw = tiny_config()
    raw["stages"][2]["targets"] = {"cross_fit": 2}
    cache = tmp_path / "cache"
    run_config(raw, tmp_path / "first", stage_cache=cache)
    raw["stages"][2]["method"]["params"]["tau"] = 2.0  # the KD stage differs, its teacher does not
    with caplog.at_level("INFO", logger="crossmodal_kd.engine.crossfit"):
        run_config(raw, tmp_path / "second", stage_cache=cache)
    assert not any("cross-fitting: training" in r.message for r in caplog.records)
    assert sum("reused from the stage cache" in r.message for r in caplog.records) == 2
    for f in range(2):
        model = f"crossfit/teacher/fold{f}/stages/teacher/models/model.pt"
        assert (tmp_path / "first" / model).read_bytes() == (tmp_path / "second" / model).read_bytes()
    caplog.clear()
    with caplog.at_level("INFO", logger="crossmodal_kd.engine.crossfit"):
        run_config({**raw, "seed": 1}, tmp_path / "third", stage_cache=cache)
    assert sum("cross-fitting: training" in r.message for r in caplog.records) == 2
