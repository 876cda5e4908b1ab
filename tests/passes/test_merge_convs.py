import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt.testing import check_pass, op_counts, randomize_norm_stats

MERGE = {"name": "merge_convs", "policy": "all"}
BEFORE = ["canonicalize", "fold_bn"]


def prepared(model, seed=0):
    torch.manual_seed(seed)
    return randomize_norm_stats(model, seed).eval()


def merge(model, shape, pass_=MERGE, before=BEFORE, **expected):
    return check_pass(pass_, prepared(model), (torch.randn(shape),), before=before, **expected)


def convs_of(gm):
    return [m for m in gm.modules() if isinstance(m, nn.Conv2d)]


# ---------------------------------------------------------------------------------------------
# Merges


def test_pointwise_chain():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 6, 1))
    gm, _ = merge(model, (2, 4, 9, 9), stats={"merged_groups": 1, "merged_convs": 2}, ops_after={"conv2d": 1})
    (conv,) = convs_of(gm)
    assert conv.kernel_size == (1, 1) and conv.in_channels == 4 and conv.out_channels == 6


def test_bias_free_pointwise_then_padded_3x3():
    # zero-padding the output of a bias-free unpadded 1x1 conv is zero-padding its input
    model = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.Conv2d(8, 6, 3, padding=1))
    gm, _ = merge(model, (2, 4, 9, 9), stats={"merged_groups": 1, "merged_convs": 2}, ops_after={"conv2d": 1})
    (conv,) = convs_of(gm)
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)


def test_depthwise_chain_stays_depthwise():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 3, groups=4))
    gm, _ = merge(model, (2, 4, 9, 9), stats={"merged_groups": 1, "merged_convs": 2}, ops_after={"conv2d": 1})
    (conv,) = convs_of(gm)
    assert conv.groups == 4 and conv.kernel_size == (5, 5) and tuple(conv.weight.shape) == (4, 1, 5, 5)


def test_conv_bn_conv():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3))
    merge(model, (2, 4, 9, 9), stats={"merged_groups": 1, "merged_convs": 2}, ops_after={"conv2d": 1, "batch_norm": 0})


def test_unfolded_batch_norm_merges_as_an_affine_step():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3))
    merge(model, (2, 4, 9, 9), before=["canonicalize"], stats={"merged_groups": 1, "merged_convs": 2},
          ops_after={"conv2d": 1, "batch_norm": 0})


def test_strided_then_pointwise():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.Conv2d(8, 6, 1))
    gm, _ = merge(model, (2, 4, 9, 9), stats={"merged_groups": 1, "merged_convs": 2}, ops_after={"conv2d": 1})
    (conv,) = convs_of(gm)
    assert conv.stride == (2, 2) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 1, bias=False)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.c2(self.c1(x))


def test_residual_identity_is_absorbed():
    merge(Residual(), (2, 4, 9, 9), stats={"merged_groups": 1, "merged_convs": 2, "residual_absorbed": 1},
          ops_after={"conv2d": 1, "add": 0})


class Projection(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 1, bias=False)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.shortcut = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.shortcut(x) + self.bn(self.c2(self.c1(x)))


def test_projection_shortcut_is_absorbed():
    merge(Projection(), (2, 4, 9, 9), stats={"merged_groups": 1, "merged_convs": 2, "residual_absorbed": 1},
          ops_after={"conv2d": 1, "add": 0, "batch_norm": 0})


def test_three_unpadded_3x3_merge_to_7x7_within_the_default_max_kernel():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
    gm, _ = merge(model, (2, 4, 13, 13), stats={"merged_groups": 1, "merged_convs": 3}, ops_after={"conv2d": 1})
    assert convs_of(gm)[0].kernel_size == (7, 7)


# ---------------------------------------------------------------------------------------------
# Declines


def test_activation_between_convs_is_not_merged():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 6, 1))
    _, result = merge(model, (2, 4, 9, 9), stats={}, ops_after={"conv2d": 2, "relu": 1})
    assert result.declines == []  # a nonlinear gap is no candidate at all


def test_inner_padding_after_a_bias_is_declined():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 6, 3, padding=1))
    merge(model, (2, 4, 9, 9), stats={}, ops_after={"conv2d": 2}, declines=["inner zero padding"])


