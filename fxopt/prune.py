"""Pruning: structured (whole channels, made physical) and unstructured (zeros in the weights).

Structured, ``plan_prune``: the model is optimized (BN folded) and its channel dependency groups
found (``fxopt.passes.channel_groups``); a *unit* is a set of channels that can only go together
(through BN, activations, depthwise convs, residual adds, concatenation, flatten→linear). In each
group of units, the units with the least L1 (or L2) norm of their producers' weight rows go, a
``ratio`` of those that may go; or, for a latency ``budget`` or ``speedup`` on a target, the least
ratio whose pruned model, compiled and measured with ``fxopt.measure``, fits. The plan is JSON:
which output channels of which layers get zero weights and zero bias.

``apply_prune_plan`` writes those zeros (the lossy step, also a pass: ``apply_prune_plan{plan=...}``)
and ``lower_zero_channels`` (exact, in the default pipeline) removes the channels physically: the
result is a smaller ordinary GraphModule to fine-tune or compile.

Unstructured, ``plan_sparsify``: the smallest-magnitude weights of convs and linears become zero
(global or per-layer threshold), for sparse kernels to use (``lower_sparse_weights``).
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from fxopt import ir, planfile, spec
from fxopt.calibration import calibration_batch, float64_outputs, relative_error
from fxopt.errors import InputError
from fxopt.pass_manager import PassContext, apply

FORMAT = "fxopt-prune-plan/1"
NORMS = ("l1", "l2")
RATIOS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # candidates of the latency search


@dataclass
class PrunePlan:
    """Which output channels of which layers become zero (weights and bias), and what that does."""

    model: str
    input_shapes: list[list[int]]
    norm: str  # "l1" | "l2": the magnitude that ranks units
    ratio: float  # the share of removable units the plan removes
    removable: int  # units (sets of coupled channels) that may go
    removed: int  # units the plan removes
    channels: dict[str, list[int]]  # layer (module path) -> output channels zeroed
    groups: list[dict]  # {"layers": [...], "channels": units, "removable": n, "removed": k, "reason": why kept}
    layer_shapes: dict[str, list[int]] = field(default_factory=dict)  # weight shapes of the layers named above
    params: list[int] = field(default_factory=list)  # [before, after] in the optimized model
    macs: list[int] = field(default_factory=list)  # [before, after] multiply-adds of convs and linears
    target: str | None = None  # latency planning: where it was measured
    unit: str | None = None  # "s" or "insn"
    baseline: float | None = None  # measured cost of the optimized model
    budget: float | None = None
    predicted: float | None = None  # measured cost of the pruned model
    measured: dict[str, float] = field(default_factory=dict)  # ratio -> measured cost of its pruned model
    calibration_error: float | None = None  # relative squared output error of the planned model
    notes: list[str] = field(default_factory=list)
    format: str = FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        return planfile.save(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        data = planfile.load(path, "prune", FORMAT, "fxopt.prune.plan_prune(...).save")
        try:
            return cls(**data)
        except TypeError as exc:
            raise InputError(f"prune plan {path}: {exc}") from exc

    def zero(self, gm: fx.GraphModule) -> Counter:
        """Write the plan's zeros into ``gm`` (each layer replaced by a zeroed copy); checks that
        the plan fits first. Stats: channels_zeroed (rows that were not zero yet), layers_pruned."""
        layers = {}
        for name, rows in self.channels.items():
            try:
                layer = gm.get_submodule(name)
            except AttributeError:
                layer = None
            if not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
                raise InputError(f"the prune plan does not fit this model: it names layer '{name}', which is not a conv "
                                 "or linear of the optimized graph; plan this model again with plan_prune")
            want, have = self.layer_shapes.get(name), list(layer.weight.shape)
            if want is not None and want != have:
                raise InputError(f"the prune plan does not fit this model: layer '{name}' has weight shape {have}, the "
                                 f"plan expects {want}; plan this model again")
            if rows and not 0 <= min(rows) <= max(rows) < have[0]:
                raise InputError(f"the prune plan names channels of '{name}' outside 0..{have[0] - 1}")
            layers[name] = (layer, rows)
        stats: Counter = Counter()
        for name, (layer, rows) in layers.items():
            index = torch.tensor(rows, dtype=torch.long)
            live = layer.weight.detach()[index].reshape(len(rows), -1).ne(0).any(1)
            if layer.bias is not None:
                live |= layer.bias.detach()[index].ne(0)
            if not bool(live.any()):
                continue  # applied already
            zeroed = copy.deepcopy(layer)  # never edit a module in place: it may be the user's
            with torch.no_grad():
                zeroed.weight[index] = 0
                if zeroed.bias is not None:
                    zeroed.bias[index] = 0
            ir.set_module(gm, name, zeroed)
            stats["channels_zeroed"] += int(live.sum())
            stats["layers_pruned"] += 1
        return stats

    def compile_pipeline(self, path: str | Path, base: str = "default") -> list:
        """A pipeline spec that compiles the original model with this plan (saved at ``path``):
        ``base`` as when the plan was made, the plan's zeros, then the channels removed. (A model
        that ``apply_prune_plan`` returned is pruned already: compile it with ``base`` alone.)"""
        return spec.resolve(base).spec() + [{"name": "apply_prune_plan", "plan": str(path)}, "lower_zero_channels"]


# ---------------------------------------------------------------------------------------------
# Structured planning


class _Candidates:
    """The units of an optimized graph that may go, ranked within their groups."""

    def __init__(self, gm: fx.GraphModule, norm: str):
        from fxopt.passes.channel_groups import ChannelGroups

        self.gm = gm
        self.groups = ChannelGroups(gm)
        self._rows: dict[fx.Node, Any] = {}
        units = [u for u in self.groups.units if u.removable and self.groups.producers(u)]
        # the plan zeroes bias too: a removed channel is f(0) after its activations; units whose
        # f(0) lowering cannot fold exactly (a sigmoid's 0.5 into a zero-padded conv) stay
        _, failed = self.groups.constants({u.root for u in units}, _zero_value)
        self.reasons = dict(failed)
        feasible = {u.root for u in units} - set(failed)
        self.ranked: list[list] = []  # per group: its feasible units, least important first
        for group in self.groups.groups:
            members = [u for u in group.units if u.root in feasible]
            members.sort(key=lambda u: (self._importance(u, norm), min(min(c) for c in u.channels.values())))
            self.ranked.append(members)
        self.removable = sum(len(members) for members in self.ranked)

    def _importance(self, unit, norm: str) -> float:
        """Σ over the unit's producers of the norm of its rows there (a sum of L1 norms, or of L2
        norms: each layer's rows measured as one vector)."""
        total = 0.0
        for node, rows in self.groups.producers(unit):
            if node not in self._rows:  # per row: Σ|w| or Σw², once per layer
                weight = self.gm.get_submodule(node.target).weight.detach().double().flatten(1)
                self._rows[node] = (weight.abs() if norm == "l1" else weight.pow(2)).sum(1).numpy()
            part = float(self._rows[node][rows].sum())
            total += part if norm == "l1" else math.sqrt(part)
        return total

    def select(self, ratio: float) -> tuple[dict[str, list[int]], list[dict], int]:
        """(layer -> channels, group summaries, units removed) for ``ratio`` of each group's
        removable units (rounded; every group keeps at least one unit)."""
        channels: dict[str, set[int]] = {}
        summaries, removed = [], 0
        for group, members in zip(self.groups.groups, self.ranked):
            layers = [n.target for n in group.producers]
            count = min(int(ratio * len(members) + 0.5), len(group.units) - 1) if members else 0
            for unit in members[:count]:
                for node, rows in self.groups.producers(unit):
                    channels.setdefault(node.target, set()).update(rows)
            removed += count
            if not layers:
                continue
            summary = {"layers": layers, "channels": len(group.units), "removable": len(members), "removed": count}
            blocked = next((u.reason or self.reasons.get(u.root) for u in group.units
                            if u.reason or u.root in self.reasons), None)
            if blocked:
                summary["reason"] = blocked
            summaries.append(summary)
        return {name: sorted(rows) for name, rows in sorted(channels.items())}, summaries, removed


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _zero_value(node: fx.Node) -> torch.Tensor:
    return torch.zeros(ir.shape_of(node)[1], dtype=torch.float64)


