"""``crossmodal-kd export`` / ``predict`` and ``crossmodal_kd.load_student`` on tiny finished runs: all three
formats reproduce the run's logits, the spec records inputs and normalisation, bad inputs give one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import crossmodal_kd
from conftest import run_config, tiny_config
from crossmodal_kd import export as export_module
from crossmodal_kd.cli import main
from crossmodal_kd.data import build_dataset, collate_batch
from crossmodal_kd.data import cremad
from crossmodal_kd.export import load_safetensors
from crossmodal_kd.models.io import load_model
from test_data import write_avmnist


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The 3-stage synthetic run (teacher: image+audio fusion; kd: image student), one epoch per stage."""
    out = tmp_path_factory.mktemp("export") / "run"
    run_config(tiny_config(), out, fast_dev_run=True)
    return out


def predicted(out: str) -> list[dict[str, float]]:
    """``predict``'s printout as one ``{class: probability}`` per sample."""
    samples: list[dict[str, float]] = []
    for line in out.splitlines():
        if line.startswith("  "):
            name, p = line.split()
            samples[-1][name] = float(p)
        else:
            samples.append({})
    return samples


def val_batch() -> dict[str, torch.Tensor]:
    data = build_dataset("synthetic", "unused", tiny_config()["data"]["params"]).load()
    return collate_batch(data.val.__getitems__(list(range(len(data.val)))))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_writes_each_format_and_reproduces_the_logits(run_dir, capsys):
    network, spec = crossmodal_kd.load_student(run_dir)
    batch = val_batch()
    with torch.no_grad():
        expected = network(batch)["logits"]
    exports = run_dir / "exports"
    for fmt, suffix in (("safetensors", ".safetensors"), ("onnx", ".onnx"), ("torchscript", ".pt")):
        assert main(["export", str(run_dir), "--format", fmt]) == 0
        out = capsys.readouterr().out
        assert "(stage 'kd', model 'student': the final student)" in out
        path = exports / fmt / f"kd_student{suffix}"
        assert f"wrote {path} and {path.with_suffix('.json')}" in out
        written = json.loads(path.with_suffix(".json").read_text())
        assert written["inputs"] == spec["inputs"] and written["class_names"] == ["class0", "class1", "class2", "class3"]
        assert written["export"]["format"] == fmt and written["export"]["check"]["rows"] == 32
        if fmt == "onnx":
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            assert [i.name for i in session.get_inputs()] == ["image"]
            got = torch.from_numpy(session.run(["logits"], {"image": batch["image"].numpy()})[0])
            assert "max abs logit difference" in out and written["export"]["opset"] >= 17
        else:
            with torch.no_grad():
                got = torch.jit.load(str(path))(batch["image"]) if fmt == "torchscript" else load_safetensors(path)[0](batch)["logits"]
        diff = float((got - expected).abs().max())
        assert diff <= 1e-4, (fmt, diff)
        assert written["export"]["check"]["max_abs_diff"] <= 1e-4


def test_safetensors_round_trips_exactly(run_dir):
    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(run_dir / "st" / "s.safetensors")]) == 0
    network, spec = load_safetensors(run_dir / "st" / "s.safetensors")
    original = load_model(run_dir / "stages" / "kd" / "models" / "student.pt")
    assert not network.training
    assert network.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), original.state_dict().values()))
    assert spec["spec"] == json.loads(json.dumps(original.build_spec))


def test_an_interrupted_run_exports_its_last_finished_stage_and_says_so(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("exports", "st"))
    (tmp_path / "run" / "stages" / "kd" / "result.json").unlink()
    assert export_module.pick_model(tmp_path / "run") == ("baseline", "model", "the only model of stage 'baseline' (not finished yet: kd)")
    assert export_module.pick_model(tmp_path / "run", stage="teacher")[2] == "the only model of stage 'teacher'"
    with pytest.raises(export_module.ExportError, match=r"stage 'kd' has not finished \(finished: teacher, baseline\)"):
        export_module.pick_model(tmp_path / "run", stage="kd")


