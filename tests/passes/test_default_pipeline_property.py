"""Random small CNNs through the default pipeline: equal outputs or a clean decline, never a crash."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.testing import op_counts, randomize_norm_stats

ACTIVATIONS = [nn.ReLU, lambda: nn.ReLU(inplace=True), lambda: nn.ReLU6(inplace=True), nn.Hardswish, nn.SiLU, nn.Identity]


@st.composite
def cnn(draw):
    layers, channels = [], draw(st.integers(1, 4))
    in_channels = channels
    expected_folds = 0
    for _ in range(draw(st.integers(1, 4))):
        out = draw(st.integers(1, 6))
        groups = channels if draw(st.booleans()) and out % channels == 0 else 1
        k = draw(st.sampled_from([1, 3]))
        layers.append(nn.Conv2d(channels, out, k, draw(st.integers(1, 2)), k // 2, groups=groups,
                                bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(out, track_running_stats=draw(st.sampled_from([True, True, False]))))
            expected_folds += layers[-1].track_running_stats
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
        if draw(st.booleans()):
            layers.append(nn.Dropout(0.3))
        channels = out
    return nn.Sequential(*layers), in_channels, expected_folds


@settings(max_examples=30, deadline=None)
@given(spec=cnn(), seed=st.integers(0, 10_000))
def test_default_pipeline_on_random_cnns(spec, seed):
    model, in_channels, expected_folds = spec
    torch.manual_seed(seed)
    model = randomize_norm_stats(model, seed).eval()
    optimized = fxopt.optimize(model, (torch.randn(2, in_channels, 9, 9),), verify="each")
    assert optimized.report.verification["ok"]
    counts = op_counts(optimized.module)
    assert counts["batch_norm"] == sum(isinstance(m, nn.BatchNorm2d) for m in model) - expected_folds
    assert counts["dropout"] == counts["identity"] == 0
