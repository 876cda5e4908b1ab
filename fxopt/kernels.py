"""Exact kernel algebra shared by the rewriting passes.

A conv or linear without a nonlinearity is an affine map ``y = W x + b``; every rewrite is built
from a few exact operations on (W, b). They compute in float64 and store in the original dtype,
so folding a chain of layers does not accumulate float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChannelAffine:
    """Per-channel ``y[c] = scale[c] * x[c] + shift[c]`` (BatchNorm in eval mode, for instance)."""

    scale: torch.Tensor  # float64, shape (C,)
    shift: torch.Tensor  # float64, shape (C,)


def batch_norm_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> ChannelAffine:
    """BN(x) = gamma * (x - mean) / sqrt(var + eps) + beta  =  scale * x + shift."""
    mean = running_mean.detach().double()
    inv_std = torch.rsqrt(running_var.detach().double() + eps)
    gamma = weight.detach().double() if weight is not None else torch.ones_like(mean)
    beta = bias.detach().double() if bias is not None else torch.zeros_like(mean)
    scale = gamma * inv_std
    return ChannelAffine(scale=scale, shift=beta - mean * scale)


def fold_affine_after(
    weight: torch.Tensor, bias: torch.Tensor | None, affine: ChannelAffine
) -> tuple[torch.Tensor, torch.Tensor]:
    """affine(W x + b) = (scale ⊙ W) x + (scale ⊙ b + shift), scale broadcast over W's dim 0.

    Holds for any conv (groups, dilation, stride, padding mode) and for linear: each output
    channel c is a dot product with W[c], so scaling channel c scales W[c] and b[c].
    """
    dtype = weight.dtype
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    view = (-1,) + (1,) * (w.dim() - 1)
    new_w = w * affine.scale.reshape(view)
    new_b = b * affine.scale + affine.shift
    return new_w.to(dtype), new_b.to(dtype)