def plan_prune(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    ratio: float | None = None,
    budget: float | None = None,
    speedup: float | None = None,
    target: Any = "host",
    norm: str = "l1",
    pipeline: Any = "default",
    ratios: Sequence[float] = RATIOS,
    calibration: Sequence[torch.Tensor] | torch.Tensor | None = None,
    measure_options: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> PrunePlan:
    """Plan structured pruning of ``model``: which channels go, by the ``norm`` ("l1" or "l2") of
    their weight rows, within their dependency groups.

    Give one goal: ``ratio`` (the share of each group's removable channels that go, in [0, 1));
    or a latency ``budget`` (seconds, or instructions on an emulated target) or ``speedup`` over
    the measured optimized model on ``target``: then the pruned model is compiled and measured
    (``fxopt.measure``, cached) for candidate ``ratios``, searched by bisection (latency falls as
    the ratio grows), and the least ratio that fits is planned. ``calibration``: a batch for the
    plan's ``calibration_error`` (default: 8 seeded random inputs). ``measure_options`` go to
    ``fxopt.measure`` (default ``number=10``).
    """
    from fxopt.api import model_name, optimize

    goals = [name for name, value in (("ratio", ratio), ("budget", budget), ("speedup", speedup)) if value is not None]
    if len(goals) != 1:
        raise InputError("give plan_prune one goal: ratio=<share of removable channels, e.g. 0.5>, "
                         f"budget=<cost per run> or speedup=<e.g. 1.5> (got {', '.join(goals) or 'none'})")
    if ratio is not None and not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio < 1):
        raise InputError(f"ratio={ratio!r} must be in [0, 1): the share of removable channels that go (0.5 removes half)")
    if budget is not None and not _positive(budget):
        raise InputError(f"budget={budget!r} must be a positive cost per run (seconds, or instructions under qemu)")
    if speedup is not None and not _positive(speedup):
        raise InputError(f"speedup={speedup!r} must be a positive number (1.5 asks for 1.5x faster)")
    if norm not in NORMS:
        raise InputError(f"norm={norm!r} is not one of {', '.join(map(repr, NORMS))}")
    if ratio is None and (not ratios or not all(0 < r < 1 for r in ratios)):
        raise InputError(f"ratios={list(ratios)!r} must be candidate ratios in (0, 1)")
    say = log or (lambda message: None)
    inputs = ir.as_input_tuple(example_inputs)
    gm = optimize(model, inputs, pipeline).module
    candidates = _Candidates(gm, norm)
    say(f"{candidates.removable} of {len(candidates.groups.units)} channel units removable "
        f"in {len(candidates.groups.groups)} groups")
    measured: dict[str, float] = {}
    extra: dict[str, Any] = {}
    notes = []
    if ratio is None:
        ratio, extra = _search(gm, inputs, candidates, budget, speedup, target, sorted(set(ratios)),
                               measure_options, measured, notes, say)
    channels, groups, removed = candidates.select(ratio)
    plan = PrunePlan(model=model_name(model), input_shapes=[list(t.shape) for t in inputs], norm=norm,
                     ratio=removed / candidates.removable if candidates.removable else 0.0,
                     removable=candidates.removable, removed=removed, channels=channels, groups=groups,
                     layer_shapes={name: list(gm.get_submodule(name).weight.shape) for name in channels},
                     measured=measured, notes=notes, **extra)
    pruned = _pruned(gm, plan, inputs)
    plan.params = [ir.count_params(gm), ir.count_params(pruned)]
    plan.macs = [ir.count_macs(gm), ir.count_macs(pruned)]
    calib = calibration_batch(inputs, calibration)
    plan.calibration_error = relative_error(float64_outputs(gm, calib), float64_outputs(pruned, calib))
    return plan


