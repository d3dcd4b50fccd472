"""Typed, range-checked component parameters, the whole-run preflight and plug-in import errors."""

from __future__ import annotations

import re
import textwrap
import time
from typing import Annotated, ClassVar, Sequence

import pytest
import torch

from conftest import REPO, TEST_CONFIGS, tiny_config, write_yaml
from crossmodal_kd.config import ConfigError, load_config, validate_config
from crossmodal_kd.engine.preflight import preflight
from crossmodal_kd.engine.trainer import Runner
from crossmodal_kd.params import Params, PositiveFloat, PositiveInt, RouterSpec, Supplied
from crossmodal_kd.registry import METHODS, OPTIMIZERS, Registry, RegistryError, UnknownComponentError, check_kwargs, import_plugins

KD = "stages[2].method.params"  # tiny_config's third stage: kd from {stage: teacher}
OPT = "stages[2].optimizer.params"


def _preflight_error(raw, tmp_path, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        preflight(validate_config(raw), tmp_path / "run", **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- item 4: ranges and types


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("method", "tau", -1, f"{KD}.tau: Input should be greater than 0 (got -1)"),
    ("method", "tau", 0, f"{KD}.tau: Input should be greater than 0 (got 0)"),
    ("method", "tau", "abc", f"{KD}.tau: Input should be a valid number, unable to parse string as a number (got 'abc')"),
    ("method", "tau", [4], f"{KD}.tau: Input should be a valid number (got [4])"),
    ("method", "w_kd", -0.5, f"{KD}.w_kd: Input should be greater than or equal to 0 (got -0.5)"),
    ("optimizer", "lr", -0.002, f"{OPT}.lr: Input should be greater than 0 (got -0.002)"),
    ("optimizer", "lr", "abc", f"{OPT}.lr: Input should be a valid number, unable to parse string as a number (got 'abc')"),
    ("optimizer", "lr", True, None),  # pydantic's lax mode reads a bool as 1.0: accepted, as by torch
    ("optimizer", "weight_decay", -1e-4, f"{OPT}.weight_decay: Input should be greater than or equal to 0 (got -0.0001)"),
])
def test_numeric_parameters_have_a_range_and_a_type_and_errors_name_the_path(tmp_path, section, key, value, message):
    raw = tiny_config()
    raw["stages"][2][section]["params"][key] = value
    if message is None:
        preflight(validate_config(raw), tmp_path / "run")
        return
    assert _preflight_error(raw, tmp_path) == message


def test_strings_from_yaml_are_converted_before_the_factory_sees_them():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = OPTIMIZERS.build("adamw", {"lr": "2e-3", "betas": ["0.8", 0.9]}, params=p)
    assert opt.defaults["lr"] == 0.002 and opt.defaults["betas"] == (0.8, 0.9)
    with pytest.raises(ConfigError, match=r"^x\.momentum: Input should be less than 1 \(got 1\.0\)$"):
        OPTIMIZERS.build("sgd", {"lr": 0.1, "momentum": 1.0}, where="x", params=p)


def test_registry_builds_from_typed_signatures_one_line_per_problem():
    reg = Registry("widget", context=("ctx",))
    seen = {}

    @reg.register("w")
    def make(ctx, size: PositiveInt, scale: PositiveFloat = 1.0, anything=None):
        return size, scale, anything

    assert reg.build("w", {"size": "3", "scale": 2, "anything": "x"}, ctx=None) == (3, 2.0, "x")
    assert isinstance(reg.build("w", {"size": 1, "scale": 2}, ctx=None)[1], float)
    with pytest.raises(ConfigError) as info:
        reg.build("w", {"size": 2.5, "scale": -1}, where="networks.w.params", ctx=None)
    assert str(info.value).splitlines() == [
        "networks.w.params.size: Input should be a valid integer, got a number with a fractional part (got 2.5)",
        "networks.w.params.scale: Input should be greater than 0 (got -1)",
    ]
    # the unknown / missing key messages are unchanged
    with pytest.raises(TypeError, match=r"^widget\.w: missing required parameter\(s\) size$"):
        reg.build("w", {}, ctx=None)
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) sise; valid: size, scale, anything$"):
        reg.validate("w", {"sise": 1})

    @reg.register("checked")
    class Checked:
        def __init__(self, ctx, names: Annotated[Sequence[str], Supplied()], n: PositiveInt = 1):
            pass

        @staticmethod
        def preflight(params, where):
            seen[where] = params

    # validation skips the registry's context parameters and those the calling code supplies, then runs the hook
    assert reg.validate("checked", {"n": "2"}, where="here") == {"n": 2}
    assert seen == {"here": {"n": 2}}
    with pytest.raises(TypeError, match="missing required parameter"):
        reg.build("checked", {}, ctx=None)


