"""Channel dependency groups: which channels of which layers can only be removed together.

An analysis (not a pass) shared by ``lower_zero_channels`` and ``fxopt.prune``. Every tensor of
rank >= 2 has its channels on dim 1 (NC..., or the features of a 2-D (N, F) tensor); each channel
is an element of a graph whose edges couple channels, and its connected components are the units
below. One handler per op kind says how the channels of its output relate to those of its inputs:

  conv (groups=1), linear   a *producer*: fresh output channels; its input channels are consumed
                            (a column of its weight each), they couple nothing
  grouped conv              per group: the group's input and output channels are coupled
                            (depthwise: input c = output c; a multiplier m couples c with m outputs)
  batch_norm, activations,  output channel c is input channel c
  dropout, pools, mean over spatial dims
  add, sub, mul, div        the operands' channel c and the output's channel c are coupled (residual
                            adds, SE gates); a constant operand must be a scalar or per channel
  cat on dim 1              output channels are the inputs' channels at their offsets
  flatten / view / reshape  (N, C, *S) -> (N, C·m, ...): output features c·m .. c·m+m−1 are channel
                            c (flatten→linear: a block of H·W features per channel)

A *unit* is a class of coupled channels: it is removed whole or not at all. A *group* is the set
of units that touch the same tensors (the hidden channels of an inverted residual block; the
channels of a residual stage, coupled through its adds). A unit is *blocked*, with a reason, when
it reaches a graph input or output, an op without a handler (a custom layer, a channel slice, a
softmax), a module called from several places, or an op that broadcasts one channel over all:
a blocked unit is kept, never removed into a wrong model.

``constants`` answers what a removed unit leaves behind: when every producer of a unit computes
zero weights, each of its channels is one value everywhere (the producer's bias, carried through
the BNs and activations after it); a consumer can take that value into its bias, exactly unless
it zero-pads (the border would see 0, not the value).
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import fx, nn

from fxopt import ir
from fxopt.passes.affine import per_channel_constant

CONVS = frozenset({"conv1d", "conv2d", "conv3d"})
ELEMENTWISE = ir.ELEMENTWISE_ACTIVATIONS | {"identity", "dropout"}
BINARY = frozenset({"add", "sub", "mul", "div"})
POOLS = frozenset({"max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d",
                   "adaptive_avg_pool2d", "adaptive_max_pool2d"})
PRODUCERS = frozenset({"conv", "grouped_conv", "linear"})  # kinds whose output channels have weights


@dataclass
class Unit:
    """Channels that are removed together: ``channels[node]`` are its indices on dim 1 of
    ``node``'s output. ``reason`` says why it must stay ("" when it may go)."""

    root: int
    channels: dict[fx.Node, list[int]] = field(default_factory=dict)
    reason: str = ""

    @property
    def removable(self) -> bool:
        return not self.reason


@dataclass
class Group:
    """Units that touch the same tensors; ``producers`` are the layers whose rows they own."""

    units: list[Unit]
    nodes: tuple[fx.Node, ...]
    producers: list[fx.Node]


