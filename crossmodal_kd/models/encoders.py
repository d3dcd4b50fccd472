"""Modality encoders. Each factory takes the modality's ``input_shape`` (no batch dim) plus its params and
returns an ``nn.Module`` mapping ``(B, *input_shape)`` to ``(B, out_dim)`` features, with ``.out_dim`` set.

Add your own with ``@ENCODERS.register("name")`` in a module listed under ``imports:`` in the config.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torchaudio
import torchvision
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
def resnet18(input_shape: Sequence[int]) -> nn.Module:
    """torchvision ResNet-18 adapted to small inputs (3x3 stem, stride 1, no max-pool); random init."""
    c = _channels(input_shape, "resnet18")
    net = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=1
    )
    net.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.out_dim = 512
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
