"""Data: containers, sampler, stratified split, the synthetic set, and the AV-MNIST loader on tiny files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from crossmodal_kd.data import ArrayDataset, DataError, EpochSampler, build_dataset, collate_batch
from crossmodal_kd.data.base import load_npy, stratified_split


# ----------------------------------------------------------------------------- containers


def _dataset(n: int = 10) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(
        {"image": torch.randn(n, 1, 3, 3, generator=g), "audio": torch.randint(0, 9, (n, 5), generator=g, dtype=torch.int32)},
        torch.arange(n, dtype=torch.int32) % 3,
    )


def test_array_dataset_batch_equals_stacked_items():
    ds = _dataset()
    idx = [7, 2, 2, 9, 0]
    batch = ds.__getitems__(idx)
    items = [ds[i] for i in idx]
    assert set(batch) == {"image", "audio", "label", "index"}
    for key in ("image", "audio", "label"):
        assert torch.equal(batch[key], torch.stack([it[key] for it in items]))
    assert batch["index"].tolist() == idx
    assert batch["image"].shape == (5, 1, 3, 3) and batch["audio"].shape == (5, 5)
    assert batch["image"].dtype == torch.float32 and batch["audio"].dtype == torch.int64  # ids stay integers
    assert batch["label"].dtype == torch.int64
    assert ds.modalities == ["image", "audio"] and len(ds) == 10


def test_array_dataset_through_a_dataloader_matches_default_collate():
    ds = _dataset()
    fast = next(iter(DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_batch)))
    slow = collate_batch([ds[i] for i in range(4)])  # per-sample dicts -> default_collate
    for key in ("image", "audio", "label", "index"):
        assert torch.equal(fast[key], slow[key])


def test_array_dataset_rejects_mismatched_lengths():
    with pytest.raises(DataError, match="modality 'audio' has 4 samples but there are 5 labels"):
        ArrayDataset({"image": torch.zeros(5, 2), "audio": torch.zeros(4, 2)}, torch.zeros(5))


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(2)
    list(b)  # iterating (or any global RNG use) does not advance anything
    torch.manual_seed(1234)
    b.set_epoch(2)
    order = list(a)
    assert order == list(b) == list(a)
    assert sorted(order) == list(range(50)) and len(a) == 50
    a.set_epoch(3)
    assert list(a) != order
    assert list(EpochSampler(50, seed=4).__iter__()) != list(EpochSampler(50, seed=3).__iter__())


def test_stratified_split_proportions_and_determinism():
    labels = np.repeat(np.arange(4), [10, 20, 30, 41])
    keep, carved = stratified_split(labels, 0.1, seed=0)
    assert np.bincount(labels[carved]).tolist() == [1, 2, 3, 4]  # round(0.1 * 41) = 4
    assert len(np.intersect1d(keep, carved)) == 0
    assert np.array_equal(np.sort(np.concatenate([keep, carved])), np.arange(len(labels)))
    keep2, carved2 = stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(keep, keep2) and np.array_equal(carved, carved2)
    _, carved3 = stratified_split(labels, 0.1, seed=1)
    assert not np.array_equal(carved, carved3)
    assert np.bincount(labels[carved3]).tolist() == [1, 2, 3, 4]


def test_load_npy_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path / 'x.npy'}: file not found"):
        load_npy(tmp_path / "x.npy")
    np.save(tmp_path / "m.npy", np.zeros((2, 3)))
    with pytest.raises(DataError, match=r"m\.npy: expected a 1-D array, got shape \(2, 3\)"):
        load_npy(tmp_path / "m.npy", ndim=1)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"o\.npy: unreadable \.npy file"):
        load_npy(tmp_path / "o.npy")  # pickled objects are refused, not executed


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_sizes_and_determinism():
    params = {"num_classes": 3, "n_train": 30, "n_val": 10, "n_test": 20, "image_shape": [1, 6, 6], "audio_shape": [2, 4, 4]}
    data = build_dataset("synthetic", "unused", params).load()
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 20)
    assert data.num_classes == 3 and data.class_names == ["class0", "class1", "class2"]
    assert data.input_shapes == {"image": (1, 6, 6), "audio": (2, 4, 4)}
    batch = data.train.__getitems__(list(range(30)))
    assert batch["image"].shape == (30, 1, 6, 6) and batch["audio"].shape == (30, 2, 4, 4)
    assert set(batch["label"].tolist()) <= {0, 1, 2}
    again = build_dataset("synthetic", "unused", params).load()
    assert torch.equal(again.test.arrays["audio"], data.test.arrays["audio"])
    other = build_dataset("synthetic", "unused", {**params, "seed": 1}).load()
    assert not torch.equal(other.test.arrays["audio"], data.test.arrays["audio"])
    assert data.split("val") is data.val
    with pytest.raises(KeyError, match="unknown split 'dev'"):
        data.split("dev")


def test_synthetic_modalities_carry_label_information():
    """Noise-free, fully informative data: each sample equals its class pattern."""
    data = build_dataset("synthetic", "unused", {"noise": 0.0, "informative": 1.0, "n_train": 40}).load()
    x, y = data.train.arrays["image"], data.train.labels
    for c in y.unique():
        rows = x[y == c]
        assert torch.equal(rows, rows[:1].expand_as(rows))


def test_dataset_params_are_checked():
    with pytest.raises(TypeError, match=r"data\.params: unknown parameter\(s\) n_trian"):
        build_dataset("synthetic", "unused", {"n_trian": 3})


# ----------------------------------------------------------------------------- avmnist


def write_avmnist(root: Path, n_train: int = 40, n_test: int = 12, classes: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Tiny files in the MultiBench layout; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    d = root / "avmnist"
    (d / "image").mkdir(parents=True)
    (d / "audio").mkdir()
    raw = {}
    for split, n in (("train", n_train), ("test", n_test)):
        raw[f"{split}_image"] = (rng.random((n, 784)) * 255).astype(np.float32) + (5.0 if split == "test" else 0.0)
        raw[f"{split}_audio"] = rng.normal(3.0, 2.0, (n, 112, 112)).astype(np.float32)
        raw[f"{split}_labels"] = np.arange(n) % classes
        np.save(d / "image" / f"{split}_data.npy", raw[f"{split}_image"])
        np.save(d / "audio" / f"{split}_data.npy", raw[f"{split}_audio"])
        np.save(d / f"{split}_labels.npy", raw[f"{split}_labels"])
    return raw


def test_avmnist_loads_multibench_layout(tmp_path):
    raw = write_avmnist(tmp_path)
    family = build_dataset("avmnist", str(tmp_path), {"val_fraction": 0.2, "split_seed": 1, "num_classes": 4})
    assert family.check() == []
    data = family.load()
    assert data.num_classes == 4 and data.input_shapes == {"image": (1, 28, 28), "audio": (1, 112, 112)}
    # validation is carved from train (2 of 10 per class), the official test split is kept whole and in order
    assert (len(data.train), len(data.val), len(data.test)) == (32, 8, 12)
    assert np.bincount(data.val.labels.numpy()).tolist() == [2, 2, 2, 2]
    assert data.test.labels.tolist() == raw["test_labels"].tolist()
    keep, val = stratified_split(raw["train_labels"], 0.2, seed=1)

    # z-scoring uses the statistics of the training part only, for every split
    for m, side in (("image", 28), ("audio", 112)):
        train_raw = raw[f"train_{m}"].reshape(-1, 1, side, side)
        mean, std = float(train_raw[keep].mean()), float(train_raw[keep].std())
        assert data.train.arrays[m].shape == (32, 1, side, side)
        assert abs(float(data.train.arrays[m].mean())) < 1e-4
        assert float(data.train.arrays[m].std()) == pytest.approx(1.0, abs=1e-3)
        expect_val = (train_raw[val] - mean) / std
        expect_test = (raw[f"test_{m}"].reshape(-1, 1, side, side) - mean) / std
        np.testing.assert_allclose(data.val.arrays[m].numpy(), expect_val, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(data.test.arrays[m].numpy(), expect_test, rtol=1e-4, atol=1e-4)
    # the shifted test images stay shifted: test statistics did not leak into the normalisation
    assert float(data.test.arrays["image"].mean()) > 0.04
    assert data.train.labels.tolist() == raw["train_labels"][keep].tolist()


def test_avmnist_split_is_deterministic(tmp_path):
    write_avmnist(tmp_path)
    a = build_dataset("avmnist", str(tmp_path), {"split_seed": 0}).load()
    b = build_dataset("avmnist", str(tmp_path), {"split_seed": 0}).load()
    c = build_dataset("avmnist", str(tmp_path), {"split_seed": 5}).load()
    assert torch.equal(a.val.arrays["image"], b.val.arrays["image"])
    assert not torch.equal(a.val.arrays["image"], c.val.arrays["image"])


def test_avmnist_rejects_bad_val_fraction(tmp_path):
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        build_dataset("avmnist", str(tmp_path), {"val_fraction": 1.5})


def _expect_data_error(root: Path, needle: str, path: Path) -> None:
    family = build_dataset("avmnist", str(root))
    with pytest.raises(DataError) as info:
        family.load()
    assert str(path) in str(info.value) and needle in str(info.value)
    problems = family.check()
    assert any(str(path) in p and needle in p for p in problems), problems


def test_avmnist_missing_file(tmp_path):
    write_avmnist(tmp_path)
    path = tmp_path / "avmnist" / "audio" / "test_data.npy"
    path.unlink()
    _expect_data_error(tmp_path, "file not found", path)


def test_avmnist_wrong_shape(tmp_path):
    write_avmnist(tmp_path)
    path = tmp_path / "avmnist" / "image" / "train_data.npy"
    np.save(path, np.zeros((40, 28, 28), np.float32))
    _expect_data_error(tmp_path, "expected a 2-D array, got shape (40, 28, 28)", path)
    np.save(path, np.zeros((40, 100), np.float32))
    _expect_data_error(tmp_path, "expected shape (N, 784), got (40, 100)", path)
    write_avmnist(tmp_path / "b")
    path = tmp_path / "b" / "avmnist" / "audio" / "train_data.npy"
    np.save(path, np.zeros((40, 112, 100), np.float32))
    _expect_data_error(tmp_path / "b", "expected shape (N, 112, 112)", path)


def test_avmnist_label_count_mismatch(tmp_path):
    write_avmnist(tmp_path)
    np.save(tmp_path / "avmnist" / "train_labels.npy", np.arange(39) % 4)
    _expect_data_error(tmp_path, "40 rows but train_labels.npy has 39 labels", tmp_path / "avmnist" / "image" / "train_data.npy")


def test_avmnist_bad_labels(tmp_path):
    write_avmnist(tmp_path)
    path = tmp_path / "avmnist" / "test_labels.npy"
    np.save(path, np.linspace(0, 1, 12))
    _expect_data_error(tmp_path, "labels must be non-negative integers", path)


def test_avmnist_truncated_file(tmp_path):
    write_avmnist(tmp_path)
    path = tmp_path / "avmnist" / "audio" / "train_data.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_data_error(tmp_path, "unreadable .npy file", path)
    path.write_bytes(data[:20])  # cut inside the header
    _expect_data_error(tmp_path, "unreadable .npy file", path)
