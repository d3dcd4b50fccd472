"""The ``timm`` encoder: timm architectures built offline on avdigits' shapes, their stage taps as mask hook
points, local pretrained weights, the refusal to download, and KD with a timm teacher."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import TEST_CONFIGS, run_config
from crossmodal_kd.config import ConfigError, validate_config
from crossmodal_kd.data.avdigits import AVDigits
from crossmodal_kd.engine.trainer import Runner
from crossmodal_kd.export import export
from crossmodal_kd.models.masks import ChannelGate, attached
from crossmodal_kd.models.networks import build_network
from crossmodal_kd.registry import ENCODERS

SHAPES, _ = AVDigits("unused").input_spec()  # image (1, 28, 28), audio (1, 40, 51): read from the recipe, no data
RESNET = {"model": "test_resnet"}  # timm's smallest test models (0.37 M and 0.25 M parameters)
VIT = {"model": "test_vit", "model_args": {"patch_size": 4, "dynamic_img_pad": True}}  # 51 frames: padded to 52


@pytest.mark.parametrize("params", [RESNET, VIT], ids=["resnet", "vit"])
@pytest.mark.parametrize("modality", ["image", "audio"])
def test_builds_on_avdigits_shapes_with_channel_first_stage_taps(params, modality):
    shape = SHAPES[modality]
    enc = ENCODERS.build("timm", params, input_shape=shape)
    seen: list[tuple[int, ...]] = []
    for tap in enc.stages:
        tap.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        features = enc(torch.randn(2, *shape))
    assert features.shape == (2, enc.out_dim)
    if params is RESNET:
        assert enc.out_dim == 96 and enc.stage_names == ["act1", "layer1", "layer2", "layer3", "layer4"]
        assert [s[1] for s in seen] == [32, 32, 48, 192, 96] and all(len(s) == 4 for s in seen)  # (B, C, H, W)
    else:
        assert enc.out_dim == 64 and enc.stage_names == [f"blocks.{i}" for i in range(6)]
        tokens = 1 + -(-shape[1] // 4) * -(-shape[2] // 4)  # class token + patches
        assert seen == [(2, 64, tokens)] * 6  # a block's (B, tokens, D) tapped as (B, D, tokens)
    assert enc.model.patch_embed.proj.in_channels == 1 if params is VIT else enc.model.conv1[0].in_channels == 1


def test_a_mask_on_a_stage_tap_changes_what_the_rest_of_the_model_sees():
    net = build_network("unimodal", {"modality": "image", "encoder": {"name": "timm", "params": VIT}}, SHAPES, 10).eval()
    x = {"image": torch.randn(2, *SHAPES["image"])}
    gate = ChannelGate(64)
    torch.nn.init.constant_(gate.net[2].bias, -20.0)  # a gate that closes every channel
    with torch.no_grad():
        plain = net(x)["logits"]
        with attached(net, "encoder.stages.2", gate):
            masked = net(x)["logits"]
        assert torch.equal(net(x)["logits"], plain)  # the mask is active only inside the block
    assert not torch.allclose(plain, masked)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_file_round_trip(tmp_path, suffix):
    source = ENCODERS.build("timm", VIT, input_shape=SHAPES["audio"])
    path = tmp_path / f"weights{suffix}"
    weights = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(weights, path) if suffix == ".safetensors" else torch.save(weights, path)
    loaded = ENCODERS.build("timm", {**VIT, "pretrained_file": str(path)}, input_shape=SHAPES["audio"])
    fresh = ENCODERS.build("timm", VIT, input_shape=SHAPES["audio"])
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not torch.equal(fresh.state_dict()["model.pos_embed"], source.state_dict()["model.pos_embed"])
    with pytest.raises(ValueError, match=r"pretrained_file .* lacks \d+ weights of 'test_resnet' \(conv1.0.weight"):
        ENCODERS.build("timm", {**RESNET, "pretrained_file": str(path)}, input_shape=SHAPES["audio"])


def test_hub_weights_are_never_downloaded():
    message = r"encoder.timm.pretrained: weights are never downloaded: pass pretrained_file: PATH .* \(got True\)"
    with pytest.raises(ConfigError, match=message):
        ENCODERS.build("timm", {**RESNET, "pretrained": True}, input_shape=SHAPES["image"])
    with pytest.raises(ConfigError, match=r"model: hub names are downloaded.*\(got 'hf-hub:timm/test_resnet.r160_in1k'\)"):
        ENCODERS.build("timm", {"model": "hf-hub:timm/test_resnet.r160_in1k"}, input_shape=SHAPES["image"])
    with pytest.raises(ConfigError, match=r"model: unknown timm model \(timm [\d.]+; see timm.list_models\(\)\) \(got 'resnet_typo'\)"):
        ENCODERS.build("timm", {"model": "resnet_typo"}, input_shape=SHAPES["image"])
    with pytest.raises(ConfigError, match=r"pretrained_file: file not found \(got 'nowhere.safetensors'\)"):
        ENCODERS.build("timm", {**RESNET, "pretrained_file": "nowhere.safetensors"}, input_shape=SHAPES["image"])


def kd_config() -> dict:
    """tests/configs/synthetic_kd.yaml at avdigits' shapes: a timm ViT audio teacher, KD into the small-CNN
    image student, then a mask trained on the teacher's stage tap ``encoder.stages.1``."""
    raw = yaml.safe_load((TEST_CONFIGS / "synthetic_kd.yaml").read_text())
    raw["data"]["params"] = {"n_train": 32, "n_val": 16, "n_test": 16, "image_shape": list(SHAPES["image"]),
                             "audio_shape": list(SHAPES["audio"])}
    raw["data"]["batch_size"] = raw["data"]["eval_batch_size"] = 16
    raw["accelerator"] = {"cpu": True}
    raw["networks"]["vit_teacher"] = {"name": "unimodal", "params": {"modality": "audio", "encoder": {"name": "timm", "params": VIT}}}
    raw["stages"] = [
        {"name": "teacher_cm", "method": {"name": "supervised", "params": {"network": "vit_teacher"}}, "epochs": 1},
        {"name": "kd_cm", "method": {"name": "kd", "params": {"student": "image_student", "teacher": {"stage": "teacher_cm"}}},
         "epochs": 1},
        {"name": "mask_cm", "epochs": 1, "select": {"metric": "loss"}, "method": {"name": "mask", "params": {
            "teacher": {"stage": "teacher_cm"}, "student": {"stage": "kd_cm", "model": "student"}, "layer": "encoder.stages.1"}}},
    ]
    return raw


def test_kd_with_a_timm_teacher_fast_dev_run(tmp_path):
    metrics = run_config(kd_config(), tmp_path / "run", fast_dev_run=True)
    assert list(metrics["stages"]) == ["teacher_cm", "kd_cm", "mask_cm"]
    assert metrics["stages"]["kd_cm"]["models"]["student"]["test"]["n"] == 16
    assert metrics["stages"]["mask_cm"]["models"]["mask"]["test"]["n"] == 16
    # the ViT teacher (attention, taps) exports to ONNX and reproduces its logits
    _, spec = export(tmp_path / "run", "onnx", stage="teacher_cm")
    assert spec["export"]["check"]["max_abs_diff"] <= 1e-4


def test_a_pretrained_request_fails_before_anything_is_written(tmp_path):
    raw = kd_config()
    raw["networks"]["vit_teacher"]["params"]["encoder"]["params"]["pretrained"] = True
    with pytest.raises(ConfigError, match=r"networks.vit_teacher.params.encoder.params.pretrained: weights are never "
                                          r"downloaded: pass pretrained_file: PATH"):
        Runner(validate_config(raw), tmp_path / "run", fast_dev_run=True, progress=False).run()
    assert not (tmp_path / "run").exists()