def _search(gm, inputs, candidates, budget, speedup, target, ratios, measure_options, measured, notes, say):
    """The least candidate ratio whose pruned model's measured cost fits the goal (bisection)."""
    from fxopt.measure import measure
    from fxopt.targets import get_target

    target = get_target(target)
    options = {"number": 10, **(measure_options or {})}
    baseline = measure(gm, inputs, target, **options)
    goal = budget if budget is not None else baseline.value / speedup
    extra = {"target": target.name, "unit": baseline.unit, "baseline": baseline.value, "budget": goal}
    say(f"baseline: {baseline}")
    if baseline.value <= goal:
        notes.append("the optimized model fits the goal already: nothing is pruned")
        return 0.0, {**extra, "predicted": baseline.value}

    def cost(r: float) -> float:
        key = f"{r:g}"
        if key not in measured:
            channels, _, _ = candidates.select(r)
            plan = PrunePlan("", [], "l1", r, 0, 0, channels, [])
            measured[key] = measure(_pruned(gm, plan, inputs), inputs, target, **options).value
            say(f"ratio {r:g}: {measured[key]:.6g} {baseline.unit}")
        return measured[key]

    if cost(ratios[-1]) > goal:
        best = measured[f"{ratios[-1]:g}"]
        raise InputError(f"no ratio up to {ratios[-1]:g} reaches {goal:.6g} {baseline.unit} per run on {target.name}: "
                         f"the best measured is {best:.6g} ({baseline.value / best:.2f}x the optimized model's "
                         f"{baseline.value:.6g}); ask for less")
    low, high = 0, len(ratios) - 1
    while low < high:  # the least ratio that fits; latency is taken to fall as the ratio grows
        middle = (low + high) // 2
        if cost(ratios[middle]) <= goal:
            high = middle
        else:
            low = middle + 1
    return ratios[low], {**extra, "predicted": cost(ratios[low])}


