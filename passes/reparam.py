"""fold_branches: parallel affine branches of one input, summed, become one conv."""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

from torch import fx

from fxopt import ir, kernels
from fxopt.pass_manager import Pass, PassContext, register
from fxopt.passes.affine import ConvStep, conv_step


def _add_tree(root: fx.Node, gm: fx.GraphModule) -> tuple[list, list[fx.Node]]:
    """Leaves (terms, with repetition) and inner add nodes of the add tree under ``root``.
    An operand that is itself an add used only here belongs to the tree."""
    terms, inner = [], []

    def visit(node):
        for operand in node.args:
            if isinstance(operand, fx.Node) and ir.op_key(operand, gm) == "add" and len(operand.users) == 1 \
                    and _is_tensor_add(operand, gm):
                inner.append(operand)
                visit(operand)
            else:
                terms.append(operand)

    visit(root)
    return terms, inner


def _is_tensor_add(node: fx.Node, gm: fx.GraphModule) -> bool:
    return ir.op_key(node, gm) == "add" and ir.shape_of(node) is not None and len(node.args) == 2


def _path(node: fx.Node, gm: fx.GraphModule) -> tuple[list[fx.Node], dict[fx.Node, ConvStep]]:
    """The node and its ancestors through affine conv steps; the last one is not such a step."""
    path, steps = [node], {}
    while (step := conv_step(gm, path[-1])) is not None and isinstance(step.input, fx.Node):
        steps[path[-1]] = step
        path.append(step.input)
    return path, steps


