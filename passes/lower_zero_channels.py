"""lower_zero_channels and apply_prune_plan: channels whose weights are zero are removed
physically; a prune plan's channels are made zero first."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import fx, nn

from fxopt import ir
from fxopt.pass_manager import Pass, PassContext, PreconditionError, register
from fxopt.passes.affine import with_weights
from fxopt.passes.channel_groups import ChannelGroups, Unit, set_shape_entry


@register
@dataclass
class LowerZeroChannels(Pass):
    """Remove channels whose weights are all zero, with every layer entry that reads them.

    Algebra, for a unit U of coupled channels (passes/channel_groups.py) whose every producer
    (conv or linear computing one of U's channels) has zero weights there:
      producer:   y[c] = W[c]·x + b[c] = b[c] everywhere             =>  row c dropped
      per channel f (BN, activations, adds/muls of U's channels, pools, cat, flatten):
                  f(constant) is a constant                           =>  entry c dropped (BN
                  statistics, per-channel constants), computed in the tensor's dtype as the model does
      consumer:   conv(x; W, b) where x[c] = v everywhere             =>  conv(x without c; W[:, ≠c],
                  b + v·Σ_taps W[:, c])   (linear: b + v·W[:, c]; after flatten, over c's feature block)
      grouped conv: a whole group goes (groups − 1); depthwise: input c with output c.

    Preconditions: shapes in node.meta.

    Declines (the channels stay): a unit that reaches a graph input or output, an op without a
    channel handler (a custom layer, named in the reason), a module called from several places,
    an op that broadcasts one channel over all; a non-zero constant that reaches a zero-padded
    conv (the border would see 0, not the constant) or an average pool counting zero padding;
    removing it would leave a tensor without channels.

    Stats: channels_removed (units of coupled channels), layers_shrunk (convs, linears and
    BatchNorms narrowed), constants_folded (layers whose bias took in a removed constant).
    """

    name = "lower_zero_channels"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if any(node.op == "placeholder" and ir.tensor_meta(node) is None for node in gm.graph.nodes):
            raise PreconditionError("lower_zero_channels needs shapes in node.meta: run it with example inputs "
                                    "(fxopt.optimize does; or ir.propagate_shapes(gm, inputs) first)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        # Removing channels can zero a consumer's rows (those that read only removed channels),
        # which a second run would remove: repeat until a round removes nothing, keeping the last
        # round's declines (fuzzer found: not idempotent on conv chains with sparse weights).
        stats: Counter = Counter()
        first_decline = len(ctx.declines)
        while True:
            del ctx.declines[first_decline:]
            step = self._run_once(gm, ctx)
            stats.update(step)
            if not step.get("channels_removed") or not ctx.example_inputs:
                return stats
            ir.propagate_shapes(gm, ctx.example_inputs)

    def _run_once(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        groups = ChannelGroups(gm)
        zero_rows = _zero_rows(gm, groups)
        zero, partial = zero_units(groups, zero_rows)
        if not zero and not partial:
            return Counter()
        stay: dict[tuple[fx.Node, str], list[int]] = {}

        def keep(unit: Unit, reason: str) -> None:
            # reported at a producer that has zero weights there: that is what the user zeroed
            node, channels = next((n, c) for n, c in groups.producers(unit) if zero_rows[n][c].any())
            stay.setdefault((node, reason), []).extend(c for c in channels if zero_rows[node][c])

        for unit, live in partial:
            keep(unit, f"'{live.name}' computes them with non-zero weights (zero its rows there too)")
        candidates = set()
        for unit in zero:
            if unit.reason:
                keep(unit, unit.reason)
            else:
                candidates.add(unit.root)
        values, failed = groups.constants(candidates, lambda node: layer_bias(gm, node))
        failed.update(groups.keep_some(candidates - set(failed)))
        for root, reason in failed.items():
            keep(groups.by_root[root], reason)
            candidates.discard(root)
        for (node, reason), channels in stay.items():
            shown = ", ".join(map(str, channels[:8])) + (" ..." if len(channels) > 8 else "")
            ctx.decline("zero_channels", node, f"{len(channels)} zero channel(s) of '{node.name}' stay ({shown}): "
                                               f"{reason}")
        if not candidates:
            return Counter()
        return shrink(gm, groups, candidates, values)


def _zero_rows(gm: fx.GraphModule, groups: ChannelGroups) -> dict[fx.Node, np.ndarray]:
    """For each conv and linear: which of its output channels have all-zero weights."""
    found = {}
    for node, kind in groups.kind.items():
        if kind in ("conv", "grouped_conv", "linear"):
            weight = gm.get_submodule(node.target).weight.detach()
            found[node] = (weight.reshape(weight.shape[0], -1).abs().amax(1) == 0).numpy()  # (faster than eq().all())
    return found


def zero_units(groups: ChannelGroups, zero_rows: dict[fx.Node, np.ndarray]) -> tuple[list[Unit], list[tuple[Unit, fx.Node]]]:
    """(units whose every producer has zero weights there, [(unit, a producer with non-zero
    weights there)] for units that are zero in some producers only)."""
    if not zero_rows:
        return [], []
    live = np.concatenate([groups.roots[node][~zero] for node, zero in zero_rows.items()])
    dead = np.concatenate([groups.roots[node][zero] for node, zero in zero_rows.items()])
    zero = [groups.by_root[root] for root in np.setdiff1d(dead, live).tolist()]
    partial = []
    for root in np.intersect1d(dead, live).tolist():
        unit = groups.by_root[root]
        partial.append((unit, next(n for n, c in groups.producers(unit) if not zero_rows[n][c].all())))
    return zero, partial


def layer_bias(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """A conv's or linear's bias as float64 (zeros when it has none)."""
    layer = gm.get_submodule(node.target)
    if layer.bias is None:
        return torch.zeros(layer.weight.shape[0], dtype=torch.float64)
    return layer.bias.detach().double()


# ---------------------------------------------------------------------------------------------
# Rewriting


def shrink(gm: fx.GraphModule, groups: ChannelGroups, roots: set[int], values: dict[fx.Node, torch.Tensor]) -> Counter:
    """Remove the units ``roots`` from every layer, constant and shape that holds their channels;
    ``values`` are their constants (ChannelGroups.constants). Returns the stats."""
    wanted = np.fromiter(roots, dtype=np.int64, count=len(roots))
    stats: Counter = Counter(channels_removed=len(roots))
    for node in list(gm.graph.nodes):
        kind = groups.kind.get(node)
        if kind in ("conv", "grouped_conv", "linear"):
            shrunk, folded = _shrink_layer(gm, groups, node, wanted, values)
            stats["layers_shrunk"] += shrunk
            stats["constants_folded"] += folded
        elif node not in groups.roots or not groups.removed(node, wanted).any():
            continue
        elif kind == "batch_norm":
            _shrink_batch_norm(gm, node, groups.removed(node, wanted))
            stats["layers_shrunk"] += 1
        elif kind == "elementwise":
            _shrink_constants(gm, node, groups.removed(node, wanted))
        elif kind == "reshape":
            set_shape_entry(node, int((~groups.removed(node, wanted)).sum()))
    gm.delete_all_unused_submodules()
    return +stats


def _keep(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.flatnonzero(~mask))


def _shrink_layer(gm, groups: ChannelGroups, node: fx.Node, wanted, values) -> tuple[int, int]:
    """(1 if the layer changed, 1 if its bias took in constants) for one conv or linear."""
    layer = gm.get_submodule(node.target)
    source = node.args[0]
    out_mask = groups.removed(node, wanted)
    in_mask = groups.removed(source, wanted) if source in groups.roots else np.zeros(layer.weight.shape[1], bool)
    if not out_mask.any() and not in_mask.any():
        return 0, 0
    weight = layer.weight.detach()[_keep(out_mask)]
    bias = layer.bias.detach()[_keep(out_mask)].double() if layer.bias is not None else None
    folded = 0
    grouped = groups.kind[node] == "grouped_conv"
    if grouped:  # whole groups go: their inputs feed only their own outputs
        kept_groups = weight.shape[0] // (layer.out_channels // layer.groups)
    else:
        gone = torch.from_numpy(np.flatnonzero(in_mask))
        if len(gone):
            # x[c] = v everywhere: W[:, c] ⊛ v = v·Σ_taps W[:, c], a bias (no zero padding: checked)
            columns = weight[:, gone].double()
            extra = (columns.flatten(2).sum(-1) if columns.dim() > 2 else columns) @ values[source][gone]
            if bool(extra.any()):
                bias = extra if bias is None else bias + extra
                folded = 1
        weight = weight[:, _keep(in_mask)]
    # a copy: the original may belong to the user's model
    new = with_weights(layer, weight.clone(), bias.to(layer.weight.dtype) if bias is not None else None,
                       groups=None if isinstance(layer, nn.Linear) else kept_groups if grouped else 1)
    ir.set_module(gm, node.target, new)
    return 1, folded


def _shrink_batch_norm(gm, node: fx.Node, mask: np.ndarray) -> None:
    bn = gm.get_submodule(node.target)
    keep = _keep(mask)
    new = copy.deepcopy(bn)
    new.num_features = len(keep)
    new.running_mean = bn.running_mean[keep].clone()
    new.running_var = bn.running_var[keep].clone()
    if bn.affine:
        new.weight = nn.Parameter(bn.weight.detach()[keep].clone(), requires_grad=bn.weight.requires_grad)
        new.bias = nn.Parameter(bn.bias.detach()[keep].clone(), requires_grad=bn.bias.requires_grad)
    ir.set_module(gm, node.target, new)


def _shrink_constants(gm, node: fx.Node, mask: np.ndarray) -> None:
    """Per-channel constant operands of a binary op lose the removed channels (in a new attribute:
    the old one may be read elsewhere)."""
    rank = len(ir.shape_of(node))
    for arg in list(node.args):
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            continue
        value = ir.get_attr_value(gm, arg.target)
        if value.numel() == 1:
            continue
        axis = 1 - (rank - value.dim())  # the channel dim, with broadcasting aligned from the right
        name, i = arg.target.replace(".", "_") + "_pruned", 0
        while hasattr(gm, name if not i else f"{name}_{i}"):
            i += 1
        name = name if not i else f"{name}_{i}"
        gm.register_buffer(name, value.detach().index_select(axis, _keep(mask)).clone())
        with gm.graph.inserting_before(node):
            replacement = gm.graph.get_attr(name)
        node.replace_input_with(arg, replacement)
        if not arg.users:
            gm.graph.erase_node(arg)
            ir.delete_unused_attributes(gm, [arg.target])


# ---------------------------------------------------------------------------------------------
# Plans


@register
@dataclass
class ApplyPrunePlan(Pass):
    """Apply a prune plan: its channels of convs and linears get zero weights and zero bias.

    Algebra (lossy, explicit): W[c] := 0 and b[c] := 0 for each (layer, channel c) of the plan
    (``fxopt.prune.plan_prune``); the channel then computes the constant f(0) through the
    activations after it, and ``lower_zero_channels`` removes it exactly, so the compiled model
    equals the planned one.

    Preconditions: the graph the plan was made on, after the same pipeline (layers are named by
    module path).

    Declines: nothing; a plan that does not fit the graph (a layer it names is missing or has
    another weight shape) is an error. Applying a plan twice changes nothing.

    Stats: channels_zeroed, layers_pruned.
    """

    name = "apply_prune_plan"
    exact: ClassVar[bool] = False
    plan: str = ""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not self.plan:
            raise PreconditionError("apply_prune_plan needs plan=FILE (a plan saved by fxopt.prune.plan_prune)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        from fxopt.prune import PrunePlan

        return PrunePlan.load(self.plan).zero(gm)
