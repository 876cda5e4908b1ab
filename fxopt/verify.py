"""Verification: IR invariants and numerical equivalence with a reference model.

Tolerances are relative to the output's scale: an output passes when
``|actual - expected| <= atol * max|expected| + rtol * |expected|`` element-wise
(torch.testing.assert_close with atol scaled). fp32 defaults: rtol 1e-4, atol 1e-5.

A float32 reference is itself rounded: a deep network without normalization (a depth-planned
one, whose activations are gone) can be as far from its exact output as the tolerance. When the
float32 outputs differ, ``check_equivalent`` asks float64 to arbitrate: the candidate passes when
it is no further from the reference run in float64 than ``ROUNDING_FACTOR`` times the float32
reference is (plus the tolerance), i.e. when the difference is rounding, not a wrong rewrite.
A rewrite also rounds the weights it computes (a folded BN's scale times the conv's weight) to
float32; in an ill-conditioned model (random BN statistics that let activations grow) that moves
the outputs more than eager's arithmetic rounding does. So the float32 reference's error is
counted together with the float64 reference's sensitivity to half-ulp noise on every weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from fxopt import ir
from fxopt.errors import VerificationError

PASS_TOLERANCE = (1e-4, 1e-5)  # (rtol, atol relative to output scale): fx rewrites
BUILD_TOLERANCE = (1e-4, 1e-4)  # compiled code reorders accumulation more freely
ROUNDING_FACTOR = 4.0


def check_ir(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] = ()) -> None:
    """graph.lint (which also resolves every call_module and get_attr target), shapes propagate."""
    try:
        gm.graph.lint()
    except Exception as exc:
        raise VerificationError(f"graph is malformed: {exc}") from exc
    if example_inputs:
        try:
            ir.propagate_shapes(gm, example_inputs)
        except Exception as exc:
            raise VerificationError(f"shapes do not propagate through the graph: {exc}") from exc


def random_inputs_like(example_inputs: Sequence[torch.Tensor], seed: int) -> tuple[torch.Tensor, ...]:
    """Seeded random tensors of the example inputs' shapes; integer and bool inputs are kept."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(x.shape, generator=generator, dtype=x.dtype) if x.is_floating_point() else x.clone()
        for x in example_inputs
    )


@dataclass(frozen=True)
class Comparison:
    ok: bool
    max_abs_error: float
    max_rel_error: float  # max |actual - expected| / max |expected|
    detail: str = ""

    def to_json(self) -> dict:
        return {"ok": self.ok, "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
                **({"detail": self.detail} if self.detail else {})}


def compare_outputs(expected: Any, actual: Any, rtol: float, atol: float) -> Comparison:
    """Compare two output structures (tensors, tuples, lists, dicts) with scale-relative tolerance."""
    expected_leaves, expected_spec = pytree.tree_flatten(expected)
    actual_leaves, actual_spec = pytree.tree_flatten(actual)
    if expected_spec != actual_spec:
        return Comparison(False, float("inf"), float("inf"), f"output structure differs: {expected_spec} vs {actual_spec}")
    worst_abs = worst_rel = 0.0
    problems = []
    for index, (e, a) in enumerate(zip(expected_leaves, actual_leaves)):
        if not isinstance(e, torch.Tensor):
            if e != a:
                problems.append(f"output {index}: {a!r} != {e!r}")
            continue
        a = torch.as_tensor(a)
        if a.shape != e.shape or a.dtype != e.dtype:
            problems.append(f"output {index}: got {tuple(a.shape)} {a.dtype}, expected {tuple(e.shape)} {e.dtype}")
            worst_abs = worst_rel = float("inf")
            continue
        if not e.is_floating_point():
            if not torch.equal(a, e):
                problems.append(f"output {index}: integer values differ")
            continue
        e64, a64 = e.detach().double(), a.detach().double()
        # NaN/Inf outputs (from NaN/Inf weights) must match exactly (assert_close below checks
        # that); the scale and the error are over the finite values, or atol would be NaN
        finite = torch.isfinite(e64) & torch.isfinite(a64)
        scale = float(e64[torch.isfinite(e64)].abs().max()) if torch.isfinite(e64).any() else 0.0
        error = float((a64 - e64)[finite].abs().max()) if finite.any() else 0.0
        worst_abs = max(worst_abs, error)
        worst_rel = max(worst_rel, error / scale if scale > 0 else error)
        try:
            torch.testing.assert_close(a64, e64, rtol=rtol, atol=atol * max(scale, 1e-30), equal_nan=True)
        except AssertionError as exc:
            mismatched = [line.strip() for line in str(exc).splitlines() if line.startswith("Mismatched")]
            problems.append(f"output {index} {tuple(e.shape)}: max abs error {error:.3g} at output scale {scale:.3g}"
                            + (f" ({mismatched[0]})" if mismatched else ""))
    return Comparison(not problems, worst_abs, worst_rel, "; ".join(problems))


