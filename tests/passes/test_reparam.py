import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxopt.testing import check_pass, op_counts, randomize_norm_stats
from reparam_models import (ACBlock, DBBBlock, GhostV3Module, MobileOne, MobileOneBlock, RepGhostBottleneck,
                            RepVGG, RepVGGBlock, conv_bn)

FOLD = {"fixpoint": ["fold_bn", "fold_branches"]}


def prepared(model, seed=0):
    torch.manual_seed(seed)
    return randomize_norm_stats(model, seed).eval()


@pytest.mark.parametrize(
    "block, shape",
    [
        (RepVGGBlock(8, 8), (2, 8, 10, 10)),
        (RepVGGBlock(4, 8, stride=2), (2, 4, 9, 9)),
        (RepVGGBlock(8, 8, groups=4), (1, 8, 6, 6)),
        (ACBlock(4, 6), (2, 4, 7, 7)),
        (ACBlock(4, 6, stride=2), (2, 4, 8, 8)),
        (DBBBlock(4, 8), (2, 4, 9, 9)),
        (DBBBlock(4, 8, kernel=5, stride=2), (1, 4, 11, 11)),
        (DBBBlock(8, 8, groups=2), (1, 8, 7, 7)),
        (MobileOneBlock(6, 6, 3, 1, 6, 4), (2, 6, 8, 8)),
        (MobileOneBlock(6, 6, 3, 2, 6, 4), (2, 6, 8, 8)),
        (MobileOneBlock(6, 12, 1, 1, 1, 4), (2, 6, 5, 5)),
        (GhostV3Module(8, 12), (2, 8, 6, 6)),
        (GhostV3Module(6, 6), (2, 6, 6, 6)),
    ],
    ids=["repvgg", "repvgg-s2", "repvgg-g4", "acnet", "acnet-s2", "dbb", "dbb-k5-s2", "dbb-g2",
         "mobileone-dw", "mobileone-dw-s2", "mobileone-pw", "ghostv3", "ghostv3-skip"],
)
def test_block_folds_to_its_deploy_form(block, shape):
    model = prepared(block)
    gm, result = check_pass(FOLD, model, (torch.randn(shape),), before=["canonicalize"],
                            ops_after={"conv2d": block.deploy_convs, "batch_norm": 0, "add": 0})
    assert result.stats["fold_branches.branch_sum"] == block.deploy_convs


def test_depthwise_branches_stay_depthwise():
    gm, _ = check_pass(FOLD, prepared(MobileOneBlock(6, 6, 3, 1, 6, 4)), (torch.randn(1, 6, 8, 8),))
    (conv,) = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert conv.groups == 6 and conv.kernel_size == (3, 3) and conv.padding == (1, 1)


def test_repghost_bottleneck():
    for block in (RepGhostBottleneck(8, 16, 8), RepGhostBottleneck(8, 16, 12, stride=2)):
        check_pass(FOLD, prepared(block), (torch.randn(2, 8, 8, 8),), before=["canonicalize"],
                   ops_after={"conv2d": block.deploy_convs, "batch_norm": 0, "add": 1})


@pytest.mark.parametrize("network", [RepVGG(widths=(8, 8, 16, 16, 32), depths=(1, 2, 4, 14, 1), num_classes=10),
                                     MobileOne(widths=(8, 8, 16, 16, 32), num_classes=10)], ids=["repvgg-a0", "mobileone-s0"])
def test_networks_fold_to_one_conv_per_block(network):
    model = prepared(network)
    gm, _ = check_pass(FOLD, model, (torch.randn(1, 3, 64, 64),), before=["canonicalize"],
                       ops_after={"conv2d": network.deploy_convs, "batch_norm": 0, "add": 0})


class StrideMismatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(4, 4, 3, 2, 1)
        self.b = conv_bn(4, 4, 5, 1, 0)

    def forward(self, x):  # 8x8 -> 4x4 both ways
        return self.a(x) + self.b(x)


class EvenKernel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(4, 4, 3, 2, 1)
        self.b = conv_bn(4, 4, 2, 2, 0)

    def forward(self, x):  # 8x8 -> 4x4 both ways, but the 2x2 cannot be centred
        return self.a(x) + self.b(x)


class BranchReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(4, 4, 3)
        self.b = conv_bn(4, 4, 1)

    def forward(self, x):
        y = self.b(x)
        return self.a(x) + y, y


class ShiftThenPaddedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.a(self.bn(x)) + self.b(x)


@pytest.mark.parametrize(
    "model, reason",
    [(StrideMismatch(), "different strides"), (EvenKernel(), "cannot be centred"),
     (BranchReused(), "also used by"), (ShiftThenPaddedConv(), "inner zero padding cannot be expressed")],
    ids=["stride", "even-kernel", "reused", "inner-padding"],
)
def test_declines(model, reason):
    gm, result = check_pass("fold_branches", prepared(model), (torch.randn(2, 4, 8, 8),), stats={}, declines=[reason])
    assert op_counts(gm)["add"] == 1


def test_other_terms_of_the_sum_stay():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x, other):
            return self.a(x) + other + self.b(x)

    gm, _ = check_pass("fold_branches", prepared(Mixed()), (torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)),
                       stats={"branch_sum": 1, "branch_terms": 2}, ops_after={"conv2d": 1, "add": 1})


def test_models_without_branches_are_unchanged():
    from pytorchcv.models.mobilenetv2 import mobilenetv2_w1

    check_pass(FOLD, prepared(mobilenetv2_w1()), (torch.randn(1, 3, 224, 224),), before=["canonicalize"],
               stats={"fold_bn.conv_bn": 52 + 1})


KERNELS = {"1": (1, 0), "3": (3, 1), "5": (5, 2), "1x3": ((1, 3), (0, 1)), "3x1": ((3, 1), (1, 0))}


class RandomBlock(nn.Module):
    def __init__(self, channels, kernels, stride, groups, identity, avg_pool):
        super().__init__()
        self.branches = nn.ModuleList(conv_bn(channels, channels, KERNELS[k][0], stride, KERNELS[k][1], groups)
                                      for k in kernels)
        self.identity = nn.BatchNorm2d(channels) if identity and stride == 1 else None
        self.avg = nn.Sequential(nn.Conv2d(channels, channels, 1, padding=1, groups=groups), nn.BatchNorm2d(channels),
                                 nn.AvgPool2d(3, stride), nn.BatchNorm2d(channels)) if avg_pool else None

    def forward(self, x):
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        if self.identity is not None:
            y = y + self.identity(x)
        if self.avg is not None:
            y = y + self.avg(x)
        return y


@settings(max_examples=40, deadline=None)
@given(kernels=st.lists(st.sampled_from(sorted(KERNELS)), min_size=1, max_size=4), stride=st.sampled_from([1, 2]),
       groups=st.sampled_from([1, 2, 4]), identity=st.booleans(), avg_pool=st.booleans(), seed=st.integers(0, 999))
def test_property_random_multi_branch_blocks(kernels, stride, groups, identity, avg_pool, seed):
    block = prepared(RandomBlock(4, kernels, stride, groups, identity, avg_pool), seed)
    gm, result = check_pass(FOLD, block, (torch.randn(2, 4, 9, 9),))
    folded = len(kernels) + (block.identity is not None) + (block.avg is not None) > 1
    assert op_counts(gm) == {"conv2d": 1}
    assert result.stats["fold_branches.branch_sum"] == (1 if folded else 0)
