"""CREMA-D (issue 7): decoding, the cache, lazy == cached, ``data check`` faults and the shipped configs,
all on a tiny CREMA-D-layout tree synthesised in a temporary folder (22.05 kHz stereo tones, jpg frames)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from conftest import REPO
from crossmodal_kd import cli
from crossmodal_kd.config import load_config
from crossmodal_kd.data import DataError, build_dataset, collate_batch
from crossmodal_kd.data import cremad
from crossmodal_kd.engine.trainer import Runner

TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 1
SMALL = {  # small decoding parameters so every test stays fast
    "sample_rate": 8000, "clip_seconds": 1.0, "n_mels": 16, "n_fft": 256, "hop_length": 256,
    "image_size": 16, "num_frames": 2, "val_fraction": 0.25, "progress": False,
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return cremad.synthesise_tree(tmp_path_factory.mktemp("cremad") / "cremad", TRAIN_PER_CLASS, TEST_PER_CLASS)


@pytest.fixture
def root(pristine, tmp_path) -> Path:
    """A fresh copy of the tree (tests damage it) without any cache; returns the ``--root`` folder."""
    shutil.copytree(pristine, tmp_path / "cremad", ignore=shutil.ignore_patterns(".cache"))
    return tmp_path


def family(root: Path, **params) -> cremad.CremaD:
    return build_dataset("cremad", str(root), {**SMALL, **params})


def test_shapes_dtypes_and_labels(root):
    ds = family(root)
    splits = ds.load()
    shapes, n_classes = ds.input_spec()
    assert shapes == {"image": (6, 16, 16), "audio": (1, 16, 8000 // 256 + 1)} and n_classes == 6
    assert splits.input_shapes == shapes and splits.class_names == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 6)
    batch = splits.train.__getitems__(list(range(len(splits.train))))
    assert batch["image"].shape == (18, 6, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["audio"].shape == (18, 1, 16, 32) and batch["audio"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and torch.equal(batch["label"].bincount(), torch.full((6,), 3))
    # train-only statistics: the training part is z-scored per RGB channel / overall
    per_channel = batch["image"].view(18, 2, 3, -1).permute(2, 0, 1, 3).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-3)
    assert abs(batch["audio"].std().item() - 1) < 1e-2
    # labels follow test.csv (clip names carry their emotion)
    rows = [line.split(",") for line in (root / "cremad/test.csv").read_text().split()]
    assert [int(splits.test[i]["label"]) for i in range(6)] == [cremad.CLASS_NAMES.index(e) for _, e in rows]


def test_audio_is_resampled_mono_and_fixed_length(tmp_path):
    p = cremad.DecodeParams(16000, 3.0, 64, 512, 160, 1, 112)
    t = np.arange(int(22050 * 3.9)) / 22050
    tone = np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "long.wav", np.stack([tone, -0.5 * tone], 1), 22050)
    sf.write(tmp_path / "short.wav", tone[:22050], 22050)
    long = cremad.read_audio(tmp_path / "long.wav", p)
    short = cremad.read_audio(tmp_path / "short.wav", p)
    assert long.shape == short.shape == (48000,)
    spectrum = torch.fft.rfft(long).abs()
    assert abs(spectrum.argmax().item() * 16000 / 48000 - 440) < 2  # the tone survives resampling
    assert short[17000:].abs().max() == 0 and short[:15000].abs().max() > 0.9  # 1 s of sound, then zeros
    assert cremad.log_mel(long, p).shape == (1, 64, 301)


def test_cache_is_written_once_reused_and_rebuilt_when_damaged(root, monkeypatch):
    first = family(root).load()
    cache = family(root).cache_dir
    assert (cache / "manifest.json").is_file()

    def no_decoding(*args):
        raise AssertionError("decoded although the cache is valid")

    real = cremad.decode_clip
    monkeypatch.setattr(cremad, "decode_clip", no_decoding)
    again = family(root).load()
    assert torch.equal(again.test.__getitems__([0, 5])["image"], first.test.__getitems__([0, 5])["image"])

    good = (cache / "audio.npy").read_bytes()
    (cache / "audio.npy").write_bytes(good[: len(good) // 2])
    with pytest.raises(AssertionError, match="decoded"):
        family(root).load()
    calls = []
    monkeypatch.setattr(cremad, "decode_clip", lambda *a: calls.append(a[1]) or real(*a))
    family(root).load()
    assert len(calls) == 30 and (cache / "audio.npy").read_bytes() == good
    assert family(root, n_mels=8).cache_dir != cache  # other decoding parameters, another cache


def test_lazy_and_cached_give_identical_tensors(root):
    cached = family(root).load()
    lazy = family(root, cache=False).load()
    assert isinstance(lazy.train, cremad.LazyClips) and isinstance(cached.train, cremad.NormalisedArrayDataset)
    for split in ("train", "val", "test"):
        a, b = cached.split(split), lazy.split(split)
        assert len(a) == len(b)
        for i in range(len(a)):
            sa, sb = a[i], b[i]
            assert sa.keys() == sb.keys() and sa["index"] == sb["index"] == i
            assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa), (split, i)
    # through DataLoaders, the lazy one decoding in two worker processes
    loaders = [DataLoader(d.train, batch_size=8, collate_fn=collate_batch, num_workers=w) for d, w in ((cached, 0), (lazy, 2))]
    for ba, bb in zip(*loaders):
        assert all(torch.equal(ba[k], bb[k]) for k in ba)


def test_data_check_names_every_planted_fault(root, capsys):
    base = root / "cremad"
    assert cli.main(["data", "check", "cremad", "--root", str(root), "--set", "progress=false"]) == 0
    train = (base / "train.csv").read_text().splitlines()
    missing_wav = base / "AudioWAV" / f"{train[0].split(',')[0]}.wav"
    missing_wav.unlink()
    corrupt_jpg = base / "Image-01-FPS" / train[1].split(",")[0] / "00002.jpg"
    corrupt_jpg.write_bytes(b"\xff\xd8 not a jpeg at all")
    empty_folder = base / "Image-01-FPS" / train[2].split(",")[0]
    for f in empty_folder.iterdir():
        f.unlink()
    missing_folder = base / "Image-01-FPS" / train[3].split(",")[0]
    shutil.rmtree(missing_folder)
    bad_wav = base / "AudioWAV" / f"{train[4].split(',')[0]}.wav"
    bad_wav.write_bytes(b"RIFF\x00\x00garbage")
    train[5] = train[5].split(",")[0] + ",SURPRISE"
    train.insert(6, "just_one_field")
    train.append(train[7])
    (base / "train.csv").write_text("\n".join(train) + "\n")

    assert cli.main(["data", "check", "cremad", "--root", str(root), "--set", "progress=false"]) == 1
    out = capsys.readouterr().out
    csv_path = base / "train.csv"
    expected = [
        f"{missing_wav}: audio file not found",
        f"{corrupt_jpg}: corrupt or unreadable image",
        f"{empty_folder}: frame folder holds no .jpg frames",
        f"{missing_folder}: frame folder not found",
        f"{bad_wav}: unreadable audio",
        f"{csv_path}:6: unknown label 'SURPRISE'",
        f"{csv_path}:7: malformed row 'just_one_field'",
        f"{csv_path}:{len(train)}: clip '{train[7].split(',')[0]}' listed twice (first at {csv_path}:8)",
    ]
    for line in expected:
        assert line in out, f"{line!r} not reported in:\n{out}"
    assert out.strip().endswith("cremad: 8 problem(s)")

    # load() stops at the first problem with a DataError naming the path, in either mode
    for cache in (True, False):
        with pytest.raises(DataError, match=f"{csv_path}:6: unknown label"):
            family(root, cache=cache).load()
    (base / "train.csv").write_text("\n".join(train[:5] + train[7:-1]) + "\n")  # csv fixed, files not
    for cache in (True, False):
        with pytest.raises(DataError) as err:
            family(root, cache=cache).load()
        assert str(err.value).startswith(f"{missing_wav}: audio file not found")


def test_unknown_parameter_and_missing_lists_are_named(tmp_path):
    with pytest.raises(TypeError, match="n_mel"):
        build_dataset("cremad", str(tmp_path), {"n_mel": 8})
    problems = family(tmp_path).check()
    assert problems == [f"{tmp_path / 'cremad' / s}.csv: file not found" for s in ("train", "test")]
    with pytest.raises(DataError, match="train.csv: file not found"):
        family(tmp_path).load()


CORE = {"student_only", "teacher_mm", "kd_mm", "teacher_cm", "kd_cm", "collab", "mask_mm_1", "mask_mm_2",
        "mask_cm_1", "mask_cm_2", "routed"}  # teachers, no-KD, KD from either teacher, MST-Distill


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["core", "all"])
@pytest.mark.parametrize("config", ["compare.yaml", "compare_audio.yaml"])
def test_shipped_cremad_configs_run_end_to_end(root, tmp_path, config, full):
    """Image and audio students; ``core``: the main comparison's stages, ``all``: every baseline too."""
    tiny = "{channels: [4, 4, 4, 4]}"
    overrides = [
        f"data.root={root}",
        "data.params={sample_rate: 8000, clip_seconds: 1.0, n_mels: 16, n_fft: 256, hop_length: 256,"
        " image_size: 16, num_frames: 1, val_fraction: 0.25, progress: false}",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "accelerator.cpu=true",
        f"networks.image_net.params.encoder.params={tiny}",
        f"networks.audio_net.params.encoder.params={tiny}",
        f"networks.fusion.params.encoders.image.params={tiny}",
        f"networks.fusion.params.encoders.audio.params={tiny}",
        "networks.fusion.params.hidden=8",
        "stages.mgdfr.method.params.repeats=1",
        "stages.crd.method.params.nce_k=16",
    ]
    cfg = load_config(REPO / "configs/cremad" / config, overrides)
    assert cfg.network("student").params["modality"] == ("audio" if "audio" in config else "image")
    if not full:
        cfg.stages = [s for s in cfg.stages if s.name in CORE]
    metrics = Runner(cfg, tmp_path / "run", fast_dev_run=True, progress=False).run()
    assert set(metrics["stages"]) == ({s.name for s in cfg.stages})
    assert "model" in metrics["stages"]["student_only"]["models"]
    students = [s.name for s in cfg.stages if s.name not in {"student_only", "teacher_mm", "teacher_cm"} and "mask" not in s.name]
    assert all("student" in metrics["stages"][s]["models"] for s in students)


def test_loader_benchmark_tool_measures_both_modes(capsys):
    spec = importlib.util.spec_from_file_location("loader_benchmark", REPO / "tools/loader_benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    small = ["data.params.val_fraction=0.5", "data.params.image_size=16", "data.params.n_mels=16",
             "data.params.clip_seconds=1.0", "networks.image_net.params.encoder.params.channels=[4,4,4,4]"]
    argv = ["--synthetic", "2", "--batches", "2", "--batch-size", "4", "--workers", "0", *(f"--set={s}" for s in small)]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    for row in ("| DataLoader, cached arrays | 0 | off |", "| DataLoader, decoded per sample | 0 | off |",
                "| training step of student_only (supervised) on cpu | - | - |"):
        assert row in out, out
