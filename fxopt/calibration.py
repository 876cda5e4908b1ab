"""Calibration data for lossy plans (depth, prune): a batch to measure what a plan changes, and
the relative squared output error it is measured with."""

from __future__ import annotations

import torch
from torch import nn

from fxopt import ir
from fxopt.errors import InputError


def calibration_batch(inputs: tuple[torch.Tensor, ...], calibration) -> tuple[torch.Tensor, ...]:
    """``calibration`` checked against the example inputs (same per-sample shapes and dtypes),
    or, when it is None, a seeded random batch of 8 samples shaped like them."""
    if calibration is None:
        generator = torch.Generator().manual_seed(0)
        return tuple(torch.randn((8, *t.shape[1:]), generator=generator).to(t.dtype) for t in inputs)
    calib = ir.as_input_tuple(calibration)
    for i, (c, t) in enumerate(zip(calib, inputs)):
        if tuple(c.shape[1:]) != tuple(t.shape[1:]) or c.dtype != t.dtype:
            raise InputError(f"calibration input {i} has shape {tuple(c.shape)} ({c.dtype}); the model's example input "
                             f"is {tuple(t.shape)} ({t.dtype}): give a batch of the same per-sample shape and dtype")
    if len(calib) != len(inputs):
        raise InputError(f"calibration data has {len(calib)} input(s), the model takes {len(inputs)}")
    return calib


@torch.no_grad()
def float64_outputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The module's output tensors on ``inputs``, in float64."""
    out = module(*inputs)
    return [t.double() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def relative_error(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    """Σ‖actual − expected‖² / Σ‖expected‖² over all outputs."""
    num = sum(float((a - e).pow(2).sum()) for a, e in zip(actual, expected))
    den = sum(float(e.pow(2).sum()) for e in expected) or 1.0
    return num / den
