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


def fold_affine_before(
    weight: torch.Tensor, bias: torch.Tensor | None, affine: ChannelAffine, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """W ⊛ (s ⊙ x + t) + b  =  (W ⊙ s[in]) ⊛ x + (b + Σ_{i,taps} W[o,i,taps] t[in(o,i)]).

    Exact for linear, and for a conv when its padding is zero or t == 0 (padding pads the
    scaled input with zeros, not with t). ``weight`` is (out, in/groups, *k) or (out, in).
    """
    dtype = weight.dtype
    w = weight.detach().double()
    out_channels, per_group = w.shape[0], w.shape[1]
    # input channel seen by weight[o, i]: (o // out_per_group) * per_group + i
    group_of_out = torch.arange(out_channels) // (out_channels // groups)
    channel = group_of_out[:, None] * per_group + torch.arange(per_group)[None, :]  # (out, per_group)
    scale = affine.scale[channel].reshape(out_channels, per_group, *([1] * (w.dim() - 2)))
    shift = affine.shift[channel]  # (out, per_group)
    b = bias.detach().double() if bias is not None else torch.zeros(out_channels, dtype=torch.float64)
    new_b = b + (w.flatten(2).sum(-1) if w.dim() > 2 else w).mul(shift).sum(1)
    return (w * scale).to(dtype), new_b.to(dtype)


# ---------------------------------------------------------------------------------------------
# Affine 2-D convs: the common currency of branch folding and conv composition


def dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight (out, in/groups, kh, kw) as the equivalent dense (out, in, kh, kw)."""
    if groups == 1:
        return weight
    out_channels, per_group = weight.shape[:2]
    out_per_group = out_channels // groups
    dense = weight.new_zeros(out_channels, per_group * groups, *weight.shape[2:])
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * per_group:(g + 1) * per_group] = weight[rows]
    return dense


def grouped_weight(dense: torch.Tensor, groups: int) -> torch.Tensor | None:
    """The (out, in/groups, kh, kw) weight of a dense kernel that is block-diagonal in ``groups``
    groups, or None when some weight outside the blocks is non-zero."""
    out_channels, in_channels = dense.shape[:2]
    if out_channels % groups or in_channels % groups:
        return None
    out_per_group, per_group = out_channels // groups, in_channels // groups
    blocks = [dense[g * out_per_group:(g + 1) * out_per_group, g * per_group:(g + 1) * per_group] for g in range(groups)]
    if groups > 1:
        off_block = dense.abs().flatten(2).sum(-1)
        for g in range(groups):
            off_block[g * out_per_group:(g + 1) * out_per_group, g * per_group:(g + 1) * per_group] = 0
        if off_block.max() != 0:
            return None
    return torch.cat(blocks, 0)


@dataclass(frozen=True)
class AffineConv:
    """``y = conv2d(x, weight, bias, stride, padding, dilation)`` with a dense float64 weight.

    ``groups`` lists the group counts of the ops it was built from: ``to_conv`` re-groups the
    result into the largest of them that the weight's block structure allows.
    """

    weight: torch.Tensor  # (out, in, kh, kw) float64
    bias: torch.Tensor  # (out,) float64
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: frozenset[int] = frozenset({1})

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:])

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def zero_padding(conv: torch.nn.Conv2d) -> tuple[int, int] | str:
    """The symmetric zero padding of an nn.Conv2d ('valid' and odd 'same' resolved), or why it
    has none."""
    if conv.padding_mode != "zeros":
        return f"padding_mode='{conv.padding_mode}' pads with other values than zeros"
    if not isinstance(conv.padding, str):
        return _pair(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    if all(((k - 1) * d) % 2 == 0 for k, d in zip(conv.kernel_size, conv.dilation)):
        return tuple(((k - 1) * d) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return "padding='same' with an even kernel pads asymmetrically"


def conv_as_affine(conv: torch.nn.Conv2d) -> AffineConv | str:
    """An nn.Conv2d as an AffineConv, or why it cannot be one."""
    padding = zero_padding(conv)
    if isinstance(padding, str):
        return padding
    weight = dense_weight(conv.weight.detach().double(), conv.groups)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    return AffineConv(weight, bias, _pair(conv.stride), padding, _pair(conv.dilation), frozenset({conv.groups}))


def identity_conv(channels: int) -> AffineConv:
    """x  =  conv1x1(x; I): the identity as a kernel, depthwise-compatible with any grouping."""
    weight = torch.eye(channels, dtype=torch.float64).reshape(channels, channels, 1, 1)
    return AffineConv(weight, torch.zeros(channels, dtype=torch.float64), groups=frozenset({channels}))


def avg_pool_conv(channels: int, kernel_size, stride, padding) -> AffineConv:
    """avg_pool2d(x, k, s, p) with count_include_pad=True  =  depthwise conv with weights 1/(kh·kw)."""
    kh, kw = _pair(kernel_size)
    weight = torch.eye(channels, dtype=torch.float64)[:, :, None, None].expand(channels, channels, kh, kw) / (kh * kw)
    return AffineConv(weight.contiguous(), torch.zeros(channels, dtype=torch.float64), _pair(stride), _pair(padding),
                      groups=frozenset({channels}))


def affine_after(conv: AffineConv, affine: ChannelAffine) -> AffineConv:
    """s ⊙ conv(x) + t as one conv."""
    weight, bias = fold_affine_after(conv.weight, conv.bias, affine)
    return AffineConv(weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def compose(first: AffineConv, second: AffineConv) -> AffineConv | str:
    """second(first(x)) as one conv, or why that is not exact.

    With first (W1, b1, stride s1, padding p1) and second (W2, b2, s2, p2):
      W[o, i, u] = Σ_m Σ_j W2[o, m, j] W1[m, i, u − s1·j]     (a transposed conv of W2 by W1)
      b = b2 + Σ_m (Σ_j W2[o, m, j]) b1[m];  kernel k1 + (k2 − 1)·s1;  stride s1·s2.
    Padding composes exactly in two cases: p2 = 0 (padding p1), or first is a bias-free 1x1
    stride-1 unpadded conv (zero-padding its output is zero-padding x; padding p2).
    """
    if first.kernel_size == (1, 1) and first.stride == (1, 1):
        dilation = second.dilation  # a pointwise first conv mixes channels per tap of the second
    elif second.kernel_size == (1, 1):
        dilation = first.dilation  # a pointwise second conv mixes channels per tap of the first
    elif first.dilation == second.dilation == (1, 1):
        dilation = (1, 1)
    else:
        return "dilated conv in a chain of spatial convs"
    if first.weight.shape[0] != second.weight.shape[1]:
        return f"channel mismatch ({first.weight.shape[0]} outputs feed {second.weight.shape[1]} inputs)"
    if second.padding == (0, 0):
        padding = first.padding
    elif first.kernel_size == (1, 1) and first.stride == (1, 1) and first.padding == (0, 0) and not first.bias.any():
        padding = second.padding
    else:
        return "an inner zero padding cannot be expressed (padding the intermediate tensor is not padding the input)"
    weight = torch.nn.functional.conv_transpose2d(second.weight, first.weight, stride=first.stride)
    bias = second.bias + second.weight.sum((2, 3)) @ first.bias
    stride = (first.stride[0] * second.stride[0], first.stride[1] * second.stride[1])
    return AffineConv(weight, bias, stride, padding, dilation, first.groups | second.groups)


def add(terms: list[AffineConv]) -> AffineConv | str:
    """Σ_i conv_i(x) as one conv: kernels zero-padded into a common window, biases summed.

    Branch i reads input taps y·s − p_i + d·[0, k_i); the sum reads taps from −P with
    P = max p_i, each kernel placed at offset (P − p_i)/d. The result is one symmetric conv
    only when 2·p_i − d·(k_i − 1) is the same for every branch (centred kernels; 1x3 and 3x1
    with their centred padding qualify), else the output sizes or alignment would differ.
    """
    first = terms[0]
    for term in terms[1:]:
        if term.stride != first.stride:
            return f"branches have different strides ({first.stride} vs {term.stride})"
        if term.weight.shape[:2] != first.weight.shape[:2]:
            return "branches have different channel counts"
    dilated = {t.dilation for t in terms if t.kernel_size != (1, 1)}
    if len(dilated) > 1:
        return f"branches have different dilations {sorted(dilated)}"
    dilation = dilated.pop() if dilated else (1, 1)
    size, padding = [], []
    for dim in range(2):
        d = dilation[dim]
        spans = {2 * t.padding[dim] - d * (t.kernel_size[dim] - 1) for t in terms}
        if len(spans) > 1:
            return "branches are not aligned: 2·padding − dilation·(kernel − 1) differs (an even kernel cannot be centred)"
        pad = max(t.padding[dim] for t in terms)
        if any((pad - t.padding[dim]) % d for t in terms):
            return "branch paddings are not a multiple of the dilation apart"
        padding.append(pad)
        size.append(max((pad - t.padding[dim]) // d + t.kernel_size[dim] for t in terms))
    weight = torch.zeros(*first.weight.shape[:2], *size, dtype=torch.float64)
    bias = torch.zeros_like(first.bias)
    for term in terms:
        top = (padding[0] - term.padding[0]) // dilation[0]
        left = (padding[1] - term.padding[1]) // dilation[1]
        kh, kw = term.kernel_size
        weight[:, :, top:top + kh, left:left + kw] += term.weight
        bias += term.bias
    groups = frozenset().union(*(t.groups for t in terms))
    return AffineConv(weight, bias, first.stride, tuple(padding), dilation, groups)


def group_count(conv: AffineConv) -> int:
    """The largest of ``conv.groups`` (or 1) that its weight's block structure allows."""
    return next(g for g in sorted(conv.groups | {1}, reverse=True) if grouped_weight(conv.weight, g) is not None)


def to_conv(conv: AffineConv, dtype: torch.dtype) -> torch.nn.Conv2d:
    """An nn.Conv2d computing ``conv``, in the largest group count its block structure allows."""
    groups = group_count(conv)
    weight = grouped_weight(conv.weight, groups)
    module = torch.nn.Conv2d(conv.weight.shape[1], conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             conv.dilation, groups, bias=True, dtype=dtype)
    module.weight = torch.nn.Parameter(weight.to(dtype))
    module.bias = torch.nn.Parameter(conv.bias.to(dtype))
    return module
