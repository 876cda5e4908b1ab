"""lower_sparse_weights: 1x1 convs and linears with mostly-zero weights become fxopt sparse ops."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxopt import ir, sparse_ops
from fxopt.errors import SpecError
from fxopt.pass_manager import Pass, PassContext, PreconditionError, register
from fxopt.passes.affine import as_module, module_name, replace_with_module

DECIDE = ("measured", "density")
_KNOWN_BLOCKS = {f"{r}x{c}": (r, c) for r, c in sparse_ops.BLOCK_SHAPES}


@register
@dataclass
class LowerSparseWeights(Pass):
    """Replace 1x1 convs and linears whose weights are mostly zero with block-sparse kernels.

    Algebra, with BSR(W) the weight in block-sparse-row form (blocks of R x C stored where they
    hold a non-zero, zeros inside a stored block kept), so that dense(BSR(W)) = W bit for bit:
      conv1x1: conv2d(x; W, b), 1x1 kernel, stride 1, no padding, groups 1
                 =>  fxopt::sparse_conv1x1(x; BSR(W), b)     (sparse_ops.SparseConv1x1)
      linear:  linear(x; W, b)  =>  fxopt::sparse_linear(x; BSR(W), b)  (sparse_ops.SparseLinear)
    The kernels skip only products with a zero weight: exact up to float summation order (and
    0·inf, which the dense layer turns into NaN). A layer is a candidate when its density (the
    fraction of non-zero weights) is below ``max_density``. Its block shape is one of ``blocks``
    (1x1, 1x4, 4x1, 8x1 rows x columns): every shape is exact, they differ in stored values and
    speed. ``decide="measured"`` builds the dense layer and the sparse one for each block shape
    that stores at most twice the fewest values, measures them on ``ctx.target``
    (``fxopt.measure``: time on the host, qemu instruction counts for RISC-V, cached) and keeps
    the fastest, dense included. The sparse kernel works in NCHW: on a target whose convs run in
    NHWC (``capabilities.preferred_layout``) it is charged the two layout transposes around it,
    and the dense conv, measured alone with NCHW input and output, is credited the two it carries
    there (all four measured).
    ``decide="density"`` measures nothing and takes the largest block among those storing the
    fewest values.

    Preconditions: shapes in node.meta (the layer's input shape is what is measured); BN folded
    first (fold_bn), since a BN after a sparse op no longer folds into its weights; a target for
    ``decide="measured"``.

    Declines: density >= ``max_density`` (a dense layer); a target without sparse kernels
    (``capabilities.sparse_kernels`` false); a sparse conv that is not 1x1 / is strided / padded /
    grouped or depthwise; weights that are not floating point or not constant; the measured
    dense layer is at least as fast as the best sparse one (both figures in the reason).

    Stats: conv1x1, linear.
    """

    name = "lower_sparse_weights"
    max_density: float = 0.5
    decide: str = "measured"
    blocks: str = "1x1,1x4,4x1,8x1"

    def __post_init__(self) -> None:
        if (isinstance(self.max_density, bool) or not isinstance(self.max_density, (int, float))
                or not 0 < self.max_density <= 1):
            raise SpecError(f"lower_sparse_weights option max_density={self.max_density!r} is out of range: it is "
                            "the density (fraction of non-zero weights) below which a layer becomes sparse, a "
                            "number in (0, 1], e.g. max_density=0.5")
        if self.decide not in DECIDE:
            raise SpecError(f"lower_sparse_weights option decide={self.decide!r} is not one of "
                            f"{', '.join(repr(d) for d in DECIDE)}")
        self.block_shapes()  # validates

    def block_shapes(self) -> list[tuple[int, int]]:
        names = [b.strip() for b in str(self.blocks).split(",") if b.strip()]
        unknown = [b for b in names if b not in _KNOWN_BLOCKS]
        if unknown or not names:
            raise SpecError(f"lower_sparse_weights option blocks={self.blocks!r}: use a comma-separated list of "
                            f"{', '.join(_KNOWN_BLOCKS)}" + (f" ({', '.join(unknown)} unknown)" if unknown else ""))
        return [_KNOWN_BLOCKS[b] for b in dict.fromkeys(names)]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        stats: Counter = Counter()
        for node in list(gm.graph.nodes):
            key = ir.op_key(node, gm)
            if key not in ("conv2d", "linear"):
                continue
            rule = "linear" if key == "linear" else "conv1x1"
            found = as_module(gm, node)
            if isinstance(found, str):  # computed weights, extra arguments: no constant pattern
                ctx.decline(rule, node, found)
                continue
            layer, source = found
            outcome = self._lower(gm, ctx, node, layer, source, rule)
            if isinstance(outcome, str):
                if outcome:
                    ctx.decline(rule, node, outcome)
            else:
                stats[rule] += 1
        if stats:
            gm.delete_all_unused_submodules()
        return stats

    def _lower(self, gm: fx.GraphModule, ctx: PassContext, node: fx.Node, layer: nn.Module, source: Any,
               rule: str) -> str | None:
        """None when lowered; else the decline reason ("" for a layer not worth a word)."""
        weight = layer.weight
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            return "weights are not floating point"
        density = sparse_ops.density(weight)
        pointwise = rule == "linear" or tuple(layer.kernel_size) == (1, 1)
        if density >= self.max_density:
            # a dense 3x3 conv is no candidate at all; a dense 1x1 conv or linear is, and is told
            return f"density {density:.3f} >= max_density {self.max_density:g}: dense" if pointwise else ""
        shape_reason = _shape_reason(layer, source) if rule == "conv1x1" else _linear_reason(source)
        if shape_reason:
            return f"density {density:.3f}, but {shape_reason}: only 1x1 convs (stride 1, no padding, groups 1) " \
                   "and linears have sparse kernels"
        target = ctx.target
        if target is not None and not target.capabilities.sparse_kernels:
            return (f"target {target.name!r} has no sparse kernels (capabilities.sparse_kernels is false); "
                    f"density {density:.3f} stays dense")
        bias = layer.bias.detach() if layer.bias is not None else None
        counts = {block: sparse_ops.stored_values(weight, block) for block in self.block_shapes()}
        fewest = min(counts.values())
        if self.decide == "density":
            block = max((b for b, n in counts.items() if n == fewest), key=lambda b: (b[0] * b[1], b[0]))
            chosen, note = sparse_ops_module(rule, weight, bias, block), {}
        else:
            candidates = [b for b, n in counts.items() if n <= 2 * fewest]
            chosen, note, reason = self._measured(ctx, node, layer, source, rule, weight, bias, candidates)
            if reason:
                return reason
        replaced = self._replace(gm, node, chosen, source)
        # (an analysis result for reports: the choice and what it was measured at)
        replaced.meta["fxopt"] = {**replaced.meta.get("fxopt", {}), "sparse": {**chosen.describe(), **note}}
        return None

    def _measured(self, ctx, node, layer, source, rule, weight, bias, candidates):
        from fxopt import measure

        target = ctx.target
        if target is None:
            raise PreconditionError("lower_sparse_weights{decide='measured'} measures dense and sparse kernels on "
                                    "the target: give optimize() a target, or use decide='density'")
        shape = ir.shape_of(source) if isinstance(source, fx.Node) else None
        if shape is None:
            raise PreconditionError(f"lower_sparse_weights: no input shape for '{node.name}' in node.meta; run "
                                    "with example inputs (optimize() propagates shapes)")
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(tuple(shape), generator=generator, dtype=weight.dtype)
        dense_module = copy.deepcopy(layer).eval()
        dense = measure.measure(dense_module, (x,), target)
        unit = dense.unit
        best, best_cost = None, None
        costs = {}
        for block in candidates:
            module = sparse_ops_module(rule, weight, bias, block)
            cost = measure.measure(module, (x,), target).value
            costs[f"{block[0]}x{block[1]}"] = cost
            if best_cost is None or cost < best_cost:
                best, best_cost = module, cost
        dense_cost, layout = dense.value, 0.0
        if rule == "conv1x1" and target.capabilities.preferred_layout == "NHWC":
            # The target runs convs in NHWC; the sparse kernel reads and writes NCHW. Measured alone
            # (NCHW in and out) the dense conv carries the transposes NCHW->NHWC of x and NHWC->NCHW
            # of y that its neighbours spare it inside a network; there the sparse kernel needs the
            # opposite two (a transpose's cost depends on its direction).
            with torch.no_grad():
                y = dense_module(x)

            def cost(module, tensor):
                return measure.measure(module.eval(), (tensor,), target).value

            last = lambda t: t.permute(0, 2, 3, 1).contiguous()  # noqa: E731 - the NHWC tensor
            alone = cost(_ChannelsLast(), x) + cost(_ChannelsFirst(), last(y))
            layout = cost(_ChannelsFirst(), last(x)) + cost(_ChannelsLast(), y)
            dense_cost, best_cost = max(dense_cost - alone, 0.0), best_cost + layout
        where = f"{target.name}, inside an NHWC network" if layout else target.name
        if best_cost >= dense_cost:
            with_layout = f" (with {_figure(layout, unit)} of layout transposes)" if layout else ""
            return None, {}, (f"measured on {where}: dense {_figure(dense_cost, unit)} <= sparse "
                              f"{_figure(best_cost, unit)}{with_layout}, {best.block[0]}x{best.block[1]} blocks, "
                              f"density {sparse_ops.density(weight):.3f}")
        return best, {"measured": {"unit": unit, "dense": dense.value, "layout_transposes": layout, **costs}}, ""

    @staticmethod
    def _replace(gm: fx.GraphModule, node: fx.Node, module: nn.Module, source: Any) -> fx.Node:
        # never edit a module in place: the user's model keeps its layer; a call of a module used
        # only here swaps the module under the same name
        if node.op == "call_module" and len(ir.module_users(gm, node.target)) == 1:
            ir.set_module(gm, node.target, module)
            return node
        return replace_with_module(gm, node, module, source, module_name(node) + "_sparse")


def sparse_ops_module(rule: str, weight: torch.Tensor, bias: torch.Tensor | None, block) -> nn.Module:
    cls = sparse_ops.SparseLinear if rule == "linear" else sparse_ops.SparseConv1x1
    return cls(weight.detach(), bias, block).eval()




class _ChannelsLast(nn.Module):
    """NCHW -> NHWC, as the layout conversion transposes an NCHW kernel's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class _ChannelsFirst(nn.Module):
    """NHWC -> NCHW, as the layout conversion transposes an NCHW kernel's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def _figure(value: float, unit: str) -> str:
    return f"{value * 1e3:.4g} ms" if unit == "s" else f"{value:,.0f} instructions"


def _shape_reason(conv: nn.Module, source: Any) -> str:
    """Why a conv2d has no sparse kernel ("" when it has one)."""
    if tuple(conv.kernel_size) != (1, 1):
        return f"a {conv.kernel_size[0]}x{conv.kernel_size[1]} kernel"
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels == conv.out_channels else "grouped"
        return f"{kind} (groups={conv.groups})"
    if tuple(conv.stride) != (1, 1):
        return f"strided (stride={tuple(conv.stride)})"
    padding = conv.padding
    if isinstance(padding, str) and padding == "same":
        padding = (0, 0)  # a 1x1 kernel pads nothing for "same"
    if isinstance(padding, str):
        padding = (0, 0) if padding == "valid" else padding
    if tuple(padding) != (0, 0):
        return f"padded (padding={tuple(padding)})"
    shape = ir.shape_of(source) if isinstance(source, fx.Node) else None
    if shape is None or len(shape) != 4:
        return "an input that is not a 4-D NCHW tensor (or shapes are unknown)"
    return ""


def _linear_reason(source: Any) -> str:
    shape = ir.shape_of(source) if isinstance(source, fx.Node) else None
    if shape is None or len(shape) < 1:
        return "an input of unknown shape"
    return ""