class ChannelGroups:
    """The channel dependency analysis of a GraphModule with shapes in node.meta (see the module
    docstring). ``kind[node]`` says which handler took a node; ``roots[node]`` the unit of each of
    its channels."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._next = 0
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []  # pairs of coupled channel elements
        self._blocks: list[tuple[np.ndarray, str]] = []
        self.ids: dict[fx.Node, np.ndarray] = {}
        self.kind: dict[fx.Node, str] = {}
        self.repeat: dict[fx.Node, int] = {}  # reshape nodes: features per input channel
        self._uses = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self._read = [n.target for n in gm.graph.nodes if n.op == "get_attr"]  # (a module's weight read directly)
        for node in gm.graph.nodes:
            self._handle(node)
        label = _components(self._next, self._edges)
        self.roots = {node: label[ids] for node, ids in self.ids.items()}
        self.reasons: dict[int, str] = {}  # root -> why its unit must stay
        for elements, reason in self._blocks:
            for root in np.unique(label[elements]).tolist():
                self.reasons.setdefault(root, reason)
        self._units: dict[int, Unit] | None = None
        self._groups: list[Group] | None = None

    @property
    def by_root(self) -> dict[int, Unit]:
        """Every unit by its root (built on first use: a graph without zero channels needs none)."""
        if self._units is None:
            units: dict[int, Unit] = {}
            for node, roots in self.roots.items():
                for index, root in enumerate(roots.tolist()):
                    unit = units.get(root)
                    if unit is None:
                        unit = units[root] = Unit(root, reason=self.reasons.get(root, ""))
                    unit.channels.setdefault(node, []).append(index)
            self._units = units
        return self._units

    @property
    def units(self) -> list[Unit]:
        return list(self.by_root.values())

    @property
    def groups(self) -> list[Group]:
        """Units grouped by the tensors they touch, in graph order of their first channel."""
        if self._groups is None:
            by_nodes: dict[tuple, list[Unit]] = {}
            for unit in self.by_root.values():
                by_nodes.setdefault(tuple(unit.channels), []).append(unit)
            self._groups = [Group(members, nodes, [n for n in nodes if self.kind.get(n) in PRODUCERS])
                            for nodes, members in by_nodes.items()]
        return self._groups

    # -- queries

    def unit(self, node: fx.Node, channel: int) -> Unit:
        return self.by_root[int(self.roots[node][channel])]

    def producers(self, unit: Unit) -> list[tuple[fx.Node, list[int]]]:
        """(layer node, its output channels in the unit) for each conv/linear that computes it."""
        return [(node, index) for node, index in unit.channels.items() if self.kind.get(node) in PRODUCERS]

    def removed(self, node: fx.Node, roots: set[int] | np.ndarray) -> np.ndarray:
        """A boolean mask over ``node``'s channels: True where the channel's unit is in ``roots``."""
        if not isinstance(roots, np.ndarray):
            roots = np.fromiter(roots, dtype=np.int64, count=len(roots))
        return np.isin(self.roots[node], roots)

    def keep_some(self, roots: set[int]) -> dict[int, str]:
        """Units of ``roots`` to keep so that no tensor loses every channel (a conv with no output
        channels cannot be built): {root: reason}."""
        roots, kept = set(roots), {}
        changed = True
        while changed and roots:
            changed = False
            wanted = np.fromiter(roots, dtype=np.int64, count=len(roots))
            for node, node_roots in self.roots.items():
                if len(node_roots) and self.removed(node, wanted).all():
                    root = int(node_roots[0])
                    kept[root] = f"removing it would leave '{node.name}' without channels"
                    roots.discard(root)
                    changed = True
                    break
        return kept

    # -- building

    def _fresh(self, count: int) -> np.ndarray:
        ids = np.arange(self._next, self._next + count, dtype=np.int64)
        self._next += count
        return ids

    def _union(self, *arrays: np.ndarray) -> None:
        """Couple element i of every array with element i of the first."""
        for other in arrays[1:]:
            self._edges.append((arrays[0], other))

    def _block(self, elements: np.ndarray, reason: str) -> None:
        self._blocks.append((elements, reason))

    def _channels(self, node: fx.Node) -> int | None:
        shape = ir.shape_of(node)
        return int(shape[1]) if shape is not None and len(shape) >= 2 else None

    def _tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), found.append)
        return [n for n in found if n in self.ids]

    def _handle(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            channels = self._channels(node)
            if channels is not None:
                self.ids[node] = self._fresh(channels)
                self._block(self.ids[node], f"it reaches the graph input '{node.name}'")
            return
        if node.op == "get_attr":
            return  # constants: read by the handler of the op that uses them
        if node.op == "output":
            for arg in self._tensor_inputs(node):
                self._block(self.ids[arg], f"it reaches the graph output (through '{arg.name}')")
            return
        key = ir.op_key(node, self.gm)
        handler = _HANDLERS.get(key)
        if handler is None and node.op == "call_method" and node.target in ("view", "reshape"):
            handler = ChannelGroups._reshape
        if handler is None and node.op == "call_function" and node.target is torch.reshape:
            handler = ChannelGroups._reshape
        if handler is None and ((node.op == "call_method" and node.target == "size")
                                or (node.op == "call_function" and node.target is getattr)):
            handler = ChannelGroups._size
        try:
            reason = handler(self, node, key) if handler is not None else None
        except Exception as exc:  # a node this analysis does not understand: its channels stay
            reason = f"'{node.name}' could not be analysed ({type(exc).__name__}: {exc})"
        if handler is None or reason:
            self._unknown(node, reason or f"'{node.name}' ({_describe(node, self.gm)}) has no channel handler")

    def _unknown(self, node: fx.Node, reason: str) -> None:
        """Block every channel the op reads and every channel it makes."""
        for arg in self._tensor_inputs(node):
            self._block(self.ids[arg], reason)
        channels = self._channels(node)
        if channels is not None:
            self.ids[node] = self._fresh(channels)
            self._block(self.ids[node], reason)

    def _module(self, node: fx.Node) -> nn.Module | str:
        if node.op != "call_module":
            return f"'{node.name}' is a functional {ir.op_key(node, self.gm)} (canonicalize makes it a module)"
        if len(node.args) != 1 or node.kwargs:
            return f"'{node.name}' is called with extra arguments"
        if self._uses[node.target] > 1:
            return f"module '{node.target}' is called from {self._uses[node.target]} places"
        read = next((t for t in self._read if t.startswith(node.target + ".")), None)
        if read is not None:
            return f"the graph also reads '{read}' of module '{node.target}' directly"
        if not isinstance(node.args[0], fx.Node) or node.args[0] not in self.ids:
            return f"the input of '{node.name}' has no channel dim"
        return self.gm.get_submodule(node.target)

    # Handlers return a reason when they cannot handle the node (it is then blocked whole).

    def _conv(self, node: fx.Node, key: str) -> str | None:
        conv = self._module(node)
        if isinstance(conv, str):
            return conv
        if self._channels(node) != conv.out_channels:
            return f"'{node.name}' has no shape in node.meta"
        source = self.ids[node.args[0]]
        out = self._fresh(conv.out_channels)
        if conv.groups > 1:
            per_in, per_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
            for g in range(conv.groups):
                members = np.concatenate([source[g * per_in:(g + 1) * per_in], out[g * per_out:(g + 1) * per_out]])
                self._edges.append((np.full(len(members) - 1, members[0]), members[1:]))
        self.ids[node] = out
        self.kind[node] = "grouped_conv" if conv.groups > 1 else "conv"
        return None

    def _linear(self, node: fx.Node, key: str) -> str | None:
        linear = self._module(node)
        if isinstance(linear, str):
            return linear
        shape = ir.shape_of(node.args[0])
        if len(shape) != 2 or self._channels(node) != linear.out_features:
            return f"'{node.name}' is a linear over the last dim of a {len(shape)}-D tensor (channels are dim 1)"
        self.ids[node] = self._fresh(linear.out_features)
        self.kind[node] = "linear"
        return None

    def _batch_norm(self, node: fx.Node, key: str) -> str | None:
        bn = self._module(node)
        if isinstance(bn, str):
            return bn
        if bn.training or not bn.track_running_stats or bn.running_mean is None:
            return f"BatchNorm '{node.name}' normalizes with batch statistics"
        self.ids[node] = self.ids[node.args[0]]
        self.kind[node] = "batch_norm"
        return None

    def _same_channels(self, node: fx.Node, kind: str) -> str | None:
        """Output channel c is channel c of the first argument (the other arguments are options)."""
        form = ir.classify(node, self.gm)
        args = list(form.args) + list(form.kwargs.values())
        if not args or not isinstance(args[0], fx.Node) or args[0] not in self.ids:
            return f"the input of '{node.name}' has no channel dim"
        if any(isinstance(a, fx.Node) for a in args[1:]) or self._channels(node) != len(self.ids[args[0]]):
            return f"'{node.name}' ({form.key}) does not keep its input's channels"
        self.ids[node] = self.ids[args[0]]
        self.kind[node] = kind
        return None

    def _elementwise(self, node: fx.Node, key: str) -> str | None:
        return self._same_channels(node, "elementwise")

    def _pool(self, node: fx.Node, key: str) -> str | None:
        return self._same_channels(node, "pool")

    def _mean(self, node: fx.Node, key: str) -> str | None:
        shape, source = ir.shape_of(node), ir.shape_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        form = ir.classify(node, self.gm)
        dims = form.args[1] if len(form.args) > 1 else form.kwargs.get("dim")
        if shape is None or source is None or dims is None:
            return f"'{node.name}' averages over every dim"
        dims = {d % len(source) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        if min(dims) < 2:
            return f"'{node.name}' averages over the batch or channel dim"
        return self._same_channels(node, "elementwise")

    def _binary(self, node: fx.Node, key: str) -> str | None:
        shape = ir.shape_of(node)
        if shape is None or len(shape) < 2:
            return f"'{node.name}' ({key}) has no channel dim"
        members = []
        for arg in node.args:
            if isinstance(arg, bool) or (not isinstance(arg, (int, float, fx.Node))):
                return f"'{node.name}' ({key}) has an operand of type {type(arg).__name__}"
            if not isinstance(arg, fx.Node):
                continue  # a Python scalar: the same for every channel
            if arg.op == "get_attr":
                if per_channel_constant(self.gm, arg, shape, 1) is None:
                    return f"'{node.name}' ({key}) reads a constant '{arg.target}' that is not per channel"
                continue
            arg_shape = ir.shape_of(arg)
            if arg not in self.ids or len(arg_shape) != len(shape) or arg_shape[1] != shape[1]:
                return f"'{node.name}' ({key}) broadcasts '{arg.name}' over the channels"
            members.append(self.ids[arg])
        if not members or node.kwargs:
            return f"'{node.name}' ({key}) has no tensor operand with channels"
        self._union(*members)
        self.ids[node] = members[0]
        self.kind[node] = "elementwise"
        return None

    def _cat(self, node: fx.Node, key: str) -> str | None:
        form = ir.classify(node, self.gm)
        tensors = form.args[0] if form.args else form.kwargs.get("tensors")
        dim = form.args[1] if len(form.args) > 1 else form.kwargs.get("dim", 0)
        shape = ir.shape_of(node)
        if shape is None or len(shape) < 2 or not isinstance(dim, int) or dim % len(shape) != 1:
            return f"'{node.name}' concatenates along another dim than the channels"
        if not all(isinstance(t, fx.Node) and t in self.ids for t in tensors):
            return f"'{node.name}' concatenates a tensor without channels (a constant?)"
        self.ids[node] = np.concatenate([self.ids[t] for t in tensors])
        self.kind[node] = "cat"
        return None

    def _reshape(self, node: fx.Node, key: str | None) -> str | None:
        """(N, C, *S) -> (N, C·m, ...) when output dim 1 merges input dims 1..j (row-major)."""
        source = node.args[0] if node.args else None
        shape = ir.shape_of(node)
        if not isinstance(source, fx.Node) or source not in self.ids or shape is None or len(shape) < 2:
            return f"'{node.name}' reshapes away the channel dim"
        before = ir.shape_of(source)
        if shape[0] != before[0]:
            return f"'{node.name}' reshapes the batch dim"
        merged = 1
        for d in range(1, len(before)):
            merged *= int(before[d])
            if merged >= shape[1]:
                break
        if merged != shape[1]:
            return f"'{node.name}' splits the channel dim ({tuple(before)} -> {tuple(shape)})"
        if key != "flatten":
            entry = _shape_entry(node)
            if entry is None or isinstance(entry, fx.Node):
                return f"'{node.name}' computes its target shape in the graph"
        m = int(shape[1]) // int(before[1])
        self.ids[node] = np.repeat(self.ids[source], m)
        self.repeat[node] = m
        self.kind[node] = "reshape"
        return None

    def _size(self, node: fx.Node, key: str | None) -> str | None:
        """x.size(d), x.size()[d], x.shape[d]: harmless when d is never the channel dim."""
        source = node.args[0] if node.args else None
        shape = ir.shape_of(source) if isinstance(source, fx.Node) else None
        if shape is None:
            return f"'{node.name}' reads the shape of a tensor without one in node.meta"
        if node.target is getattr and node.args[1:] != ("shape",):
            return f"'{node.name}' reads attribute {node.args[1:]!r} of '{source.name}'"
        dim = node.args[1] if node.target == "size" and len(node.args) > 1 else node.kwargs.get("dim")
        if dim is None:  # the whole shape: fine when only other dims are taken from it
            dims = [user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
                    for user in node.users]
        else:
            dims = [dim]
        if all(isinstance(d, int) and d % len(shape) != 1 for d in dims):
            self.kind[node] = "size"
            return None
        return f"'{node.name}' reads the channel count of '{source.name}'"

    # -- what a removed unit leaves behind

    def constants(self, roots: set[int], producer_value: Callable[[fx.Node], torch.Tensor]
                  ) -> tuple[dict[fx.Node, torch.Tensor], dict[int, str]]:
        """The value of each channel of ``roots``' units, assuming each of their producers computes
        zero weights: ``producer_value(node)`` is then its output per channel (float64, the bias).

        Returns ({node: float64 vector over its channels, meaningful where removed}, {root: reason}
        for the units that leave no constant an exact rewrite can use: a value that varies over
        space (an avg-pool counting zero padding), is not finite, or reaches a zero-padded conv).
        """
        values: dict[fx.Node, torch.Tensor] = {}
        failed: dict[int, str] = {}
        if not roots:
            return values, failed
        wanted = np.fromiter(roots, dtype=np.int64, count=len(roots))
        for node in self.gm.graph.nodes:
            if node not in self.roots:
                continue
            kind = self.kind.get(node)
            if kind in ("conv", "linear") and node.args[0] in self.roots:
                consumed = self.removed(node.args[0], wanted)
                if consumed.any():
                    self._check_consumer(node, consumed, values, failed)
            mask = self.removed(node, wanted)
            if not mask.any():
                continue
            try:
                value = self._value(node, kind, values, producer_value)
                if value.numel() != len(mask):
                    raise _NotConstant(f"'{node.name}' does not map a constant per channel to one per channel")
            except _NotConstant as exc:
                self._fail(node, mask, str(exc), failed)
                continue
            except Exception as exc:  # an op that rejects a constant input: its units stay
                self._fail(node, mask, f"'{node.name}' cannot be evaluated on a constant ({type(exc).__name__}: {exc})",
                           failed)
                continue
            finite = np.isfinite(value.numpy())
            self._fail(node, mask & ~finite, f"its value after '{node.name}' is not finite", failed)
            if kind == "pool" and not _pool_keeps_constants(node, self.gm):
                self._fail(node, mask & finite & (value.numpy() != 0),
                           f"the average pool '{node.name}' counts zero padding (a constant does not stay constant)",
                           failed)
            values[node] = value
        return values, failed

    def _fail(self, node: fx.Node, mask: np.ndarray, reason: str, failed: dict[int, str]) -> None:
        for root in self.roots[node][mask].tolist():
            failed.setdefault(root, reason)

    def _check_consumer(self, node, consumed, values, failed) -> None:
        """A removed input channel with value v adds Σ_taps W[:, c]·v to the bias: exact unless the
        conv zero-pads (at the border the padding shows 0, not v)."""
        layer = self.gm.get_submodule(node.target)
        source = node.args[0]
        if self.kind[node] == "linear" or not _zero_pads(layer) or source not in values:
            return  # (a source without values: its failure is recorded where they were computed)
        weight = layer.weight.detach()
        for c in np.flatnonzero(consumed).tolist():
            v = float(values[source][c])
            if v != 0 and bool(weight[:, c].any()):
                failed.setdefault(int(self.roots[source][c]),
                                  f"its constant value {v:.4g} reaches the zero-padded conv '{node.name}' (at the "
                                  "border the padding shows 0, not the value)")

    def _value(self, node: fx.Node, kind: str | None, values, producer_value) -> torch.Tensor:
        if kind in PRODUCERS:
            return producer_value(node).double()
        if kind == "cat":
            form = ir.classify(node, self.gm)
            tensors = form.args[0] if form.args else form.kwargs["tensors"]
            return torch.cat([values.get(t, torch.full((len(self.ids[t]),), math.nan, dtype=torch.float64))
                              for t in tensors])
        if kind == "reshape":
            return _input_value(values, node.args[0]).repeat_interleave(self.repeat[node])
        if kind == "pool":
            return _input_value(values, node.args[0])  # (avg pools that count padding: checked by the caller)
        if kind in ("elementwise", "batch_norm"):
            return _evaluate(self.gm, node, values)
        raise _NotConstant(f"'{node.name}' has no rule for constants")


def _components(count: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected components of ``count`` elements under ``edges``: each element's label is the
    least element of its component (hooking of roots and pointer jumping, vectorized: a graph
    has tens of thousands of channels, too many for a union-find in Python on every build)."""
    label = np.arange(count, dtype=np.int64)
    if not edges:
        return label
    a = np.concatenate([e[0] for e in edges])
    b = np.concatenate([e[1] for e in edges])
    while True:
        la, lb = label[a], label[b]
        if (la == lb).all():
            return label
        low = np.minimum(la, lb)
        np.minimum.at(label, la, low)  # la, lb are roots: hook the larger under the smaller
        np.minimum.at(label, lb, low)
        while True:  # point every element at its root
            jumped = label[label]
            if (jumped == label).all():
                break
            label = jumped


