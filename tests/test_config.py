"""Config: strict schema with key paths in errors, ``--set`` overrides, ``base:`` includes, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, TEST_CONFIGS, tiny_config, write_yaml
from crossmodal_kd.config import (
    ConfigError,
    ModelRef,
    RunConfig,
    apply_override,
    deep_merge,
    dump_config,
    load_config,
    read_dotted,
    validate_config,
)
from crossmodal_kd.registry import METHODS, NETWORKS


def test_tiny_config_validates_with_defaults():
    raw = tiny_config()
    del raw["stages"][0]["optimizer"]
    cfg = validate_config(raw)
    assert [s.name for s in cfg.stages] == ["teacher", "baseline", "kd"]
    assert cfg.stages[0].optimizer.name == "adamw" and cfg.stages[0].optimizer.params == {"lr": 1e-3}
    assert cfg.stages[0].scheduler.name == "cosine"
    assert cfg.stages[0].select.metric == "accuracy" and cfg.stages[0].select.mode == "max"
    assert cfg.accelerator.gradient_accumulation_steps == 1
    assert cfg.stage("kd").method.params["teacher"] == {"stage": "teacher"}
    with pytest.raises(ConfigError, match="no stage named 'nope'; stages: teacher, baseline, kd"):
        cfg.stage("nope")


def test_unknown_key_is_rejected_with_its_dotted_path(tmp_path):
    raw = tiny_config()
    raw["stages"][0]["method"]["nme"] = "supervised"
    path = write_yaml(tmp_path / "typo.yaml", raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"{path}: stages.0.method.nme: Extra inputs are not permitted" in msg
    raw = tiny_config()
    raw["data"]["batchsize"] = 3
    raw["lr"] = 1
    with pytest.raises(ConfigError) as info:
        validate_config(raw, source="x.yaml")
    assert "x.yaml: data.batchsize:" in str(info.value) and "x.yaml: lr:" in str(info.value)


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda r: r["data"].update(batch_size=0), "data.batch_size"),
        (lambda r: r["stages"][1].update(epochs=0), "stages.1.epochs"),
        (lambda r: r["stages"][0].update(name="has space"), "stages.0.name"),
        (lambda r: r["stages"][0]["method"].pop("name"), "stages.0.method.name"),
        (lambda r: r.update(accelerator={"mixed_precision": "fp8"}), "accelerator.mixed_precision"),
        (lambda r: r["stages"][0].update(select={"metric": "test_accuracy"}), "stages.0.select.metric"),
        (lambda r: r.update(stages=[]), "stages"),
    ],
)
def test_invalid_values_name_their_path(mutate, where):
    raw = tiny_config()
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    assert f"<config>: {where}:" in str(info.value)


def test_duplicate_stage_names_are_rejected():
    raw = tiny_config()
    raw["stages"][2]["name"] = "teacher"
    with pytest.raises(ConfigError, match="duplicate stage name 'teacher'"):
        validate_config(raw)


def test_set_overrides_scalars_list_items_and_new_keys(tmp_path):
    raw = tiny_config()
    del raw["data"]["params"]
    path = write_yaml(tmp_path / "c.yaml", raw)
    cfg = load_config(
        path,
        [
            "stages.1.epochs=5",
            "stages.-1.method.params.tau=2.5",
            "data.batch_size=8",
            "data.params.n_train=40",  # 'params' did not exist: created
            "stages.0.optimizer={name: sgd, params: {lr: 0.1, momentum: 0.9}}",
            "seed=7",
        ],
    )
    assert cfg.stages[1].epochs == 5 and cfg.stages[0].epochs == 3
    assert cfg.stages[2].method.params["tau"] == 2.5
    assert cfg.data.batch_size == 8 and cfg.data.params == {"n_train": 40}
    assert cfg.stages[0].optimizer.name == "sgd" and cfg.stages[0].optimizer.params == {"lr": 0.1, "momentum": 0.9}
    assert cfg.seed == 7


def test_set_errors(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tiny_config())
    with pytest.raises(ConfigError, match=r"'stages\.3': list index '3' out of range \(0\.\.2\)"):
        load_config(path, ["stages.3.epochs=1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(path, ["seed"])
    with pytest.raises(ConfigError, match=r"'seed' is not a mapping"):
        load_config(path, ["seed.x=1"])
    with pytest.raises(ConfigError, match=r"stages\.0\.epocs: Extra inputs"):
        load_config(path, ["stages.0.epocs=1"])  # a typo in --set is caught like one in the file
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, ["seed=[1"])


def test_apply_override_creates_nested_mappings():
    raw: dict = {}
    apply_override(raw, "a.b.c=true")
    apply_override(raw, "a.b.d=null")
    assert raw == {"a": {"b": {"c": True, "d": None}}}


def test_read_dotted_follows_the_override_paths_and_returns_none_when_absent():
    raw = {"dataset": {"params": {"shared": 0.25}}, "stages": [{"name": "stage1", "epochs": 3}, {"name": "route"}]}
    assert read_dotted(raw, "dataset.params.shared") == 0.25
    assert read_dotted(raw, "stages.stage1.epochs") == 3  # by name, as --set addresses it
    assert read_dotted(raw, "stages.1.name") == "route"
    assert read_dotted(raw, "dataset.params.missing") is None
    assert read_dotted(raw, "stages.7.epochs") is None
    assert read_dotted(raw, "dataset.params.shared.deeper") is None


def test_bad_yaml_and_missing_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\nstages: [\n  - {name: a\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: invalid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=rf"^{lst}: top level must be a mapping, got list"):
        load_config(lst)
    with pytest.raises(ConfigError, match=rf"config file not found: {tmp_path / 'absent.yaml'}"):
        load_config(tmp_path / "absent.yaml")


def test_base_include_deep_merges(tmp_path):
    base = tiny_config()
    base["accelerator"] = {"gradient_accumulation_steps": 2, "keep_checkpoints": 3, "cpu": True}
    base["imports"] = ["base.module"]
    write_yaml(tmp_path / "common" / "base.yaml", base)
    write_yaml(tmp_path / "common" / "extra.yaml", {"seed": 5, "data": {"eval_batch_size": 8}})
    child = {
        "base": ["common/base.yaml", "common/extra.yaml"],
        "imports": ["child.module"],
        "data": {"batch_size": 4, "params": {"n_train": 20}},
        "accelerator": {"keep_checkpoints": 1},
        "stages": [
            {"name": "baseline", "epochs": 7},
            {"name": "extra", "method": {"name": "supervised", "params": {"network": "fusion"}}},
        ],
    }
    cfg = load_config(write_yaml(tmp_path / "child.yaml", child))
    assert cfg.seed == 5  # from the second base
    assert cfg.data.name == "synthetic" and cfg.data.batch_size == 4 and cfg.data.eval_batch_size == 8
    # nested mappings merge key by key ...
    assert cfg.data.params == {**base["data"]["params"], "n_train": 20}
    assert cfg.accelerator.gradient_accumulation_steps == 2 and cfg.accelerator.keep_checkpoints == 1
    assert cfg.accelerator.cpu is True
    assert set(cfg.networks) == {"image_student", "fusion"}
    # ... stages (a list of named mappings) merge by name, in order of first appearance ...
    assert [s.name for s in cfg.stages] == ["teacher", "baseline", "kd", "extra"]
    assert cfg.stage("baseline").epochs == 7
    assert cfg.stage("baseline").method.params == {"network": "image_student"}
    # ... and other lists are replaced, not concatenated
    assert cfg.imports == ["child.module"]


def test_deep_merge_does_not_alias_inputs():
    base = {"a": {"b": [1]}}
    out = deep_merge(base, {"a": {"c": 2}})
    out["a"]["b"].append(9)
    assert base == {"a": {"b": [1]}} and out == {"a": {"b": [1, 9], "c": 2}}


def test_circular_base_is_an_error(tmp_path):
    write_yaml(tmp_path / "a.yaml", {"base": "b.yaml", "seed": 1})
    write_yaml(tmp_path / "b.yaml", {"base": "a.yaml", "seed": 2})
    with pytest.raises(ConfigError, match=r"a\.yaml: circular 'base:' include"):
        load_config(tmp_path / "a.yaml")
    write_yaml(tmp_path / "self.yaml", {"base": "self.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "self.yaml")
    with pytest.raises(ConfigError, match=r"config file not found: .*missing_base\.yaml"):
        load_config(write_yaml(tmp_path / "m.yaml", {"base": "missing_base.yaml"}))


def test_model_ref_needs_exactly_one_source():
    assert ModelRef(stage="teacher").model == "model"
    assert ModelRef(path="/x/model.pt").stage is None
    for bad in ({}, {"stage": "t", "path": "p.pt"}, {"model": "student"}):
        with pytest.raises(ValueError, match="exactly one of 'stage'"):
            ModelRef.model_validate(bad)
    with pytest.raises(ValueError, match="Extra inputs"):
        ModelRef.model_validate({"stage": "t", "stge": "x"})


def test_dump_config_round_trips(tmp_path):
    raw = tiny_config()
    raw["imports"] = ["some.module"]
    raw["stages"][0]["grad_clip_norm"] = 1.5
    cfg = validate_config(raw)
    text = dump_config(cfg)
    again = validate_config(yaml.safe_load(text))
    assert again == cfg
    assert dump_config(again) == text
    # the dumped file loads through the normal path too (this is what `eval RUN_DIR` reads)
    (tmp_path / "config.yaml").write_text(text)
    assert load_config(tmp_path / "config.yaml") == cfg


def _shipped_configs() -> list[Path]:
    """Every run config in the repository. ``_name.yaml`` files are ``base:`` fragments (checked through the
    configs that include them); ``configs/bench/`` holds benchmark specs and ``configs/accelerate/`` launcher
    files, other schemas (tests/test_bench.py and tests/test_launch_recipes.py check those)."""
    paths = sorted(TEST_CONFIGS.glob("*.yaml")) + sorted((REPO / "configs").rglob("*.yaml"))
    other = {"bench", "accelerate"}
    return [p for p in paths if not p.name.startswith("_") and not other & set(p.relative_to(REPO).parts[:-1])]


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_parses_and_names_registered_components(path):
    from crossmodal_kd.registry import import_plugins

    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    import_plugins(cfg.imports)
    for stage in cfg.stages:
        METHODS.get(stage.method.name)
    for name in cfg.networks:
        NETWORKS.get(cfg.network(name).name)  # aliases resolve to a definition


@pytest.mark.parametrize("path", sorted((REPO / "configs/bench").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_benchmark_names_stages_its_configs_have(path):
    from crossmodal_kd.bench import load_bench

    bench = load_bench(path)
    for exp in bench.experiments:
        for variant, overrides in bench.variants.items():
            stages = {s.name for s in load_config(REPO / exp.config, [*exp.overrides, *overrides]).stages}
            for row in exp.rows:
                missing = {row.stage, *row.cost_stages} - stages
                assert not missing, f"{path.name}: row '{row.label}' ({variant}) names unknown stage(s) {missing}"
