"""Modality encoders. Each factory takes the modality's ``input_shape`` (no batch dim) plus its params and
returns an ``nn.Module`` mapping ``(B, *input_shape)`` to ``(B, out_dim)`` features, with ``.out_dim`` set.

Add your own with ``@ENCODERS.register("name")`` in a module listed under ``imports:`` in the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Sequence

import torch
import torchaudio
import torchvision
from pydantic import AfterValidator
from pydantic_core import PydanticCustomError
from torch import nn

from crossmodal_kd.params import Fraction, PositiveInt
from crossmodal_kd.registry import ENCODERS


def _channels(input_shape: Sequence[int], name: str, ndim: int = 3) -> int:
    if len(input_shape) != ndim:
        raise ValueError(f"encoder '{name}' expects inputs of {ndim} dims (C, H, W), got shape {tuple(input_shape)}")
    return int(input_shape[0])


class LeNet5(nn.Module):
    """LeNet-5 (conv 6@5x5 -> pool -> conv 16@5x5 -> pool -> fc 120 -> fc 84)."""

    def __init__(self, input_shape: Sequence[int], feature_dim: int = 84) -> None:
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Sequential(nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        flat = 16 * ((h // 2 - 4) // 2) * ((w // 2 - 4) // 2)
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(flat, 120), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(120, feature_dim), nn.ReLU())
        self.out_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.conv2(self.conv1(x))))


@ENCODERS.register("lenet5")
def lenet5(input_shape: Sequence[int], feature_dim: PositiveInt = 84) -> nn.Module:
    _channels(input_shape, "lenet5")
    if min(input_shape[1:]) < 12:
        raise ValueError(f"encoder 'lenet5' needs inputs of at least 12x12, got {tuple(input_shape)}")
    return LeNet5(input_shape, feature_dim)


class SmallCNN(nn.Module):
    """Blocks of conv3x3 -> BatchNorm -> ReLU -> maxpool2, then global average pooling."""

    def __init__(self, in_channels: int, channels: Sequence[int], dropout: float) -> None:
        super().__init__()
        layers, prev = [], in_channels
        for c in channels:
            layers.append(
                nn.Sequential(nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2))
            )
            prev = c
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.out_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(x))


@ENCODERS.register("small_cnn")
def small_cnn(input_shape: Sequence[int], channels: Sequence[PositiveInt] = (16, 32, 64), dropout: Fraction = 0.0) -> nn.Module:
    """A light CNN for images or (precomputed) spectrograms."""
    return SmallCNN(_channels(input_shape, "small_cnn"), list(channels), dropout)


@ENCODERS.register("resnet18")
def resnet18(input_shape: Sequence[int], width: PositiveInt = 64) -> nn.Module:
    """torchvision ResNet-18 adapted to small inputs (3x3 stem, stride 1, no max-pool); random init.

    ``width``: the first stage's channels (the four stages have 1, 2, 4, 8 x ``width``; ``out_dim`` = 8 x
    ``width``). 64 is ResNet-18; narrower ones are for CPUs (a 28x28 input keeps 28x28 maps in stage 1).
    """
    c = _channels(input_shape, "resnet18")
    block = torchvision.models.resnet.BasicBlock
    net = torchvision.models.resnet.ResNet(block, [2, 2, 2, 2], num_classes=1)
    if width != 64:  # torchvision fixes 64: rebuild the stem's norm and the stages narrower, initialised as it does
        net.inplanes, net.bn1 = width, nn.BatchNorm2d(width)
        for i in range(4):
            setattr(net, f"layer{i + 1}", net._make_layer(block, width * 2**i, 2, stride=1 if i == 0 else 2))
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    net.conv1 = nn.Conv2d(c, width, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.out_dim = 8 * width
    return net


class LogMelCNN(nn.Module):
    """Raw waveform -> torchaudio log-mel front end -> :class:`SmallCNN`."""

    def __init__(self, sample_rate: int, n_mels: int, n_fft: int, hop_length: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels
        )
        self.to_db = torchaudio.transforms.AmplitudeToDB(top_db=80)
        self.norm = nn.InstanceNorm2d(1)
        self.cnn = SmallCNN(1, channels, 0.0)
        self.out_dim = self.cnn.out_dim

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() == 3:  # (B, 1, T)
            wav = wav[:, 0]
        spec = self.to_db(self.melspec(wav.float())).unsqueeze(1)
        return self.cnn(self.norm(spec))


@ENCODERS.register("logmel_cnn")
def logmel_cnn(
    input_shape: Sequence[int],
    sample_rate: PositiveInt = 16000,
    n_mels: PositiveInt = 64,
    n_fft: PositiveInt = 512,
    hop_length: PositiveInt = 160,
    channels: Sequence[PositiveInt] = (16, 32, 64),
) -> nn.Module:
    """For waveform inputs of shape (T,) or (1, T)."""
    if len(input_shape) not in (1, 2):
        raise ValueError(f"encoder 'logmel_cnn' expects waveforms (T,) or (1, T), got shape {tuple(input_shape)}")
    return LogMelCNN(sample_rate, n_mels, n_fft, hop_length, list(channels))


@ENCODERS.register("mlp")
def mlp(input_shape: Sequence[int], hidden: Sequence[PositiveInt] = (256,), dropout: Fraction = 0.1) -> nn.Module:
    """For precomputed feature vectors of shape (D,)."""
    if len(input_shape) != 1:
        raise ValueError(f"encoder 'mlp' expects feature vectors (D,), got shape {tuple(input_shape)}")
    layers, prev = [], int(input_shape[0])
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU(), nn.Dropout(dropout)]
        prev = h
    net = nn.Sequential(*layers)
    net.out_dim = prev
    return net


class _StageTap:
    """Forward hook on a timm stage: its output passes through ``tap`` channel-first (whatever the tap, or a
    mask hooked on it, returns goes on into the model)."""

    def __init__(self, tap: nn.Module, channels: int) -> None:
        self.tap, self.channels = tap, channels

    def __call__(self, module: nn.Module, args: tuple, out: object) -> object:
        if not torch.is_tensor(out):
            return None
        if out.dim() >= 3 and out.shape[1] != self.channels and out.shape[-1] == self.channels:  # (B, N, D), NHWC
            return self.tap(out.movedim(-1, 1)).movedim(1, -1)
        return self.tap(out)


class TimmEncoder(nn.Module):
    """A timm model as a feature extractor (``num_classes=0``: pooled features, ``out_dim`` wide).

    ``model`` is the timm network (state-dict keys ``model.<timm key>``). ``stages.<i>`` are the taps of its
    ``feature_info`` (the stages ``features_only=True`` would return; ``stage_names`` gives timm's module
    names, e.g. ``act1, layer1..layer4`` for ResNets, ``blocks.0..N-1`` for ViTs): identity modules every
    forward passes that stage's output through, channel-first ((B, C, H, W); a ViT block's (B, tokens, D)
    as (B, D, tokens)). Hook masks and feature losses on ``encoder.stages.<i>``: what a hook returns there
    goes on into the rest of the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        info = list(getattr(model, "feature_info", None) or [])
        self.stage_names = [f["module"] for f in info]
        self.stages = nn.ModuleList(nn.Identity() for _ in info)
        modules = dict(model.named_modules())
        for tap, f in zip(self.stages, info):
            modules[f["module"]].register_forward_hook(_StageTap(tap, int(f["num_chs"])))
        self.out_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _timm_model(name: str) -> str:
    """A model name of the installed timm (a hub name would be downloaded)."""
    import timm

    if ":" in name:
        raise PydanticCustomError("timm", "hub names are downloaded; give the architecture name (and pretrained_file)")
    if not timm.is_model(name):
        raise PydanticCustomError("timm", "unknown timm model (timm {version}; see timm.list_models())", {"version": timm.__version__})
    return name


