"""Random CNNs with sibling convs, explicit pads and channel shuffles through the fusion passes
and the default pipeline: equal outputs or a clean decline, never a crash."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.testing import randomize_norm_stats

from fuzz_graphs import Shuffle

FUSION_PASSES = ["eliminate_noops", "fold_pad", "fold_constant_subgraphs", "fold_channel_permutation",
                 {"name": "fuse_siblings", "policy": "always"}]


class Pad(nn.Module):
    def __init__(self, pad):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x, self.pad)


class Siblings(nn.Module):
    def __init__(self, channels, outs, k, stride, concat):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, o, k, stride, k // 2) for o in outs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(o) for o in outs)
        self.concat = concat

    def forward(self, x):
        ys = [F.relu(bn(conv(x))) for conv, bn in zip(self.convs, self.bns)]
        return torch.cat(ys, 1) if self.concat else ys[0] + ys[-1][:, :1]


@st.composite
def cnn(draw):
    channels = draw(st.integers(2, 4))
    first, layers = channels, []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "pad_conv", "shuffle", "siblings"]))
        if kind == "shuffle":
            groups = draw(st.sampled_from([g for g in (2, 3, 4) if channels % g == 0] or [1]))
            layers.append(Shuffle(groups))
        elif kind == "siblings":
            outs = draw(st.lists(st.integers(1, 4), min_size=2, max_size=3))
            concat = draw(st.booleans())
            layers.append(Siblings(channels, outs, draw(st.sampled_from([1, 3])), draw(st.integers(1, 2)), concat))
            channels = sum(outs) if concat else outs[0]
        else:
            out = draw(st.integers(2, 6))
            if kind == "pad_conv":
                p = draw(st.integers(0, 2))
                layers.append(Pad((p, p, p, p) if draw(st.booleans()) else (p, 0, p, 0)))
            layers.append(nn.Conv2d(channels, out, 3, draw(st.integers(1, 2)), draw(st.integers(0, 1))))
            layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            channels = out
    return nn.Sequential(*layers), first


@settings(max_examples=15, deadline=None)
@given(spec=cnn(), seed=st.integers(0, 10_000))
def test_fusion_passes_on_random_cnns(spec, seed):
    model, channels = spec
    torch.manual_seed(seed)
    model = randomize_norm_stats(model, seed).eval()
    x = (torch.randn(2, channels, 11, 11),)
    for p in FUSION_PASSES:
        assert fxopt.optimize(model, x, [p], verify="each").report.verification["ok"]
    assert fxopt.optimize(model, x, "default", verify="each").report.verification["ok"]