def test_inner_padding_after_a_spatial_kernel_is_declined():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), nn.Conv2d(8, 6, 3, padding=1))
    merge(model, (2, 4, 9, 9), stats={}, ops_after={"conv2d": 2}, declines=["inner zero padding"])


class IntermediateReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(y), y


def test_intermediate_read_elsewhere_is_declined():
    merge(IntermediateReused(), (2, 4, 9, 9), stats={}, ops_after={"conv2d": 2}, declines=["also read by"])


def test_merged_kernel_over_max_kernel_is_declined():
    model = nn.Sequential(nn.Conv2d(4, 4, 5), nn.Conv2d(4, 4, 5))  # 9x9 merged
    merge(model, (2, 4, 13, 13), {**MERGE, "max_kernel": 7}, stats={}, ops_after={"conv2d": 2},
          declines=["max_kernel=7"])


def test_max_kernel_lets_only_part_of_a_chain_merge():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))  # 7x7 merged
    gm, result = merge(model, (2, 4, 13, 13), {**MERGE, "max_kernel": 5},
                       stats={"merged_groups": 1, "merged_convs": 2}, ops_after={"conv2d": 2})
    assert sorted(c.kernel_size for c in convs_of(gm)) == [(3, 3), (5, 5)]
    assert len(result.declines) == 1


def test_max_kernel_split_names_max_kernel():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
    _, result = merge(model, (2, 4, 13, 13), {**MERGE, "max_kernel": 5})
    (decline,) = result.declines
    assert "max_kernel" in decline.reason and "measured" not in decline.reason


class SkipFromBefore(nn.Module):
    """c1 → (+ x) → c2 where x is read before the group [c1, c2] starts."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(4, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 1)
        self.c2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.relu(self.c0(x))
        return self.c2(self.c1(y) + x)


def test_residual_add_reading_before_the_group_is_declined():
    merge(SkipFromBefore(), (2, 4, 9, 9), stats={}, ops_after={"conv2d": 3, "add": 1}, declines=["reads 'x'"])


class SkipAroundTheGroupFromBefore(nn.Module):
    """x + c2(c1(relu(c0(x)))): the convs merge, the add (its skip starts before them) stays."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(4, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 1, bias=False)
        self.c2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x + self.c2(self.c1(torch.relu(self.c0(x))))


def test_add_whose_skip_starts_before_the_group_is_not_absorbed():
    merge(SkipAroundTheGroupFromBefore(), (2, 4, 9, 9), stats={"merged_groups": 1, "merged_convs": 2},
          ops_after={"conv2d": 2, "add": 1})


# ---------------------------------------------------------------------------------------------
# Options


def test_measured_policy_without_target_raises():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 6, 1)).eval()
    with pytest.raises(fxopt.PassError, match="policy='all'"):
        fxopt.optimize(model, torch.randn(1, 4, 5, 5), pipeline=["canonicalize", "fold_bn", "merge_convs"])


@pytest.mark.parametrize("options, message", [({"policy": "fast"}, "policy='fast'"), ({"max_kernel": 0}, "max_kernel=0")])
def test_bad_options_raise(options, message):
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 6, 1)).eval()
    with pytest.raises(fxopt.PassError, match=message):
        fxopt.optimize(model, torch.randn(1, 4, 5, 5), pipeline=["canonicalize", {"name": "merge_convs", **options}])


# ---------------------------------------------------------------------------------------------
# Property: random linear chains merge exactly or decline with a reason


class Chain(nn.Module):
    def __init__(self, layers, residual):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


conv_specs = st.tuples(st.sampled_from([1, 3, 5]), st.sampled_from([1, 2]), st.booleans(),
                       st.sampled_from(["dense", "depthwise"]), st.sampled_from([4, 6]), st.booleans(), st.booleans())


