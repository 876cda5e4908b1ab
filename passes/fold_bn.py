"""fold_bn: BatchNorm folded into the conv or linear before it."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

from torch import fx, nn

from fxopt import ir, kernels
from fxopt.pass_manager import Pass, PassContext, register

_AFFINE_KEYS = {"conv1d": "conv_bn", "conv2d": "conv_bn", "conv3d": "conv_bn", "linear": "linear_bn"}


@register
@dataclass
class FoldBatchNorm(Pass):
    """Fold an eval-mode BatchNorm into the conv or linear that feeds it.

    Algebra: BN(y) = s ⊙ y + t with s = γ / sqrt(σ² + ε), t = β − μ·s, per channel; and
      conv_bn:    BN(conv(x; W, b))   =>  conv(x; s ⊙ W, s ⊙ b + t)   (any groups, dilation, stride,
                                           padding and padding mode: channel c only scales W[c], b[c])
      linear_bn:  BN1d(linear(x; W, b)) =>  linear(x; s ⊙ W, s ⊙ b + t)  (2-D linear output only)
    Computed in float64, stored in the weights' dtype. BN may be a module or F.batch_norm with
    constant running statistics; the conv/linear may be a module or its functional form with
    constant weights.

    Preconditions: none (runs on any graph; canonicalize first makes more spellings match).

    Declines: the conv/linear output has users besides the BN; the BN tracks no running
    statistics or is in training mode; BatchNorm1d after a linear whose output is not 2-D (it
    would normalize a non-feature dim); channel counts that do not match. A conv module called
    from several places is never edited in place: the folded weights go into a copy used only here.

    Stats: conv_bn, linear_bn.
    """

    name = "fold_bn"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        stats: Counter = Counter()
        for bn_node in list(gm.graph.nodes):
            if ir.op_key(bn_node, gm) != "batch_norm" or not bn_node.args:
                continue
            producer = bn_node.args[0]
            if not isinstance(producer, fx.Node):
                continue
            rule = _AFFINE_KEYS.get(ir.op_key(producer, gm))
            if rule is None:
                continue
            reason = self._fold(gm, producer, bn_node)
            if reason:
                ctx.decline(rule, bn_node, reason)
            else:
                stats[rule] += 1
        if stats:
            gm.delete_all_unused_submodules()
        return stats

    def _fold(self, gm: fx.GraphModule, producer: fx.Node, bn_node: fx.Node) -> str | None:
        bn = _as_module(gm, bn_node)
        if isinstance(bn, str):
            return bn
        bn = bn[0]
        if bn.training:
            return "BatchNorm is in training mode (batch statistics)"
        if not bn.track_running_stats or bn.running_mean is None:
            return "BatchNorm tracks no running statistics (track_running_stats=False): it normalizes with batch statistics"
        if len(producer.users) != 1:
            others = ", ".join(sorted(u.name for u in producer.users if u is not bn_node))
            return f"'{producer.name}' output is also used by {others}"
        affine = _as_module(gm, producer)
        if isinstance(affine, str):
            return affine
        affine, source = affine
        if affine.weight.shape[0] != bn.num_features:
            return f"'{producer.name}' has {affine.weight.shape[0]} output channels, BatchNorm has {bn.num_features}"
        if isinstance(affine, nn.Linear):
            shape = ir.shape_of(producer)
            if shape is None or len(shape) != 2:
                return "BatchNorm1d after a linear whose output is not 2-D normalizes a non-feature dim"
        if not affine.weight.is_floating_point():
            return f"'{producer.name}' weights are not floating point"
        # BN(W x + b) => (s ⊙ W) x + (s ⊙ b + t)
        scale_shift = kernels.batch_norm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        weight, bias = kernels.fold_affine_after(affine.weight, affine.bias, scale_shift)
        folded = copy.deepcopy(affine)
        folded.weight = nn.Parameter(weight, requires_grad=affine.weight.requires_grad)
        folded.bias = nn.Parameter(bias, requires_grad=affine.weight.requires_grad)
        # never edit a module in place: it may be called from elsewhere, or belong to the user
        if producer.op == "call_module" and len(ir.module_users(gm, producer.target)) == 1:
            ir.set_module(gm, producer.target, folded)
            name = producer.target
        else:
            name = ir.add_module(gm, f"{producer.target if producer.op == 'call_module' else producer.name}_bn", folded)
        with gm.graph.inserting_before(producer):
            replacement = gm.graph.call_module(name, (source,))
        replacement.meta = dict(bn_node.meta)
        bn_node.replace_all_uses_with(replacement)
        gm.graph.erase_node(bn_node)
        gm.graph.erase_node(producer)
        return None


def _as_module(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, fx.Node] | str:
    """(module, input) for a module call or a functional call with constant weights, or why not."""
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs:
            return f"'{node.name}' is called with extra arguments"
        return gm.get_submodule(node.target), node.args[0]
    return ir.module_for_function(gm, node)