def _no_download(pretrained: bool) -> bool:
    if pretrained:
        raise PydanticCustomError("timm", "weights are never downloaded: pass pretrained_file: PATH (a local weights "
                                  "file of the model, e.g. its model.safetensors) instead")
    return pretrained


def _local_file(path: str | None) -> str | None:
    if path is not None and not Path(path).is_file():
        raise PydanticCustomError("timm", "file not found")
    return path


@ENCODERS.register("timm")
def timm_encoder(
    input_shape: Sequence[int],
    model: Annotated[str, AfterValidator(_timm_model)],
    pretrained_file: Annotated[str | None, AfterValidator(_local_file)] = None,
    pretrained: Annotated[bool, AfterValidator(_no_download)] = False,
    model_args: dict[str, Any] | None = None,
) -> nn.Module:
    """Any ``timm.create_model`` architecture (:class:`TimmEncoder`), built offline: ``in_chans`` from the
    input's channels, ``img_size`` from its height and width where the model takes one (ViTs), ``model_args``
    passed on (e.g. ``patch_size``, ``depth``, ``embed_dim``, ``dynamic_img_pad``). Weights: random, or
    ``pretrained_file`` (a local timm state dict, ``.safetensors`` or ``.pth``; timm adapts the stem to
    ``in_chans`` and drops the head); ``pretrained: true`` is refused (it would download)."""
    import timm

    c = _channels(input_shape, "timm")
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": c, **(model_args or {})}
    if pretrained_file is not None:
        try:
            weights = timm.models.load_state_dict(str(pretrained_file))
        except Exception as exc:  # torch / safetensors raise many types for unreadable files
            raise ValueError(f"encoder 'timm': pretrained_file {pretrained_file}: unreadable ({type(exc).__name__}: {exc})") from None
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file), "source": "file"})
    try:
        net = timm.create_model(model, img_size=tuple(input_shape[1:]), **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        net = timm.create_model(model, **kwargs)  # CNNs take any size and no img_size
    if pretrained_file is not None:
        missing = [k for k in net.state_dict() if k not in weights and not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"encoder 'timm': pretrained_file {pretrained_file} lacks {len(missing)} weights of "
                             f"'{model}' ({', '.join(missing[:3])}, ...); it must hold that model's timm state dict")
    return TimmEncoder(net)
