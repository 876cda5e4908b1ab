"""Small CNNs for the channel dependency tests (tests/passes/test_channel_groups.py,
test_lower_zero_channels.py, tests/test_prune.py): a network built from a static list of block
specs, and a hypothesis strategy of random ones (convs, depthwise with multipliers, grouped
convs, residual adds, concatenation, SE gates, pools, flatten→linear heads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import fx, nn

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
               "none": nn.Identity}


def _act(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


class Net(nn.Module):
    """Runs ``blocks`` in order (the list is static, so torch.fx unrolls it):

    ("conv", out, k, stride, bias, bn, act)   conv (padding k // 2) [+ BN] + act
    ("dw", multiplier, stride, bn, act)       depthwise 3x3 conv, padding 1
    ("group", groups, per_group, act)         grouped 1x1 conv, per_group outputs per group
    ("res", k, bn, act)                       x + conv1x1(act(bn(conv_k(x))))
    ("cat", a, b)                             cat(conv1x1(x) -> a, relu(conv3x3(x)) -> b)
    ("se", hidden)                            x * sigmoid(conv(relu(conv(mean(x)))))
    ("pool", "max" | "avg")                   2x2 pool
    head: "flatten" (flatten -> linear), "pool" (global average -> linear), "none" (the tensor)
    """

    def __init__(self, in_channels: int, blocks: list[tuple], head: str = "flatten", size: int = 8, classes: int = 3):
        super().__init__()
        self.specs, self.head_kind = [tuple(b) for b in blocks], head
        self.blocks = nn.ModuleList()
        c, s = in_channels, size
        for spec in self.specs:
            kind, m = spec[0], nn.ModuleDict()
            if kind == "conv":
                _, out, k, stride, bias, bn, act = spec
                m["conv"] = nn.Conv2d(c, out, k, stride, k // 2, bias=bias)
                m["bn"] = nn.BatchNorm2d(out) if bn else nn.Identity()
                m["act"] = _act(act)
                c, s = out, (s + 2 * (k // 2) - k) // stride + 1
            elif kind == "dw":
                _, mult, stride, bn, act = spec
                m["conv"] = nn.Conv2d(c, c * mult, 3, stride, 1, groups=c)
                m["bn"] = nn.BatchNorm2d(c * mult) if bn else nn.Identity()
                m["act"] = _act(act)
                c, s = c * mult, (s - 1) // stride + 1
            elif kind == "group":
                _, groups, per_group, act = spec
                m["conv"] = nn.Conv2d(c, groups * per_group, 1, groups=groups)
                m["act"] = _act(act)
                c = groups * per_group
            elif kind == "res":
                _, k, bn, act = spec
                m["conv1"] = nn.Conv2d(c, c, k, 1, k // 2)
                m["bn"] = nn.BatchNorm2d(c) if bn else nn.Identity()
                m["act"] = _act(act)
                m["conv2"] = nn.Conv2d(c, c, 1)
            elif kind == "cat":
                _, a, b = spec
                m["a"] = nn.Conv2d(c, a, 1)
                m["b"] = nn.Conv2d(c, b, 3, 1, 1)
                c = a + b
            elif kind == "se":
                m["reduce"] = nn.Conv2d(c, spec[1], 1)
                m["expand"] = nn.Conv2d(spec[1], c, 1)
            elif kind == "pool":
                m["pool"] = nn.MaxPool2d(2) if spec[1] == "max" else nn.AvgPool2d(2)
                s //= 2
            self.blocks.append(m)
        self.head = nn.Linear(c * s * s if head == "flatten" else c, classes) if head != "none" else nn.Identity()

    def forward(self, x):
        for spec, m in zip(self.specs, self.blocks):
            kind = spec[0]
            if kind in ("conv", "dw"):
                x = m["act"](m["bn"](m["conv"](x)))
            elif kind == "group":
                x = m["act"](m["conv"](x))
            elif kind == "res":
                x = x + m["conv2"](m["act"](m["bn"](m["conv1"](x))))
            elif kind == "cat":
                x = torch.cat([m["a"](x), F.relu(m["b"](x))], 1)
            elif kind == "se":
                x = x * torch.sigmoid(m["expand"](F.relu(m["reduce"](x.mean((2, 3), keepdim=True)))))
            elif kind == "pool":
                x = m["pool"](x)
        if self.head_kind == "flatten":
            return self.head(torch.flatten(x, 1))
        if self.head_kind == "pool":
            return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return x


@st.composite
def nets(draw, max_blocks: int = 5):
    """(Net, input shape): a random small CNN on 8x8 inputs."""
    c = in_channels = draw(st.integers(1, 3))
    size, blocks = 8, []
    act = st.sampled_from(sorted(ACTIVATIONS))
    for _ in range(draw(st.integers(1, max_blocks))):
        kind = draw(st.sampled_from(["conv", "conv", "dw", "group", "res", "cat", "se", "pool"]))
        if kind == "conv":
            k, stride = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 1, 2])) if size >= 4 else 1
            c = draw(st.integers(1, 6))
            blocks.append(("conv", c, k, stride, draw(st.booleans()), draw(st.booleans()), draw(act)))
            size = (size + 2 * (k // 2) - k) // stride + 1
        elif kind == "dw":
            mult, stride = draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 2])) if size >= 4 else 1
            blocks.append(("dw", mult, stride, draw(st.booleans()), draw(act)))
            c, size = c * mult, (size - 1) // stride + 1
        elif kind == "group":
            divisors = [g for g in range(2, c + 1) if c % g == 0]
            if not divisors:
                continue
            groups, per_group = draw(st.sampled_from(divisors)), draw(st.integers(1, 2))
            blocks.append(("group", groups, per_group, draw(act)))
            c = groups * per_group
        elif kind == "res":
            blocks.append(("res", draw(st.sampled_from([1, 3])), draw(st.booleans()), draw(act)))
        elif kind == "cat":
            a, b = draw(st.integers(1, 3)), draw(st.integers(1, 3))
            blocks.append(("cat", a, b))
            c = a + b
        elif kind == "se":
            blocks.append(("se", draw(st.integers(1, 3))))
        elif size >= 4:
            blocks.append(("pool", draw(st.sampled_from(["max", "avg"]))))
            size //= 2
    head = draw(st.sampled_from(["flatten", "pool", "none"]))
    return Net(in_channels, blocks, head), (2, in_channels, 8, 8)


def node_values(gm: fx.GraphModule, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's output on ``inputs``, by node name."""
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(*inputs)
    return {node.name: value for node, value in interpreter.env.items() if isinstance(value, torch.Tensor)}


def resnet_ish(width: int = 8, classes: int = 4) -> nn.Module:
    """Stem, two residual basic blocks (3x3-BN-ReLU-3x3-BN + identity, ReLU), a global-pool head."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)

        def forward(self, x):
            return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))

    class ResNetish(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            self.layer1, self.layer2 = Block(), Block()
            self.fc = nn.Linear(width, classes)

        def forward(self, x):
            x = self.layer2(self.layer1(self.stem(x)))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    return ResNetish()
