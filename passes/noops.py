"""eliminate_noops: ops that return their input (or a cheaper spelling of the same value) go."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx

from fxopt import ir
from fxopt.pass_manager import Pass, PassContext, register

_RESHAPE_METHODS = {"view", "reshape"}
_PERMUTE_METHODS = {"permute", "transpose", "t"}


def _reshape_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input of a reshape-like node (view, reshape, flatten, unflatten), else None."""
    if node.op == "call_method" and node.target in _RESHAPE_METHODS | {"flatten", "unflatten"}:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_function" and node.target in (torch.reshape, torch.flatten, torch.unflatten):
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if ir.op_key(node, gm) == "flatten" and node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _is_reshape(node: fx.Node) -> bool:
    """A reshape whose target shape is its own argument: reshape(reshape(x, a), b) = reshape(x, b)."""
    return (node.op == "call_method" and node.target in _RESHAPE_METHODS) or \
        (node.op == "call_function" and node.target is torch.reshape)


def _permutation(node: fx.Node) -> tuple[fx.Node, tuple[int, ...]] | None:
    """(input, perm) when ``node`` permutes its input's dims: out.dim(i) = in.dim(perm[i])."""
    if node.op not in ("call_method", "call_function") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    name = node.target if node.op == "call_method" else {torch.permute: "permute", torch.transpose: "transpose",
                                                          torch.t: "t"}.get(node.target)
    source = node.args[0]
    shape = ir.shape_of(source)
    if name not in _PERMUTE_METHODS or shape is None or node.kwargs:
        return None
    rank = len(shape)
    if name == "t":
        return (source, (1, 0)) if rank == 2 else (source, tuple(range(rank)))
    if name == "transpose":
        if len(node.args) != 3:
            return None
        a, b = (d % rank for d in node.args[1:3])
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return source, tuple(perm)
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    if not all(isinstance(d, int) for d in dims) or len(dims) != rank:
        return None
    return source, tuple(d % rank for d in dims)


def _is_constant(gm: fx.GraphModule, arg, value: float, like: fx.Node) -> bool:
    """Whether ``arg`` is the scalar ``value`` (or a constant tensor of it) that broadcasting
    against ``like`` changes neither its shape nor its dtype."""
    if isinstance(arg, bool):
        return False
    if isinstance(arg, (int, float)):
        return arg == value
    tensor = ir.constant_value(gm, arg)
    meta = ir.tensor_meta(like)
    if tensor is None or meta is None or tensor.dtype != meta.dtype:
        return False
    try:
        if torch.broadcast_shapes(tensor.shape, meta.shape) != meta.shape:
            return False
    except RuntimeError:
        return False
    return bool((tensor == value).all())


