"""fold_channel_permutation: a static channel gather (a channel shuffle, an index) folded into
the conv that produces its input or the convs that read its output."""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxopt import ir
from fxopt.pass_manager import Pass, PassContext, register
from fxopt.passes.affine import module_name, with_weights

# Data movement ops a gather chain may be made of (the probe below checks what they do).
_MOVEMENT_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "chunk",
                     "split", "narrow", "index_select", "__getitem__"}
_MOVEMENT_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten, torch.permute, torch.transpose, torch.chunk,
                       torch.split, torch.narrow, torch.index_select, operator.getitem}


def _is_movement(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_method":
        return node.target in _MOVEMENT_METHODS
    if node.op == "call_function":
        return node.target in _MOVEMENT_FUNCTIONS
    return node.op == "call_module" and ir.op_key(node, gm) == "flatten"


def _chain(end: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, list[fx.Node]] | None:
    """(source, ops from the source to ``end``) for the longest run of movement ops ending at
    ``end`` whose other tensor inputs are constants; None when ``end`` is not a movement op."""
    ops, current = [], end
    while _is_movement(current, gm):
        tensors = [n for n in current.all_input_nodes if n.op != "get_attr" and not ir.has_static_value(n)]
        if len(tensors) != 1:
            break
        ops.append(current)
        current = tensors[0]
    return (current, ops[::-1]) if ops else None


def _probe(source: fx.Node, ops: list[fx.Node], gm: fx.GraphModule) -> torch.Tensor | None:
    """Run the ops on a tensor whose every element holds its own flat index: the result says
    where each output element came from. Returns the channel index map when the chain is a
    pure channel gather (out[n, c, ...] = in[n, index[c], ...]), else None."""
    source_shape = ir.shape_of(source)
    numel = 1
    for size in source_shape:
        numel *= size
    probe = torch.arange(numel, dtype=torch.int64).reshape(source_shape)
    values: dict[fx.Node, object] = {}

    def load(n: fx.Node):
        if n in values:
            return values[n]
        if n.op == "get_attr":
            return ir.get_attr_value(gm, n.target)
        return probe if n is source else ir.static_value(n)

    try:
        for op in ops:
            values[op] = ir.run_node(gm, op, load)
    except Exception:  # noqa: BLE001 - an op the probe cannot replay: not a gather we know
        return None
    out = values[ops[-1]]
    if not isinstance(out, torch.Tensor) or out.dim() != len(source_shape) or out.dim() < 2:
        return None
    n, c = source_shape[0], source_shape[1]
    rest = tuple(source_shape[2:])
    if out.shape[0] != n or tuple(out.shape[2:]) != rest:
        return None
    inner = numel // (n * c)
    batch, channel, position = out // (c * inner), (out // inner) % c, out % inner
    expected_batch = torch.arange(n).reshape((n,) + (1,) * (out.dim() - 1))
    expected_position = torch.arange(inner).reshape((1, 1) + rest) if rest else torch.zeros((1, 1), dtype=torch.int64)
    if not bool((batch == expected_batch).all()) or not bool((position == expected_position).all()):
        return None
    index = channel.reshape(n, out.shape[1], inner)[0, :, 0]
    if not bool((channel == index.reshape((1, -1) + (1,) * len(rest))).all()):
        return None
    return index


def _readers(node: fx.Node) -> list[fx.Node]:
    """Users that read the values, not only the shape (``x.shape`` stays valid after a fold)."""
    return [user for user in node.users if not ir.has_static_value(user)]


def _conv_layer(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The groups=1 conv2d or linear module ``node`` calls on its one input, else None."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    module = gm.get_submodule(node.target)
    if type(module) is nn.Conv2d and module.groups == 1:
        return module
    if type(module) is nn.Linear:
        return module
    return None


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    form = ir.classify(node, gm)
    return form is not None and form.key in ir.ELEMENTWISE_ACTIVATIONS and not form.inplace and len(form.args) == 1


def _replace_layer(gm: fx.GraphModule, node: fx.Node, layer: nn.Module, weight: torch.Tensor,
                   bias: torch.Tensor | None, suffix: str) -> fx.Node:
    """Swap the module ``node`` calls for a copy of ``layer`` with new weights."""
    folded = with_weights(layer, weight.contiguous(), bias.contiguous() if bias is not None else None)
    node.target = ir.add_module(gm, module_name(node) + suffix, folded)
    return node


@register
@dataclass
class FoldChannelPermutation(Pass):
    """Fold a static channel gather (a channel shuffle, an index_select, a channel slice chain)
    into the conv or linear that produces its input, or into every conv/linear that reads it.

    Algebra (g = the gather: out[:, c] = in[:, g(c)]; found by replaying the movement ops on
    a tensor of element indices, so any reshape/transpose/permute/slice spelling is found):
      into_producer:   g(act(W x + b))    =>  act(W[g] x + b[g])           (act elementwise, or none)
      into_consumers:  W' g(y) + b'       =>  W'' y + b',  W''[:, j] = Σ_{c: g(c)=j} W'[:, c]
    into_producer covers selections and repeats; into_consumers needs every reader to be a
    groups=1 conv2d or linear, and g to use every input channel (else W'' has zero columns:
    more MACs than before).

    Preconditions: shapes in node.meta.

    Declines: the producer's output (or an activation between) is read elsewhere and a reader
    is not a foldable conv; a gather that drops channels, into consumers; grouped convs (a
    permutation would mix their groups).

    Stats: into_producer, into_consumers.
    """

    name = "fold_channel_permutation"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        stats: Counter = Counter()
        for end in list(gm.graph.nodes):
            if end.graph is not gm.graph:
                continue
            found = _chain(end, gm)
            if found is None or any(_is_movement(user, gm) for user in end.users):
                continue  # only the end of a chain is a gather's result
            source, ops = found
            shape = ir.shape_of(source)
            if shape is None or len(shape) < 2 or ir.shape_of(end) is None:
                continue
            index = _probe(source, ops, gm)
            if index is None or (torch.equal(index, torch.arange(shape[1])) and ir.shape_of(end) == shape):
                continue  # not a gather, or one that changes nothing (eliminate_noops' business)
            if self._into_producer(gm, source, ops, end, index):
                stats["into_producer"] += 1
            elif self._into_consumers(gm, source, end, index, ctx):
                stats["into_consumers"] += 1
        if stats:
            ir.eliminate_dead_code(gm)
            gm.delete_all_unused_submodules()
        return stats

    @staticmethod
    def _into_producer(gm: fx.GraphModule, source: fx.Node, ops: list[fx.Node], end: fx.Node,
                       index: torch.Tensor) -> bool:
        # walk up through elementwise ops read only by this chain
        between, producer = [], source
        while _elementwise(gm, producer) and len(_readers(producer)) == 1:
            between.append(producer)
            producer = producer.args[0]
        if any(len(_readers(n)) != 1 for n in [producer, source, *ops[:-1]]):
            return False  # another reader needs the channels in their old order
        layer = _conv_layer(gm, producer)
        if layer is None or (isinstance(layer, nn.Linear) and len(ir.shape_of(source)) != 2):
            return False
        # g(act(W x + b)) => act(W[g] x + b[g])
        weight = layer.weight.detach()[index]
        bias = layer.bias.detach()[index] if layer.bias is not None else None
        _replace_layer(gm, producer, layer, weight, bias, "_gathered")
        end.replace_all_uses_with(source)
        return True

    @staticmethod
    def _into_consumers(gm: fx.GraphModule, source: fx.Node, end: fx.Node, index: torch.Tensor,
                        ctx: PassContext) -> bool:
        readers = list(end.users)
        layers = [_conv_layer(gm, r) for r in readers]
        if not readers or any(layer is None for layer in layers):
            return False
        channels = ir.shape_of(source)[1]
        if len(torch.unique(index)) != channels:
            ctx.decline("into_consumers", end, f"the gather keeps {len(torch.unique(index))} of {channels} "
                                               "channels: folding it would add multiply-adds")
            return False
        if any(isinstance(layer, nn.Linear) for layer in layers) and len(ir.shape_of(source)) != 2:
            return False
        for reader, layer in zip(readers, layers):
            # W' g(y) => W'' y with W''[:, j] = Σ_{c: g(c)=j} W'[:, c]
            weight = layer.weight.detach()
            folded = torch.zeros((weight.shape[0], channels) + tuple(weight.shape[2:]), dtype=weight.dtype)
            folded.index_add_(1, index, weight)
            _replace_layer(gm, reader, layer, folded, layer.bias.detach() if layer.bias is not None else None,
                           "_ungathered")
            reader.args = (source,)
        return True
