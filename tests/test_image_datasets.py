"""Image datasets for TMKD (Zhang et al., arXiv 2603.24208): ImageFolder trees (``imagefolder``) and CIFAR-100 pickles (``cifar100``),
on small trees and pickles written here."""

from __future__ import annotations

import json
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crossmodal_kd.cli import main as cli_main
from crossmodal_kd.data import DataError, build_dataset
from crossmodal_kd.data import images as images_module
from crossmodal_kd.data.images import Cifar100, ImageFolder, prompt_name

FOLDERS = ["001.Black_footed_Albatross", "n02085620-Chihuahua", "red_fox"]


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 14), mode: str = "RGB") -> None:
    """A noisy image of one colour (``size`` = width, height), saved in ``mode`` by its suffix."""
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = (np.array(colour) + rng.integers(-20, 20, (size[1], size[0], 3))).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def write_tree(base: Path, per_class: dict[str, int], folders: list[str] = FOLDERS) -> Path:
    """``base/<split>/<class>/`` with ``per_class[split]`` images per class: jpg, png, grey and RGBA mixed."""
    for split, n in per_class.items():
        for label, folder in enumerate(folders):
            colour = (60 * label + 40, 200 - 60 * label, 100)
            for i in range(n):
                suffix, mode = [(".jpg", "RGB"), (".png", "RGBA"), (".png", "L"), (".jpeg", "RGB")][i % 4]
                write_image(base / split / folder / f"img{i}{suffix}", colour, size=(20 + 3 * i, 14), mode=mode)
    return base


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_tree(tmp_path / "birds", {"train": 10, "test": 2})


def test_imagefolder_decodes_carves_val_and_normalises_with_train_statistics(tree, monkeypatch):
    family = build_dataset("imagefolder", str(tree.parent), {"name": "birds", "image_size": 8, "progress": False})
    splits = family.load()
    assert splits.class_names == ["Black footed Albatross", "Chihuahua", "red fox"]
    assert splits.num_classes == 3 and splits.input_shapes == {"image": (3, 8, 8)}
    assert [len(splits.split(s)) for s in ("train", "val", "test")] == [27, 3, 6]
    assert torch.bincount(splits.val.labels).tolist() == [1, 1, 1]  # carved from train, stratified
    batch = splits.train.__getitems__(list(range(len(splits.train))))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (27, 3, 8, 8)
    # z-scored with the statistics of the training part only (the carved validation images excluded)
    torch.testing.assert_close(batch["image"].mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(batch["image"].std((0, 2, 3), correction=0), torch.ones(3), atol=1e-3, rtol=0)
    raw = splits.train.arrays["image"].double() / 255
    assert family.stats["mean"] == pytest.approx(raw.mean((0, 2, 3)).tolist())
    val = splits.val.__getitems__([0, 1, 2])["image"]
    mean, std = torch.tensor(family.stats["mean"]).view(3, 1, 1), torch.tensor(family.stats["std"]).view(3, 1, 1)
    torch.testing.assert_close(val, ((splits.val.arrays["image"].float() / 255 - mean) / std).float())
    # each class keeps its colour: red channel rises with the label
    red = [splits.test.arrays["image"][splits.test.labels == c][:, 0].float().mean() for c in range(3)]
    assert red[0] < red[1] < red[2]

    # decoded once: a second load reads the checksummed cache
    manifest = json.loads((family.cache_dir / "manifest.json").read_text())
    assert manifest["name"] == "imagefolder" and len(manifest["tree"]) == 36
    monkeypatch.setattr(images_module, "decode_image", lambda *a, **k: pytest.fail("decoded again"))
    again = ImageFolder(tree.parent, "birds", image_size=8, progress=False).load()
    assert torch.equal(again.test.arrays["image"], splits.test.arrays["image"])


def test_imagefolder_cache_is_rebuilt_when_damaged_or_when_the_tree_changes(tree):
    family = ImageFolder(tree.parent, "birds", image_size=8, progress=False)
    family.load()
    (family.cache_dir / "images.npy").write_bytes(b"damaged")
    assert len(ImageFolder(tree.parent, "birds", image_size=8, progress=False).load().train) == 27  # rebuilt
    write_image(tree / "test" / "red_fox" / "extra.png", (0, 0, 0))
    assert len(ImageFolder(tree.parent, "birds", image_size=8, progress=False).load().test) == 7
    assert ImageFolder(tree.parent, "birds", image_size=6, progress=False).load().input_shapes == {"image": (3, 6, 6)}


def test_imagefolder_resizes_the_short_side_and_crops_the_centre(tmp_path):
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, 10:20] = 255  # white centre third of a 3:1 image
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    out = images_module.decode_image(path, 5)
    assert out.shape == (3, 5, 5) and out.dtype == np.uint8 and out.min() > 200


def test_imagefolder_uses_a_given_val_split_and_class_name_overrides(tmp_path):
    tree = write_tree(tmp_path / "faces", {"train": 4, "val": 2, "test": 1}, folders=["1", "2"])
    splits = ImageFolder(tmp_path, "faces", image_size=8, class_names={"1": "surprise"}, progress=False).load()
    assert splits.class_names == ["surprise", "2"]
    assert [len(splits.split(s)) for s in ("train", "val", "test")] == [8, 4, 2]
    with pytest.raises(DataError, match="class_names: no class folder"):
        ImageFolder(tree.parent, "faces", class_names={"7": "x"}).load()