@register
@dataclass
class FoldBranches(Pass):
    """Fold parallel branches that read one tensor and are summed into a single conv.

    Algebra: every branch is an affine conv of the shared input x, built from a chain of
    conv2d, BatchNorm, avg_pool2d (counting padding), constant per-channel scale/shift and the
    identity; so is their sum:
      branch_sum:  Σ_i chain_i(x)  =>  conv(x; Σ_i pad(W_i), Σ_i b_i)
    with chains composed by kernels.compose (k1 + (k2 − 1)·s1, strides multiplied) and summed by
    kernels.add (kernels zero-padded into a common centred window, per-group structure kept
    where the result allows). This covers RepVGG (3x3-BN + 1x1-BN + BN), ACNet (3x3 + 1x3 +
    3x1), DBB (kxk, 1x1, 1x1→kxk, 1x1→avg-pool, each with BN), MobileOne (k kxk-BN branches +
    1x1-BN + BN skip), RepGhost (depthwise conv + BN on the identity) and GhostNetV3's
    reparameterizable modules. Terms of an add tree from other inputs stay as adds.

    Preconditions: shapes in node.meta (trace propagates them); BN in eval mode.

    Declines: branches with different strides or dilations; kernels that cannot be centred in
    a common window (even sizes); a chain whose inner zero padding cannot be expressed (a
    padded conv after a shift, e.g. BN→conv3x3); a branch output or an inner node of a chain
    used elsewhere; terms whose shapes differ (broadcasting adds).

    Stats: branch_sum (sums folded), branch_terms (branches absorbed).
    """

    name = "fold_branches"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        stats: Counter = Counter()
        for root in list(gm.graph.nodes):
            if root.graph is not gm.graph or not _is_tensor_add(root, gm):
                continue
            if len(root.users) == 1 and _is_tensor_add(next(iter(root.users)), gm):
                continue  # an inner node: its root handles it
            terms, inner = _add_tree(root, gm)
            for group in self._groups(terms, gm):
                outcome = self._fold(gm, root, terms, inner, group)
                if isinstance(outcome, str):
                    ctx.decline("branch_sum", root, outcome)
                    continue
                stats["branch_sum"] += 1
                stats["branch_terms"] += len(group["terms"])
                root = outcome
                if not _is_tensor_add(root, gm):
                    break  # every term folded: the root is now the conv
                terms, inner = _add_tree(root, gm)
        if stats:
            ir.eliminate_dead_code(gm)
            gm.delete_all_unused_submodules()
        return stats

    @staticmethod
    def _groups(terms: list, gm: fx.GraphModule) -> list[dict]:
        """Terms whose affine paths meet, with the nearest node they all reach (their source)."""
        paths = {}
        for term in terms:
            if isinstance(term, fx.Node) and term not in paths:
                paths[term] = _path(term, gm)
        groups: list[dict] = []
        for term, (path, _) in paths.items():
            for group in groups:
                if set(path) & set(group["path"]):
                    group["members"].append(term)
                    group["path"] = [n for n in group["path"] if n in set(path)]
                    break
            else:
                groups.append({"members": [term], "path": list(path)})
        result = []
        for group in groups:
            members = group["members"]
            group_terms = [t for t in terms if t in members]
            if len(group_terms) < 2:
                continue
            source = group["path"][0]
            steps = {}
            for member in members:
                steps.update(paths[member][1])
            chains = {m: _chain(m, source, steps) for m in members}
            if not any(steps[n].kind == "conv" for chain in chains.values() for n in chain):
                continue  # nothing to fold into: x + BN(x) and the like stay as they are
            result.append({"source": source, "terms": group_terms, "chains": chains, "steps": steps})
        return result

    @staticmethod
    def _fold(gm: fx.GraphModule, root: fx.Node, terms: list, inner: list[fx.Node], group: dict) -> fx.Node | str:
        """Replace the group's terms of the add tree at ``root`` by one conv; the new root, or why not."""
        source, steps = group["source"], group["steps"]
        tree = set(inner) | {root}
        shape = ir.shape_of(root)
        for term, chain in group["chains"].items():
            if ir.shape_of(term) != shape:
                return f"branch '{term.name}' has shape {tuple(ir.shape_of(term))}, the sum {tuple(shape)} (broadcasting add)"
            allowed = tree
            for node in reversed(chain):  # from the term down to the source
                extra = [u.name for u in node.users if u not in allowed]
                if extra:
                    return f"branch node '{node.name}' is also used by {', '.join(sorted(extra))}"
                allowed = {node}
        source_shape = ir.shape_of(source)
        if source_shape is None or len(source_shape) != 4:
            return f"branch input '{source.name}' is not a 4-D tensor"
        folded = []
        for term in group["terms"]:
            current = kernels.identity_conv(source_shape[1])
            for node in group["chains"][term]:
                current = steps[node].apply(current)
                if isinstance(current, str):
                    return f"branch through '{node.name}': {current}"
            folded.append(current)
        total = kernels.add(folded)
        if isinstance(total, str):
            return total
        dtype = ir.tensor_meta(root).dtype
        convs = [steps[n].node.target for chain in group["chains"].values() for n in chain if steps[n].kind == "conv"]
        prefix = _common_prefix(convs)
        name = ir.add_module(gm, f"{prefix}.reparam" if prefix else "reparam", kernels.to_conv(total, dtype))
        # the other terms stay; a literal 0 (from Python's sum()) goes
        rest = [t for t in terms if t not in group["terms"] and not (isinstance(t, (int, float)) and t == 0)]
        graph = gm.graph
        with graph.inserting_before(root):
            result = graph.call_module(name, (source,))
            for term in rest:  # (Σ folded) + the other terms, in their order
                result.meta = dict(root.meta)  # same shape: the terms do not broadcast
                result = graph.call_function(operator.add, (result, term))
        result.meta = dict(root.meta)
        root.replace_all_uses_with(result)
        graph.erase_node(root)
        return result


def _chain(term: fx.Node, source: fx.Node, steps: dict[fx.Node, ConvStep]) -> list[fx.Node]:
    """Step nodes from ``source`` (exclusive) up to ``term``, in execution order."""
    chain, node = [], term
    while node is not source:
        chain.append(node)
        node = steps[node].input
    return chain[::-1]


def _common_prefix(qualnames: list[str]) -> str:
    if not qualnames:
        return ""
    parts = [name.split(".")[:-1] for name in qualnames]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)
