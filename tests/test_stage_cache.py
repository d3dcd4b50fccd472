"""The stage cache: a finished stage with the same fingerprint and code is copied, not trained again."""

from __future__ import annotations

import json
import logging

from conftest import tiny_config, write_yaml
from crossmodal_kd.cli import main
from crossmodal_kd.engine.stage_cache import StageCache


def run(config, out, cache, *extra):
    return main(["run", str(config), "--output-dir", str(out), "--no-progress", "--stage-cache", str(cache), *extra])


def test_a_second_run_copies_the_shared_stages_and_trains_only_what_changed(tmp_path, caplog):
    raw = tiny_config()
    for stage in raw["stages"]:
        stage["epochs"] = 1
    cache = tmp_path / "cache"
    first = write_yaml(tmp_path / "a.yaml", raw)
    assert run(first, tmp_path / "a", cache) == 0
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 3  # every finished stage stored
    assert not any(cache.rglob("checkpoints"))  # without resumable-training state

    raw["stages"][2]["method"]["params"]["tau"] = 2.0  # the KD stage changes, teacher and baseline do not
    second = write_yaml(tmp_path / "b.yaml", raw)
    with caplog.at_level(logging.INFO, logger="crossmodal_kd.engine.trainer"):
        assert run(second, tmp_path / "b", cache) == 0
    reused = {r.getMessage().split()[1].rstrip(":") for r in caplog.records if "reused from the stage cache" in r.getMessage()}
    assert reused == {"teacher", "baseline"}
    a, b = tmp_path / "a/stages", tmp_path / "b/stages"
    assert (b / "teacher/models/model.pt").read_bytes() == (a / "teacher/models/model.pt").read_bytes()
    assert json.loads((b / "baseline/result.json").read_text()) == json.loads((a / "baseline/result.json").read_text())
    assert json.loads((b / "kd/fingerprint.json").read_text())["stage"]["method"]["params"]["tau"] == 2.0  # trained anew
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 4  # and stored beside the first KD
    metrics = json.loads((tmp_path / "b/metrics.json").read_text())
    assert set(metrics["stages"]) == {"teacher", "baseline", "kd"}

    caplog.clear()  # --restart-stage trains afresh even when the cache holds the stage
    with caplog.at_level(logging.INFO, logger="crossmodal_kd.engine.trainer"):
        assert run(second, tmp_path / "b", cache, "--restart-stage", "baseline") == 0
    assert not [r for r in caplog.records if "reused from the stage cache" in r.getMessage()]


def test_the_key_covers_the_fingerprint_and_an_entry_is_written_whole(tmp_path):
    cache = StageCache(tmp_path / "cache")
    fp = {"seed": 0, "stage": {"name": "teacher", "epochs": 1}}
    assert cache.key(fp) == cache.key(json.loads(json.dumps(fp)))
    assert cache.key(fp) != cache.key({**fp, "seed": 1})
    stage = tmp_path / "stage"
    (stage / "checkpoints").mkdir(parents=True)
    (stage / "result.json").write_text("{}")
    (stage / "checkpoints/epoch_0.pt").write_bytes(b"x")
    assert not cache.fetch("k", tmp_path / "elsewhere")  # nothing stored yet
    cache.store("k", stage)
    assert (tmp_path / "cache/k/result.json").is_file() and not (tmp_path / "cache/k/checkpoints").exists()
    assert not list((tmp_path / "cache").glob(".*partial"))
    target = tmp_path / "copy"
    (target / "stale").mkdir(parents=True)
    assert cache.fetch("k", target) and sorted(p.name for p in target.iterdir()) == ["result.json"]
