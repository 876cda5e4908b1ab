"""Train-time reparameterizable blocks and networks, written from the papers' descriptions.

Each block is what a model author writes for training: parallel conv/BN branches summed. None
has a switch_to_deploy method; fxopt must find the structure by data flow. ``deploy_convs``
is the number of convs the deploy form has, which the folded graph must match.
Not a test module: imported by the tests and by benchmarks/reparam.py.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in, c_out, kernel, stride=1, padding=None, groups=1) -> nn.Sequential:
    if padding is None:
        padding = tuple(k // 2 for k in kernel) if isinstance(kernel, tuple) else kernel // 2
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(c_out))


class RepVGGBlock(nn.Module):
    """RepVGG (Ding et al., CVPR 2021): 3x3-BN + 1x1-BN (+ BN on the identity when shapes allow), ReLU."""

    deploy_convs = 1

    def __init__(self, c_in, c_out, stride=1, groups=1):
        super().__init__()
        self.dense = conv_bn(c_in, c_out, 3, stride, 1, groups)
        self.pointwise = conv_bn(c_in, c_out, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class RepVGG(nn.Module):
    """RepVGG-A-shaped network: five stages of RepVGG blocks (first of each with stride 2), GAP, FC."""

    def __init__(self, widths=(48, 48, 96, 192, 1280), depths=(1, 2, 4, 14, 1), num_classes=1000):
        super().__init__()
        blocks, c_in = [], 3
        for width, depth in zip(widths, depths):
            for i in range(depth):
                blocks.append(RepVGGBlock(c_in, width, stride=2 if i == 0 else 1))
                c_in = width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
        self.deploy_convs = len(blocks)

    def forward(self, x):
        return self.head(self.features(x))


def repvgg_a0(num_classes=1000) -> RepVGG:
    return RepVGG(num_classes=num_classes)


class ACBlock(nn.Module):
    """ACNet (Ding et al., ICCV 2019): 3x3-BN + 1x3-BN + 3x1-BN, summed."""

    deploy_convs = 1

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.square = conv_bn(c_in, c_out, 3, stride)
        self.horizontal = conv_bn(c_in, c_out, (1, 3), stride)
        self.vertical = conv_bn(c_in, c_out, (3, 1), stride)

    def forward(self, x):
        return torch.relu(self.square(x) + self.horizontal(x) + self.vertical(x))


class DBBBlock(nn.Module):
    """Diverse Branch Block (Ding et al., CVPR 2021): kxk-BN, 1x1-BN, 1x1-BN→kxk-BN, 1x1-BN→avg-BN.

    The 1x1 convs that precede a kxk op carry the kxk op's padding themselves, so the border of
    the intermediate tensor holds BN(bias): the paper's "pad with the BN values" semantics.
    """

    deploy_convs = 1

    def __init__(self, c_in, c_out, kernel=3, stride=1, groups=1):
        super().__init__()
        p = kernel // 2
        self.origin = conv_bn(c_in, c_out, kernel, stride, p, groups)
        self.pointwise = conv_bn(c_in, c_out, 1, stride, 0, groups)
        self.one_then_k = nn.Sequential(
            nn.Conv2d(c_in, c_in, 1, padding=p, groups=groups, bias=False), nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, kernel, stride, 0, groups=groups, bias=False), nn.BatchNorm2d(c_out))
        self.one_then_avg = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, padding=p, groups=groups, bias=False), nn.BatchNorm2d(c_out),
            nn.AvgPool2d(kernel, stride, 0), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return torch.relu(self.origin(x) + self.pointwise(x) + self.one_then_k(x) + self.one_then_avg(x))


class MobileOneBlock(nn.Module):
    """MobileOne (Vasu et al., CVPR 2023) conv block: k parallel kxk-BN branches, a 1x1-BN scale
    branch (when k > 1), and a BN skip when shapes allow; ReLU."""

    deploy_convs = 1

    def __init__(self, c_in, c_out, kernel, stride, groups, branches):
        super().__init__()
        self.branches = nn.ModuleList(conv_bn(c_in, c_out, kernel, stride, kernel // 2, groups) for _ in range(branches))
        self.scale = conv_bn(c_in, c_out, 1, stride, 0, groups) if kernel > 1 else None
        self.skip = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return self.act(y)


class MobileOne(nn.Module):
    """MobileOne-S0-shaped network: stem block, then per stage (depthwise 3x3 block, pointwise 1x1
    block) pairs with k=4 branches; widths 48, 48, 128, 256, 1024 and 2, 8, 10, 1 units."""

    def __init__(self, widths=(48, 48, 128, 256, 1024), units=(2, 8, 10, 1), branches=4, num_classes=1000):
        super().__init__()
        layers = [MobileOneBlock(3, widths[0], 3, 2, 1, 1)]
        c_in = widths[0]
        for width, count in zip(widths[1:], units):
            for i in range(count):
                stride = 2 if i == 0 else 1
                layers.append(MobileOneBlock(c_in, c_in, 3, stride, c_in, branches))
                layers.append(MobileOneBlock(c_in, width, 1, 1, 1, branches))
                c_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
        self.deploy_convs = len(layers)

    def forward(self, x):
        return self.head(self.features(x))


def mobileone_s0(num_classes=1000) -> MobileOne:
    return MobileOne(num_classes=num_classes)


class RepGhostModule(nn.Module):
    """RepGhost (Chen et al., 2022): 1x1 primary conv-BN(-ReLU), then a depthwise 3x3-BN cheap op
    with a BN on the identity added (feature reuse by addition instead of concatenation)."""

    def __init__(self, c_in, c_out, relu=True):
        super().__init__()
        self.primary = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
                                     nn.ReLU() if relu else nn.Identity())
        self.cheap = conv_bn(c_out, c_out, 3, 1, 1, groups=c_out)
        self.fusion = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU() if relu else nn.Identity()

    def forward(self, x):
        y = self.primary(x)
        return self.act(self.cheap(y) + self.fusion(y))


class RepGhostBottleneck(nn.Module):
    """RepGhost bottleneck: expand module, optional depthwise stride-2 conv-BN, project module,
    residual (identity, or depthwise 3x3-BN + 1x1-BN when the shape changes)."""

    def __init__(self, c_in, c_mid, c_out, stride=1):
        super().__init__()
        self.expand = RepGhostModule(c_in, c_mid, relu=True)
        self.down = conv_bn(c_mid, c_mid, 3, stride, 1, groups=c_mid) if stride > 1 else None
        self.project = RepGhostModule(c_mid, c_out, relu=False)
        if c_in == c_out and stride == 1:
            self.shortcut = None
        else:
            self.shortcut = nn.Sequential(conv_bn(c_in, c_in, 3, stride, 1, groups=c_in), conv_bn(c_in, c_out, 1))
        # deploy: per module one 1x1 and one depthwise 3x3, plus the down and shortcut convs
        self.deploy_convs = 4 + (self.down is not None) + (2 if self.shortcut is not None else 0)

    def forward(self, x):
        y = self.expand(x)
        if self.down is not None:
            y = self.down(y)
        y = self.project(y)
        return y + (x if self.shortcut is None else self.shortcut(x))


class GhostV3Module(nn.Module):
    """GhostNetV3's reparameterizable ghost module (Liu et al., 2024): the primary 1x1 conv and
    the cheap depthwise 3x3 conv are each k parallel conv-BN branches (+ a 1x1 scale branch and a
    BN skip for the cheap op), followed by concatenation."""

    deploy_convs = 2

    def __init__(self, c_in, c_out, branches=3):
        super().__init__()
        half = (c_out + 1) // 2
        self.c_out = c_out
        self.primary = nn.ModuleList(conv_bn(c_in, half, 1) for _ in range(branches))
        self.primary_skip = nn.BatchNorm2d(c_in) if c_in == half else None
        self.cheap = nn.ModuleList(conv_bn(half, half, 3, 1, 1, groups=half) for _ in range(branches))
        self.cheap_scale = conv_bn(half, half, 1, groups=half)
        self.cheap_skip = nn.BatchNorm2d(half)

    def forward(self, x):
        y = sum(branch(x) for branch in self.primary)
        if self.primary_skip is not None:
            y = y + self.primary_skip(x)
        y = torch.relu(y)
        z = self.cheap_skip(y) + self.cheap_scale(y)
        for branch in self.cheap:
            z = z + branch(y)
        z = torch.relu(z)
        return torch.cat([y, z], 1)[:, :self.c_out]
