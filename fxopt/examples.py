"""Bundled example models, importable as MODEL specs (``fxopt.examples:small_cnn``)."""

from __future__ import annotations

import torch
from torch import nn

from fxopt.testing import randomize_norm_stats


class MultiBranch(nn.Module):
    """A training-time block: parallel conv-BN branches (kernel sizes ``kernels``), a BN on the
    identity when the shape allows, summed, then ReLU. With kernels (3, 1) it is a RepVGG block;
    with several 3x3 depthwise branches and a 1x1 one, a MobileOne depthwise block."""

    def __init__(self, c_in: int, c_out: int, kernels=(3, 1), stride: int = 1, groups: int = 1):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out))
            for k in kernels)
        self.identity = nn.BatchNorm2d(c_out) if c_in == c_out and stride == 1 else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class SmallCNN(nn.Module):
    """A compact classifier in its training-time form, as RepVGG and MobileOne are trained:
    multi-branch conv-BN blocks, dropout, global pooling and a linear head. fxopt folds every
    block into a single conv (``make demo`` shows it in the report)."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            MultiBranch(3, width, (3, 1), stride=2),                          # RepVGG-style stem
            MultiBranch(width, width, (3, 1)),                                # + identity BN
            MultiBranch(width, width, (3, 3, 1), stride=2, groups=width),     # MobileOne depthwise
            MultiBranch(width, 2 * width, (1, 1)),                            # MobileOne pointwise
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def small_cnn(seed: int = 0) -> SmallCNN:
    """SmallCNN with seeded weights and non-trivial BatchNorm statistics, as a trained model has."""
    torch.manual_seed(seed)
    return randomize_norm_stats(SmallCNN(), seed).eval()


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project, each with BN; ReLU6 after
    the first two; the input added back when the shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, expand: int = 4):
        super().__init__()
        hidden = c_in * expand
        self.body = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class TinyMobileNetV2(nn.Module):
    """A MobileNetV2-style network for small images (32x32): the structure depth compression
    works on (fxopt plan depth), small enough to train in seconds on a CPU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6(inplace=True)]
        channels = width
        for c_out, stride, repeat in ((width, 1, 1), (24, 2, 2), (32, 2, 3), (48, 2, 2), (64, 1, 1)):
            for i in range(repeat):
                layers.append(InvertedResidual(channels, c_out, stride if i == 0 else 1, expand=1 if channels == width and i == 0 and c_out == width else 4))
                channels = c_out
        layers += [nn.Conv2d(channels, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # as MobileNetV2 is initialised: the signal keeps its scale
                nn.init.kaiming_normal_(module.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_mobilenetv2(seed: int = 0) -> TinyMobileNetV2:
    """TinyMobileNetV2 (1x32x32 inputs, 10 classes) with seeded weights and BN statistics."""
    torch.manual_seed(seed)
    return randomize_norm_stats(TinyMobileNetV2(), seed).eval()


class SensorCNN(nn.Module):
    """A 1D-conv network for human activity recognition from sensor windows: ``channels``
    accelerometer axes x ``samples`` readings in, ``num_classes`` activity scores out. Sized for a
    microcontroller (about 7k weights, 28 KB in float32): three conv-BN-ReLU layers (the second
    and third strided), a global average over time (``mean``) and a linear head."""

    def __init__(self, channels: int = 3, num_classes: int = 6, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(channels, width, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Conv1d(width, 2 * width, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(2 * width), nn.ReLU(inplace=True),
            nn.Conv1d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(2 * width),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x.mean, not nn.AdaptiveAvgPool1d: fxopt's CPU pipeline fails on 1D pooling with TVM 0.27)
        return self.head(self.features(x).mean(dim=-1))


def sensor_cnn(seed: int = 0) -> SensorCNN:
    """SensorCNN (1x3x128 windows, 6 activities) with seeded weights and BN statistics; build it for a
    microcontroller with ``fxopt build fxopt.examples:sensor_cnn --input-shape 1x3x128 --target riscv32-mcu``."""
    torch.manual_seed(seed)
    return randomize_norm_stats(SensorCNN(), seed).eval()
