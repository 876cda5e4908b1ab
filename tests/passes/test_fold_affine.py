import pytest
import torch
from torch import nn

from fxopt.testing import check_pass


class ConvThenScale(nn.Module):
    def __init__(self, scale_shape, shift_shape):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.register_buffer("scale", torch.rand(scale_shape) + 0.5)
        self.register_buffer("shift", torch.randn(shift_shape))

    def forward(self, x):
        return (self.conv(x) * self.scale + self.shift) / 2.0 - 0.25


@pytest.mark.parametrize("scale_shape, shift_shape", [((6, 1, 1), (1, 6, 1, 1)), ((1,), (6, 1, 1))])
def test_scale_and_shift_after_conv(scale_shape, shift_shape):
    gm, _ = check_pass("fold_affine", ConvThenScale(scale_shape, shift_shape).eval(), (torch.randn(2, 3, 5, 5),),
                       stats={"scale_shift": 4}, ops_after={"conv2d": 1, "mul": 0, "add": 0, "div": 0, "sub": 0})


def test_constant_minus_conv_is_a_negative_scale():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return 1.0 - self.linear(x)

    check_pass("fold_affine", M().eval(), (torch.randn(2, 4),), stats={"scale_shift": 1}, ops_after={"sub": 0})


def test_spatially_varying_constant_is_left_alone():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.register_buffer("mask", torch.rand(1, 1, 5, 5))

        def forward(self, x):
            return self.conv(x) * self.mask

    check_pass("fold_affine", M().eval(), (torch.randn(1, 3, 5, 5),), stats={}, ops_after={"mul": 1})


def test_declines_when_conv_output_is_reused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 1)

        def forward(self, x):
            y = self.conv(x)
            return y * 2.0, y

    check_pass("fold_affine", M().eval(), (torch.randn(1, 3, 4, 4),), stats={}, declines=["also used elsewhere"])


def test_linear_linear():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)).eval()
    gm, _ = check_pass("fold_affine", model, (torch.randn(3, 8),), stats={"linear_linear": 1}, ops_after={"linear": 1})
    merged = [m for m in gm.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in merged] == [(8, 4)]


def test_linear_bottleneck_is_kept():
    model = nn.Sequential(nn.Linear(64, 2), nn.Linear(2, 64)).eval()
    check_pass("fold_affine", model, (torch.randn(3, 64),), stats={}, ops_after={"linear": 2},
               declines=["costs more than the rank-2 pair"])