def test_load_student_entry_point(run_dir):
    network, spec = crossmodal_kd.load_student(run_dir)
    assert not network.training and network.modalities == ("image",)
    assert spec["source"]["stage"] == "kd" and spec["source"]["chosen"] == "the final student"
    assert spec["inputs"] == [{"name": "image", "shape": [1, 8, 8], "dtype": "float32", "normalisation": {"kind": "none"},
                               "raw": {"image": {"pixel_scale": 1 / 255, "resize": "stretch", "resample": "bilinear"}}}]
    _, spec = crossmodal_kd.load_student(run_dir, stage="teacher")
    assert [i["name"] for i in spec["inputs"]] == ["image", "audio"] and "only model" in spec["source"]["chosen"]
    # the package import stays light: export (and torch) load only when the function is called
    code = "import sys, crossmodal_kd; print('crossmodal_kd.export' in sys.modules, 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False", "False"]


def test_predict_prints_probabilities_for_npy_and_png(run_dir, tmp_path, capsys):
    for fmt in ("onnx", "torchscript", "safetensors"):
        assert main(["export", str(run_dir), "--format", fmt, "--out", str(tmp_path / fmt / f"m{export_module.FORMATS[fmt]}")]) == 0
    capsys.readouterr()
    np.save(tmp_path / "one.npy", np.random.default_rng(0).normal(size=(1, 8, 8)).astype(np.float32))
    np.save(tmp_path / "three.npy", np.random.default_rng(1).normal(size=(3, 1, 8, 8)).astype(np.float32))
    Image.fromarray((np.random.default_rng(2).random((20, 30)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    seen = {}
    for fmt, suffix in export_module.FORMATS.items():
        for name, rows in (("one.npy", 1), ("three.npy", 3), ("x.png", 1)):
            assert main(["predict", str(tmp_path / fmt / f"m{suffix}"), "--input", str(tmp_path / name), "--top", "0"]) == 0
            samples = predicted(capsys.readouterr().out)
            assert len(samples) == rows and all(len(s) == 4 for s in samples)
            assert all(abs(sum(s.values()) - 1) < 1e-3 for s in samples)
            seen.setdefault(name, []).append(samples)
    for name, runs in seen.items():  # the three formats agree
        for a, b in zip(runs, runs[1:]):
            assert all(abs(x[c] - y[c]) < 1e-3 for x, y in zip(a, b) for c in x), name
    assert main(["predict", str(tmp_path / "onnx" / "m.onnx"), "--input", str(tmp_path / "one.npy"), "--top", "2"]) == 0
    assert [len(s) for s in predicted(capsys.readouterr().out)] == [2]


def test_a_two_input_teacher_takes_named_inputs(run_dir, tmp_path, capsys):
    out = tmp_path / "teacher.onnx"
    assert main(["export", str(run_dir), "--stage", "teacher", "--format", "onnx", "--out", str(out)]) == 0
    capsys.readouterr()
    np.save(tmp_path / "img.npy", np.zeros((2, 1, 8, 8), np.float32))
    np.save(tmp_path / "aud.npy", np.ones((2, 1, 8, 8), np.float32))
    assert main(["predict", str(out), "--input", f"image={tmp_path / 'img.npy'}", "--input", f"audio={tmp_path / 'aud.npy'}"]) == 0
    assert len(predicted(capsys.readouterr().out)) == 2
    assert main(["predict", str(out), "--input", str(tmp_path / "img.npy")]) == 1
    assert capsys.readouterr().err.strip() == "error: ExportError: the model takes inputs image, audio: pass --input NAME=FILE for each"


def test_a_logit_mismatch_is_an_error_and_removes_the_export(run_dir, tmp_path, monkeypatch, capsys):
    runner = export_module._runner
    monkeypatch.setattr(export_module, "_runner", lambda *a: (lambda xs: runner(*a)(xs) + 1e-3))
    out = tmp_path / "bad.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: ExportError: {out}: onnx logits differ from PyTorch by 0.001 (> 0.0001) on 32 validation rows")
    assert "\n" not in err and not out.exists() and not out.with_suffix(".json").exists()


def test_bad_inputs_and_choices_give_one_line(run_dir, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(model)]) == 0
    capsys.readouterr()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.npy").write_bytes(b"not an npy")
    np.save(tmp_path / "shape.npy", np.zeros((3, 8), np.float32))
    np.save(tmp_path / "nan.npy", np.full((1, 8, 8), np.nan, np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    np.save(tmp_path / "text.npy", np.full((1, 8, 8), "a"))
    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "x.wav").write_bytes(b"")
    cases = {
        "missing.npy": f"{tmp_path / 'missing.npy'}: file not found",
        "broken.png": f"{tmp_path / 'broken.png'}: unreadable image",
        "broken.npy": f"{tmp_path / 'broken.npy'}: unreadable .npy file",
        "shape.npy": f"{tmp_path / 'shape.npy'}: shape (3, 8) is not the model's 'image' input (1, 8, 8)",
        "nan.npy": f"{tmp_path / 'nan.npy'}: holds NaN/inf values",
        "text.npy": f"{tmp_path / 'text.npy'}: dtype <U1 cannot feed the model's float32 input 'image'",
        "x.jpg": f"{tmp_path / 'x.jpg'}: unsupported input type '.jpg'; use .npy, .png, .wav",
        "x.wav": f"{tmp_path / 'x.wav'}: dataset 'synthetic' has no raw-audio front end for the model's input 'image'",
        "empty.npy": f"{tmp_path / 'empty.npy'}: shape (0, 1, 8, 8) is not the model's 'image' input (1, 8, 8)",
    }
    for name, message in cases.items():
        assert main(["predict", str(model), "--input", str(tmp_path / name)]) == 1, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: ExportError: {message}"), err
    assert main(["predict", str(tmp_path / "missing.onnx"), "--input", str(tmp_path / "shape.npy")]) == 1
    assert capsys.readouterr().err == f"error: ExportError: {tmp_path / 'missing.onnx'}: file not found\n"
    assert main(["export", str(run_dir), "--format", "onnx", "--stage", "nope"]) == 1
    assert "stage 'nope' is not in this run; stages: teacher, baseline, kd" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--format", "onnx", "--model", "teacher"]) == 1
    assert "stage 'kd' saves no model 'teacher'; models: student" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "onnx"]) == 1
    assert capsys.readouterr().err == f"error: ExportError: {tmp_path}: not a run directory (no config.yaml)\n"