def test_a_declared_params_model_is_validated_once_and_handed_over_whole():
    reg = Registry("widget", context=("ctx",))
    seen = {}

    class Base:
        class Params(Params):
            size: PositiveInt
            scale: PositiveFloat = 1.0

    @reg.register("w")
    class Widget(Base):
        class Params(Base.Params):  # inherits size and scale, adds its own, overrides a default
            renamed: ClassVar[dict[str, str]] = {"alpha": "w_extra"}
            scale: PositiveFloat = 2.0
            w_extra: PositiveFloat = 0.5
            names: Annotated[Sequence[str], Supplied()]
            router: RouterSpec | None = None

        def __init__(self, ctx, params: Widget.Params):
            self.ctx, self.params = ctx, params

        @staticmethod
        def preflight(params, where):
            seen[where] = params

    built = reg.build("w", {"size": "3"}, where="stages[0].method.params", ctx="the context", names=["a", "b"])
    assert built.ctx == "the context" and isinstance(built.params, Widget.Params)
    assert (built.params.size, built.params.scale, built.params.w_extra, built.params.names) == (3, 2.0, 0.5, ["a", "b"])
    assert reg.build("w", {"size": 1, "names": ["c"]}, ctx=None, names=["a"]).params.names == ["c"]  # the config's wins
    where = "stages[0].method.params"
    with pytest.raises(ConfigError) as info:
        reg.build("w", {"sise": 1, "colour": "red", "scale": -1, "router": {"name": "gate", "params": {"k": 0}}}, where=where, ctx=None, names=[])
    assert str(info.value).splitlines() == [
        f"{where}: unknown parameter(s) colour, sise; valid: size, scale, w_extra, names, router",
        f"{where}: missing required parameter(s) size",
        f"{where}.scale: Input should be greater than 0 (got -1)",
        f"{where}.router.params.k: Input should be greater than 0 (got 0)",
    ]
    with pytest.raises(ConfigError, match=rf"^{re.escape(where)}\.alpha: renamed to w_extra$"):
        reg.build("w", {"size": 1, "alpha": 0.1}, where=where, ctx=None, names=[])
    # validation without building: Supplied fields are not required, the hook sees the converted values given
    assert reg.validate("w", {"size": "2"}, where="here") == {"size": 2} and seen == {"here": {"size": 2}}
    assert [p.line("x") for p in reg.problems("w", {"alpha": 1})] == ["x.alpha: renamed to w_extra"]
    with pytest.raises(TypeError, match=r"^x: unknown parameter\(s\) colour; valid: size, scale, w_extra, names, router$"):
        check_kwargs(Widget, {"size": 1, "colour": 1, "alpha": 1}, where="x")  # a renamed key is left to its own error