class _NotConstant(Exception):
    pass


_HANDLERS: dict[str | None, Callable] = {
    **{key: ChannelGroups._conv for key in CONVS},
    "linear": ChannelGroups._linear,
    "batch_norm": ChannelGroups._batch_norm,
    **{key: ChannelGroups._elementwise for key in ELEMENTWISE},
    **{key: ChannelGroups._binary for key in BINARY},
    **{key: ChannelGroups._pool for key in POOLS},
    "mean": ChannelGroups._mean,
    "cat": ChannelGroups._cat,
    "flatten": ChannelGroups._reshape,
}


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module {type(gm.get_submodule(node.target)).__qualname__}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__qualname__', node.target)}"
    return f"{node.op} {node.target}"


def _shape_entry(node: fx.Node):
    """The target-shape entry of a view/reshape that becomes output dim 1 (an int, -1, or a
    Node when computed), or None when the call cannot be read."""
    shape = node.kwargs.get("shape", node.kwargs.get("size"))
    if shape is None:
        rest = node.args[1:]
        shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    if not isinstance(shape, (tuple, list)) or len(shape) < 2:
        return None
    return shape[1]


def set_shape_entry(node: fx.Node, value: int) -> None:
    """Write ``value`` as the target-shape entry of output dim 1 of a view/reshape (when it is a
    literal: -1 and torch.flatten adapt by themselves)."""
    entry = _shape_entry(node)
    if not isinstance(entry, int) or entry == -1:
        return
    if "shape" in node.kwargs or "size" in node.kwargs:
        name = "shape" if "shape" in node.kwargs else "size"
        shape = list(node.kwargs[name])
        shape[1] = value
        node.kwargs = {**node.kwargs, name: type(node.kwargs[name])(shape)}
    elif len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        shape = list(node.args[1])
        shape[1] = value
        node.args = (node.args[0], type(node.args[1])(shape))
    else:
        args = list(node.args)
        args[2] = value
        node.args = tuple(args)


