"""merge_convs and apply_depth_plan: consecutive convs with nothing nonlinear between them become
one conv; a depth plan's activations go.

Both stand on one analysis of the traced graph, ``ConvChain``: the spine (the longest path from
the inputs to the outputs, found with networkx, so a residual branch lies on it and its identity
skip does not), the convs on it in order, and what lies between two of them (a "gap": an
activation, a constant per-channel affine step, a residual add, or anything else, which is a
barrier). A *group* of consecutive spine convs is the subgraph from the first conv's input to the
last conv's output, extended over the adds right after it whose skips start inside; it merges
when that subgraph is affine (kernels.compose along the spine, kernels.add at residual adds), no
tensor inside it is read outside it, and the merged kernel stays within ``max_kernel``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, ClassVar

import networkx as nx
import torch
from torch import fx, nn

from fxopt import ir, kernels
from fxopt.pass_manager import Pass, PassContext, PreconditionError, register
from fxopt.passes.affine import channel_affine, conv_step

# Elementwise nonlinearities a depth plan may replace with the identity. Gates (sigmoid,
# hardsigmoid) are not on this list: they scale another tensor, they are not a layer's activation.
REMOVABLE_ACTIVATIONS = frozenset({"relu", "relu6", "hardtanh", "hardswish", "silu", "gelu", "leaky_relu", "elu", "mish"})


@dataclass
class Gap:
    """The spine nodes after conv k, up to the next spine conv (exclusive)."""

    nodes: list[fx.Node]
    activation: fx.Node | None = None  # the first removable activation, if any
    barrier: str = ""  # why no group may span this gap ("" when it is linear or an activation)


@dataclass
class Group:
    """Spine convs [start, stop) as one region of the graph; ``reason`` says why it cannot merge."""

    start: int
    stop: int
    input: fx.Node
    output: fx.Node  # the region's last node (the last conv, or an add it absorbed)
    nodes: list[fx.Node]  # region nodes in graph order (spine and skip branches), input excluded
    merged: kernels.AffineConv | None = None
    padding_moved: bool = False
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


class ConvChain:
    """The convs on a graph's spine and the gaps between them (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, max_kernel: int = 7):
        self.gm = gm
        self.max_kernel = max_kernel
        self._affine: dict[fx.Node, kernels.AffineConv] = {}
        self.spine = _spine(gm)
        self.position = {node: i for i, node in enumerate(self.spine)}
        self.kinds = {node: self._kind(node) for node in self.spine[1:]}
        self.convs = [n for n in self.spine if self.kinds.get(n) == "conv"]
        self.gaps: list[Gap] = []
        for k, conv in enumerate(self.convs):
            end = self.position[self.convs[k + 1]] if k + 1 < len(self.convs) else len(self.spine)
            self.gaps.append(self._gap(self.spine[self.position[conv] + 1:end]))
        self._groups: dict[tuple, Group] = {}

    def affine(self, conv: fx.Node) -> kernels.AffineConv:
        """Spine conv ``conv`` as an AffineConv (computed once: a dense copy of a grouped weight)."""
        if conv not in self._affine:
            self._affine[conv] = kernels.conv_as_affine(self.gm.get_submodule(conv.target))
        return self._affine[conv]

    def __len__(self) -> int:
        return len(self.convs)

    def name(self, k: int) -> str:
        """The stable name of conv k: its module's qualified name."""
        return self.convs[k].target

    def index(self, conv_name: str) -> int | None:
        return next((k for k, conv in enumerate(self.convs) if conv.target == conv_name), None)

    def _kind(self, node: fx.Node) -> str:
        """How a spine node takes part in a group: "conv", "activation", "affine", "add" (a
        residual add of an affine skip), or "barrier"."""
        previous = self.spine[self.position[node] - 1]
        key = ir.op_key(node, self.gm)
        if key == "conv2d" and _spine_conv(self.gm, node) and node.args[0] is previous:
            return "conv"
        if key in REMOVABLE_ACTIVATIONS and node.args and node.args[0] is previous:
            return "activation"
        found = channel_affine(self.gm, node)
        if found is not None and found[0] is previous:
            return "affine"
        if key == "add" and _skip_operand(node, previous) is not None:
            return "add"
        return "barrier"

    def _gap(self, nodes: list[fx.Node]) -> Gap:
        gap = Gap(nodes)
        for node in nodes:
            kind = self.kinds[node]
            if kind == "activation" and gap.activation is None:
                gap.activation = node
            elif kind not in ("affine", "add"):
                gap.barrier = f"'{node.name}' ({ir.op_key(node, self.gm) or node.op}) is not linear"
                break
        return gap

    def group(self, start: int, stop: int, removed: frozenset[int] = frozenset(), move_padding: bool = False) -> Group:
        """Convs [start, stop) as a Group (merged kernel computed), with the activations of the
        gaps in ``removed`` taken as the identity; ``move_padding`` accepts moving the inner zero
        paddings onto the group's input (a planned approximation, see ``apply_plan``)."""
        key = (start, stop, move_padding, frozenset(k for k in removed if start <= k < stop - 1))
        if key not in self._groups:
            self._groups[key] = self._build_group(start, stop, key[3], move_padding)
        return self._groups[key]

    def _build_group(self, start: int, stop: int, removed: frozenset[int], move_padding: bool) -> Group:
        first, last = self.convs[start], self.convs[stop - 1]
        group = Group(start, stop, first.args[0], last, [])
        for k in range(start, stop - 1):
            gap, between = self.gaps[k], f"between '{self.convs[k].name}' and '{self.convs[k + 1].name}'"
            if gap.barrier:
                group.reason = f"{between}: {gap.barrier}"
                return group
            if gap.activation is not None and k not in removed:
                group.reason = f"activation '{gap.activation.name}' {between}"
                return group
        spine = self.spine[self.position[first]:self.position[last] + 1]
        inside = {group.input, *spine}
        for node in self.gaps[stop - 1].nodes:  # absorb the adds right after the group whose skips start inside
            if self.kinds[node] != "add" or self._skip_source(node) not in inside:
                break
            spine.append(node)
            inside.add(node)
            group.output = node
        for node in spine:
            if self.kinds[node] == "add" and self._skip_source(node) not in inside:
                group.reason = (f"the residual add '{node.name}' inside the group reads "
                                f"'{self._skip_source(node).name}' from before it")
                return group
        group.nodes = self._region(spine)
        region = set(group.nodes)
        for node in group.nodes:
            outside = sorted(u.name for u in node.users if u not in region)
            if outside and node is not group.output:
                group.reason = f"'{node.name}' inside the group is also read by {', '.join(outside)}"
                return group
        merged = self._compose(group, move_padding=False)
        if isinstance(merged, str) and move_padding and "inner zero padding" in merged:
            merged = self._compose(group, move_padding=True)
            group.padding_moved = not isinstance(merged, str)
        if isinstance(merged, str):
            group.reason = merged
        elif stop - start > 1 and max(merged.kernel_size) > self.max_kernel:
            group.reason = (f"the merged kernel {merged.kernel_size[0]}x{merged.kernel_size[1]} exceeds "
                            f"max_kernel={self.max_kernel}")
        else:
            group.merged = merged
        return group

    def _skip_source(self, add: fx.Node) -> fx.Node:
        return _branch(self.gm, self._skip(add))[0]

    def _skip(self, add: fx.Node) -> fx.Node:
        return _skip_operand(add, self.spine[self.position[add] - 1])

    def _region(self, spine: list[fx.Node]) -> list[fx.Node]:
        """Spine nodes plus the affine steps on the skips of their adds, in graph order."""
        nodes = set(spine)
        for node in spine:
            if self.kinds[node] == "add":
                nodes.update(_branch(self.gm, self._skip(node))[1])
        return [n for n in self.gm.graph.nodes if n in nodes]

    def _compose(self, group: Group, move_padding: bool) -> kernels.AffineConv | str:
        """The group's region as one AffineConv of its input, or why it is not one.

        With ``move_padding`` every spine conv after the first is taken unpadded, and the first
        one pads its input by what they padded, scaled by the strides before them: the planned
        model computes exactly this (``apply_plan`` edits its convs the same way)."""
        shape = ir.shape_of(group.input)
        if shape is None or len(shape) != 4:
            return f"the group input '{group.input.name}' is not a 4-D tensor"
        convs = self.convs[group.start:group.stop]
        paddings = moved_paddings([self.affine(c) for c in convs]) if move_padding else []
        if move_padding:
            padded = [c for c in convs[1:] if self.affine(c).padding != (0, 0)]
            for node in group.nodes:
                if padded and self.kinds.get(node) == "add" and self.position[node] < self.position[padded[-1]]:
                    return f"padding cannot move past the residual add '{node.name}'"
        values = {group.input: kernels.identity_conv(shape[1])}
        for node in group.nodes:
            kind = self.kinds.get(node)
            if kind == "conv":
                conv = self.affine(node)
                if paddings:
                    conv = dataclasses.replace(conv, padding=paddings[convs.index(node)])
                value = kernels.compose(values[node.args[0]], conv)
            elif kind == "activation":
                value = values[node.args[0]]  # removed by the plan: the identity
            elif kind == "add":
                previous = self.spine[self.position[node] - 1]
                value = kernels.add([values[previous], values[self._skip(node)]])
            else:  # an affine step on the spine or on a skip
                step = conv_step(self.gm, node)
                if step is None or step.input not in values:
                    return f"'{node.name}' is not an affine step of the group input"
                value = step.apply(values[step.input])
            if isinstance(value, str):
                return f"at '{node.name}': {value}"
            values[node] = value
        return values[group.output]