@register
@dataclass
class EliminateNoops(Pass):
    """Remove ops that return their input unchanged, and collapse chains of reshapes and
    permutations into one op.

    Algebra (identities of values; shapes from node.meta):
      contiguous:       x.contiguous()                             =>  x   (a view reading it: reshape)
      reshape_noop:     reshape/view/flatten(x) with out shape = in shape  =>  x
      reshape_chain:    reshape(reshape(x, a), b)  (inner used once) =>  reshape(x, b)
      permute_cancel:   permute(permute(x, p), q) with p∘q = id      =>  x   (transpose, t too)
      permute_chain:    permute(permute(x, p), q)  (inner used once) =>  permute(x, p∘q)
      mul_one:          x*1, 1*x, x/1                              =>  x
      add_zero:         x+0, 0+x, x−0 (Python's sum([x]) is 0+x)     =>  x
      cat_single:       cat([x], d)                                =>  x
      stack_reduce:     stack([x], d).sum(d) / .mean(d)            =>  x
    A constant 1 or 0 may be a tensor, when broadcasting it leaves x's shape and dtype.

    Preconditions: shapes in node.meta.

    Declines: the removed op's result (or its input) is mutated in place by a later op, since
    the removal would make the two share storage.

    Stats: the rule names above.
    """

    name = "eliminate_noops"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        stats: Counter = Counter()
        worklist = list(gm.graph.nodes)[::-1]
        while worklist:
            node = worklist.pop()
            if node.graph is not gm.graph or node.op not in ("call_function", "call_method", "call_module"):
                continue
            found = self._match(node, gm)
            if found is None:
                continue
            rule, replacement = found
            if isinstance(replacement, fx.Node) and (ir.mutated_in_place(node, gm) or ir.mutated_in_place(replacement, gm)):
                ctx.decline(rule, node, f"'{node.name}' or its input is mutated in place later")
                continue
            if isinstance(replacement, tuple):  # (function, args): one op in place of two
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(*replacement)
                new.meta = dict(node.meta)
                replacement = new
                worklist.append(new)  # the merged op may itself be a no-op
            if rule == "contiguous":
                # x.contiguous().view(s) = x.reshape(s): view alone fails on a non-contiguous x
                for user in node.users:
                    if user.op == "call_method" and user.target == "view":
                        user.target = "reshape"
            node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
            stats[rule] += 1
        if stats:
            ir.eliminate_dead_code(gm)
            gm.delete_all_unused_submodules()
        return stats

    @staticmethod
    def _match(node: fx.Node, gm: fx.GraphModule):
        """(rule, replacement node) or (rule, (target, args)) for an in-place respelling."""
        if node.op == "call_method" and node.target == "contiguous" and not node.kwargs and len(node.args) == 1:
            return "contiguous", node.args[0]
        source = _reshape_input(node, gm)
        if source is not None:
            shape, before = ir.shape_of(node), ir.shape_of(source)
            if shape is not None and shape == before:
                return "reshape_noop", source
            inner = _reshape_input(source, gm)
            if _is_reshape(node) and not node.kwargs and inner is not None and len(source.users) == 1:
                # reshape(reshape(x, a), b) => reshape(x, b)
                shape_args = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
                    else node.args[1:]
                return "reshape_chain", (torch.reshape, (inner, tuple(shape_args)))
            return None
        outer = _permutation(node)
        if outer is not None:
            source, q = outer
            if q == tuple(range(len(q))):
                return "permute_cancel", source
            inner = _permutation(source)
            if inner is not None:
                x, p = inner
                composed = tuple(p[i] for i in q)
                if composed == tuple(range(len(q))):
                    return "permute_cancel", x
                if len(source.users) == 1:
                    return "permute_chain", (torch.permute, (x, composed))
            return None
        key = ir.op_key(node, gm)
        if key in ("mul", "div", "add", "sub") and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            identity = {"mul": 1.0, "div": 1.0, "add": 0.0, "sub": 0.0}[key]
            commutes = key in ("mul", "add")
            for x, c in ((a, b), (b, a)) if commutes else ((a, b),):
                if isinstance(x, fx.Node) and ir.shape_of(x) == ir.shape_of(node) \
                        and ir.tensor_meta(x) is not None and ir.tensor_meta(x).dtype == ir.tensor_meta(node).dtype \
                        and _is_constant(gm, c, identity, x):
                    return ("mul_one" if key in ("mul", "div") else "add_zero"), x
            return None
        if key == "cat":
            tensors = node.args[0] if node.args else node.kwargs.get("tensors")
            if isinstance(tensors, (tuple, list)) and len(tensors) == 1 and isinstance(tensors[0], fx.Node):
                return "cat_single", tensors[0]
            return None
        if node.op == "call_method" and node.target in ("sum", "mean") or \
                node.op == "call_function" and node.target in (torch.sum, torch.mean):
            return _stack_reduce(node)
        return None


def _stack_reduce(node: fx.Node):
    """stack([x], d).sum(d) => x."""
    stacked = node.args[0] if node.args else None
    if not isinstance(stacked, fx.Node) or stacked.op != "call_function" or stacked.target is not torch.stack:
        return None
    tensors = stacked.args[0]
    stack_dim = stacked.args[1] if len(stacked.args) > 1 else stacked.kwargs.get("dim", 0)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not isinstance(tensors, (tuple, list)) or len(tensors) != 1 or not isinstance(tensors[0], fx.Node):
        return None
    if node.kwargs.get("keepdim", False) or (len(node.args) > 2 and node.args[2]) or node.kwargs.get("dtype"):
        return None
    shape = ir.shape_of(stacked)
    if shape is None or not isinstance(dim, int) or not isinstance(stack_dim, int):
        return None
    if dim % len(shape) != stack_dim % len(shape):
        return None
    return "stack_reduce", tensors[0]

