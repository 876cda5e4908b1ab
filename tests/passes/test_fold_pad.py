"""fold_pad: explicit pads become conv / pool padding."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt.passes  # noqa: F401
from fxopt.testing import check_pass


def _pads(gm):
    return sum(n.target is F.pad or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ZeroPad2d))
               for n in gm.graph.nodes)


class PadConv(nn.Module):
    def __init__(self, pad, conv_padding=0, value=0.0, module=False):
        super().__init__()
        self.pad, self.value = pad, value
        self.zero = nn.ZeroPad2d(pad) if module else None
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=conv_padding)

    def forward(self, x):
        y = self.zero(x) if self.zero is not None else F.pad(x, self.pad, value=self.value)
        return self.conv(y)


@pytest.mark.parametrize("pad,conv_padding,module", [((1, 1, 1, 1), 0, False), ((2, 2, 1, 1), 1, False),
                                                      ((1, 1, 1, 1), 0, True)])
def test_symmetric_pad_folds_into_conv(pad, conv_padding, module):
    gm, _ = check_pass("fold_pad", PadConv(pad, conv_padding, module=module), [torch.randn(1, 4, 9, 10)],
                       stats={"pad_conv": 1})
    assert _pads(gm) == 0
    conv = [m for m in gm.modules() if isinstance(m, nn.Conv2d)][0]
    assert conv.padding == (conv_padding + pad[2], conv_padding + pad[0])


@pytest.mark.parametrize("pad,value,reason", [((1, 0, 1, 0), 0.0, "asymmetric"), ((1, 1, 1, 1), 0.5, "not zero"),
                                              ((-1, -1, 0, 0), 0.0, "negative"),
                                              ((0, 0, 0, 0, 1, 1), 0.0, "channel padding")])
def test_pads_a_conv_cannot_take_stay(pad, value, reason):
    gm, _ = check_pass("fold_pad", PadConv(pad, value=value), [torch.randn(1, 4 - sum(pad[4:]), 9, 10)]
                       if len(pad) > 4 else [torch.randn(1, 4, 9, 10)], stats={}, declines=[reason])
    assert _pads(gm) == 1


class PadPool(nn.Module):
    def __init__(self, kind, value=0.0, **kwargs):
        super().__init__()
        self.kind, self.value, self.kwargs = kind, value, kwargs

    def forward(self, x):
        y = F.pad(x, (1, 1, 1, 1), value=self.value)
        pool = F.avg_pool2d if self.kind == "avg" else F.max_pool2d
        return pool(y, 3, **self.kwargs) + 0 * pool(y, 3, **self.kwargs).mean()


@pytest.mark.parametrize("kind,value,kwargs", [("avg", 0.0, {"stride": 1}), ("max", -math.inf, {"stride": 2})])
def test_pad_folds_into_pools(kind, value, kwargs):
    gm, _ = check_pass("fold_pad", PadPool(kind, value, **kwargs), [torch.randn(1, 3, 8, 8)], stats={"pad_pool": 2})
    assert _pads(gm) == 0


@pytest.mark.parametrize("kind,value,kwargs,reason", [
    ("avg", 0.0, {"count_include_pad": False}, "count"),
    ("max", 0.0, {}, "−inf"),
    ("avg", 0.0, {"ceil_mode": True}, "ceil_mode"),
])
def test_pools_that_would_change_decline(kind, value, kwargs, reason):
    gm, _ = check_pass("fold_pad", PadPool(kind, value, **kwargs), [torch.randn(1, 3, 8, 8)], stats={},
                       declines=[reason])
    assert _pads(gm) == 1


def test_pad_read_by_a_conv_and_another_op_stays_for_the_other():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            y = F.pad(x, (1, 1, 1, 1))
            return self.conv(y) + y[:, :, 1:-1, 1:-1]
    gm, _ = check_pass("fold_pad", M(), [torch.randn(1, 3, 6, 6)], stats={"pad_conv": 1})
    assert _pads(gm) == 1