def _spine(gm: fx.GraphModule) -> list[fx.Node]:
    """The longest path through the graph's compute nodes, inputs to output (ties: graph order)."""
    graph = nx.DiGraph()
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        graph.add_node(node)
        for user in node.users:
            if user.op != "get_attr":
                graph.add_edge(node, user)
    if not graph:
        return []
    return nx.dag_longest_path(graph, topo_order=sorted(graph, key=order.get))


def _spine_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A Conv2d module call that kernels.conv_as_affine accepts (checked without its dense copy)."""
    if node.op != "call_module" or ir.op_key(node, gm) != "conv2d" or len(node.args) != 1 or node.kwargs:
        return False
    return not isinstance(kernels.zero_padding(gm.get_submodule(node.target)), str)


def _skip_operand(add: fx.Node, previous: fx.Node) -> fx.Node | None:
    """The operand of a two-tensor add that is not the spine's previous node."""
    if len(add.args) != 2 or add.kwargs or previous not in add.args:
        return None
    other = add.args[1] if add.args[0] is previous else add.args[0]
    if not isinstance(other, fx.Node) or ir.shape_of(other) != ir.shape_of(add) or ir.shape_of(previous) != ir.shape_of(add):
        return None
    return other


def _branch(gm: fx.GraphModule, operand: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """(source, steps): the node a skip operand is an affine function of, and the affine steps
    from it (an identity skip has no steps; ResNet's projection shortcut has a conv)."""
    steps = []
    node = operand
    while (step := conv_step(gm, node)) is not None and isinstance(step.input, fx.Node) and len(node.users) == 1:
        steps.append(node)
        node = step.input
    return node, steps[::-1]


def moved_paddings(convs: list[kernels.AffineConv]) -> list[tuple[int, int]]:
    """Paddings that compute a chain of convs with every inner zero padding moved onto the first
    conv's input: conv j's padding p_j becomes 0 and the first conv pads by Σ_j p_j·Π_{i<j} s_i
    more (a pad of p_j rows after a stride product S is S·p_j rows of the input)."""
    total, scale = list(convs[0].padding), list(convs[0].stride)
    for conv in convs[1:]:
        for d in range(2):
            total[d] += conv.padding[d] * scale[d]
            scale[d] *= conv.stride[d]
    return [tuple(total)] + [(0, 0)] * (len(convs) - 1)


# ---------------------------------------------------------------------------------------------
# The merge pattern of a linear run: a dynamic program over split points


def optimal_partition(n: int, cost: Callable[[int, int], float]) -> tuple[float, list[tuple[int, int]]]:
    """The partition of units [0, n) into consecutive groups [a, b) with the least total
    ``cost(a, b)`` (math.inf: not allowed), and that total.

    best[b] = min_a best[a] + cost(a, b), best[0] = 0 (Kim et al. 2023's first-stage DP)."""
    best = [0.0] + [math.inf] * n
    choice = [0] * (n + 1)
    for b in range(1, n + 1):
        for a in range(b):
            if best[a] == math.inf:
                continue
            c = cost(a, b)
            if best[a] + c < best[b]:
                best[b], choice[b] = best[a] + c, a
    if best[n] == math.inf:
        return math.inf, []
    groups, b = [], n
    while b > 0:
        groups.append((choice[b], b))
        b = choice[b]
    return best[n], groups[::-1]


# ---------------------------------------------------------------------------------------------
# Rewriting


def merge_group(gm: fx.GraphModule, chain: ConvChain, group: Group) -> fx.Node:
    """Replace the group's region by one conv (its merged kernel) reading the group input."""
    dtype = ir.tensor_meta(group.output).dtype
    conv = kernels.to_conv(group.merged, dtype)
    name = ir.add_module(gm, chain.name(group.start) + "_merged", conv)
    with gm.graph.inserting_before(group.output):
        node = gm.graph.call_module(name, (group.input,))
    node.meta = dict(group.output.meta)
    group.output.replace_all_uses_with(node)
    for old in reversed(group.nodes):
        if not old.users:
            gm.graph.erase_node(old)
    return node


def conv_cost_module(merged: kernels.AffineConv, activation: str | None, dtype: torch.dtype,
                     channels_last: bool = False) -> nn.Module:
    """A stand-in with the merged conv's shape (and the activation after it) and seeded weights:
    what a conv costs does not depend on its weight values, and equal shapes then share one
    cache entry of ``fxopt.measure`` (its key includes the constants). ``channels_last``: it
    reads and writes NHWC, so that a target running convs in NHWC times no layout transposes
    (inside a model there are none between two convs)."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(merged.weight.shape[1], merged.out_channels, merged.kernel_size, merged.stride, merged.padding,
                     merged.dilation, kernels.group_count(merged), dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
    layers = [conv] if activation is None else [conv, ir.stateless_module(activation)]
    return (_ChannelsLast(*layers) if channels_last else nn.Sequential(*layers)).eval()


class _ChannelsLast(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def linear_runs(chain: ConvChain, removed: frozenset[int] = frozenset()) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of spine convs whose gaps a..b-2 hold nothing nonlinear (an activation
    in ``removed`` counts as gone); runs of one conv are left out."""
    runs, start = [], 0
    for k in range(len(chain)):
        gap = chain.gaps[k]
        linear = not gap.barrier and (gap.activation is None or k in removed)
        if not linear or k == len(chain) - 1:
            if k + 1 - start > 1:
                runs.append((start, k + 1))
            start = k + 1
    return runs


def kept_activation(chain: ConvChain, k: int, removed: frozenset[int] = frozenset()) -> str | None:
    """The op key of the activation right after conv k, when it stays (the cost of a conv
    includes its fused activation)."""
    gap = chain.gaps[k]
    if gap.activation is None or k in removed or gap.nodes[0] is not gap.activation:
        return None
    return ir.op_key(gap.activation, chain.gm)


def group_cost(chain: ConvChain, group: Group, target, removed: frozenset[int] = frozenset(), **measure_options) -> float:
    """Measured seconds (or instructions) of the group's merged conv and its kept activation on
    ``target`` (``fxopt.measure``, cached on disk)."""
    from fxopt.measure import measure

    from fxopt.targets import get_target

    target = get_target(target)
    dtype = ir.tensor_meta(group.output).dtype
    channels_last = target.capabilities.preferred_layout == "NHWC"
    module = conv_cost_module(group.merged, kept_activation(chain, group.stop - 1, removed), dtype, channels_last)
    shape = tuple(ir.shape_of(group.input))
    if channels_last:
        shape = (shape[0], *shape[2:], shape[1])
    return measure(module, (torch.zeros(shape, dtype=dtype),), target, **measure_options).value


def merge_groups(gm: fx.GraphModule, chain: ConvChain, groups: list[Group]) -> Counter:
    """Rewrite each group of two or more convs as its merged conv; stats."""
    stats: Counter = Counter()
    # later groups first: an earlier group's output node may be a later group's input
    for group in sorted(groups, key=lambda g: g.start, reverse=True):
        if group.stop - group.start < 2:
            continue
        merge_group(gm, chain, group)
        stats["merged_groups"] += 1
        stats["merged_convs"] += group.stop - group.start
        stats["residual_absorbed"] += sum(1 for n in group.nodes if chain.kinds.get(n) == "add")
    if stats:
        ir.eliminate_dead_code(gm)
        gm.delete_all_unused_submodules()
    return stats


@register
@dataclass
class MergeConvs(Pass):
    """Merge consecutive convs with nothing nonlinear between them into one conv.

    Algebra (kernels.compose / kernels.add, float64):
      conv2(conv1(x))       =>  conv(x; W2 ⊛ᵀ W1, b2 + ΣW2·b1)   kernel k1 + (k2 − 1)·s1, stride s1·s2,
                                depthwise∘depthwise stays depthwise, otherwise dense
      x + convs(x)          =>  conv(x; W + I at the centre tap)   (a residual identity absorbed)
      constant per-channel scales/shifts and affine skips (a projection shortcut) compose too.
    The convs are those on the graph's spine (its longest path), grouped between activations
    and other nonlinear ops; which runs merge and where they split is a dynamic program over the
    split points: ``policy="measured"`` minimizes the latency of the merged convs measured on
    the target (``fxopt.measure``, cached), since a merged kernel can be slower than its parts;
    ``policy="all"`` merges as far as ``max_kernel`` allows; ``plan=FILE`` merges exactly the
    groups of a depth plan (``fxopt plan depth``), which ``apply_depth_plan`` prepared.

    Preconditions: shapes in node.meta; BN folded first (fold_bn) or it is merged as an affine step.

    Declines: an inner zero padding that cannot be expressed (padding the intermediate tensor
    is not padding the input: a padded conv after a conv with a bias or a kernel), a merged
    kernel larger than ``max_kernel``, a tensor inside the group read outside it, a residual add
    whose skip starts before the group, dilated spatial convs in a row, a measured merge that is
    slower (policy "measured"). Raises when policy "measured" has no target to measure on, and
    when a plan's group does not fit the graph or cannot merge exactly.

    Stats: merged_groups, merged_convs (convs that went into them), residual_absorbed.
    """

    name = "merge_convs"
    policy: str = "measured"
    max_kernel: int = 7
    plan: str = ""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if self.policy not in ("measured", "all"):
            raise PreconditionError(f"merge_convs option policy={self.policy!r} is not 'measured' or 'all'")
        if self.max_kernel < 1:
            raise PreconditionError(f"merge_convs option max_kernel={self.max_kernel} must be at least 1")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        chain = ConvChain(gm, self.max_kernel)
        if self.plan:
            from fxopt.depth import DepthPlan

            return merge_groups(gm, chain, DepthPlan.load(self.plan).groups_in(chain, exact=True))
        # Merging the spine's convs can make another path the longest (the other branch of a
        # multi-branch block), which a second run would merge: repeat on the new spine, merging
        # only convs this run has not made (so a merged conv is never merged again and the stats
        # count original convs), until a round merges nothing. The first round's splits are the
        # declines. (Fuzzer found: merge_convs was not idempotent on multi-branch blocks.)
        stats: Counter = Counter()
        made: set[str] = set()
        while True:
            names = {n.name for n in gm.graph.nodes}
            chosen = []
            for start, stop in linear_runs(chain):
                cost = self._cost_function(chain, ctx, start, made)
                total, partition = optimal_partition(stop - start, cost)
                for a, b in partition:
                    chosen.append(chain.group(start + a, start + b))
                if not made:
                    self._declines(chain, ctx, start, stop, partition)
            merged = merge_groups(gm, chain, chosen)
            stats.update(merged)
            if not merged.get("merged_groups") or not ctx.example_inputs:
                return stats
            made |= {n.name for n in gm.graph.nodes} - names
            ir.propagate_shapes(gm, ctx.example_inputs)
            chain = ConvChain(gm, self.max_kernel)

    def _cost_function(self, chain: ConvChain, ctx: PassContext, offset: int,
                       made: set[str] = frozenset()) -> Callable[[int, int], float]:
        def cost(a: int, b: int) -> float:
            group = chain.group(offset + a, offset + b)
            if not group.ok:
                return math.inf
            if b - a > 1 and any(chain.convs[offset + k].name in made for k in range(a, b)):
                return math.inf  # merged by an earlier round of this run
            if self.policy == "all":
                return 1.0  # fewest convs
            if ctx.target is None:
                raise PreconditionError("merge_convs{policy='measured'} measures merged convs on the target: give "
                                        "optimize() a target, or use merge_convs{policy='all'}")
            return group_cost(chain, group, ctx.target)

        return cost

    @staticmethod
    def _declines(chain: ConvChain, ctx: PassContext, start: int, stop: int, partition) -> None:
        """One decline per split of a run, with the reason the two groups beside it stay apart."""
        for (a, k), (_, b) in zip(partition, partition[1:]):
            a, k, b = start + a, start + k, start + b
            pair, joined = chain.group(k - 1, k + 1), chain.group(a, b)
            reason = pair.reason or joined.reason or "measured: merged is slower on the target than separate"
            ctx.decline("merge", chain.convs[k], f"'{chain.convs[k - 1].name}' → '{chain.convs[k].name}': {reason}")


@register
@dataclass
class ApplyDepthPlan(Pass):
    """Apply a depth plan: its activations become the identity, its groups' paddings move.

    Algebra (lossy, explicit): act(y) => y for each activation the plan removes; for each group
    the plan merges whose inner zero padding cannot compose exactly, conv_j's padding moves onto
    the group's first conv (p_first += Σ_j p_j·Π_{i<j} s_i, p_j = 0): the border rows of the
    intermediate tensors then see the previous conv's bias instead of zero. The result is an
    ordinary trainable graph (fine-tune it, e.g. with fxopt.finetune.distill); merge_convs{plan=...}
    then merges its groups exactly.

    Preconditions: the graph the plan was made on, after the same default pipeline (convs are
    named by module path).

    Declines: nothing; a plan that does not fit the graph (a conv it names is missing or has
    another shape, an activation it removes is of another kind) is an error. Applying a plan
    twice changes nothing.

    Stats: activations_removed, paddings_moved.
    """

    name = "apply_depth_plan"
    exact: ClassVar[bool] = False
    plan: str = ""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not self.plan:
            raise PreconditionError("apply_depth_plan needs plan=FILE (a plan written by `fxopt plan depth`)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        from fxopt.depth import DepthPlan

        return apply_plan(gm, DepthPlan.load(self.plan))


def apply_plan(gm: fx.GraphModule, plan) -> Counter:
    """Edit ``gm`` as ``plan`` (a fxopt.depth.DepthPlan) says; see ApplyDepthPlan."""
    chain = ConvChain(gm)
    stats: Counter = Counter()
    removed = plan.removed_in(chain)  # checks the plan fits before anything changes
    groups = plan.groups_in(chain, exact=False, removed=removed)
    for k in sorted(removed):
        activation = chain.gaps[k].activation
        if activation is not None:
            activation.replace_all_uses_with(activation.args[0])
            gm.graph.erase_node(activation)
            stats["activations_removed"] += 1
    for group in groups:
        if not group.padding_moved:
            continue
        convs = chain.convs[group.start:group.stop]
        for node, padding in zip(convs, moved_paddings([chain.affine(c) for c in convs])):
            if chain.affine(node).padding == padding:
                continue
            moved = copy.deepcopy(gm.get_submodule(node.target))  # the user's model keeps its own module
            moved.padding = padding
            if len(ir.module_users(gm, node.target)) == 1:
                ir.set_module(gm, node.target, moved)
            else:  # called elsewhere too: only this call moves its padding
                node.target = ir.add_module(gm, node.target + "_padded", moved)
            stats["paddings_moved"] += 1
    if stats:
        ir.eliminate_dead_code(gm)
    return stats