def test_nested_components_are_checked_against_their_registry():
    where = "stages[3].method.params"
    params = {"student": "s", "teachers": [{"mask_stage": "m"}]}
    with pytest.raises(UnknownComponentError) as info:
        METHODS.validate("mst_distill", {**params, "router": {"name": "gatee"}}, where=where)
    assert str(info.value) == (
        f"{where}.router.name: unknown router 'gatee'; valid: fixed, gate, static, text_guided, uniform"
    )
    assert isinstance(info.value, KeyError) and isinstance(info.value, ConfigError)
    with pytest.raises(ConfigError) as info:
        METHODS.validate("mst_distill", {**params, "router": {"name": "gate", "params": {"k": 0, "hiden": 3}}}, where=where)
    assert str(info.value).splitlines() == [
        f"{where}.router.params: unknown parameter(s) hiden; valid: k, mode, objective, input, hidden, linear, detach_input, target_tau",
        f"{where}.router.params.k: Input should be greater than 0 (got 0)",
    ]
    net = {"modality": "image", "encoder": {"name": "small_cnn", "params": {"channels": [8, -1], "dropout": 1.0}}}
    with pytest.raises(ConfigError) as info:
        from crossmodal_kd.registry import NETWORKS

        NETWORKS.validate("unimodal", net, where="networks.student.params")
    assert str(info.value).splitlines() == [
        "networks.student.params.encoder.params.channels[1]: Input should be greater than 0 (got -1)",
        "networks.student.params.encoder.params.dropout: Input should be less than 1 (got 1.0)",
    ]


# ----------------------------------------------------------------------------- item 5: preflight


def test_an_unknown_router_in_the_last_stage_fails_before_the_first_stage_trains(tmp_path):
    cfg = load_config(TEST_CONFIGS / "synthetic_mst.yaml", ["stages.routed.method.params.router.name=gatee"])
    runner = Runner(cfg, tmp_path / "run", progress=False)
    started = time.perf_counter()
    with pytest.raises(RegistryError, match=r"^stages\[3\]\.method\.params\.router\.name: unknown router 'gatee'; valid: fixed, gate"):
        runner.run()
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "run").exists()  # no run directory, no stage directory, no model