def test_imagefolder_check_lists_every_problem_by_path(tree, capsys):
    (tree / "train" / "001.Black_footed_Albatross" / "img3.jpeg").write_bytes(b"not a jpeg")
    (tree / "train" / "empty_class").mkdir()
    write_image(tree / "test" / "unknown_class" / "a.jpg", (1, 2, 3))
    (tree / "val").mkdir()
    family = ImageFolder(tree.parent, "birds", image_size=8, progress=False)
    problems = family.check()
    assert len(problems) == 4
    assert f"{tree / 'val'}: no class folders" in problems
    assert any("empty_class: empty class folder" in p for p in problems)
    assert any("test/unknown_class: class folder not in" in p for p in problems)
    assert any("img3.jpeg: corrupt or unreadable image" in p for p in problems)
    with pytest.raises(DataError, match=r"empty class folder .*\(and 2 more"):
        family.load()
    (tree / "val").rmdir()
    (tree / "train" / "empty_class").rmdir()
    (tree / "test" / "unknown_class" / "a.jpg").unlink()
    (tree / "test" / "unknown_class").rmdir()
    with pytest.raises(DataError, match="img3.jpeg: corrupt or unreadable image"):
        family.load()
    assert cli_main(["data", "check", "imagefolder", "--root", str(tree.parent), "--set", "name=birds", "--set", "progress=false"]) == 1
    assert "1 problem(s)" in capsys.readouterr().out
    assert ImageFolder(tree.parent, "missing").check() == [f"{tree.parent / 'missing' / 'train'}: split folder not found",
                                                           f"{tree.parent / 'missing' / 'test'}: split folder not found"]


def test_prompt_names():
    assert [prompt_name(f) for f in [*FOLDERS, "banded", "7", "3d_glasses"]] == [
        "Black footed Albatross", "Chihuahua", "red fox", "banded", "7", "3d glasses"]


# ----------------------------------------------------------------------------- CIFAR-100

CIFAR_NAMES = ["apple", "aquarium_fish", "maple_tree"]


def write_cifar(root: Path, n_train: int = 30, n_test: int = 6) -> Path:
    """The python pickle layout with 3 fine classes; image i's red plane is i, green 100, blue 200."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        data[:, 0] = np.arange(n, dtype=np.uint8)[:, None, None]
        data[:, 1], data[:, 2] = 100, 200
        blob = {"data": data.reshape(n, 3072), "fine_labels": [i % 3 for i in range(n)], "coarse_labels": [0] * n,
                "filenames": [f"{i}.png" for i in range(n)], "batch_label": split}
        (base / split).write_bytes(pickle.dumps(blob))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": CIFAR_NAMES, "coarse_label_names": ["x"]}))
    return base


def test_cifar100_reads_the_pickles_keeps_test_and_carves_val(tmp_path):
    write_cifar(tmp_path)
    family = build_dataset("cifar100", str(tmp_path), {"val_fraction": 0.2})
    splits = family.load()
    assert splits.class_names == ["apple", "aquarium fish", "maple tree"] and splits.num_classes == 3
    assert [len(splits.split(s)) for s in ("train", "val", "test")] == [24, 6, 6]
    assert torch.bincount(splits.val.labels).tolist() == [2, 2, 2]
    assert splits.input_shapes == {"image": (3, 32, 32)}
    test = splits.test.arrays["image"]
    assert test[:, 0, 5, 7].tolist() == list(range(6)) and (test[:, 1] == 100).all() and (test[:, 2] == 200).all()
    assert splits.test.labels.tolist() == [0, 1, 2, 0, 1, 2]
    train = splits.train.arrays["image"].double() / 255
    assert family.stats["mean"] == pytest.approx(train.mean((0, 2, 3)).tolist())  # train part only
    assert family.check() == []


def test_cifar100_errors_name_the_file(tmp_path):
    base = write_cifar(tmp_path)
    (base / "test").write_bytes((base / "test").read_bytes()[:100])  # truncated
    (base / "meta").unlink()
    family = Cifar100(tmp_path)
    problems = family.check()
    assert len(problems) == 2 and problems[0] == f"{base / 'meta'}: file not found"
    assert problems[1].startswith(f"{base / 'test'}: unreadable pickle")
    with pytest.raises(DataError, match="meta: file not found"):
        family.load()
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": CIFAR_NAMES}))
    (base / "test").write_bytes(pickle.dumps({"data": np.zeros((2, 10), dtype=np.uint8), "fine_labels": [0, 1]}))
    with pytest.raises(DataError, match=r"test: 'data' must be uint8 \(N, 3072\)"):
        family.load()
    (base / "test").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), dtype=np.uint8), "fine_labels": [0, 5]}))
    with pytest.raises(DataError, match=r"test: row 1: fine label 5 outside the 3 classes 0\.\.2"):
        family.load()