def run_reference(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Any:
    with torch.no_grad():
        return model(*inputs)


def check_equivalent(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    rtol: float = PASS_TOLERANCE[0],
    atol: float = PASS_TOLERANCE[1],
    trials: int = 2,
    seed: int = 0,
) -> Comparison:
    """Outputs of ``candidate`` equal ``reference`` on the example inputs and ``trials`` seeded random ones.

    Raises VerificationError on the first mismatch; returns the worst comparison otherwise.
    """
    worst = Comparison(True, 0.0, 0.0)
    for trial in range(trials + 1):
        inputs = tuple(example_inputs) if trial == 0 else random_inputs_like(example_inputs, seed + trial)
        expected, actual = run_reference(reference, inputs), run_reference(candidate, inputs)
        comparison = compare_outputs(expected, actual, rtol, atol)
        if not comparison.ok:
            comparison = _arbitrate_in_float64(reference, inputs, expected, actual, atol, comparison)
        if not comparison.ok:
            which = "the example inputs" if trial == 0 else f"random inputs (seed {seed + trial})"
            raise VerificationError(f"outputs differ from the reference on {which}: {comparison.detail}")
        if comparison.max_rel_error >= worst.max_rel_error:
            worst = comparison
    return worst


def _arbitrate_in_float64(reference: nn.Module, inputs: Sequence[torch.Tensor], expected: Any, actual: Any,
                          atol: float, failed: Comparison) -> Comparison:
    """``failed`` unless the candidate is within ROUNDING_FACTOR x the float32 reference's own
    error of the float64 reference, plus the float64 reference's sensitivity to float32 weight
    rounding (+ atol x scale), on every float32 output (see the module docstring)."""
    import copy

    try:
        exact = run_reference(copy.deepcopy(reference).double(),
                              tuple(t.double() if t.is_floating_point() else t for t in inputs))
        noisy = _with_weight_rounding_noise(reference, inputs)
    except Exception:  # a model that cannot run in float64: the float32 verdict stands
        return failed
    exact_leaves, expected_leaves, actual_leaves, noisy_leaves = (pytree.tree_leaves(v) for v in (exact, expected, actual, noisy))
    if not len(exact_leaves) == len(expected_leaves) == len(actual_leaves) == len(noisy_leaves):
        return failed
    for x, e, a, n in zip(exact_leaves, expected_leaves, actual_leaves, noisy_leaves):
        if not (isinstance(e, torch.Tensor) and e.dtype == torch.float32 and e.numel()):
            continue
        x64, e64, a64 = x.detach().double(), e.double(), torch.as_tensor(a).double()
        if not torch.equal(torch.isfinite(a64), torch.isfinite(e64)):
            return failed  # NaN/Inf where the reference has a number (or the reverse) is no rounding
        finite = torch.isfinite(x64) & torch.isfinite(e64)  # (a NaN error would compare as "within")
        if not finite.any():
            continue
        x64, e64, a64, n64 = x64[finite], e64[finite], a64[finite], n.detach().double()[finite]
        # eager's own float32 error, and what rounding the weights to float32 alone can do
        reference_error = float((e64 - x64).abs().max()) + float((n64 - x64).abs().max())
        candidate_error = float((a64 - x64).abs().max())
        if candidate_error > ROUNDING_FACTOR * reference_error + atol * float(x64.abs().max()):
            return failed
    return Comparison(True, failed.max_abs_error, failed.max_rel_error,
                      "float32 outputs differ by rounding: within the float32 reference's own error of float64")


def _with_weight_rounding_noise(reference: nn.Module, inputs: Sequence[torch.Tensor]) -> Any:
    """The reference in float64 with every floating parameter and buffer off by half a float32 ulp
    (random signs, seeded): how far float32 storage of the weights alone can move the outputs."""
    import copy

    noisy = copy.deepcopy(reference).double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in (*noisy.parameters(), *noisy.buffers()):
            if t.is_floating_point():
                signs = torch.randint(0, 2, t.shape, generator=generator, dtype=torch.float64) * 2 - 1
                t.mul_(1 + signs * 2.0 ** -24)
    return run_reference(noisy, tuple(t.double() if t.is_floating_point() else t for t in inputs))