def test_the_issue_example_fails_in_the_cli_without_data_or_output(tmp_path, capsys):
    from crossmodal_kd.cli import main

    out = tmp_path / "out"
    code = main(["run", str(REPO / "configs/avdigits/mst_distill.yaml"), "--set", "stages.routed.method.params.router.name=gatee",
                 "--output-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and not out.exists()
    assert err.startswith("error: UnknownComponentError: stages[") and ".method.params.router.name: unknown router 'gatee'" in err
    assert len(err.splitlines()) == 1


def test_references_between_stages_and_to_networks_are_checked_up_front(tmp_path):
    raw = tiny_config()
    raw["networks"]["dangling"] = "nowhere"
    raw["stages"][0]["method"]["params"]["network"] = "fusoin"
    raw["stages"][1]["method"] = {"name": "kd", "params": {"student": "image_student", "teacher": {"stage": "kd"}}}
    raw["stages"][2]["method"]["params"]["teacher"] = {"path": str(tmp_path / "missing.pt")}
    raw["stages"][2]["method"]["params"]["student_init"] = {"stage": "teacher", "path": "x.pt"}
    lines = _preflight_error(raw, tmp_path).splitlines()
    assert lines[0] == "5 problems in the config:"
    assert [line.strip() for line in lines[1:]] == [
        "networks.dangling: unknown network 'nowhere'; defined: image_student, fusion, dangling",
        "stages[0].method.params.network: unknown network 'fusoin'; defined under networks: dangling, fusion, image_student",
        "stages[1].method.params.teacher: stage 'kd' does not run before stage 'baseline'; only earlier stages can be used",
        f"{KD}.teacher: model file {tmp_path / 'missing.pt'} does not exist",
        f"{KD}.student_init: Value error, give exactly one of 'stage' (a stage of this run) or 'path' (a model file)"
        " (got {'stage': 'teacher', 'path': 'x.pt'})",
    ]


def test_a_finished_stage_does_not_need_its_input_files_on_resume(tmp_path):
    raw = tiny_config()
    raw["stages"][2]["method"]["params"]["teacher"] = {"path": str(tmp_path / "gone.pt")}
    assert "gone.pt does not exist" in _preflight_error(raw, tmp_path, resume=True)
    (tmp_path / "run" / "stages" / "kd").mkdir(parents=True)
    (tmp_path / "run" / "stages" / "kd" / "result.json").write_text("{}")
    preflight(validate_config(raw), tmp_path / "run", resume=True)


def test_mask_stage_must_be_an_earlier_mask_stage(tmp_path):
    cfg = load_config(TEST_CONFIGS / "synthetic_mst.yaml", ["stages.routed.method.params.teachers=[{mask_stage: collab}, {mask_stage: routed}]"])
    with pytest.raises(ConfigError) as info:
        preflight(cfg, tmp_path / "run")
    assert str(info.value).splitlines() == [
        "stages[3].method.params.teachers[0].mask_stage: stage 'collab' is a 'collaborative' stage, not 'mask'",
        "stages[3].method.params.teachers[1].mask_stage: stage 'routed' does not run before stage 'routed'; only earlier stages can be used",
    ]


def test_wordnet_clip_checks_the_wordnet_database_before_training(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setenv("CROSSMODAL_KD_WORDNET", str(tmp_path / "no_wordnet"))
    monkeypatch.setenv("CROSSMODAL_KD_CACHE", str(tmp_path / "cache"))
    backend = {"name": "text_aligned", "params": {"image_model": {"stage": "align"}}}
    with pytest.raises(ConfigError, match=rf"^stages\[1\]\.method\.params\.pool: WordNet: no database folder at {tmp_path / 'no_wordnet'}; install"):
        METHODS.validate("wordnet_clip", {"backend": backend}, where="stages[1].method.params")
    # the label-leakage pool (the exact class names) needs no WordNet
    METHODS.validate("wordnet_clip", {"backend": backend, "pool": {"source": "class_names"}}, where="s")


def test_every_signature_annotation_is_usable_by_the_registries():
    from crossmodal_kd.registry import ALL_REGISTRIES

    typed = {}
    for kind, registry in ALL_REGISTRIES.items():
        for name in registry.list():
            typed[kind, name] = registry._model(name).model_fields
    assert "tau" in typed["methods", "kd"] and "ctx" not in typed["methods", "kd"]  # a declared Params model
    assert "p_lr" in typed["optimizers", "adamw"] and "p_params" not in typed["optimizers", "adamw"]


# ----------------------------------------------------------------------------- item 7: plug-in import errors


def test_a_plugin_file_that_raises_names_the_file_and_line(tmp_path, clean_registries, capsys):
    from crossmodal_kd.cli import main

    plugin = tmp_path / "my_plugin.py"
    plugin.write_text("import os\n\n{}['boom']\n")
    with pytest.raises(ImportError) as info:
        import_plugins([str(plugin)])
    assert str(info.value) == f"imports: {plugin} line 3: KeyError: 'boom'"
    plugin.write_text("import os\n")  # fixed: importing it again in the same process works
    import_plugins([str(plugin)])

    bad = tmp_path / "bad_plugin.py"
    bad.write_text("x = 1\ndef f():\n    return 1 / 0\nf()\n")
    config = write_yaml(tmp_path / "run.yaml", {**tiny_config(), "imports": ["bad_plugin.py"]})
    assert main(["run", str(config), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: ImportError: imports: {bad.resolve()} line 3: ZeroDivisionError: division by zero"


def test_a_plugin_module_that_raises_names_its_file_and_line(tmp_path, monkeypatch, clean_registries):
    (tmp_path / "broken_mod_xyz.py").write_text(textwrap.dedent("""\
        from crossmodal_kd.registry import ENCODERS
        ENCODERS.register("lenet5")(print)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as info:
        import_plugins(["broken_mod_xyz"])
    assert str(info.value).startswith(f"imports: broken_mod_xyz ({tmp_path / 'broken_mod_xyz.py'} line 2): RegistryError: encoder: 'lenet5' is already registered")
