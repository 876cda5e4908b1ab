"""fold_bn: BatchNorm folded into the conv or linear before it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import fx, nn

from fxopt import ir, kernels
from fxopt.pass_manager import Pass, PassContext, register
from fxopt.passes.affine import as_module, channel_affine, module_name, replace_with_module, with_weights

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
        bn = as_module(gm, bn_node)
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
        affine = as_module(gm, producer)
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
        folded = with_weights(affine, weight, bias)
        # never edit a module in place: it may be called from elsewhere, or belong to the user
        if producer.op == "call_module" and len(ir.module_users(gm, producer.target)) == 1:
            ir.set_module(gm, producer.target, folded)
            name = producer.target
        else:
            name = ir.add_module(gm, module_name(producer) + "_bn", folded)
        with gm.graph.inserting_before(producer):
            replacement = gm.graph.call_module(name, (source,))
        replacement.meta = dict(bn_node.meta)
        bn_node.replace_all_uses_with(replacement)
        gm.graph.erase_node(bn_node)
        gm.graph.erase_node(producer)
        return None


@register
@dataclass
class FoldBatchNormBeforeConv(Pass):
    """Fold a BatchNorm or constant per-channel scale/shift that feeds a conv or linear into it.

    Algebra, with the affine y = s ⊙ x + t over input channels:
      bn_conv / affine_conv:     conv(s ⊙ x + t; W, b)  =>  conv(x; W ⊙ s[in], b + Σ W·t[in])
      bn_linear / affine_linear: linear(s ⊙ x + t)      =>  the same with taps = 1
    Exact for a linear; for a conv when it has no padding, when t = 0, or when its padding mode
    copies input values (reflect, replicate, circular commute with a per-channel affine).

    Preconditions: shapes in node.meta.

    Declines: a zero-padded conv after a non-zero shift (zero padding of a shifted input is not
    exact: the border would see t instead of 0); the affine output has other users. (A
    BatchNorm1d whose channels are not the linear's features is not an affine of them: no match.)

    Stats: bn_conv, affine_conv, bn_linear, affine_linear.
    """

    name = "fold_bn_before_conv"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        stats: Counter = Counter()
        worklist = list(gm.graph.nodes)
        while worklist:
            node = worklist.pop(0)
            key = ir.op_key(node, gm)
            if key not in ("conv1d", "conv2d", "conv3d", "linear") or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            producer = node.args[0]
            channel_dim = -1 if key == "linear" else 1
            found = channel_affine(gm, producer, channel_dim)
            if found is None:
                continue
            source, affine, kind = found
            rule = ("bn_" if kind == "batch_norm" else "affine_") + ("linear" if key == "linear" else "conv")
            folded = self._fold(gm, node, producer, source, affine)
            if isinstance(folded, str):
                ctx.decline(rule, node, folded)
            else:
                stats[rule] += 1
                # a chain of affine steps (x * s + t, BN after a scale) folds one step at a time:
                # look at the folded conv again, so that one run folds the whole chain (fuzzer
                # found: a second run still folded 'mul' after 'add' had been folded)
                worklist.insert(0, folded)
        if stats:
            gm.delete_all_unused_submodules()
        return stats

    @staticmethod
    def _fold(gm, node, producer, source, affine) -> str | fx.Node:
        found = as_module(gm, node)
        if isinstance(found, str):
            return found
        layer, _ = found
        if len(producer.users) != 1:
            return f"'{producer.name}' output is also used by others"
        if isinstance(layer, nn.Linear):
            groups = 1  # (channel_affine only matched a BatchNorm whose channels are the features)
        else:
            padded = any(p != 0 for p in layer.padding) if not isinstance(layer.padding, str) else layer.padding != "valid"
            if padded and layer.padding_mode == "zeros" and bool(affine.shift.any()):
                return "the conv zero-pads a shifted input (the border would see the shift, not 0)"
            groups = layer.groups
        # conv(s ⊙ x + t) => conv(x; W ⊙ s, b + Σ W t)
        weight, bias = kernels.fold_affine_before(layer.weight, layer.bias, affine, groups)
        folded = replace_with_module(gm, node, with_weights(layer, weight, bias), source, module_name(node) + "_prescaled")
        gm.graph.erase_node(producer)
        return folded  # the reason it declines (a str) or the folded conv
