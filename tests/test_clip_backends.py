"""CLIP backends: the shared interface (preprocessing, norms, batching) and the offline open_clip backend."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from crossmodal_kd.clip import backends
from crossmodal_kd.clip.backends import CLIP_BACKENDS, ClipBackend, OpenClipBackend, build_clip_backend
from crossmodal_kd.registry import RegistryError

TINY = {"model_name": "tiny_open_clip"}
TEXTS = ["a photo of a dog.", "a picture of a seven.", "an origami crane."]


def build_tiny(**params) -> OpenClipBackend:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return build_clip_backend("open_clip", {**TINY, **params})


@pytest.fixture(scope="module")
def tiny() -> OpenClipBackend:
    return build_tiny()


class Pixels(ClipBackend):
    """A model-free backend whose 'image features' are the preprocessed pixels, flattened."""

    def __init__(self, **kwargs):
        super().__init__(image_size=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **kwargs)
        self.embed_dim = 48
        self.cache_key = "pixels"

    def _image_features(self, pixels):
        return pixels.flatten(1)


def test_preprocess_grey_to_rgb_resize_crop_and_normalise():
    b = Pixels()
    grey = torch.rand(2, 1, 8, 16)
    out = b.preprocess(grey)
    assert out.shape == (2, 3, 4, 4)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    # short side 8 -> 4 (halved), width 16 -> 8, centre crop keeps columns 2..5
    expected = torch.nn.functional.interpolate(grey, size=(4, 8), mode="bilinear", antialias=True)[..., 2:6]
    torch.testing.assert_close(out[:, :1], (expected - 0.5) / 0.25)
    same_size = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(b.preprocess(same_size), (same_size - 0.5) / 0.25)
    torch.testing.assert_close(
        b.preprocess((same_size * 255).round().to(torch.uint8)), b.preprocess(same_size), atol=3e-2, rtol=0
    )


def test_dataset_normalised_inputs_are_undone_first():
    x = torch.rand(3, 1, 4, 4)
    mean, std = 0.1307, 0.3081
    plain, normalised = Pixels(), Pixels(input_mean=mean, input_std=std)
    torch.testing.assert_close(normalised.encode_image((x - mean) / std), plain.encode_image(x))
    with pytest.raises(ValueError, match="both input_mean and input_std"):
        Pixels(input_mean=0.5)
    with pytest.raises(ValueError, match="1 or 3 values"):
        Pixels(input_mean=[0.1, 0.2], input_std=[1, 1])
    with pytest.raises(ValueError, match=r"expected images \(B, 1 or 3, H, W\), got shape \(4, 4\)"):
        plain.encode_image(torch.rand(4, 4))


def test_tiny_open_clip_builds_offline_with_a_loud_warning(caplog):
    with caplog.at_level("WARNING", logger="crossmodal_kd.clip.backends"):
        b = build_tiny(seed=3)
    assert "meaningless for real use" in caplog.text
    assert isinstance(b, OpenClipBackend) and isinstance(b, torch.nn.Module)
    assert (b.embed_dim, b.image_size) == (32, (32, 32))
    assert b.cache_key.startswith("open_clip:tiny_open_clip:") and b.cache_key.endswith(":random-seed3")


def test_shapes_unit_norm_batching_and_grad(tiny):
    text = tiny.encode_text(TEXTS)
    assert text.shape == (3, 32) and text.dtype == torch.float32 and not text.requires_grad
    torch.testing.assert_close(text.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(tiny.encode_text(TEXTS, batch_size=1), text, atol=1e-5, rtol=1e-5)
    assert tiny.encode_text([]).shape == (0, 32)
    with pytest.raises(TypeError, match="list of strings"):
        tiny.encode_text("a dog")
    grey = torch.rand(4, 1, 28, 28)
    image = tiny.encode_image(grey)
    assert image.shape == (4, 32) and not image.requires_grad
    torch.testing.assert_close(image.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(tiny.encode_image(grey.expand(-1, 3, -1, -1)), image)  # grey == replicated RGB
    assert tiny.encode_image(torch.rand(2, 3, 40, 56)).shape == (2, 32)
    # the backend is frozen (no weight gets a gradient); ``grad=True`` keeps the graph to the input images
    assert not any(p.requires_grad for p in tiny.model.parameters()) and not list(tiny.parameters())
    pixels = grey.clone().requires_grad_()
    assert not tiny.encode_image(pixels).requires_grad
    tiny.encode_image(pixels, grad=True).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_random_weights_are_deterministic_given_the_seed(tiny):
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    again, other = build_tiny(seed=0), build_tiny(seed=1)
    torch.testing.assert_close(torch.rand(3), expected_next)  # building does not disturb the global RNG
    torch.testing.assert_close(again.encode_text(TEXTS), tiny.encode_text(TEXTS))
    assert not torch.allclose(other.encode_text(TEXTS), tiny.encode_text(TEXTS))
    assert again.cache_key == tiny.cache_key != other.cache_key


def test_local_checkpoint_reproduces_the_embeddings(tiny, tmp_path):
    path = tmp_path / "tiny_clip.pt"
    torch.save(tiny.model.state_dict(), path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = build_clip_backend("open_clip", {**TINY, "pretrained": str(path), "seed": 99})
    assert not [w for w in caught if "RANDOM" in str(w.message)]
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_text(TEXTS), tiny.encode_text(TEXTS))
    torch.testing.assert_close(loaded.encode_image(images), tiny.encode_image(images))
    assert ":file-" in loaded.cache_key and loaded.cache_key != tiny.cache_key
    with pytest.raises(FileNotFoundError, match=r"checkpoint file not found: .*missing\.pt"):
        build_clip_backend("open_clip", {**TINY, "pretrained": str(tmp_path / "missing.pt")})


def test_unknown_tag_fails_at_once_and_suggests_a_local_checkpoint():
    start = time.monotonic()
    with pytest.raises(ValueError) as info:
        build_clip_backend("open_clip", {"model_name": "ViT-B-32", "pretrained": "no_such_tag"})
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "'no_such_tag'" in msg and "local checkpoint" in msg and "openai" in msg  # lists the valid tags


def test_known_tag_offline_fails_at_once_with_what_to_do(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(backends, "_reachable", lambda host, timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        build_clip_backend("open_clip", {"model_name": "ViT-B-32", "pretrained": "openai"})
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "offline" in msg and "local file path" in msg and "HF_HUB_OFFLINE=1" in msg


def test_known_tag_with_hub_offline_wraps_the_download_error(monkeypatch):
    open_clip = backends._open_clip()

    def no_download(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': not in the local cache")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(open_clip, "create_model", no_download)
    with pytest.raises(
        RuntimeError, match=r"could not fetch weights .*not in the local cache.*local file path"
    ):
        build_clip_backend("open_clip", {"model_name": "ViT-B-32", "pretrained": "openai"})


def test_config_errors_name_the_key():
    assert "open_clip" in CLIP_BACKENDS
    with pytest.raises(RegistryError, match=r"unknown clip backend 'nope'; valid: .*open_clip"):
        build_clip_backend("nope")
    with pytest.raises(TypeError, match=r"clip backend 'open_clip': unknown parameter\(s\) modle_name"):
        build_clip_backend("open_clip", {"modle_name": "ViT-B-32"})
    with pytest.raises(ValueError, match=r"unknown model_name 'ViT-Z-99'.*model_config"):
        build_clip_backend("open_clip", {"model_name": "ViT-Z-99"})


def test_extra_model_config_file_becomes_a_model_name(tmp_path):
    path = tmp_path / "my_micro_clip.json"
    path.write_text(
        backends.MODEL_CONFIGS.joinpath("tiny_open_clip.json")
        .read_text()
        .replace('"embed_dim": 32', '"embed_dim": 16')
    )
    b = build_tiny(model_name="my_micro_clip", model_config=str(path))
    assert b.encode_text(TEXTS).shape == (3, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_gpu_with_cpu_inputs(tiny):
    gpu = build_tiny().to("cuda")
    images = torch.rand(2, 1, 28, 28)  # preprocessing moves the batch to the backend's device
    out = gpu.encode_image(images)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), tiny.encode_image(images), atol=1e-4, rtol=1e-4)
    assert gpu.encode_text(TEXTS).device.type == "cuda"
