"""Precomputed-feature datasets (``features``): .npz and .pt files, given and carved splits, z-scoring,
``check()`` problems naming the file and key, and the shipped features configs end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from crossmodal_kd.config import load_config
from crossmodal_kd.data import DataError, build_dataset
from crossmodal_kd.engine.trainer import Runner

N, CLASSES = 90, 3


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """CrisisMMD-style features: ``image`` (N, 6) whose first column is the row number, ``text`` (N, 4)."""
    rng = np.random.default_rng(seed)
    label = np.arange(N) % CLASSES
    image = rng.normal(size=(N, 6)) + label[:, None]
    image[:, 0] = np.arange(N)
    return {"image": image.astype(np.float32), "text": rng.normal(5, 3, size=(N, 4)), "label": label}


def load(path: Path, **params):
    return build_dataset("features", str(path.parent), {"file": path.name, "num_classes": CLASSES, **params}).load()


def rows(ds) -> set[int]:
    return set(ds.arrays["image"][:, 0].round().long().tolist())


def test_without_split_val_and_test_are_carved_stratified(tmp_path):
    path = tmp_path / "feats.npz"
    np.savez(path, **arrays())
    splits = load(path, normalize=False, val_fraction=0.2, test_fraction=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (57, 15, 18)
    parts = [rows(splits.train), rows(splits.val), rows(splits.test)]
    assert set.union(*parts) == set(range(N)) and sum(map(len, parts)) == N  # disjoint, complete
    for ds in (splits.val, splits.test):
        assert np.bincount(ds.labels.numpy(), minlength=CLASSES).min() == len(ds) // CLASSES  # stratified
    assert splits.input_shapes == {"image": (6,), "text": (4,)}
    assert splits.num_classes == CLASSES and splits.class_names == ["0", "1", "2"]
    assert rows(load(path, normalize=False, val_fraction=0.2, test_fraction=0.2).test) == parts[2]  # deterministic


def test_z_scored_with_train_statistics(tmp_path):
    path = tmp_path / "feats.npz"
    np.savez(path, **arrays())
    splits = load(path)
    train = splits.train.arrays["text"]
    assert train.dtype == torch.float32
    torch.testing.assert_close(train.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    assert splits.test.arrays["text"].mean(0).abs().max() < 1  # same statistics, not its own


def test_pt_file_with_string_splits_and_class_names(tmp_path):
    data = arrays()
    split = np.where(np.arange(N) < 60, "train", "test")
    blob = {k: torch.from_numpy(v) for k, v in data.items()}
    blob |= {"split": split.tolist(), "class_names": ["flood", "fire", "quake"]}
    path = tmp_path / "crisis.pt"
    torch.save(blob, path)
    splits = load(path, normalize=False, val_fraction=0.25)
    assert rows(splits.test) == set(range(60, N))  # the file's test split is kept
    assert (len(splits.train), len(splits.val)) == (45, 15)  # val carved from the file's train rows
    assert splits.class_names == ["flood", "fire", "quake"]
    sample = splits.val[0]
    assert set(sample) == {"image", "text", "label", "index"} and sample["text"].shape == (4,)


def test_integer_split_codes_are_used_as_given(tmp_path):
    path = tmp_path / "feats.npz"
    np.savez(path, **arrays(), split=np.arange(N) % 3)
    splits = load(path, normalize=False, modalities=["image"])
    assert rows(splits.val) == set(range(1, N, 3)) and rows(splits.test) == set(range(2, N, 3))
    assert splits.input_shapes == {"image": (6,)}


def test_check_names_the_file_and_key_of_each_problem(tmp_path):
    data = arrays()
    bad = {
        "image": data["image"],
        "text": np.vstack([data["text"], data["text"][:1]]),  # one row too many
        "audio": np.where(np.arange(N)[:, None] == 7, np.nan, 1.0) * np.ones((N, 2)),
        "label": np.where(np.arange(N) == 5, 3, data["label"]),
        "class_names": np.array(["a", "b", "c"]),
        "split": np.array(["train"] * (N - 1) + ["dev"]),
    }
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    ds = build_dataset("features", str(tmp_path), {"file": "bad.npz"})
    problems = ds.check()
    assert all(p.startswith(f"{path}: ") for p in problems)
    text = "\n".join(problems)
    assert "row 5: label 3 outside the 3 classes 0..2" in text
    assert "'text' has 91 rows but 'label' has 90" in text
    assert "row 7: NaN/inf in 'audio'" in text
    assert "'split' has unknown value(s) ['dev']; valid: train, val, test or 0, 1, 2" in text
    assert len(problems) == 4
    with pytest.raises(DataError, match=r"row 5: label 3 outside .* \(and 3 more; `crossmodal-kd data check features`"):
        ds.load()

    np.savez(tmp_path / "nolabel.npz", image=data["image"])
    assert build_dataset("features", str(tmp_path), {"file": "nolabel.npz"}).check() == [
        f"{tmp_path / 'nolabel.npz'}: missing key 'label' (keys: image)"
    ]
    np.savez(tmp_path / "nomod.npz", **data)
    def check(**params) -> list[str]:
        return build_dataset("features", str(tmp_path), params).check()

    assert "missing modality key 'video'" in check(file="nomod.npz", modalities=["video"])[0]
    assert check(file="absent.pt") == [f"{tmp_path / 'absent.pt'}: file not found"]
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert "junk.pt: unreadable" in check(file="junk.pt")[0]


@pytest.mark.parametrize("config", ["kd", "mst_distill"])
def test_features_configs_run_end_to_end(tmp_path, config):
    data = arrays()
    path = tmp_path / "crisismmd.npz"
    np.savez(path, image=data["image"], text=data["text"], label=data["label"])
    overrides = [f"data.params.file={path}", f"data.params.num_classes={CLASSES}", "data.batch_size=16", "data.eval_batch_size=32", "accelerator.cpu=true"]
    cfg = load_config(REPO / "configs" / "features" / f"{config}.yaml", overrides)
    metrics = Runner(cfg, tmp_path / "run", fast_dev_run=True, progress=False).run()
    assert set(metrics["stages"]) == {s.name for s in cfg.stages}
    assert "student" in metrics["stages"]["kd_cm" if config == "kd" else "routed"]["models"]