def test_normalisation_not_recorded_by_the_dataset_refuses_raw_files(tmp_path, capsys):
    """avmnist z-scores in load() and keeps no statistics: a png cannot be preprocessed as in training."""
    write_avmnist(tmp_path)
    raw = tiny_config()
    raw["data"] = {"name": "avmnist", "root": str(tmp_path), "params": {"val_fraction": 0.2, "num_classes": 4},
                   "batch_size": 16, "eval_batch_size": 16}
    raw["stages"] = [dict(raw["stages"][1], epochs=1)]
    run_config(raw, tmp_path / "run", fast_dev_run=True)
    model = tmp_path / "m.pt"
    assert main(["export", str(tmp_path / "run"), "--format", "torchscript", "--out", str(model)]) == 0
    spec = json.loads(model.with_suffix(".json").read_text())
    assert spec["inputs"][0]["normalisation"]["kind"] == "unrecorded"
    Image.new("L", (28, 28)).save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["predict", str(model), "--input", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset 'avmnist' z-scores this input with training statistics it does not record" in err
    np.save(tmp_path / "x.npy", np.zeros((1, 28, 28), np.float32))
    assert main(["predict", str(model), "--input", str(tmp_path / "x.npy")]) == 0


def test_cremad_records_its_statistics_and_predicts_from_wav_and_png(tmp_path, capsys):
    """CREMA-D's loader normalises with recorded statistics and has a raw-audio front end: a .wav and a
    .png go through the same decoding and normalisation as the training data."""
    base = cremad.synthesise_tree(tmp_path / "cremad", 2, 1)
    params = {"sample_rate": 8000, "clip_seconds": 1.0, "n_mels": 16, "n_fft": 256, "hop_length": 256,
              "image_size": 16, "num_frames": 1, "val_fraction": 0.5, "progress": False}
    small = {"name": "small_cnn", "params": {"channels": [4]}}
    raw = tiny_config()
    raw["data"] = {"name": "cremad", "root": str(tmp_path), "params": params, "batch_size": 6, "eval_batch_size": 6}
    raw["networks"] = {"fusion": {"name": "fusion", "params": {"encoders": {"image": small, "audio": small}, "hidden": 8}}}
    raw["stages"] = [dict(raw["stages"][0], epochs=1)]
    run_config(raw, tmp_path / "run", fast_dev_run=True)
    model = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(model)]) == 0
    inputs = {i["name"]: i for i in json.loads(model.with_suffix(".json").read_text())["inputs"]}
    assert inputs["image"]["normalisation"]["kind"] == "zscore" and len(inputs["image"]["normalisation"]["mean"]) == 3
    assert inputs["audio"]["raw"]["audio"]["dataset"] == "cremad"
    clip = sorted((base / "AudioWAV").iterdir())[0]
    frame = sorted((base / "Image-01-FPS" / clip.stem).iterdir())[0]
    Image.open(frame).save(tmp_path / "frame.png")
    capsys.readouterr()
    assert main(["predict", str(model), "--input", f"image={tmp_path / 'frame.png'}", "--input", f"audio={clip}", "--top", "0"]) == 0
    (sample,) = predicted(capsys.readouterr().out)
    assert set(sample) == set(cremad.CLASS_NAMES) and abs(sum(sample.values()) - 1) < 1e-3
    # the wav decodes to exactly the dataset's (normalised) tensor
    family = build_dataset("cremad", str(tmp_path), params)
    data = family.load()
    expected = data.val.normalise("audio", torch.from_numpy(cremad.log_mel(cremad.read_audio(clip, family.params), family.params)))
    got = export_module._read_input(clip, inputs["audio"], "cremad")[0]
    assert torch.allclose(got, expected, atol=1e-6)
    with wave.open(str(tmp_path / "empty.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
    assert main(["predict", str(model), "--input", f"image={tmp_path / 'frame.png'}", "--input", f"audio={tmp_path / 'empty.wav'}"]) == 1
    assert capsys.readouterr().err == f"error: ExportError: {tmp_path / 'empty.wav'}: audio file has no samples\n"


def test_a_student_on_a_derived_view_takes_the_source_modality(tmp_path, capsys):
    """``data.views`` are derived inside the exported graph: the file takes the view's source modality."""
    raw = tiny_config()
    raw["data"]["views"] = {"image_edge": {"name": "edge", "params": {"source": "image", "alpha": 0.5}}}
    raw["networks"]["image_student"]["params"]["modality"] = "image_edge"
    raw["stages"] = [dict(raw["stages"][1], epochs=1)]
    run_config(raw, tmp_path / "run", fast_dev_run=True)
    capsys.readouterr()
    for fmt in ("onnx", "torchscript", "safetensors"):
        out, spec = export_module.export(tmp_path / "run", fmt)
        assert [i["name"] for i in spec["inputs"]] == ["image"] and spec["modalities"] == ["image_edge"]
        assert spec["views"] == {"image_edge": {"name": "edge", "params": {"source": "image", "alpha": 0.5}}}
        assert spec["export"]["check"]["max_abs_diff"] <= 1e-4
        np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32))
        assert main(["predict", str(out), "--input", str(tmp_path / "x.npy"), "--top", "0"]) == 0
        assert all(abs(sum(s.values()) - 1) < 1e-3 for s in predicted(capsys.readouterr().out))