def _pruned(gm: fx.GraphModule, plan: PrunePlan, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """A copy of ``gm`` with the plan's zeros, lowered (its channels removed)."""
    from fxopt.passes.lower_zero_channels import LowerZeroChannels

    pruned = copy.deepcopy(gm)
    plan.zero(pruned)
    apply(LowerZeroChannels(), pruned, PassContext(example_inputs=inputs, verify="off"))
    return pruned


def apply_prune_plan(
    model: nn.Module, plan: PrunePlan | str | Path, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    pipeline: Any = "default", lower: bool = True,
) -> fx.GraphModule:
    """The pruned model as a trainable GraphModule: ``model`` optimized with ``pipeline`` (the
    one the plan was made with), the plan's channels zeroed and, with ``lower``, removed
    physically (checked against the zeroed model). Fine-tune it (``fxopt.finetune.distill``),
    then compile it as any model."""
    from fxopt.api import optimize
    from fxopt.passes.lower_zero_channels import LowerZeroChannels

    if not isinstance(plan, PrunePlan):
        plan = PrunePlan.load(plan)
    inputs = ir.as_input_tuple(example_inputs)
    gm = optimize(model, inputs, pipeline).module
    plan.zero(gm)
    gm.recompile()
    if lower:
        ctx = PassContext(example_inputs=inputs, verify="each", reference=copy.deepcopy(gm))
        apply(LowerZeroChannels(), gm, ctx)
    ir.propagate_shapes(gm, inputs)
    return gm


# ---------------------------------------------------------------------------------------------
# Unstructured


SPARSIFY_SCOPES = ("global", "layer")
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def plan_sparsify(
    model: nn.Module,
    density: float,
    *,
    scope: str = "global",
    layers: Sequence[str] | Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """A copy of ``model`` whose conv and linear weights keep only their largest-magnitude
    ``density`` share (in (0, 1]; 0.1 keeps 10 %), the rest set to zero.

    ``scope="global"``: one magnitude threshold over all chosen layers (layers with small weights
    lose more); ``"layer"``: each layer keeps its own ``density`` share (at least one weight).
    ``layers``: module paths, or a predicate ``(name, module) -> bool``, choosing which convs and
    linears to sparsify (default: all). Ties at the threshold are broken by position, so exactly
    the requested count stays. The model itself is not modified.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise InputError(f"density={density!r} must be in (0, 1]: the share of weights kept (0.1 keeps 10 %)")
    if scope not in SPARSIFY_SCOPES:
        raise InputError(f"scope={scope!r} is not one of {', '.join(map(repr, SPARSIFY_SCOPES))}")
    model = copy.deepcopy(model)
    weighted = {name: m for name, m in model.named_modules() if isinstance(m, _WEIGHTED)}
    if layers is None:
        chosen = list(weighted.items())
    elif callable(layers):
        chosen = [(name, m) for name, m in weighted.items() if layers(name, m)]
    else:
        unknown = [name for name in layers if name not in weighted]
        if unknown:
            raise InputError(f"layers {unknown} are not convs or linears of {type(model).__name__} "
                             f"(those are: {', '.join(list(weighted)[:8])}{' ...' if len(weighted) > 8 else ''})")
        chosen = [(name, weighted[name]) for name in layers]
    if not chosen:
        raise InputError(f"{type(model).__name__} has no conv or linear to sparsify (layers={layers!r})")
    with torch.no_grad():
        if scope == "layer":
            for _, module in chosen:
                module.weight.mul_(_top_mask(module.weight.abs().flatten(), density).reshape(module.weight.shape))
        else:
            magnitudes = torch.cat([m.weight.detach().abs().flatten().float() for _, m in chosen])
            mask = _top_mask(magnitudes, density)
            offset = 0
            for _, module in chosen:
                n = module.weight.numel()
                module.weight.mul_(mask[offset:offset + n].reshape(module.weight.shape).to(module.weight.dtype))
                offset += n
    return model


def _top_mask(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """1 at the ``density`` share of largest entries (at least one), 0 elsewhere."""
    keep = max(1, math.floor(density * magnitudes.numel() + 0.5))
    mask = torch.zeros_like(magnitudes)
    mask[torch.topk(magnitudes, keep, sorted=False).indices] = 1
    return mask


__all__ = ["FORMAT", "PrunePlan", "apply_prune_plan", "plan_prune", "plan_sparsify"]
