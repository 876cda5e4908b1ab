"""Bundled example models, importable as MODEL specs (``fxopt.examples:small_cnn``)."""

from __future__ import annotations

import torch
from torch import nn

from fxopt.testing import randomize_norm_stats


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """A compact classifier in its training-time form: conv/BN/ReLU stages, a depthwise-separable
    block with a residual add, dropout, global pooling and a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = _conv_bn_relu(3, width, stride=2)
        self.block = nn.Sequential(
            _conv_bn_relu(width, width, groups=width),
            nn.Conv2d(width, width, 1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.down = _conv_bn_relu(width, 2 * width, stride=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(self.down(x))


def small_cnn(seed: int = 0) -> SmallCNN:
    """SmallCNN with seeded weights and non-trivial BatchNorm statistics, as a trained model has."""
    torch.manual_seed(seed)
    return randomize_norm_stats(SmallCNN(), seed).eval()
