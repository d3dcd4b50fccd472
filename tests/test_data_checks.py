"""Data checks shared by every dataset family: labels within the declared classes, NaN/inf, empty data and
missing files, each reported by ``data check`` with file and row and raised by ``load()`` as one line."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from crossmodal_kd import cli
from crossmodal_kd.data import ArrayDataset, DataError, DataSplits, build_dataset
from crossmodal_kd.data import base
from crossmodal_kd.data.array_folder import write_array_folder
from crossmodal_kd.data.base import BuildableFamily, DatasetFamily, check_finite, check_labels, describe_rows
from crossmodal_kd.data.cremad import synthesise_tree
from crossmodal_kd.registry import DATASETS
from test_data import write_avmnist

AVMNIST_FILES = ["image/train_data.npy", "audio/train_data.npy", "train_labels.npy",
                 "image/test_data.npy", "audio/test_data.npy", "test_labels.npy"]


def data_check(name: str, root: Path, *params: str, capsys) -> tuple[int, list[str]]:
    code = cli.main(["data", "check", name, "--root", str(root), *(a for p in params for a in ("--set", p))])
    return code, capsys.readouterr().out.strip().splitlines()


# ----------------------------------------------------------------------------- the helpers


def test_helpers_name_rows_and_values():
    assert describe_rows(np.array([17])) == "row 17"
    assert describe_rows(np.array([3, 8])) == "rows 3, 8 (2 rows)"
    assert describe_rows(np.arange(40)) == "rows 0, 1, 2, 3, 4, ... (40 rows)"
    assert check_labels(np.array([0, 9, 10, 3]), 10, "f.npy") == ["f.npy: row 2: label 10 outside the 10 classes 0..9"]
    assert check_labels(np.array([-1, 1, 12]), 2, "f.npy") == [
        "f.npy: rows 0, 2 (2 rows): labels -1, 12 outside the 2 classes 0..1"]
    assert check_labels(np.zeros(0, np.int64), 10, "f.npy") == ["f.npy: empty (no labels)"]
    assert "must be non-negative integers" in check_labels(np.array([0.5]), 10, "f.npy")[0]
    assert check_finite({"x": np.zeros((0, 3))}, "f.npy") == ["f.npy: 'x' is empty (0 rows)"]
    assert check_finite({"x": np.arange(6, dtype=np.uint8).reshape(2, 3)}, "f.npy") == []  # integers are finite


def test_nan_rows_are_found_across_chunks(monkeypatch):
    monkeypatch.setattr(base, "FINITE_CHUNK_BYTES", 3 * 4 * 2 * 2)  # three rows of (2, 2) float32 per chunk
    x = np.ones((10, 2, 2), np.float32)
    x[2, 1, 0], x[3, 0, 0], x[9, 1, 1] = np.nan, np.inf, -np.inf
    assert base.nonfinite_rows(x).tolist() == [2, 3, 9]
    assert check_finite({"audio": x}, "a.npy") == ["a.npy: rows 2, 3, 9 (3 rows): NaN/inf in 'audio'"]


# ----------------------------------------------------------------------------- avmnist (issue items 2 and 6)


@pytest.mark.parametrize("split", ["train", "test"])
def test_avmnist_label_outside_the_ten_classes_is_named(tmp_path, capsys, split):
    write_avmnist(tmp_path, classes=10)
    path = tmp_path / "avmnist" / f"{split}_labels.npy"
    labels = np.load(path)
    labels[7] = 10
    np.save(path, labels)
    expected = f"{path}: row 7: label 10 outside the 10 classes 0..9"
    assert data_check("avmnist", tmp_path, capsys=capsys) == (1, [expected, "avmnist: 1 problem(s)"])
    with pytest.raises(DataError) as err:
        build_dataset("avmnist", str(tmp_path)).load()  # not an 11-class model
    assert str(err.value) == expected


def test_avmnist_class_count_is_declared_not_inferred(tmp_path):
    write_avmnist(tmp_path, classes=3)
    assert build_dataset("avmnist", str(tmp_path)).load().num_classes == 10
    assert build_dataset("avmnist", str(tmp_path), {"num_classes": 3}).load().num_classes == 3
    problems = build_dataset("avmnist", str(tmp_path), {"num_classes": 2}).check()
    assert "label 2 outside the 2 classes 0..1" in problems[0]
    with pytest.raises(ValueError, match="avmnist: num_classes must be a positive integer, got 0"):
        build_dataset("avmnist", str(tmp_path), {"num_classes": 0})


def test_avmnist_nan_and_inf_are_named_by_file_and_row(tmp_path, capsys):
    write_avmnist(tmp_path)
    audio, image = tmp_path / "avmnist" / "audio" / "train_data.npy", tmp_path / "avmnist" / "image" / "test_data.npy"
    a = np.load(audio)
    a[3, 5, 5], a[8, 0, 111] = np.nan, np.inf
    np.save(audio, a)
    i = np.load(image)
    i[11, 0] = -np.inf
    np.save(image, i)
    code, out = data_check("avmnist", tmp_path, capsys=capsys)
    assert code == 1 and out == [f"{audio}: rows 3, 8 (2 rows): NaN/inf in 'audio'",
                                 f"{image}: row 11: NaN/inf in 'image'", "avmnist: 2 problem(s)"]
    with pytest.raises(DataError, match=r"audio/train_data\.npy: rows 3, 8 \(2 rows\): NaN/inf in 'audio' \(and 1 more"):
        build_dataset("avmnist", str(tmp_path)).load()


def test_avmnist_empty_arrays_get_a_clear_message(tmp_path, capsys):
    d = tmp_path / "avmnist"
    write_avmnist(tmp_path)
    np.save(d / "image" / "train_data.npy", np.zeros((0, 784), np.float32))
    np.save(d / "audio" / "train_data.npy", np.zeros((0, 112, 112), np.float32))
    np.save(d / "train_labels.npy", np.zeros(0, np.int64))
    code, out = data_check("avmnist", tmp_path, capsys=capsys)
    assert code == 1 and out == [f"{d / 'train_labels.npy'}: empty (no labels)",
                                 f"{d / 'image' / 'train_data.npy'}: 'image' is empty (0 rows)",
                                 f"{d / 'audio' / 'train_data.npy'}: 'audio' is empty (0 rows)", "avmnist: 3 problem(s)"]
    with pytest.raises(DataError, match=r"train_labels\.npy: empty \(no labels\) \(and 2 more"):
        build_dataset("avmnist", str(tmp_path)).load()


def test_avmnist_empty_root_lists_all_six_files(tmp_path, capsys):
    code, out = data_check("avmnist", tmp_path, capsys=capsys)
    assert code == 1
    assert out == [f"{tmp_path / 'avmnist' / f}: file not found" for f in AVMNIST_FILES] + ["avmnist: 6 problem(s)"]


# ----------------------------------------------------------------------------- every family


def test_every_family_has_the_interface_and_reports_an_empty_root(tmp_path):
    params = {"features": {"file": "f.npz"}, "imagefolder": {"name": "tree", "progress": False},
              "cremad": {"progress": False}}
    for name in DATASETS.list():
        family = build_dataset(name, str(tmp_path / "empty"), params.get(name, {}))
        assert isinstance(family, DatasetFamily), name
        problems = family.check()
        if name == "synthetic":
            assert problems == []  # generated in memory: nothing can be missing
        else:
            assert problems and all(str(tmp_path / "empty") in p for p in problems), (name, problems)
            assert any("not found" in p or "unreadable manifest" in p for p in problems), (name, problems)
    assert isinstance(build_dataset("avdigits", str(tmp_path)), BuildableFamily)
    assert not isinstance(build_dataset("avmnist", str(tmp_path)), BuildableFamily)


def test_data_build_names_families_it_does_not_build(tmp_path, capsys):
    assert cli.main(["data", "build", "avmnist", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "dataset 'avmnist' is not built by this tool (`crossmodal-kd data check avmnist` checks it)" in out


def _fake_cache(family, inputs: dict[str, np.ndarray], label: np.ndarray, split: np.ndarray, extra: dict) -> None:
    """A checksummed cache with these contents where the family looks for it (so it is not rebuilt)."""
    arrays = {**inputs, "label": label, "split": split, **extra}
    write_array_folder(family.path, arrays, {"name": type(family).__name__.lower()})


def test_generated_caches_are_checked_beyond_their_checksums(tmp_path, capsys):
    n = 12
    split = np.repeat(np.arange(3, dtype=np.int8), 4)
    label = np.arange(n) % 10
    label[5] = 10
    image = np.zeros((n, 1, 28, 28), np.float32)
    image[2, 0, 3, 3] = np.nan
    avdigits = build_dataset("avdigits", str(tmp_path))
    _fake_cache(avdigits, {"image": image, "audio": np.zeros((n, 1, 4, 5), np.float16)}, label, split,
                {"image_id": np.arange(n), "voice_id": np.arange(n)})
    code, out = data_check("avdigits", tmp_path, capsys=capsys)
    assert code == 1 and out == [f"{avdigits.path / 'label.npy'}: row 5: label 10 outside the 10 classes 0..9",
                                 f"{avdigits.path / 'image.npy'}: row 2: NaN/inf in 'image'", "avdigits: 2 problem(s)"]
    with pytest.raises(DataError, match=r"label\.npy: row 5: label 10 outside .* \(and 1 more"):
        avdigits.load()

    textdigits = build_dataset("textdigits", str(tmp_path))
    _fake_cache(textdigits, {"image": np.zeros((n, 1, 28, 28), np.float32)}, np.arange(n) % 10, np.zeros(n, np.int8),
                {"caption": np.array(["one"] * n)})
    split_file = textdigits.path / "split.npy"
    assert textdigits.check() == [f"{split_file}: the {s} split is empty (0 rows)" for s in ("val", "test")]
    with pytest.raises(DataError, match="the val split is empty"):
        textdigits.load()  # before any tokenizer is needed


def _features(tmp_path: Path, **arrays) -> Path:
    n = 30
    base_arrays = {"image": np.random.default_rng(0).normal(size=(n, 4)), "label": np.arange(n) % 3}
    np.savez(tmp_path / "f.npz", **{**base_arrays, **arrays})
    return tmp_path / "f.npz"


def test_features_classes_are_declared(tmp_path):
    path = _features(tmp_path)
    check = lambda **p: build_dataset("features", str(tmp_path), {"file": "f.npz", **p}).check()  # noqa: E731
    assert check() == [
        f"{path}: the number of classes is not declared: add 'class_names' to the file or set num_classes"]
    assert check(num_classes=3) == []
    assert check(num_classes=2) == [f"{path}: rows 2, 5, 8, 11, 14, ... (10 rows): label 2 outside the 2 classes 0..1"]
    assert build_dataset("features", str(tmp_path), {"file": "f.npz", "num_classes": 5}).load().num_classes == 5
    _features(tmp_path, class_names=np.array(["a", "b", "c"]))
    assert check(num_classes=4) == [f"{path}: 3 'class_names' but num_classes is 4"]
    _features(tmp_path, label=np.zeros(0, np.int64), image=np.zeros((0, 4)))
    assert check(num_classes=3) == [f"{path}: empty (no labels)", f"{path}: 'image' is empty (0 rows)"]
    with pytest.raises(DataError, match=r"f\.npz: empty \(no labels\) \(and 1 more"):
        build_dataset("features", str(tmp_path), {"file": "f.npz", "num_classes": 3}).load()


def test_cifar100_labels_and_empty_files(tmp_path):
    base_dir = tmp_path / "cifar-100-python"
    base_dir.mkdir()
    names = [f"c{i}" for i in range(100)]
    (base_dir / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
    train = {"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0, 99, 100, 1]}
    (base_dir / "train").write_bytes(pickle.dumps(train))
    (base_dir / "test").write_bytes(pickle.dumps({"data": np.zeros((0, 3072), np.uint8), "fine_labels": []}))
    assert build_dataset("cifar100", str(tmp_path)).check() == [
        f"{base_dir / 'train'}: row 2: fine label 100 outside the 100 classes 0..99",
        f"{base_dir / 'test'}: empty (no images)"]


def test_cremad_nan_audio_is_named(tmp_path, capsys):
    base_dir = synthesise_tree(tmp_path / "cremad", train_per_class=2, test_per_class=1, frames_per_clip=1,
                               frame_size=(8, 8), seconds=0.2)
    wav = next((base_dir / "AudioWAV").glob("*TRAIN_HAP*.wav"))
    wave = np.zeros(100, np.float32)
    wave[[10, 40]] = np.nan
    sf.write(wav, wave, 16000, subtype="FLOAT")
    code, out = data_check("cremad", tmp_path, "progress=false", capsys=capsys)
    assert code == 1 and out == [f"{wav}: samples 10, 40 (2 samples): NaN/inf audio", "cremad: 1 problem(s)"]


def test_synthetic_nan_and_empty_splits(tmp_path, capsys):
    code, out = data_check("synthetic", tmp_path, "noise=.nan", "n_val=0", "n_train=8", "n_test=4", capsys=capsys)
    assert code == 1 and out[0] == "synthetic: the val split is empty (0 rows)"
    assert "synthetic (train split): rows 0, 1, 2, 3, 4, ... (8 rows): NaN/inf in 'image'" in out
    with pytest.raises(DataError, match=r"^synthetic: the val split is empty \(0 rows\) \(and 4 more"):
        build_dataset("synthetic", str(tmp_path), {"n_val": 0, "noise": float("nan")}).load()
    assert data_check("synthetic", tmp_path, "n_train=8", capsys=capsys) == (0, ["synthetic: OK"])


def test_data_splits_refuse_labels_outside_num_classes():
    ok = ArrayDataset({"x": torch.zeros(3, 2)}, torch.tensor([0, 1, 2]))
    bad = ArrayDataset({"x": torch.zeros(3, 2)}, torch.tensor([0, 1, 4]))
    assert DataSplits(ok, ok, ok, num_classes=3, class_names=["a", "b", "c"]).num_classes == 3
    with pytest.raises(DataError, match=r"^test split: row 2: label 4 outside the 3 classes 0\.\.2$"):
        DataSplits(ok, ok, bad, num_classes=3, class_names=["a", "b", "c"])
