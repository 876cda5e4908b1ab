import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxopt.testing import check_pass, randomize_norm_stats


def bn_model(*layers):
    return randomize_norm_stats(nn.Sequential(*layers), seed=1).eval()


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.Conv2d(4, 8, 3, padding=1, groups=4),
        nn.Conv2d(4, 8, (1, 3), padding=(0, 1), groups=2, padding_mode="reflect"),
    ],
    ids=["plain", "stride-dilation-nobias", "grouped", "reflect-1x3"],
)
def test_conv2d_bn(conv):
    model = bn_model(conv, nn.BatchNorm2d(8), nn.ReLU())
    gm, _ = check_pass("fold_bn", model, (torch.randn(2, 4, 9, 9),), stats={"conv_bn": 1},
                       ops_after={"batch_norm": 0, "conv2d": 1})
    folded = gm.get_submodule("0")
    assert folded.bias is not None and folded.weight.dtype == torch.float32


def test_conv1d_bn_and_linear_bn():
    model = bn_model(nn.Conv1d(3, 6, 5, padding=2), nn.BatchNorm1d(6), nn.Flatten(), nn.Linear(6 * 7, 5), nn.BatchNorm1d(5))
    check_pass("fold_bn", model, (torch.randn(3, 3, 7),), stats={"conv_bn": 1, "linear_bn": 1},
               ops_after={"batch_norm": 0, "conv1d": 1, "linear": 1})


def test_functional_batch_norm_with_constant_buffers():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("mean", torch.randn(4))
            self.register_buffer("var", torch.rand(4) + 0.5)
            self.gamma = nn.Parameter(torch.rand(4) + 0.5)

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, None, False, 0.1, 1e-3)

    gm, _ = check_pass("fold_bn", M().eval(), (torch.randn(1, 3, 6, 6),), stats={"conv_bn": 1}, ops_after={"batch_norm": 0})
    assert not any(n.op == "call_function" for n in gm.graph.nodes)


class SharedConv(nn.Module):
    """One conv module called twice; only the first call is followed by BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


def test_shared_conv_folds_into_a_copy():
    model = randomize_norm_stats(SharedConv()).eval()
    original = copy.deepcopy(model.conv.weight.detach())
    gm, _ = check_pass("fold_bn", model, (torch.randn(1, 3, 6, 6),), stats={"conv_bn": 1},
                       ops_after={"conv2d": 2, "batch_norm": 0})
    targets = sorted(n.target for n in gm.graph.nodes if n.op == "call_module")
    assert targets == ["conv", "conv_bn"]
    torch.testing.assert_close(gm.get_submodule("conv").weight, original, rtol=0, atol=0)
    torch.testing.assert_close(model.conv.weight, original, rtol=0, atol=0)  # the user's model is untouched


class ConvOutputReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_declines_when_conv_output_has_other_users():
    model = randomize_norm_stats(ConvOutputReused()).eval()
    check_pass("fold_bn", model, (torch.randn(1, 3, 4, 4),), stats={}, ops_after={"batch_norm": 1},
               declines=["output is also used by add"])


def test_declines_without_running_stats():
    model = bn_model(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    check_pass("fold_bn", model, (torch.randn(2, 3, 6, 6),), stats={}, ops_after={"batch_norm": 1},
               declines=["tracks no running statistics"])


def test_declines_batchnorm1d_over_non_feature_dim():
    model = bn_model(nn.Linear(4, 4), nn.BatchNorm1d(4))  # input (N, 4, 4): BN1d normalizes dim 1, not features
    check_pass("fold_bn", model, (torch.randn(2, 4, 4),), stats={}, ops_after={"batch_norm": 1},
               declines=["not 2-D"])


def test_ignores_bn_after_non_affine_op():
    model = bn_model(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    gm, result = check_pass("fold_bn", model, (torch.randn(1, 3, 6, 6),), stats={}, ops_after={"batch_norm": 1})
    assert result.declines == []


@settings(max_examples=25, deadline=None)
@given(
    c_in=st.integers(1, 4), c_mult=st.integers(1, 3), groups_on=st.booleans(), k=st.sampled_from([1, 2, 3, 5]),
    stride=st.integers(1, 3), dilation=st.integers(1, 2), padding=st.integers(0, 2), bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_random_conv_bn(c_in, c_mult, groups_on, k, stride, dilation, padding, bias, seed):
    groups = c_in if groups_on else 1
    c_out = c_in * c_mult
    size = (k - 1) * dilation + 4
    torch.manual_seed(seed)
    model = randomize_norm_stats(nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, padding, dilation, groups, bias), nn.BatchNorm2d(c_out)), seed).eval()
    check_pass("fold_bn", model, (torch.randn(2, c_in, size, size),), stats={"conv_bn": 1}, ops_after={"batch_norm": 0})


@pytest.mark.parametrize(
    "conv, stats",
    [
        (nn.Conv2d(4, 6, 3, padding=0), {"bn_conv": 1}),
        (nn.Conv2d(4, 8, 3, padding=1, groups=4, padding_mode="reflect"), {"bn_conv": 1}),
        (nn.Conv2d(4, 6, 1, stride=2, bias=False), {"bn_conv": 1}),
    ],
    ids=["unpadded", "grouped-reflect", "pointwise-strided"],
)
def test_bn_before_conv(conv, stats):
    model = bn_model(nn.BatchNorm2d(4), conv)
    check_pass("fold_bn_before_conv", model, (torch.randn(2, 4, 7, 7),), stats=stats,
               ops_after={"batch_norm": 0, "conv2d": 1})


def test_bn_before_linear_and_scale_before_conv():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x * 0.5)  # a pure scale commutes with zero padding
            return self.fc(self.bn(y.mean((2, 3))))

    check_pass("fold_bn_before_conv", randomize_norm_stats(M()).eval(), (torch.randn(2, 3, 6, 6),),
               stats={"affine_conv": 1, "bn_linear": 1}, ops_after={"batch_norm": 0, "mul": 0})


def test_bn_before_zero_padded_conv_is_declined():
    model = bn_model(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1))
    check_pass("fold_bn_before_conv", model, (torch.randn(2, 4, 7, 7),), stats={}, ops_after={"batch_norm": 1},
               declines=["zero-pads a shifted input"])


def test_chain_of_affine_steps_before_conv_folds_in_one_run():
    """Fuzzer regression (tests/passes/test_fuzz_passes.py): x * -1 + 0 -> BN -> conv left the
    'mul' (and the BN) for a second run, which check_pass's idempotency check caught; the folded
    conv is now looked at again until its input is no affine step."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 3, 3, padding=2, padding_mode="circular")

        def forward(self, x):
            return self.conv(self.bn(x * -1.0 + 0.25))

    check_pass("fold_bn_before_conv", randomize_norm_stats(M()).eval(), (torch.randn(2, 4, 10, 10),),
               stats={"bn_conv": 1, "affine_conv": 2}, ops_after={"batch_norm": 0, "mul": 0, "add": 0, "conv2d": 1})
