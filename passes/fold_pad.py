"""fold_pad: an explicit constant pad before a conv or pool becomes that op's own padding."""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass

import torch.nn.functional as F
from torch import fx, nn

from fxopt import ir
from fxopt.pass_manager import Pass, PassContext, register
from fxopt.passes.affine import module_name

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOL_ARGS = {
    "avg_pool1d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "max_pool1d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
}


def _constant_pad(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, tuple[int, ...], float] | None:
    """(input, pad in F.pad order (last dim first, (before, after) per dim), value) for a
    constant-mode pad: F.pad or an nn.ConstantPadNd / nn.ZeroPadNd module."""
    if node.op == "call_function" and node.target is F.pad:
        named = dict(zip(("input", "pad", "mode", "value"), node.args), **node.kwargs)
        if named.get("mode", "constant") != "constant" or not isinstance(named.get("input"), fx.Node):
            return None
        pad = named.get("pad")
        value = named.get("value")
        if not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
            return None
        return named["input"], tuple(pad), 0.0 if value is None else float(value)
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        module = gm.get_submodule(node.target)
        if isinstance(module, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d,
                               nn.ZeroPad3d)):
            return node.args[0], tuple(module.padding), float(module.value)
    return None


def _symmetric(pad: tuple[int, ...], spatial: int) -> tuple[int, ...] | str:
    """Per spatial dim (first dim first) the padding of both sides, or why there is none."""
    if len(pad) % 2 or len(pad) // 2 > spatial:
        return f"pads {len(pad) // 2} dims of a tensor with {spatial} spatial dims (batch or channel padding)"
    pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)][::-1]  # first spatial dim first
    pairs = [(0, 0)] * (spatial - len(pairs)) + pairs
    if any(before < 0 or after < 0 for before, after in pairs):
        return "a negative pad crops the tensor"
    uneven = [(i, pair) for i, pair in enumerate(pairs) if pair[0] != pair[1]]
    if uneven:
        dim, (before, after) = uneven[0]
        return (f"asymmetric pad ({before}, {after}) on spatial dim {dim}: torch convs and pools pad "
                "both sides equally")
    return tuple(before for before, _ in pairs)


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


@register
@dataclass
class FoldPad(Pass):
    """Fold an explicit constant pad into the padding of the conv or pool that reads it.

    Algebra (p: symmetric per spatial dim; a conv's own padding is zeros):
      pad_conv:  conv(pad(x, p, 0), padding=q)                          =>  conv(x, padding=q+p)
      pad_pool:  avg_pool(pad(x, p, 0), padding=0, count_include_pad)   =>  avg_pool(x, padding=p)
                 max_pool(pad(x, p, −inf), padding=0)                   =>  max_pool(x, padding=p)
    The pad node goes when no other op reads it.

    Preconditions: shapes in node.meta.

    Declines: asymmetric pads (torch convs and pools pad both sides equally), negative pads,
    pads of the batch or channel dims; a non-zero pad value before a conv (or other than 0 / −inf
    before an avg / max pool); a conv whose padding_mode is not 'zeros' or whose padding is a
    string; a pool with its own padding, ceil_mode, avg_pool with count_include_pad=False or a
    divisor; pool padding over half the kernel (torch refuses it).

    Stats: pad_conv, pad_pool.
    """

    name = "fold_pad"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        stats: Counter = Counter()
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph:
                continue
            found = _constant_pad(node, gm)
            if found is None:
                continue
            for user in list(node.users):
                rule, reason = self._fold(gm, node, user, found)
                if reason:
                    ctx.decline(rule, user, reason)
                elif rule:
                    stats[rule] += 1
            if not node.users:
                gm.graph.erase_node(node)
        if stats:
            gm.delete_all_unused_submodules()
        return stats

    @staticmethod
    def _fold(gm: fx.GraphModule, pad_node: fx.Node, user: fx.Node, found) -> tuple[str | None, str | None]:
        """(rule, decline reason); (rule, None) when folded; (None, None) when no rule applies."""
        source, pad, value = found
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), _CONVS):
            conv = gm.get_submodule(user.target)
            if len(user.args) != 1 or user.kwargs:
                return "pad_conv", f"'{user.name}' is called with extra arguments"
            if value != 0.0:
                return "pad_conv", f"pad value {value} is not zero"
            if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
                return "pad_conv", f"conv padding is {conv.padding!r} with padding_mode {conv.padding_mode!r}"
            spatial = _symmetric(pad, len(conv.kernel_size))
            if isinstance(spatial, str):
                return "pad_conv", spatial
            # conv(pad(x, p), padding=q) => conv(x, padding=q+p)
            folded = copy.deepcopy(conv)
            folded.padding = tuple(q + p for q, p in zip(conv.padding, spatial))
            name = ir.add_module(gm, module_name(user) + "_padded", folded)
            with gm.graph.inserting_before(user):
                new = gm.graph.call_module(name, (source,))
            new.meta = dict(user.meta)
            user.replace_all_uses_with(new)
            gm.graph.erase_node(user)
            return "pad_conv", None
        key = ir.op_key(user, gm)
        if key not in _POOL_ARGS or user.op != "call_function":
            return None, None
        form = ir.classify(user, gm)
        named = dict(zip(_POOL_ARGS[key], form.args), **form.kwargs)
        if named.get("input") is not pad_node:
            return None, None
        kernel = _tuple(named["kernel_size"], int(key[-2]))
        if any(_tuple(named.get("padding", 0), len(kernel))) or named.get("ceil_mode") or named.get("return_indices"):
            return "pad_pool", "the pool has its own padding, ceil_mode or returns indices"
        if key.startswith("avg"):
            if value != 0.0 or named.get("count_include_pad", True) is False or named.get("divisor_override"):
                return "pad_pool", "avg_pool folds a zero pad only, counting the padding in its divisor"
        elif value != -math.inf:
            return "pad_pool", f"max_pool folds a −inf pad only (pad value {value})"
        spatial = _symmetric(pad, len(kernel))
        if isinstance(spatial, str):
            return "pad_pool", spatial
        dilation = _tuple(named.get("dilation", 1), len(kernel))
        if any(p > (d * (k - 1) + 1) // 2 for p, k, d in zip(spatial, kernel, dilation)):
            return "pad_pool", f"pad {spatial} exceeds half the pool window {kernel}"
        # pool(pad(x, p)) => pool(x, padding=p)
        kwargs = {k: v for k, v in named.items() if k != "input"}
        kwargs["padding"] = spatial
        kwargs["stride"] = kwargs.get("stride") or kernel
        with gm.graph.inserting_before(user):
            new = gm.graph.call_function(form.canonical, (source,), kwargs)
        new.meta = dict(user.meta)
        user.replace_all_uses_with(new)
        gm.graph.erase_node(user)
        return "pad_pool", None

