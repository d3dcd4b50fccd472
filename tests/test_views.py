"""Views (Zhang et al., TMKD, arXiv 2603.24208): derived image modalities with the intended frequency content, applied by the engine."""

from __future__ import annotations

import pytest
import torch

from crossmodal_kd.config import ConfigError, validate_config
from crossmodal_kd.engine.trainer import Runner
from crossmodal_kd.registry import VIEWS
from crossmodal_kd.data.views import ViewSet, high_pass_mask


def disc_energy(x: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral energy (per image) inside and outside the centred disc of ``radius``."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1)).abs() ** 2
    keep = high_pass_mask(*x.shape[-2:], radius)
    return spectrum[..., ~keep].sum(-1).sum(-1), spectrum[..., keep].sum(-1).sum(-1)


def smooth_images(n: int = 4, size: int = 32) -> torch.Tensor:
    """Low-frequency-dominated images: blurred noise plus a constant offset."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    kernel = torch.ones(3, 1, 5, 5) / 25
    for _ in range(3):
        x = torch.nn.functional.conv2d(x, kernel, padding=2, groups=3)
    return x + 0.5


def test_high_frequency_view_removes_the_disc_and_blends_exactly():
    x = smooth_images()
    inside_x, _ = disc_energy(x, 0.25)
    pure = VIEWS.build("highfreq", {"alpha": 1.0, "radius": 0.25})(x)
    inside_pure, outside_pure = disc_energy(pure, 0.25)
    assert (inside_pure < 1e-8 * outside_pure).all()  # nothing left inside the removed disc
    blended = VIEWS.build("highfreq", {"alpha": 0.4, "radius": 0.25})(x)
    inside_blend, _ = disc_energy(blended, 0.25)
    assert torch.allclose(inside_blend, 0.6**2 * inside_x, rtol=1e-4)  # (1 - alpha)^2 of the source's
    assert pure.shape == x.shape and torch.allclose(pure.std((-2, -1)), x.std((-2, -1)), rtol=1e-3)


def test_edge_view_marks_a_step_and_ignores_flat_regions():
    x = torch.zeros(1, 1, 16, 16)
    x[..., 8:] = 1.0  # a vertical step between columns 7 and 8
    edges = VIEWS.build("edge", {"alpha": 1.0})(x)[0, 0]
    step_cols, flat_cols = edges[:, 7:9], torch.cat([edges[:, :5], edges[:, 11:]], 1)
    assert step_cols.min() > flat_cols.max() + 0.5
    assert torch.allclose(edges.mean(), x.mean(), atol=1e-5)  # rescaled to the source's mean and std
    assert torch.equal(VIEWS.build("edge", {"alpha": 0.0})(x), x)
    assert torch.equal(VIEWS.build("rgb", {})(x), x)


@pytest.mark.parametrize(("name", "params", "match"), [
    ("edge", {"alpha": 1.5}, r"^view\.edge\.alpha: Input should be less than or equal to 1 \(got 1\.5\)$"),
    ("highfreq", {"radius": 0.0}, r"^view\.highfreq\.radius: Input should be greater than 0 \(got 0\.0\)$"),
])
def test_bad_view_parameters_are_named(name, params, match):
    with pytest.raises(ValueError, match=match):
        VIEWS.build(name, params)


def _views(raw: dict) -> ViewSet:
    return ViewSet(validate_config({"data": {"views": raw}, "stages": [
        {"name": "s", "method": {"name": "supervised", "params": {"network": "n"}}}]}).data.views)


def test_view_set_adds_modalities_with_the_source_shape_and_keeps_the_batch():
    views = _views({"image_edge": {"name": "edge", "params": {"source": "image"}}, "image_hf": {"name": "highfreq"}})
    assert views.input_shapes({"image": (3, 8, 8), "audio": (1, 4, 4)}) == {
        "image": (3, 8, 8), "audio": (1, 4, 4), "image_edge": (3, 8, 8), "image_hf": (3, 8, 8)}
    batch = {"image": torch.rand(2, 3, 8, 8), "label": torch.tensor([0, 1])}
    out = views(batch)
    assert set(out) == {"image", "label", "image_edge", "image_hf"} and set(batch) == {"image", "label"}
    with pytest.raises(ConfigError, match=r"data.views.image_edge: source modality 'video'"):
        _views({"image_edge": {"name": "edge", "params": {"source": "video"}}}).input_shapes({"image": (3, 8, 8)})
    with pytest.raises(KeyError, match="unknown view 'blur'"):
        _views({"x": {"name": "blur"}})


def test_engine_trains_a_network_on_a_view_modality(tmp_path):
    cfg = validate_config({
        "data": {"name": "synthetic", "batch_size": 32, "eval_batch_size": 64,
                 "views": {"image_hf": {"name": "highfreq", "params": {"alpha": 0.5}}}},
        "networks": {"hf_net": {"name": "unimodal", "params": {"modality": "image_hf", "encoder": {"name": "small_cnn", "params": {"channels": [8]}}}}},
        "stages": [{"name": "hf", "method": {"name": "supervised", "params": {"network": "hf_net"}}, "epochs": 1}],
    })
    metrics = Runner(cfg, tmp_path / "run", progress=False).run()
    assert 0.0 <= metrics["stages"]["hf"]["models"]["model"]["test"]["accuracy"] <= 1.0


def test_multiview_teacher_shares_one_backbone_and_fuses_with_weights_summing_to_one():
    from crossmodal_kd.models.networks import build_network

    shapes = {"image": (1, 12, 12), "image_edge": (1, 12, 12), "image_hf": (1, 12, 12)}
    cnn = {"name": "small_cnn", "params": {"channels": [8]}}
    net = build_network("multiview", {"views": list(shapes), "encoder": cnn}, shapes, 5).eval()
    single = build_network("unimodal", {"modality": "image", "encoder": cnn}, shapes, 5)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in single.parameters())
    batch = {m: torch.randn(4, *s) for m, s in shapes.items()}
    out = net(batch)
    assert out["logits"].shape == (4, 5) and out["view_weights"].shape == (4, 3)
    assert torch.allclose(out["view_weights"].sum(1), torch.ones(4))
    per_view = torch.stack([net.encoder(batch[m]) for m in shapes], 1)
    assert torch.allclose(out["features"], per_view.mean(1), atol=1e-6)  # uniform router = plain average
    with pytest.raises(ValueError, match="one shape"):
        build_network("multiview", {"views": ["image", "audio"], "encoder": cnn}, {**shapes, "audio": (1, 8, 8)}, 5)
