"""fold_constant_subgraphs: what depends only on parameters and buffers is computed once."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx

from fxopt import ir
from fxopt.pass_manager import Pass, PassContext, register

# Ops whose result changes from run to run: never constants, even with constant inputs.
_RANDOM_FUNCTIONS = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like,
                     torch.randint_like, torch.bernoulli, torch.normal, torch.poisson, torch.multinomial,
                     torch.nn.functional.dropout, torch.nn.functional.dropout2d, torch.nn.functional.alpha_dropout}
_RANDOM_METHODS = {"random_", "uniform_", "normal_", "bernoulli_", "exponential_", "geometric_", "cauchy_",
                   "log_normal_", "bernoulli", "multinomial"}


def _inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _written(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node``'s storage is written in place at run time: by a user, or through a view
    of it. isqrtcovresnet18 (captured by torch.export) fills ``y = torch.zeros(...)`` with
    ``y[:, i] = ...``: select(zeros) -> aten.copy_; folding zeros or the select as constants
    dropped every write (outputs 100% wrong)."""
    from fxopt.passes.canonicalize import _may_alias  # the view ops canonicalize's alias checks know

    return ir.mutated_in_place(node, gm) or any(
        user.args and user.args[0] is node and _may_alias(user, gm) and _written(user, gm) for user in node.users)


@register
@dataclass
class FoldConstantSubgraphs(Pass):
    """Compute once, at compile time, every subgraph whose inputs are only parameters,
    buffers and Python constants, and read its result as a buffer.

    Algebra: f(c1, ..., cn) with every ci a constant  =>  the constant f(c1, ..., cn)
    (evaluated in PyTorch in eval mode, the result stored in the dtype it has). Typical sources:
    weights reparameterized in forward() (weight standardization, w.sigmoid() gates, masks,
    `scale.exp()`), constant tensors built in forward (torch.ones, arange), reshapes of
    parameters. What the subgraph feeds then sees a constant, which the folds can absorb.

    Preconditions: none.

    Declines: random or impure ops (never constants); results that are not tensors; a result
    over `max_bytes` that is larger than the constants it is made of (an expand or a repeat
    materialized: cheaper to compute at run time). Folded results are buffers, not
    parameters: fine-tuning afterwards trains the folded model's convs, not the folded
    constants.

    Stats: constant_subgraph (results read as buffers), constant_ops (ops removed with them).
    """

    name = "fold_constant_subgraphs"
    max_bytes: int = 1 << 20

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        stats: Counter = Counter()
        values: dict[fx.Node, object] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                values[node] = ir.get_attr_value(gm, node.target)
            elif node.op in ("call_function", "call_method", "call_module") and self._foldable(node, gm, values):
                try:
                    with torch.no_grad():
                        values[node] = ir.run_node(gm, node, values.__getitem__)
                except Exception as exc:  # noqa: BLE001 - the op's own error: leave it to run time
                    ctx.decline("constant_subgraph", node, f"evaluating it failed: {type(exc).__name__}: {exc}")
        frontier = [node for node in values if node.op != "get_attr"
                    and any(user not in values for user in node.users)]
        nodes_before = len(gm.graph.nodes)
        for node in frontier:
            value = values[node]
            if not isinstance(value, torch.Tensor):
                continue  # a shape or a Python number: the ops that read it fold with it
            leaves = self._leaf_bytes(node, values)
            size = value.numel() * value.element_size()
            if size > self.max_bytes and size > leaves:
                ctx.decline("constant_subgraph", node,
                            f"would store {size} bytes made from {leaves} bytes of constants")
                continue
            name = ir.add_buffer(gm, f"folded_{node.name}", value.detach().clone())
            with gm.graph.inserting_before(node):
                constant = gm.graph.get_attr(name)
            constant.meta = dict(node.meta)
            # a later frontier node that read this one now reads the buffer: _leaf_bytes walks
            # into it (isqrtcovresnet18: a repeat used at run time and by a constant bmm)
            values[constant] = value
            node.replace_all_uses_with(constant)
            stats["constant_subgraph"] += 1
        if stats:
            ir.eliminate_dead_code(gm)
            ir.delete_unused_attributes(gm, [n.target for n in values if n.op == "get_attr"])
            gm.delete_all_unused_submodules()
            # each folded result added one get_attr; the rest is what went
            stats["constant_ops"] = nodes_before + stats["constant_subgraph"] - len(gm.graph.nodes)
        return stats

    @staticmethod
    def _foldable(node: fx.Node, gm: fx.GraphModule, values: dict) -> bool:
        if any(arg not in values for arg in _inputs(node)) or node.is_impure() or _written(node, gm):
            return False
        if node.op == "call_function" and node.target in _RANDOM_FUNCTIONS:
            return False
        if node.op == "call_method" and (node.target in _RANDOM_METHODS or node.target.endswith("_")):
            return False
        if node.op == "call_module":
            # stateless or parametric ops fxopt knows; a custom module may keep state
            return ir.op_key(node, gm) is not None and ir.op_key(node, gm) != "dropout"
        form = ir.classify(node, gm)
        return form is None or not form.inplace

    @staticmethod
    def _leaf_bytes(node: fx.Node, values: dict) -> int:
        seen, stack, total = set(), [node], 0
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current.op == "get_attr":
                value = values[current]
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
            stack.extend(_inputs(current))
        return total
