"""fold_affine: constant per-channel scale/shift folded into the conv or linear before it;
linear∘linear merged."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxopt import ir, kernels
from fxopt.pass_manager import Pass, PassContext, register
from fxopt.passes.affine import as_module, channel_affine, module_name, replace_with_module, with_weights

_AFFINE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@register
@dataclass
class FoldAffine(Pass):
    """Fold constant per-channel scales and shifts into the conv or linear before them; merge
    consecutive linears.

    Algebra:
      scale_shift:   s ⊙ (W x + b) + t  =>  (s ⊙ W) x + (s ⊙ b + t)    for x*c, x+c, x−c, c−x, x/c
                     with c a scalar or a constant varying only along the channel dim
      linear_linear: W2 (W1 x + b1) + b2  =>  (W2 W1) x + (W2 b1 + b2)
    Computed in float64, stored in the weights' dtype.

    Preconditions: shapes in node.meta.

    Declines: the conv/linear output has other users; linear∘linear where the merged weight
    costs more multiply-adds than the two factors (a low-rank bottleneck).

    Stats: scale_shift, linear_linear.
    """

    name = "fold_affine"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        stats: Counter = Counter()
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph:
                continue
            key = ir.op_key(node, gm)
            if key == "linear" and self._linear_linear(gm, node, ctx):
                stats["linear_linear"] += 1
            elif key in ("mul", "add", "sub", "div") and self._scale_shift(gm, node, ctx):
                stats["scale_shift"] += 1
        if stats:
            gm.delete_all_unused_submodules()
        return stats

    @staticmethod
    def _scale_shift(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> bool:
        producer_key = None
        for operand in node.args:
            if isinstance(operand, fx.Node):
                producer_key = ir.op_key(operand, gm)
        channel_dim = -1 if producer_key == "linear" else 1
        found = channel_affine(gm, node, channel_dim)
        if found is None or found[2] == "batch_norm":
            return False
        producer, affine, _ = found
        if ir.op_key(producer, gm) not in ("conv1d", "conv2d", "conv3d", "linear"):
            return False
        module = as_module(gm, producer)
        if isinstance(module, str) or not isinstance(module[0], _AFFINE_MODULES):
            return False
        if len(producer.users) != 1:
            ctx.decline("scale_shift", node, f"'{producer.name}' output is also used elsewhere")
            return False
        layer, source = module
        # s ⊙ (W x + b) + t  =>  (s ⊙ W) x + (s ⊙ b + t)
        weight, bias = kernels.fold_affine_after(layer.weight, layer.bias, affine)
        replace_with_module(gm, node, with_weights(layer, weight, bias), source, module_name(producer) + "_scaled")
        gm.graph.erase_node(producer)
        return True

    @staticmethod
    def _linear_linear(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> bool:
        outer = as_module(gm, node)
        if isinstance(outer, str) or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        producer = node.args[0]
        if ir.op_key(producer, gm) != "linear":
            return False
        inner = as_module(gm, producer)
        if isinstance(inner, str):
            return False
        (second, _), (first, source) = outer, inner
        if len(producer.users) != 1:
            ctx.decline("linear_linear", node, f"'{producer.name}' output is also used elsewhere")
            return False
        rank, n_in, n_out = first.out_features, first.in_features, second.out_features
        if n_out * n_in > rank * (n_in + n_out):
            ctx.decline("linear_linear", node, f"merged {n_in}->{n_out} weight costs more than the rank-{rank} pair")
            return False
        # W2 (W1 x + b1) + b2  =>  (W2 W1) x + (W2 b1 + b2)
        w1, w2 = first.weight.detach().double(), second.weight.detach().double()
        b1 = first.bias.detach().double() if first.bias is not None else torch.zeros(rank, dtype=torch.float64)
        b2 = second.bias.detach().double() if second.bias is not None else torch.zeros(n_out, dtype=torch.float64)
        merged = nn.Linear(n_in, n_out, dtype=first.weight.dtype)
        merged.weight = nn.Parameter((w2 @ w1).to(first.weight.dtype))
        merged.bias = nn.Parameter((w2 @ b1 + b2).to(first.weight.dtype))
        replace_with_module(gm, node, merged, source, module_name(node) + "_merged")
        gm.graph.erase_node(producer)
        return True