def _zero_pads(layer: nn.Module) -> bool:
    """Whether a conv pads its input with zeros somewhere."""
    if layer.padding_mode != "zeros":
        return False
    if isinstance(layer.padding, str):
        return layer.padding == "same" and any((k - 1) * d for k, d in zip(layer.kernel_size, layer.dilation))
    return any(p != 0 for p in layer.padding)


def _pool_keeps_constants(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Max pools and adaptive pools map a constant channel to the same constant; an average pool
    does too unless it counts zero padding or has partial windows (ceil_mode) or a divisor."""
    key = ir.op_key(node, gm)
    if not key.startswith("avg_pool"):
        return True
    form = ir.classify(node, gm)
    names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    named = dict(zip(names, form.args), **form.kwargs)
    padding = named.get("padding", 0)
    padded = any(padding) if isinstance(padding, (tuple, list)) else bool(padding)
    if named.get("ceil_mode") or named.get("divisor_override") is not None:
        return False
    return not padded or named.get("count_include_pad", True) is False


def _input_value(values: dict, source: fx.Node) -> torch.Tensor:
    if source not in values:
        raise _NotConstant(f"'{source.name}' has no constant value")
    return values[source]


def _evaluate(gm: fx.GraphModule, node: fx.Node, values: dict) -> torch.Tensor:
    """The op at ``node`` run on its inputs' constant values, one per channel, in the tensor's own
    dtype (as the model computes them), each input shaped (1, C, 1, ...)."""

    def substitute(arg: fx.Node):
        if arg in values:
            meta = ir.tensor_meta(arg)
            return values[arg].to(meta.dtype).reshape(1, -1, *([1] * (len(meta.shape) - 2))).clone()
        if arg.op == "get_attr":
            return ir.get_attr_value(gm, arg.target)
        raise _NotConstant(f"'{node.name}' reads '{arg.name}', which is not constant")

    args = fx.node.map_arg(node.args, substitute)
    kwargs = fx.node.map_arg(node.kwargs, substitute)
    with torch.no_grad():
        if node.op == "call_module":
            out = gm.get_submodule(node.target)(*args, **kwargs)
        elif node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    return out.reshape(-1).double()
