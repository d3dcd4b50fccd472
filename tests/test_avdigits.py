"""The embedded avdigits dataset, built small (few voices, few pairs) so the tests stay fast."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from crossmodal_kd import cli
from crossmodal_kd.data import build_dataset
from crossmodal_kd.data.array_folder import CorruptDatasetError, write_array_folder
from crossmodal_kd.data.avdigits import AVDigits
from crossmodal_kd.data.avdigits_build import (
    AVDIGITS_VERSION,
    build_avdigits,
    default_params,
    deform,
    source_digits,
    verify_avdigits,
)
from crossmodal_kd.data.base import ZScore

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (make install)")

SMALL = {
    "n_train": 60, "n_val": 20, "n_test": 30,
    "accents": ["en", "en-us"],
    "variants": ["m1", "m2", "m3", "f1", "f2", "f3", "klatt", "max"],
}
ROWS = 110


def load(folder, name):
    return np.load(folder / f"{name}.npy")


def digests(folder):
    return {k: v["sha256"] for k, v in json.loads((folder / "manifest.json").read_text())["files"].items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_avdigits(tmp_path_factory.mktemp("avd") / "a", seed=3, progress=False, **SMALL)


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """The same draw with shared = 0.5, built through the command line, as a user would."""
    root = tmp_path_factory.mktemp("avd_shared")
    sets = [f"{k}={json.dumps(v)}" for k, v in {**SMALL, "seed": 3, "shared": 0.5}.items()]
    args = [a for s in sets for a in ("--set", s)]
    assert cli.main(["data", "build", "avdigits", "--root", str(root), *args]) == 0
    return root, sets


@pytest.fixture(scope="module")
def shared_built(shared_root):
    root, _ = shared_root
    (folder,) = (root / "avdigits").iterdir()
    return folder


def test_layout_shapes_and_manifest(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["version"] == AVDIGITS_VERSION == 2 and manifest["seed"] == 3
    assert manifest["counts"] == {"train": 60, "val": 20, "test": 30}
    assert manifest["class_names"][0] == "zero" and len(manifest["class_names"]) == 10
    image, audio = load(built, "image"), load(built, "audio")
    p = default_params()
    frames = int(p["sample_rate"] * p["clip_seconds"]) // p["hop_length"] + 1
    assert image.shape == (ROWS, 1, 28, 28) and image.dtype == np.float32
    assert audio.shape == (ROWS, 1, p["n_mels"], frames) and audio.dtype == np.float16
    assert np.isfinite(image).all() and np.isfinite(audio.astype(np.float32)).all()
    labels, split = load(built, "label"), load(built, "split")
    assert set(np.unique(labels[split == 0])) == set(range(10))


def test_shared_zero_blends_nothing(built):
    assert (load(built, "secondary") == -1).all() and (load(built, "blend") == 0).all()


def test_shared_blends_toward_another_digit_with_one_weight(built, shared_built):
    secondary, blend, label = (load(shared_built, n) for n in ("secondary", "blend", "label"))
    assert secondary.shape == blend.shape == (ROWS,)
    assert ((secondary >= 0) & (secondary <= 9) & (secondary != label)).all()
    assert (blend >= 0).all() and (blend <= 0.25).all() and blend.max() > 0.1  # U(0, shared / 2)
    assert json.loads((shared_built / "manifest.json").read_text())["params"]["shared"] == 0.5
    for name in ("label", "split", "image_id", "voice_id"):  # the primary pairs do not depend on shared
        assert np.array_equal(load(shared_built, name), load(built, name)), name
    for name in ("image", "audio"):  # every input is blended (lam > 0 almost surely)
        diff = np.abs(load(shared_built, name).astype(np.float32) - load(built, name).astype(np.float32))
        assert (diff.reshape(ROWS, -1).max(1) > 0).all(), name


def test_data_check_and_rebuild_from_the_command_line(shared_root, capsys):
    root, sets = shared_root
    args = [a for s in sets for a in ("--set", s)]
    capsys.readouterr()
    assert cli.main(["data", "check", "avdigits", "--root", str(root), *args]) == 0
    assert capsys.readouterr().out.strip().endswith("avdigits: OK")
    assert cli.main(["data", "build", "avdigits", "--root", str(root), *args]) == 0  # cached: not rebuilt
    assert len(list((root / "avdigits").iterdir())) == 1


def test_test_voices_and_images_unseen_in_training(built):
    split, voice, image = (load(built, n) for n in ("split", "voice_id", "image_id"))
    for other in (1, 2):
        assert not set(voice[split == 0]) & set(voice[split == other])
        assert not set(image[split == 0]) & set(image[split == other])


def test_deterministic_for_a_seed_and_another_seed_is_another_draw(built, tmp_path):
    again = build_avdigits(tmp_path / "b", seed=3, progress=False, **SMALL)
    assert digests(again) == digests(built)
    other = build_avdigits(tmp_path / "c", seed=4, progress=False, **SMALL)
    for name in ("image", "audio", "label", "image_id", "voice_id"):
        assert digests(other)[f"{name}.npy"] != digests(built)[f"{name}.npy"], name
    fewer_voices = build_avdigits(tmp_path / "d", seed=3, progress=False, **{**SMALL, "accents": ["en"]})
    assert digests(fewer_voices)["image.npy"] == digests(built)["image.npy"]  # images do not depend on voices


def test_deformation_gives_every_pair_its_own_image():
    params = default_params()
    sources, _, _ = source_digits(params, np.random.default_rng(0))
    twice = deform(np.repeat(sources[:1], 2, axis=0), params, np.random.default_rng(1))
    assert np.abs(twice[0] - twice[1]).max() > 0.3  # one source, two pairs: two different digits
    assert np.abs(twice[0] - sources[0]).max() > 0.3
    still = {**params, "deform_rotation": 0.0, "deform_shear": 0.0, "deform_scale": [1.0, 1.0],
             "deform_translate": 0.0, "elastic_px": 0.0}
    assert np.allclose(deform(sources[:5], still, np.random.default_rng(1)), sources[:5], atol=1e-5)


def test_recorded_statistics_normalise_the_raw_arrays(built, tmp_path):
    norm = json.loads((built / "manifest.json").read_text())["normalisation"]
    image, audio, split = load(built, "image"), load(built, "audio").astype(np.float64), load(built, "split")
    train = split == 0
    assert norm["image"]["raw"]["pixel_range"] == [0, 255]
    assert np.isclose(norm["image"]["mean"][0], image[train].mean()) and np.isclose(norm["image"]["std"][0],
                                                                                     image[train].std())
    assert np.allclose(norm["audio"]["mean"], audio[train].mean(axis=(0, 1, 3)))
    assert np.allclose(norm["audio"]["std"], audio[train].std(axis=(0, 1, 3)))

    family = build_dataset("avdigits", str(tmp_path), {"seed": 3, **SMALL})
    shutil.copytree(built, family.path)  # the same recipe: used as is
    splits = family.load()
    assert isinstance(splits.val.normalise, ZScore)  # what `export` records for `predict`
    batch = splits.train.__getitems__(list(range(len(splits.train))))
    assert abs(float(batch["image"].mean())) < 1e-3 and abs(float(batch["image"].std()) - 1) < 1e-2
    per_bin = batch["audio"][:, 0].transpose(0, 1).flatten(1)  # (mel bin, values)
    assert per_bin.mean(1).abs().max() < 1e-3 and (per_bin.std(1) - 1).abs().max() < 1e-2
    mean, std = (torch.tensor(norm["audio"][k]).float().view(norm["audio"]["shape"]) for k in ("mean", "std"))
    val = splits.val.__getitems__([0, 1])
    rows = np.flatnonzero(split == 1)[:2]
    assert torch.allclose(val["audio"], (torch.from_numpy(audio[rows]).float() - mean) / std, atol=1e-5)
    expected = (image[rows] - norm["image"]["mean"][0]) / norm["image"]["std"][0]
    assert torch.allclose(val["image"], torch.from_numpy(expected).float(), atol=1e-5)
    assert torch.equal(splits.train.groups, torch.from_numpy(load(built, "image_id")[train].astype(np.int64)))


def test_truncated_or_edited_cache_is_detected_and_rebuilt(tmp_path):
    ds = build_dataset("avdigits", str(tmp_path), {"seed": 5, **SMALL})
    path = ds.build(progress=False)
    good = (path / "audio.npy").read_bytes()
    (path / "audio.npy").write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptDatasetError, match="audio.npy"):
        verify_avdigits(path)
    assert any("audio.npy" in p for p in ds.check())
    splits = ds.load()  # rebuilds the corrupt cache
    assert (path / "audio.npy").read_bytes() == good
    assert len(splits.train) == 60 and splits.input_shapes["image"] == (1, 28, 28)


def test_cache_key_holds_the_seed_and_every_knob(tmp_path):
    base = AVDigits(tmp_path).path
    assert base.name.startswith(f"v{AVDIGITS_VERSION}-")
    assert AVDigits(tmp_path, shared=0).path == AVDigits(tmp_path, shared=0.0).path == base
    changed = {"seed": 1, "shared": 0.5, "elastic_px": 2.0, "deform_scale": [0.8, 1.2], "snr_db": 3.0}
    paths = {AVDigits(tmp_path, **{k: v}).path for k, v in changed.items()}
    assert len(paths) == len(changed) and base not in paths


def test_older_recipe_caches_get_one_message(tmp_path, monkeypatch, caplog):
    old = tmp_path / "avdigits" / "v1-9f3cd3fbb5"
    old.mkdir(parents=True)
    def stub(path, **_):  # no espeak: the message comes before the build
        return write_array_folder(path, {"label": np.zeros(1)}, {"name": "avdigits"})

    monkeypatch.setattr("crossmodal_kd.data.avdigits.build_avdigits", stub)
    with caplog.at_level(logging.WARNING, logger="crossmodal_kd.data.avdigits"):
        AVDigits(tmp_path).build(progress=False)
    (record,) = caplog.records
    assert "v1-9f3cd3fbb5" in record.getMessage() and "no longer read" in record.getMessage()
    assert old.is_dir()  # left to the user


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half"])
def test_bad_shared_is_one_clear_error(tmp_path, bad):
    with pytest.raises(ValueError, match=r"^avdigits: shared must be a number in \[0, 1\], got "):
        build_dataset("avdigits", str(tmp_path), {"shared": bad})


def test_unknown_recipe_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="n_trian"):
        build_dataset("avdigits", str(tmp_path), {"n_trian": 5})
