import pytest
import torch
from torch import nn

from fxopt import ir, verify
from fxopt.errors import VerificationError


def test_tolerance_is_relative_to_output_scale():
    expected = torch.tensor([1000.0, 0.0, -3.0])
    near = expected + torch.tensor([0.0, 5e-3, 0.0])  # 5e-6 of the scale: within atol 1e-5 * 1000
    assert verify.compare_outputs(expected, near, 1e-4, 1e-5).ok
    far = expected + torch.tensor([0.0, 5e-2, 0.0])
    result = verify.compare_outputs(expected, far, 1e-4, 1e-5)
    assert not result.ok and result.max_abs_error == pytest.approx(5e-2) and "output 0" in result.detail


def test_structure_shape_and_dtype_mismatches():
    a = torch.zeros(2)
    assert not verify.compare_outputs((a, a), (a,), 1e-4, 1e-5).ok
    assert "got (3,)" in verify.compare_outputs(a, torch.zeros(3), 1e-4, 1e-5).detail
    assert not verify.compare_outputs(a, a.double(), 1e-4, 1e-5).ok
    assert verify.compare_outputs({"y": [a]}, {"y": [a.clone()]}, 1e-4, 1e-5).ok


def test_check_ir_catches_dangling_module():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 4, 4)
    gm = ir.trace(model, (x,))
    verify.check_ir(gm, (x,))
    del gm._modules["0"]
    with pytest.raises(VerificationError, match="malformed: .*references nonexistent attribute 0"):
        verify.check_ir(gm, (x,))


def test_check_equivalent_uses_random_inputs_too():
    class Sneaky(nn.Module):
        """Matches the reference only on the example input."""

        def __init__(self, example):
            super().__init__()
            self.example = example

        def forward(self, x):
            return x if torch.equal(x, self.example) else x + 1

    x = torch.randn(3)
    with pytest.raises(VerificationError, match=r"random inputs \(seed 1\)"):
        verify.check_equivalent(nn.Identity(), Sneaky(x), (x,))


class _Cancelling(torch.nn.Module):
    """(x + 1e4) - 1e4: float32 loses x's low bits (its own error ~5e-4), float64 does not."""

    def forward(self, x):
        return (x + 1e4) - 1e4


class _Shifted(torch.nn.Module):
    def __init__(self, shift):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        return x + self.shift


def test_float64_arbitrates_float32_rounding_of_the_reference():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    assert not verify.compare_outputs(_Cancelling()(x), x, *verify.PASS_TOLERANCE).ok  # float32 alone says no
    comparison = verify.check_equivalent(_Cancelling(), _Shifted(0.0), (x,))
    assert comparison.ok and "rounding" in comparison.detail


def test_float64_arbitration_still_catches_a_wrong_candidate():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(VerificationError, match="outputs differ"):
        verify.check_equivalent(_Cancelling(), _Shifted(1e-2), (x,))


def test_nan_and_inf_outputs_compare_by_place():
    """NaN/Inf weights (tests/test_bad_inputs.py): the scale and error are over the finite values
    (a NaN scale made torch.testing raise inside compare_outputs); NaN/Inf must be in the same places."""
    nan, inf = float("nan"), float("inf")
    expected = torch.tensor([nan, inf, 2.0, -1.0])
    assert verify.compare_outputs(expected, expected.clone(), 1e-4, 1e-5).ok
    for wrong in ([nan, inf, 2.0, nan], [nan, -inf, 2.0, -1.0], [1.0, inf, 2.0, -1.0], [nan, inf, 2.5, -1.0]):
        assert not verify.compare_outputs(expected, torch.tensor(wrong), 1e-4, 1e-5).ok, wrong


def test_float64_arbitration_does_not_pass_a_nan():
    """A candidate with NaN where the reference has numbers is not 'rounding' (NaN > bound is
    False, so the float64 arbitration used to accept it)."""
    class NanWhereBig(nn.Module):
        def forward(self, x):
            return x.masked_fill(x > 1, float("nan"))

    with pytest.raises(VerificationError, match="outputs differ"):
        verify.check_equivalent(nn.Identity(), NanWhereBig(), (torch.randn(4, 8) * 3,))


class _Difference(nn.Module):
    """x * w1 - x * w2 with w1 ~ w2: for inputs that are powers of two float32 computes it exactly,
    so eager has no rounding error of its own, and one ulp on a weight is 6e-4 of the output."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(w1), nn.Parameter(w2)

    def forward(self, x):
        return x * self.w1 - x * self.w2


def test_float64_arbitration_allows_for_float32_rounding_of_the_weights():
    """A rewrite stores the weights it computes in float32 (a folded BN's scale times the conv
    weight); in an ill-conditioned model that rounding alone exceeds eager's own float32 error
    (pytorchcv menet108 with random BN statistics: 9x). One ulp off a weight passes; an error
    a thousand times larger does not."""
    w1 = torch.full((8,), 1.2345678)
    w2 = w1 * (1 - 1e-4)
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0, -1.0, 2.0, -0.25, 8.0]])
    reference = _Difference(w1, w2)
    one_ulp = _Difference(torch.nextafter(w1, torch.tensor(2.0)), w2)
    assert not verify.compare_outputs(reference(x), one_ulp(x), *verify.PASS_TOLERANCE).ok  # float32 alone says no
    comparison = verify.check_equivalent(reference, one_ulp, (x,), trials=0)
    assert comparison.ok and "rounding" in comparison.detail
    with pytest.raises(VerificationError, match="outputs differ"):
        verify.check_equivalent(reference, _Difference(w1 * (1 + 1e-7 * 1000), w2), (x,), trials=0)
