"""The documented plug-in example (examples/plugin_encoder): a user's own encoder file named under
``imports:`` trains as a teacher and as a student with no package edits; mistakes give clear errors."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO, read_json
from crossmodal_kd.cli import main
from crossmodal_kd.config import load_config
from crossmodal_kd.engine.trainer import Runner
from crossmodal_kd.registry import ENCODERS, RegistryError
from conftest import AVDIGITS_ON_SYNTHETIC

EXAMPLE = REPO / "examples" / "plugin_encoder" / "config.yaml"


def test_plugin_encoder_trains_as_teacher_and_as_student(tmp_path, clean_registries, capsys):
    assert "conv_mixer" not in ENCODERS
    out = tmp_path / "run"
    sets = [arg for item in AVDIGITS_ON_SYNTHETIC for arg in ("--set", item)]
    code = main(["run", str(EXAMPLE), *sets, "--fast-dev-run", "--no-progress", "--output-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = read_json(out / "metrics.json")
    assert set(metrics["stages"]) == {"teacher_cm", "student_only", "kd_cm"}
    for stage, model, modality in (("teacher_cm", "model", "audio"), ("kd_cm", "student", "image")):
        spec = torch.load(out / "stages" / stage / "models" / f"{model}.pt", weights_only=True)["spec"]
        assert spec["params"]["modality"] == modality and spec["params"]["encoder"]["name"] == "conv_mixer"
        assert metrics["stages"][stage]["models"][model]["test"]["n"] > 0


def test_a_typo_in_the_encoder_name_lists_the_valid_names(tmp_path, clean_registries):
    cfg = load_config(EXAMPLE, [*AVDIGITS_ON_SYNTHETIC, "networks.image_mixer.params.encoder.name=conv_mixr"])
    with pytest.raises(RegistryError, match=r"unknown encoder 'conv_mixr'; valid: .*conv_mixer.*lenet5"):
        Runner(cfg, tmp_path / "run", fast_dev_run=True, progress=False).run()


def test_a_missing_plugin_file_is_named(tmp_path, clean_registries, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(EXAMPLE.read_text().replace("imports: [my_encoder.py]", "imports: [my_encodr.py]")
                      .replace("../../configs/", f"{REPO}/configs/"))
    assert main(["run", str(config), "--fast-dev-run", "--no-progress", "--output-dir", str(tmp_path / "run")]) == 1
    assert "FileNotFoundError: imports: plugin file not found: my_encodr.py" in capsys.readouterr().err
