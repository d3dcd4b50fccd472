"""The embedded avdigits dataset, built small (few voices, few pairs) so the tests stay fast."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from crossmodal_kd.data import build_dataset
from crossmodal_kd.data.array_folder import CorruptDatasetError
from crossmodal_kd.data.avdigits_build import build_avdigits, default_params, verify_avdigits

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (make install)")

SMALL = {
    "n_train": 60, "n_val": 20, "n_test": 30,
    "accents": ["en", "en-us"],
    "variants": ["m1", "m2", "m3", "f1", "f2", "f3", "klatt", "max"],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_avdigits(tmp_path_factory.mktemp("avd") / "a", seed=3, progress=False, **SMALL)


def test_layout_shapes_and_manifest(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 60, "val": 20, "test": 30}
    assert manifest["class_names"][0] == "zero" and len(manifest["class_names"]) == 10
    image = np.load(built / "image.npy")
    audio = np.load(built / "audio.npy")
    p = default_params()
    frames = int(p["sample_rate"] * p["clip_seconds"]) // p["hop_length"] + 1
    assert image.shape == (110, 1, 28, 28) and image.dtype == np.float32
    assert audio.shape == (110, 1, p["n_mels"], frames) and audio.dtype == np.float16
    assert np.isfinite(image).all() and np.isfinite(audio.astype(np.float32)).all()
    labels, split = np.load(built / "label.npy"), np.load(built / "split.npy")
    assert set(np.unique(labels[split == 0])) == set(range(10))


def test_test_voices_and_images_unseen_in_training(built):
    split, voice, image = (np.load(built / f"{n}.npy") for n in ("split", "voice_id", "image_id"))
    for other in (1, 2):
        assert not set(voice[split == 0]) & set(voice[split == other])
        assert not set(image[split == 0]) & set(image[split == other])


def test_deterministic_for_a_seed(built, tmp_path):
    again = build_avdigits(tmp_path / "b", seed=3, progress=False, **SMALL)
    other = build_avdigits(tmp_path / "c", seed=4, progress=False, **SMALL)
    digests = lambda d: {k: v["sha256"] for k, v in json.loads((d / "manifest.json").read_text())["files"].items()}
    assert digests(again) == digests(built)
    assert digests(other)["image.npy"] != digests(built)["image.npy"]


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


def test_unknown_recipe_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="n_trian"):
        build_dataset("avdigits", str(tmp_path), {"n_trian": 5})
