"""fuse_siblings: convs/linears reading one tensor become one wider op."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
import fxopt.passes  # noqa: F401
from fxopt.testing import check_pass, op_counts


class CatOfSiblings(nn.Module):
    """GoogLeNet/Inception-style 1x1 branches concatenated (members in another order than defined)."""

    def __init__(self, bias=True):
        super().__init__()
        self.a = nn.Conv2d(16, 8, 3, padding=1)
        self.b = nn.Conv2d(16, 4, 3, padding=1, bias=bias)
        self.c = nn.Conv2d(16, 6, 3, padding=1)

    def forward(self, x):
        return torch.cat([F.relu(self.c(x)), F.relu(self.a(x)), F.relu(self.b(x))], 1)


@pytest.mark.parametrize("bias", [True, False])
def test_cat_of_siblings_becomes_one_conv(bias):
    gm, _ = check_pass("fuse_siblings", CatOfSiblings(bias), [torch.randn(2, 16, 7, 7)],
                       stats={"sibling_groups": 1, "sibling_ops": 3, "sibling_cat": 1},
                       ops_after={"conv2d": 1, "cat": 0, "relu": 1})
    conv = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
    assert conv.out_channels == 18 and conv.bias is not None


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b2 = nn.Conv2d(16, 12, 1)
        self.b3 = nn.Conv2d(16, 4, 1)
        self.b2b = nn.Conv2d(12, 8, 3, padding=1)
        self.b3b = nn.Conv2d(4, 8, 5, padding=2)
        self.b4 = nn.Conv2d(16, 8, 3, padding=1)  # another geometry: not a sibling of the 1x1s

    def forward(self, x):
        return torch.cat([F.relu(self.b1(x)), self.b2b(F.relu(self.b2(x))), self.b3b(F.relu(self.b3(x))),
                          self.b4(x)], 1)


def test_static_policy_declines_where_slices_would_remain():
    gm, _ = check_pass("fuse_siblings", Inception(), [torch.randn(1, 16, 8, 8)], stats={},
                       declines=["leaves slices"])
    assert op_counts(gm)["conv2d"] == 6


def test_always_policy_fuses_with_slices_and_one_activation():
    gm, _ = check_pass({"name": "fuse_siblings", "policy": "always"}, Inception(), [torch.randn(1, 16, 8, 8)],
                       stats={"sibling_groups": 1, "sibling_ops": 3}, ops_after={"conv2d": 4, "relu": 1})
    assert sum(n.target is torch.narrow for n in gm.graph.nodes) == 3


class Linears(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 4), nn.Linear(8, 6)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x)], -1)


def test_sibling_linears():
    check_pass("fuse_siblings", Linears(), [torch.randn(3, 8)], stats={"sibling_groups": 1, "sibling_ops": 2,
                                                                      "sibling_cat": 1}, ops_after={"linear": 1})


class NotSiblings(nn.Module):
    """Grouped convs, different strides, and a cat along another dim."""

    def __init__(self):
        super().__init__()
        self.g1, self.g2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.s1, self.s2 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1, stride=2)
        self.w1, self.w2 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = torch.cat([self.g1(x), self.g2(x)], 1)
        b = self.s1(x).sum() + self.s2(x).sum()
        c = torch.cat([self.w1(x), self.w2(x)], 2)
        return a.sum() + b + c.sum()


def test_incompatible_groups_are_left_alone():
    gm, result = check_pass({"name": "fuse_siblings", "policy": "static"}, NotSiblings(),
                            [torch.randn(1, 8, 6, 6)], stats={})
    assert op_counts(gm)["conv2d"] == 6


def test_measured_policy_needs_a_target_and_a_known_policy():
    model, x = CatOfSiblings().eval(), torch.randn(1, 16, 7, 7)
    with pytest.raises(fxopt.PassError, match="needs a target"):
        fxopt.optimize(model, (x,), [{"name": "fuse_siblings", "policy": "measured"}])
    with pytest.raises(fxopt.PassError, match="policy='sometimes' is not one of"):
        fxopt.optimize(model, (x,), [{"name": "fuse_siblings", "policy": "sometimes"}])


def test_measured_policy_measures_on_the_target(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    optimized = fxopt.optimize(Inception().eval(), (torch.randn(1, 16, 8, 8),),
                               [{"name": "fuse_siblings", "policy": "measured"}], target="host")
    row = optimized.report.passes[0]
    # either way the decision is recorded: fused (stats) or declined with both figures
    assert row.stats.get("sibling_groups") == 1 or any("measured" in d for d in row.declines)
    assert optimized.report.verification["ok"]
