"""Recognizing affine steps in a graph (shared by the folding passes; not a pass itself).

A per-channel affine step is ``y = s ⊙ x + t`` along the channel dim: an eval-mode BatchNorm
with running statistics, or a multiply/add/subtract/divide by a constant that is a scalar or
varies only along the channel dim. An affine conv step is a zero-padded nn.Conv2d or an
avg_pool2d that counts padding. Each recognizer returns None for anything else.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn

from fxopt import ir, kernels

_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def as_module(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, fx.Node] | str:
    """(module, input) for a conv/linear/BN module call or its functional form with constant
    weights, or the reason it is not one."""
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs:
            return f"'{node.name}' is called with extra arguments"
        return gm.get_submodule(node.target), node.args[0]
    return ir.module_for_function(gm, node)


def per_channel_constant(gm: fx.GraphModule, arg: Any, shape: torch.Size, channel_dim: int) -> torch.Tensor | None:
    """A constant operand as a float64 vector over the channels of a tensor of ``shape``, or None
    when it is not constant or varies along another dim."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        value = torch.tensor(float(arg), dtype=torch.float64)
    else:
        value = ir.constant_value(gm, arg)
        if value is None or not value.is_floating_point():
            return None
        value = value.detach().double()
    channels = shape[channel_dim]
    if value.numel() == 1:
        return value.reshape(()).expand(channels).clone()
    if value.dim() > len(shape):
        return None
    aligned = (1,) * (len(shape) - value.dim()) + tuple(value.shape)
    varying = [d for d, size in enumerate(aligned) if size != 1]
    if varying != [channel_dim % len(shape)] or aligned[channel_dim] != channels:
        return None
    return value.reshape(channels).clone()


def channel_affine(gm: fx.GraphModule, node: fx.Node, channel_dim: int = 1) -> tuple[fx.Node, kernels.ChannelAffine, str] | None:
    """(input, affine, kind) when ``node`` is a per-channel affine step; kind is "batch_norm",
    "scale" or "shift"."""
    shape = ir.shape_of(node)
    if shape is None or len(shape) < 2:
        return None
    key = ir.op_key(node, gm)
    if key == "batch_norm":
        found = as_module(gm, node)
        if isinstance(found, str):
            return None
        bn, source = found
        if bn.training or not bn.track_running_stats or bn.running_mean is None or channel_dim % len(shape) != 1:
            return None
        return source, kernels.batch_norm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps), "batch_norm"
    if key not in ("mul", "add", "sub", "div") or len(node.args) != 2:
        return None
    a, b = node.args
    for tensor, constant, constant_first in ((a, b, False), (b, a, True)):
        if not isinstance(tensor, fx.Node) or ir.shape_of(tensor) != shape:
            continue
        value = per_channel_constant(gm, constant, shape, channel_dim)
        if value is None:
            continue
        ones, zeros = torch.ones_like(value), torch.zeros_like(value)
        if key == "mul":
            return tensor, kernels.ChannelAffine(value, zeros), "scale"
        if key == "add":
            return tensor, kernels.ChannelAffine(ones, value), "shift"
        if key == "sub":  # x - c  or  c - x
            affine = kernels.ChannelAffine(-ones, value) if constant_first else kernels.ChannelAffine(ones, -value)
            return tensor, affine, "shift" if not constant_first else "scale"
        if key == "div" and not constant_first and bool((value != 0).all()):
            return tensor, kernels.ChannelAffine(1 / value, zeros), "scale"
    return None


@dataclass(frozen=True)
class ConvStep:
    """One step of an affine chain: ``apply(current)`` is the chain extended by this op."""

    node: fx.Node
    input: fx.Node
    kind: str  # "conv", "avg_pool", "batch_norm", "scale", "shift"
    apply: Callable[[kernels.AffineConv], kernels.AffineConv | str]


def conv_step(gm: fx.GraphModule, node: fx.Node) -> ConvStep | None:
    """``node`` as a step of a chain of 2-D affine convs (on NCHW tensors), or None."""
    shape = ir.shape_of(node)
    if shape is None or len(shape) != 4 or not ir.tensor_meta(node).dtype.is_floating_point:
        return None
    key = ir.op_key(node, gm)
    if key == "conv2d" and node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        conv = kernels.conv_as_affine(gm.get_submodule(node.target))
        if isinstance(conv, str):
            return None
        return ConvStep(node, node.args[0], "conv", lambda current: kernels.compose(current, conv))
    if key == "avg_pool2d":
        form = ir.classify(node, gm)  # the module and the function spelling read alike
        named = dict(zip(_AVG_POOL_ARGS, form.args), **form.kwargs)
        stride = named.get("stride") or named["kernel_size"]
        padding = named.get("padding", 0)
        pads = padding if isinstance(padding, (tuple, list)) else (padding,)
        if named.get("ceil_mode") or named.get("divisor_override") is not None:
            return None
        if any(pads) and named.get("count_include_pad", True) is False:
            return None  # the divisor shrinks at the border: not a conv
        pool = kernels.avg_pool_conv(shape[1], named["kernel_size"], stride, padding)
        return ConvStep(node, named["input"], "avg_pool", lambda current: kernels.compose(current, pool))
    found = channel_affine(gm, node)
    if found is not None:
        source, affine, kind = found
        return ConvStep(node, source, kind, lambda current: kernels.affine_after(current, affine))
    return None


def replace_with_module(gm: fx.GraphModule, old: fx.Node, module: nn.Module, source: fx.Node, base: str) -> fx.Node:
    """A call of ``module`` on ``source`` takes the place of ``old`` (which is erased)."""
    name = ir.add_module(gm, base, module)
    with gm.graph.inserting_before(old):
        node = gm.graph.call_module(name, (source,))
    node.meta = dict(old.meta)
    old.replace_all_uses_with(node)
    gm.graph.erase_node(old)
    return node


def module_name(node: fx.Node) -> str:
    """A base for naming a module derived from ``node``: its module's path, or the node's name."""
    return node.target if node.op == "call_module" else node.name


def with_weights(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                 groups: int | None = None) -> nn.Module:
    """A copy of ``layer`` (conv or linear) holding new weights, its channel counts read from
    their shape (and its ``groups`` changed when given); ``bias`` None leaves the copy the
    layer's own bias (none, for the layers that have none). The original stays untouched, since
    it may be called elsewhere or belong to the user's model."""
    folded = copy.deepcopy(layer)
    trainable = layer.weight.requires_grad
    folded.weight = nn.Parameter(weight, requires_grad=trainable)
    if bias is not None:
        folded.bias = nn.Parameter(bias, requires_grad=trainable)
    if isinstance(folded, nn.Linear):
        folded.out_features, folded.in_features = weight.shape
    else:
        folded.groups = folded.groups if groups is None else groups
        folded.out_channels, folded.in_channels = weight.shape[0], weight.shape[1] * folded.groups
    return folded