@settings(max_examples=30, deadline=None)
@given(specs=st.lists(conv_specs, min_size=2, max_size=4), residual=st.booleans(), seed=st.integers(0, 999))
def test_property_random_linear_chains(specs, residual, seed):
    channels, layers, needed = 4, [], []
    residual_ok = True
    for k, stride, same, kind, width, bias, bn in specs:
        padding = k // 2 if same else 0
        groups, out = (channels, channels) if kind == "depthwise" else (1, width)
        layers.append(nn.Conv2d(channels, out, k, stride, padding, groups=groups, bias=bias))
        if bn:
            layers.append(nn.BatchNorm2d(out))
        residual_ok &= stride == 1 and out == channels and (k == 1 or same)
        needed.append((k, stride, padding))
        channels = out
    residual = residual and residual_ok and channels == 4
    size = 1
    for k, stride, padding in reversed(needed):  # the least input size that leaves one output pixel
        size = (size - 1) * stride + k - 2 * padding
    size = max(size, 17)
    model = prepared(Chain(layers, residual), seed)
    gm, result = check_pass(MERGE, model, (torch.randn(2, 4, size, size),), before=BEFORE)
    n = len(specs)
    assert op_counts(gm)["conv2d"] == n - result.stats["merged_convs"] + result.stats["merged_groups"]
    # every split of the linear chain is a recorded decline with a reason
    assert len(result.declines) == op_counts(gm)["conv2d"] - 1
    assert all(d.reason for d in result.declines)
    assert op_counts(gm)["add"] == (1 if residual else 0) - result.stats["residual_absorbed"]


@settings(max_examples=20, deadline=None)
@given(specs=st.lists(st.tuples(st.sampled_from([1, 3, 5]), st.booleans(), st.booleans(), st.booleans()),
                      min_size=2, max_size=3),
       seed=st.integers(0, 999))
def test_property_random_residual_chains(specs, seed):
    """x + chain(x) with stride-1, 4-channel, 'same'-padded convs: absorbed into one conv or declined."""
    layers = []
    for k, depthwise, bias, bn in specs:
        layers.append(nn.Conv2d(4, 4, k, padding=k // 2, groups=4 if depthwise else 1, bias=bias))
        if bn:
            layers.append(nn.BatchNorm2d(4))
    model = prepared(Chain(layers, residual=True), seed)
    gm, result = check_pass(MERGE, model, (torch.randn(2, 4, 17, 17),), before=BEFORE)
    counts = op_counts(gm)
    assert counts["conv2d"] == len(specs) - result.stats["merged_convs"] + result.stats["merged_groups"]
    assert len(result.declines) == counts["conv2d"] - 1
    assert counts["add"] == 1 - result.stats["residual_absorbed"]
    if counts["conv2d"] == 1:
        assert counts["add"] == 0  # a fully merged chain takes its identity skip with it



# the smallest failing recipe the fuzzer found (tests/fuzz_graphs.py): three summed branches of
# 1x1 convs after a pad (two of them conv -> conv, one conv -> BN -> sparse conv)
THREE_BRANCHES = {
    "input": [2, 4, 11, 10], "seed": 1963, "head": None, "body": [
        {"op": "pad", "pad": [1, 1, 1, 1], "value": 0.5},
        {"op": "branches", "mode": "add", "identity": False, "branches": [
            [{"op": "conv", "out": 5, "k": [1, 1], "stride": 2, "dilation": 1, "groups": 1, "padding": [0, 0],
              "bias": False, "mode": "zeros", "zero_out": [], "density": None},
             {"op": "conv", "out": 5, "k": [1, 1], "stride": 1, "dilation": 1, "groups": 1, "padding": [0, 0],
              "bias": True, "mode": "zeros", "zero_out": [], "density": None}],
            [{"op": "conv", "out": 5, "k": [1, 1], "stride": 2, "dilation": 1, "groups": 1, "padding": [0, 0],
              "bias": False, "mode": "zeros", "zero_out": [], "density": None}],
            [{"op": "conv", "out": 5, "k": [1, 1], "stride": 2, "dilation": 1, "groups": 1, "padding": [0, 0],
              "bias": True, "mode": "zeros", "zero_out": [], "density": None},
             {"op": "bn", "affine": True, "track": True},
             {"op": "conv", "out": 5, "k": [1, 1], "stride": 1, "dilation": 1, "groups": 1, "padding": [0, 0],
              "bias": False, "mode": "zeros", "zero_out": [0, 1, 3, 4], "density": 0.3}]]}]}


def test_every_branch_merges_in_one_run():
    """Fuzzer regression (tests/passes/test_fuzz_passes.py): merging the spine's branch made
    another branch the longest path, so a second run merged it (check_pass: not idempotent).
    The pass now repeats on the new spine, merging only convs it has not made."""
    from fuzz_graphs import build

    model, inputs = build(THREE_BRANCHES)
    gm, result = check_pass(MERGE, model, inputs, before=["canonicalize"])
    assert result.stats["merged_groups"] >= 2  # more than the spine's group
    assert op_counts(gm)["conv2d"] < 5
