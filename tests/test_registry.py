"""Registry: keys, errors that name what is valid, keyword checking, and user plug-ins through ``imports:``."""

from __future__ import annotations

import textwrap

import pytest

from conftest import read_json, tiny_config, write_yaml
from crossmodal_kd.registry import ENCODERS, Registry, RegistryError, import_plugins


def test_register_by_explicit_and_inferred_name():
    reg = Registry("widget")

    @reg.register("a")
    def make_a():
        return "A"

    @reg.register()
    def make_b():
        return "B"

    assert reg.list() == ["a", "make_b"]
    assert "a" in reg and "zzz" not in reg
    assert list(reg) == ["a", "make_b"]
    assert reg.get("a") is make_a
    assert reg.build("make_b") == "B"


def test_duplicate_key_is_an_error_naming_the_first_registration():
    reg = Registry("widget")

    @reg.register("x")
    def first():
        pass

    reg.register("x")(first)  # the same object again (e.g. a re-import) is harmless
    with pytest.raises(RegistryError, match=r"widget: 'x' is already registered by .*first"):

        @reg.register("x")
        def second():
            pass

    assert reg.get("x") is first


def test_unknown_key_lists_the_valid_keys():
    reg = Registry("widget")
    reg.register("beta")(lambda: 1)
    reg.register("alpha")(lambda: 2)
    with pytest.raises(RegistryError) as info:
        reg.get("gamma")
    assert str(info.value) == "unknown widget 'gamma'; valid: alpha, beta"
    assert isinstance(info.value, KeyError)  # callers may catch KeyError
    with pytest.raises(RegistryError, match=r"valid: \(none\)"):
        Registry("empty").get("x")


def test_build_checks_keyword_arguments_against_the_factory():
    reg = Registry("widget")

    @reg.register("w")
    def make(size, depth: int = 2, *args):
        return (size, depth)

    assert reg.build("w", {"size": 3}) == (3, 2)
    assert reg.build("w", {"depth": 5}, size=1) == (1, 5)  # context supplied by code
    with pytest.raises(TypeError) as info:
        reg.build("w", {"size": 1, "dpeth": 3, "colour": "red"}, where="networks.foo")
    msg = str(info.value)
    assert msg.startswith("networks.foo: unknown parameter(s) colour, dpeth;")
    assert "valid: size, depth" in msg
    with pytest.raises(TypeError, match=r"^widget\.w: missing required parameter\(s\) size$"):
        reg.build("w", {"depth": 1})
    # context keys are not offered to the user as valid config keys
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) x; valid: depth$"):
        reg.build("w", {"x": 1}, size=1)


def test_build_of_classes_and_kwargs_factories():
    reg = Registry("widget")

    @reg.register("cls")
    class Thing:
        def __init__(self, a, b=1):
            self.a, self.b = a, b

    @reg.register("any")
    def anything(**kw):
        return kw

    t = reg.build("cls", {"a": 4})
    assert (t.a, t.b) == (4, 1)
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) self"):
        reg.build("cls", {"a": 1, "self": 2})
    assert reg.build("any", {"whatever": 1}) == {"whatever": 1}


PLUGIN = textwrap.dedent(
    '''
    """A user encoder in a file outside the package."""
    from torch import nn
    from crossmodal_kd.registry import ENCODERS

    @ENCODERS.register("{name}")
    def flat_linear(input_shape, width: int = 8):
        n = 1
        for s in input_shape:
            n *= s
        net = nn.Sequential(nn.Flatten(), nn.Linear(n, width), nn.ReLU())
        net.out_dim = width
        return net
    '''
)


def test_import_plugins_from_a_py_file(tmp_path, clean_registries):
    plugin = tmp_path / "my_encoders.py"
    plugin.write_text(PLUGIN.format(name="user_flat"))
    assert "user_flat" not in ENCODERS
    import_plugins([str(plugin)])
    assert "user_flat" in ENCODERS
    enc = ENCODERS.build("user_flat", {"width": 5}, input_shape=(1, 4, 4))
    assert enc.out_dim == 5
    import_plugins([str(plugin)])  # importing the same file again is a no-op, not a duplicate error


def test_two_plugin_files_with_the_same_name_both_load(tmp_path, clean_registries):
    a, b = tmp_path / "a" / "plugins.py", tmp_path / "b" / "plugins.py"
    for path, name in ((a, "enc_from_a"), (b, "enc_from_b")):
        path.parent.mkdir()
        path.write_text(PLUGIN.format(name=name))
    import_plugins([str(a), str(b)])
    assert "enc_from_a" in ENCODERS and "enc_from_b" in ENCODERS


def test_import_plugins_errors_name_the_entry(tmp_path):
    with pytest.raises(FileNotFoundError, match="plugin file not found: .*nope.py"):
        import_plugins([str(tmp_path / "nope.py")])
    with pytest.raises(ModuleNotFoundError, match="cannot import plugin module 'no_such_module_xyz'"):
        import_plugins(["no_such_module_xyz"])


def test_plugin_encoder_used_from_yaml_without_package_edits(tmp_path, clean_registries, monkeypatch):
    """The documented path: a user file, an ``imports:`` entry, the encoder's name in the YAML."""
    from crossmodal_kd.cli import main

    plugin = tmp_path / "user_code" / "my_encoders.py"
    plugin.parent.mkdir()
    plugin.write_text(PLUGIN.format(name="user_flat_yaml"))
    raw = tiny_config()
    raw["imports"] = [str(plugin)]
    raw["networks"]["image_student"]["params"]["encoder"] = {"name": "user_flat_yaml", "params": {"width": 6}}
    raw["stages"] = [raw["stages"][1]]
    cfg = write_yaml(tmp_path / "plugin.yaml", raw)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--fast-dev-run", "--no-progress", "--output-dir", str(out)]) == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["stages"]["baseline"]["parameters"]["model"] == 64 * 6 + 6 + 6 * 4 + 4
    saved = read_json(out / "stages" / "baseline" / "result.json")
    assert saved["models"]["model"]["test"]["n"] > 0
