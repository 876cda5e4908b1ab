"""canonicalize: one spelling per op."""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx

from fxopt import ir
from fxopt.pass_manager import Pass, PassContext, PreconditionError, register

# Ops whose result may share storage with their first input: mutating one mutates the other.
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                   torch.transpose, torch.permute, torch.narrow, torch.select, torch.chunk, torch.split,
                   torch.unbind, torch.t, torch.detach, torch.movedim, torch.swapaxes, torch.as_strided}
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
                 "transpose", "permute", "t", "narrow", "select", "expand", "expand_as", "chunk", "split",
                 "unbind", "as_strided", "diagonal", "detach", "contiguous", "unfold", "swapaxes", "movedim",
                 "__getitem__"}


def _may_alias(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_module":
        return ir.op_key(node, gm) in ("flatten", "identity", "dropout")
    return False


@register
@dataclass
class Canonicalize(Pass):
    """Rewrite every spelling of an op to one canonical form, so later passes match one pattern.

    Algebra (each rule is an identity of programs):
      drop_noop:      identity(x), dropout_eval(x)                 =>  x
      functionalize:  y = op_(x); later uses of x                  =>  y = op(x); later uses read y
      respell:        nn.ReLU()(x), torch.relu(x), x.relu(), ...   =>  F.relu(x)   (one target per op key)
                      x + y, torch.add(x, y), x.add_(y), x += y    =>  operator.add(x, y)
      to_module:      F.conv2d(x, W, b, ...) with W, b constants   =>  nn.Conv2d module call (same for
                      F.linear and F.batch_norm with running statistics)

    Preconditions: the model is in eval mode (no BatchNorm or Dropout module is training).

    Declines: an in-place op on a tensor that may alias another (a view, a parameter, or a tensor
    that has views), where dropping the mutation would change results; a functional conv/linear
    whose weights are computed in the graph; F.batch_norm with training=True. Declined nodes are
    kept exactly as they were.

    Stats: drop_noop, functionalize, respell, to_module.
    """

    name = "canonicalize"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        training = ir.training_submodules(gm)
        if training:
            raise PreconditionError(
                f"the model is in training mode (e.g. submodule '{training[0]}'): call model.eval() before optimizing"
            )

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        stats: Counter = Counter()
        graph = gm.graph
        for node in list(graph.nodes):
            form = ir.classify(node, gm)
            if form is not None and form.key in ("identity", "dropout") and form.args:
                # x = identity(x) => x
                node.replace_all_uses_with(form.args[0])
                graph.erase_node(node)
                stats["drop_noop"] += 1
        for node in list(graph.nodes):
            form = ir.classify(node, gm)
            if form is None or form.is_canonical:
                continue
            if form.inplace:
                reason = self._functionalize(gm, node)
                if reason:
                    ctx.decline("functionalize", node, reason)
                    continue
                stats["functionalize"] += 1
            if form.key in ir.PARAMETRIC_KEYS:
                converted = ir.module_for_function(gm, node)
                if isinstance(converted, str):
                    ctx.decline("to_module", node, converted)
                    continue
                module, source = converted
                # F.conv2d(x, W, b) => conv_module(x)
                name = ir.add_module(gm, node.name, module)
                with graph.inserting_before(node):
                    replacement = graph.call_module(name, (source,))
                stats["to_module"] += 1
            else:
                # any spelling => canonical(x, **options)
                with graph.inserting_before(node):
                    replacement = graph.call_function(form.canonical, form.args, form.kwargs)
                stats["respell"] += 1
            replacement.meta = dict(node.meta)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
        if stats["drop_noop"] or stats["to_module"] or stats["respell"]:
            gm.delete_all_unused_submodules()
        return stats

    @staticmethod
    def _functionalize(gm: fx.GraphModule, node: fx.Node) -> str | None:
        """Make the mutation explicit: uses of the mutated tensor after ``node`` read its result."""
        mutated = node.args[0] if node.args else None
        if not isinstance(mutated, fx.Node):
            return "in-place op without a tensor input"
        if mutated.op == "get_attr":
            return f"mutates parameter or buffer '{mutated.target}'"
        if _may_alias(mutated, gm):
            return f"mutates '{mutated.name}', which may be a view of another tensor"
        if any(_may_alias(user, gm) for user in mutated.users if user is not node):
            return f"mutates '{mutated.name}', which has views elsewhere in the graph"
        later, cursor = set(), node.next
        while cursor.op != "root":
            later.add(cursor)
            cursor = cursor.next
        for user in list(mutated.users):
            if user in later:
                user.replace_input_with(mutated, node)
        return None
