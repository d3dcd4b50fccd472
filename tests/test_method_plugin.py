"""The README's KD-method plug-in example, run exactly as written: its method file is a plug-in named under
``imports:``, its parameters are typed (a bad weight fails in one line naming its config path), and its
loss term reaches the stage log."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO
from crossmodal_kd.cli import main
from crossmodal_kd.registry import METHODS
from conftest import AVDIGITS_ON_SYNTHETIC

SECTION = "## Plugging in your own KD method"


def readme_example() -> tuple[str, str]:
    """The ``python`` and ``yaml`` blocks of the README's KD-method section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[: section.index("\n## ", len(SECTION))]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    yaml = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return python, yaml


@pytest.fixture
def example(tmp_path, clean_registries):
    """The example's two files in ``tmp_path`` (the config's ``base:`` pointed at this repository's configs)."""
    python, yaml = readme_example()
    assert python.startswith("# my_kd.py\n") and "imports: [my_kd.py]" in yaml
    (tmp_path / "my_kd.py").write_text(python)
    config = tmp_path / "my_kd.yaml"
    config.write_text(yaml.replace("base: configs/", f"base: {REPO}/configs/"))
    return config


def run(config, out, *overrides: str) -> int:
    sets = [arg for item in (*AVDIGITS_ON_SYNTHETIC, *overrides) for arg in ("--set", item)]
    return main(["run", str(config), *sets, "--fast-dev-run", "--no-progress", "--output-dir", str(out)])


def test_the_readme_method_plugin_runs_and_logs_its_term(example, tmp_path, capsys):
    assert "my_kd" not in METHODS
    out = tmp_path / "run"
    assert run(example, out) == 0, capsys.readouterr().err
    assert "my_kd" in METHODS
    row = json.loads((out / "stages" / "my_kd" / "log.jsonl").read_text().splitlines()[0])
    assert {"train/ce", "train/kd", "train/my"} <= set(row)
    assert row["train/loss"] == pytest.approx(row["train/ce"] + row["train/kd"] + row["train/my"], rel=1e-5)
    params = METHODS.get("my_kd").Params
    assert list(params.model_fields) == ["student", "teacher", "student_init", "tau", "w_ce", "w_kd", "w_my"]


def test_a_bad_weight_of_the_plugin_fails_in_one_line_naming_its_path(example, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(example, out, "stages.my_kd.method.params.w_my=-1") == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: ConfigError: stages[1].method.params.w_my: Input should be greater than or equal to 0 (got -1)"
    assert not out.exists()  # refused before the first stage trained
