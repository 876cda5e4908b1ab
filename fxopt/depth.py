"""Depth compression: plan which activations to drop so that convs merge, within a latency budget.

Kim et al., "Efficient Latency-Aware CNN Depth Compression via Two-Stage Dynamic Programming"
(ICML 2023), on any traced CNN and with latency measured on the deployment target:

1. The graph is optimized (BN folded) and its spine convs c_0..c_{n-1} found
   (``fxopt.passes.merge_convs.ConvChain``). Removing the activations inside a segment [a, b)
   makes its convs one linear run.
2. T(i, j): the measured cost of convs [i, j) merged into one conv (``fxopt.measure``: time on
   the host, instructions under qemu, time on an RPC device; cached on disk), at its real input
   shape, with the activation after it. T_opt(a, b) = the best split of [a, b) into merged
   groups (first DP, ``optimal_partition``), since a merged kernel can be slower than its parts.
3. I(a, b): the importance of the activations inside [a, b), as the damage D = -I of removing
   them: by default the relative squared error of the network's output on a calibration batch,
   or ``importance(module)`` (e.g. accuracy after a short fine-tune) of the model without them.
4. Second DP (``solve``): boundaries 0 = k_0 < ... < k_m = n minimizing Σ D(k_i, k_i+1) subject
   to R + Σ T_opt(k_i, k_i+1) <= budget, with R the measured model's cost outside its convs.
   Costs are discretized in ``precision`` steps of the budget, rounded up: a plan the DP
   accepts is within budget by its own table.

Inner zero paddings that cannot compose (a padded conv after a conv with a bias) are moved onto
the group's input in the planned model (recorded as "padding": "moved"): an approximation the
plan accepts explicitly, which fine-tuning absorbs. The plan is JSON a user can read and edit.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import fx, nn

from fxopt import ir, kernels, planfile, progress, spec
from fxopt.calibration import calibration_batch, float64_outputs, relative_error
from fxopt.errors import InputError
from fxopt.passes.merge_convs import ConvChain, Group, apply_plan, conv_cost_module, group_cost, optimal_partition

FORMAT = "fxopt-depth-plan/1"


@dataclass
class DepthPlan:
    """Which activations go, which conv groups merge, and what that should cost (JSON)."""

    model: str
    target: str
    input_shapes: list[list[int]]
    unit: str  # "s" or "insn"
    baseline: float  # measured cost of the optimized model
    remainder: float  # baseline minus the measured cost of its convs one by one (each less a call's overhead)
    budget: float
    predicted: float
    removed_activations: list[dict]  # {"after": conv name, "op": "relu6"}
    merges: list[dict]  # {"convs": [...], "kernel": [kh, kw], "stride": [...], "groups": g, "padding": ..., "cost": T}
    segments: list[dict] = field(default_factory=list)  # {"convs": [first, last], "cost": T_opt, "damage": D}
    conv_shapes: dict[str, list[int]] = field(default_factory=dict)  # weight shapes of the convs named above
    calibration_error: float | None = None  # relative squared output error of the planned model
    notes: list[str] = field(default_factory=list)  # what makes the figures less reliable
    format: str = FORMAT
    # what planning did, for the HTML report (fxopt.report.Report: the optimize() run, the conv
    # latency table, the trade-off curve); not saved in the plan file
    report: Any = field(default=None, repr=False, compare=False)

    @property
    def predicted_speedup(self) -> float:
        return self.baseline / self.predicted if self.predicted > 0 else math.inf

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("report", None)
        return {**data, "predicted_speedup": round(self.predicted_speedup, 4)}

    def save(self, path: str | Path) -> Path:
        return planfile.save(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "DepthPlan":
        data = planfile.load(path, "depth", FORMAT, "`fxopt plan depth`")
        data.pop("predicted_speedup", None)
        try:
            return cls(**data)
        except TypeError as exc:
            raise InputError(f"depth plan {path}: {exc}") from exc

    # -- fitting a plan to a graph

    def _check_conv(self, chain: ConvChain, name: str) -> int:
        k = chain.index(name)
        if k is None:
            raise InputError(f"the depth plan does not fit this model: it names conv '{name}', which is not on the "
                             f"model's main path (convs there: {', '.join(chain.name(i) for i in range(min(len(chain), 6)))}, ...); "
                             "plan this model again with `fxopt plan depth`")
        want = self.conv_shapes.get(name)
        have = list(chain.gm.get_submodule(name).weight.shape)
        if want is not None and want != have:
            raise InputError(f"the depth plan does not fit this model: conv '{name}' has weight shape {have}, the plan "
                             f"expects {want}; plan this model again")
        return k

    def removed_in(self, chain: ConvChain) -> frozenset[int]:
        """Gap indices whose activations the plan removes (checked against the graph)."""
        removed = set()
        for entry in self.removed_activations:
            k = self._check_conv(chain, entry["after"])
            activation = chain.gaps[k].activation
            if activation is not None and ir.op_key(activation, chain.gm) != entry["op"]:
                raise InputError(f"the depth plan does not fit this model: after conv '{entry['after']}' it removes a "
                                 f"{entry['op']}, the model has '{activation.name}' "
                                 f"({ir.op_key(activation, chain.gm)}); plan this model again")
            removed.add(k)
        return frozenset(removed)

    def groups_in(self, chain: ConvChain, exact: bool, removed: frozenset[int] = frozenset()) -> list[Group]:
        """The plan's merge groups in ``chain``; with ``exact`` each must merge exactly as it is."""
        groups = []
        for entry in self.merges:
            indices = [self._check_conv(chain, name) for name in entry["convs"]]
            if indices != list(range(indices[0], indices[0] + len(indices))):
                raise InputError(f"the depth plan does not fit this model: convs {entry['convs']} are not consecutive "
                                 "on its main path")
            group = chain.group(indices[0], indices[-1] + 1, removed, move_padding=not exact)
            if not group.ok:
                hint = (" (apply the plan first: apply_depth_plan{plan=...} before merge_convs{plan=...})"
                        if exact else "")
                raise InputError(f"the depth plan's group {entry['convs']} cannot merge: {group.reason}{hint}")
            groups.append(group)
        return groups

    def compile_pipeline(self, path: str | Path, base: str = "default", applied: bool = True) -> list:
        """A pipeline spec that builds with this plan (saved at ``path``: pipelines name files, so
        that a build can be replayed from its spec).

        ``applied`` (the model is ``apply_depth_plan``'s result, maybe fine-tuned): the plan is
        checked and its groups merged first, then ``base`` runs (by then the graph has the names
        the plan uses; merging first keeps ``fold_branches`` from folding a residual block the
        plan merges under another name). Otherwise (the original model): ``base`` first, as when
        the plan was made, then the plan applied and its groups merged."""
        steps = [{"name": "apply_depth_plan", "plan": str(path)}, {"name": "merge_convs", "plan": str(path)}]
        base_steps = spec.resolve(base).spec()
        return steps + base_steps if applied else base_steps + steps


# ---------------------------------------------------------------------------------------------
# The second-stage dynamic program


@dataclass(frozen=True)
class Solution:
    damage: float
    cost: float
    boundaries: list[int]  # 0 = k_0 < ... < k_m = n


def solve(n: int, segments: dict[tuple[int, int], tuple[float, float]], budget: float, precision: int = 1000) -> Solution | None:
    """Boundaries of [0, n) into segments (a, b) from ``segments`` ({(a, b): (cost, damage)})
    with the least total damage and total cost <= budget; None when no split fits.

    Costs are rounded up to multiples of budget / precision, so the returned split's true cost
    is within budget; with integer costs and precision = budget the DP is exact.
    """
    if budget < 0:
        return None
    precision = max(int(precision), 0)
    unit = budget / precision if precision else math.inf
    size = precision + 1
    best = np.full((n + 1, size), np.inf)  # best[b, t]: least damage covering [0, b) at cost t units
    best[0, 0] = 0.0
    choice: dict[tuple[int, int], tuple[int, int]] = {}
    by_end: dict[int, list] = {}
    for (a, b), (cost, damage) in segments.items():
        if cost <= 0:
            units = 0
        elif budget > 0 and math.isfinite(cost):
            units = int(math.ceil(cost / unit - 1e-9))
        else:
            continue  # costs something, and nothing is left to spend
        by_end.setdefault(b, []).append((a, units, damage))
    for b in range(1, n + 1):
        for a, units, damage in by_end.get(b, []):
            if units >= size:
                continue
            candidate = np.full(size, np.inf)
            candidate[units:] = best[a, :size - units] + damage
            better = candidate < best[b]
            for t in np.nonzero(better)[0]:
                choice[(b, int(t))] = (a, int(t) - units)
            best[b] = np.where(better, candidate, best[b])
    row = best[n]
    if not np.isfinite(row).any():
        return None
    finite = np.isfinite(row)
    t = int(np.flatnonzero(finite & (row == row[finite].min()))[0])
    damage = float(row[t])
    boundaries, b = [n], n
    while b > 0:
        b, t = choice[(b, t)]
        boundaries.append(b)
    boundaries.reverse()
    cost = sum(segments[(a, b)][0] for a, b in zip(boundaries, boundaries[1:]))
    return Solution(damage, cost, boundaries)


def min_cost(n: int, segments: dict[tuple[int, int], tuple[float, float]]) -> float:
    """The least total cost of any split of [0, n) (what no budget can beat)."""
    return optimal_partition(n, lambda a, b: segments.get((a, b), (math.inf, 0))[0])[0]


# ---------------------------------------------------------------------------------------------
# Planning


def plan_depth(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    target: Any = "host",
    *,
    speedup: float | None = None,
    budget: float | None = None,
    calibration: Sequence[torch.Tensor] | torch.Tensor | None = None,
    importance: Callable[[nn.Module], float] | None = None,
    pipeline: Any = "default",
    max_kernel: int = 7,
    max_span: int = 8,
    precision: int = 1000,
    measure_options: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> DepthPlan:
    """Plan depth compression of ``model`` for ``target``: which activations to remove so that
    the convs between them merge, for a latency ``budget`` (seconds, or instructions on an
    emulated target) or a ``speedup`` goal over the measured optimized model.

    ``calibration``: a batch of inputs (default: 8 seeded random inputs shaped like the
    examples); damage is the relative squared error of the output on it. ``importance``: a
    callable scoring a module (higher is better), used instead. ``max_span``: the most convs in
    one segment between kept activations. ``measure_options`` go to ``fxopt.measure`` (default
    ``number=10``: each sample the mean of 10 runs).
    """
    from fxopt.api import model_name, optimize
    from fxopt.measure import measure
    from fxopt.targets import get_target

    if (speedup is None) == (budget is None):
        raise InputError("give plan_depth either speedup=<goal, e.g. 1.5> or budget=<cost per run>, not both or neither")
    if speedup is not None and not speedup > 0:
        raise InputError(f"speedup={speedup!r} must be a positive number (1.5 asks for 1.5x faster)")
    if budget is not None and not budget > 0:
        raise InputError(f"budget={budget!r} must be a positive cost per run (seconds, or instructions under qemu)")
    say = log or (lambda message: None)
    target = get_target(target)
    inputs = ir.as_input_tuple(example_inputs)
    optimized = optimize(model, inputs, pipeline, target=target)
    gm = optimized.module
    calib = calibration_batch(inputs, calibration)
    chain = ConvChain(gm, max_kernel)
    if len(chain) < 2:
        raise InputError(f"{model_name(model)} has {len(chain)} conv(s) on its main path: nothing to merge")
    # samples of 10 runs each: one run of a small conv is a few microseconds, noisy alone
    options = {"number": 10, **(measure_options or {})}
    baseline = measure(gm, inputs, target, **options)
    # A conv measured alone also pays for one call of the compiled module (argument checks, the
    # thread pool waking up), which it does not pay inside the model: measured once and taken off.
    overhead = measure(conv_cost_module(kernels.identity_conv(1), None, torch.float32, True), (torch.zeros(1, 1, 1, 1),),
                       target, **options).value
    say(f"baseline: {baseline}; a call costs {_shown(overhead, baseline.unit)}")

    costs: dict[tuple[int, int, bool], float] = {}

    def cost_of(group: Group, removed: frozenset[int]) -> float:
        key = (group.start, group.stop, group.stop - 1 in removed)
        if key not in costs:
            costs[key] = max(group_cost(chain, group, target, removed, **options) - overhead, 0.0) if group.ok else math.inf
        return costs[key]

    n = len(chain)
    singles = [cost_of(chain.group(k, k + 1), frozenset()) for k in range(n)]
    remainder = baseline.value - sum(singles)
    notes = []
    if remainder < 0:
        notes.append(f"the convs measured one by one cost {_shown(sum(singles), baseline.unit)}, more than the whole "
                     f"model ({_shown(baseline.value, baseline.unit)}): a conv alone pays per-call costs that it does "
                     "not pay inside the model, or the machine was busy; the predicted latency is less reliable "
                     "(measured MobileNetV2 plans came out 5-10 % slower than predicted); on a busy machine, measure "
                     "again when it is quiet (measure_options={'cache': False})")
        say(notes[-1])
    segments, partitions = {}, {}
    started = time.perf_counter()
    table_bar = progress.bar(n, f"latency table on {target.name}", unit="conv")
    for a in range(n):
        for b in range(a + 1, min(n, a + max_span) + 1):
            if any(chain.gaps[k].barrier for k in range(a, b - 1)):
                break
            removed = frozenset(k for k in range(a, b - 1) if chain.gaps[k].activation is not None)
            # a group ending inside the segment has its activation removed; the last keeps its own
            total, partition = optimal_partition(
                b - a, lambda i, j: cost_of(chain.group(a + i, a + j, removed, move_padding=True),
                                            removed if a + j < b else frozenset()))
            if math.isfinite(total):
                segments[(a, b)] = (total, None)
                partitions[(a, b)] = [(a + i, a + j) for i, j in partition]
        say(f"latency table: convs from {a + 1}/{n} ({time.perf_counter() - started:.0f} s)")
        table_bar.update()
    table_bar.close()
    damage = _damage_table(gm, chain, segments, calib, importance, say)
    segments = {key: (cost, damage[key]) for key, (cost, _) in segments.items()}

    goal = budget if budget is not None else baseline.value / speedup
    solution = solve(n, segments, goal - remainder, precision)
    if solution is None:
        best = remainder + min_cost(n, segments)
        shown = _shown(best, baseline.unit)
        raise InputError(f"no plan reaches {_shown(goal, baseline.unit)} per run on {target.name}: the best reachable is "
                         f"{shown} ({baseline.value / best:.2f}x the measured {_shown(baseline.value, baseline.unit)}); "
                         "ask for less, or raise max_kernel / max_span")
    plan = _plan(model_name(model), target, inputs, baseline, remainder, goal, chain, solution, segments, partitions)
    planned = _planned(gm, plan)
    plan.calibration_error = relative_error(float64_outputs(gm, calib), float64_outputs(planned, calib))
    plan.notes = notes
    plan.report = _report(optimized.report, plan, chain, singles, segments, solution, baseline, target, precision,
                          importance is not None)
    return plan


def _report(report, plan: DepthPlan, chain: ConvChain, singles: list[float], segments, solution: Solution,
            baseline, target, precision: int, custom_importance: bool):
    """``report`` (optimize()'s) with the plan's conv latency table and its trade-off curve: the
    least damage within each of a range of budgets, from the cheapest plan to the cheapest one
    that removes nothing."""
    n = len(chain)
    report.layers = {"unit": baseline.unit, "backend": baseline.backend, "target": target.name,
                     "rows": [{"name": chain.name(k), "kind": "conv2d", "value": float(singles[k])} for k in range(n)],
                     "note": "each conv of the main path measured alone, less one call's overhead (the plan's latency table)"}

    def removed(boundaries: list[int]) -> int:
        return sum(1 for a, b in zip(boundaries, boundaries[1:]) for k in range(a, b - 1)
                   if chain.gaps[k].activation is not None)

    low = min_cost(n, segments)
    whole = solve(n, segments, sum(cost for cost, _ in segments.values()), precision)
    high = whole.cost if whole is not None else plan.budget - plan.remainder
    curve = {}
    for i in range(25):
        budget = low + (high - low) * i / 24
        found = solve(n, segments, budget * (1 + 1e-9), min(precision, 400))
        for point in (found, whole, solution) if i == 24 else (found,):
            if point is not None:
                curve[tuple(point.boundaries)] = {"latency": plan.remainder + point.cost, "damage": point.damage,
                                                  "removed": removed(point.boundaries)}
    # (coarse budget steps can find a plan that a finer one dominates: keep the Pareto front)
    front, best = [], math.inf
    for point in sorted(curve.values(), key=lambda p: (p["latency"], p["damage"])):
        if point["damage"] < best:
            front.append(point)
            best = point["damage"]
    report.depth = {"unit": plan.unit, "baseline": plan.baseline, "remainder": plan.remainder, "goal": plan.budget,
                    "chosen": {"latency": plan.predicted, "damage": solution.damage,
                               "removed": len(plan.removed_activations)},
                    "curve": front,
                    "calibration_error": plan.calibration_error,
                    "removed_activations": plan.removed_activations, "merges": plan.merges,
                    "damage": ("the importance lost (importance() of the model less that of the model without the "
                               "activations)") if custom_importance else
                              "the relative squared error of the output on the calibration batch"}
    return report


def _plan(name, target, inputs, baseline, remainder, goal, chain, solution, segments, partitions) -> DepthPlan:
    removed, merges, chosen = [], [], []
    for a, b in zip(solution.boundaries, solution.boundaries[1:]):
        cost, damage = segments[(a, b)]
        chosen.append({"convs": [chain.name(a), chain.name(b - 1)], "cost": cost, "damage": damage})
        inner = frozenset(k for k in range(a, b - 1) if chain.gaps[k].activation is not None)
        removed += [{"after": chain.name(k), "op": ir.op_key(chain.gaps[k].activation, chain.gm)} for k in sorted(inner)]
        for start, stop in partitions[(a, b)]:
            if stop - start < 2:
                continue
            group = chain.group(start, stop, inner, move_padding=True)
            merged = group.merged
            merges.append({"convs": [chain.name(k) for k in range(start, stop)], "kernel": list(merged.kernel_size),
                           "stride": list(merged.stride), "padding": "moved" if group.padding_moved else "exact"})
    named = {entry["after"] for entry in removed} | {c for m in merges for c in m["convs"]}
    shapes = {c: list(chain.gm.get_submodule(c).weight.shape) for c in sorted(named)}
    return DepthPlan(model=name, target=target.name, input_shapes=[list(t.shape) for t in inputs], unit=baseline.unit,
                     baseline=baseline.value, remainder=remainder, budget=goal, predicted=remainder + solution.cost,
                     removed_activations=removed, merges=merges, segments=chosen, conv_shapes=shapes)


def _shown(value: float, unit: str) -> str:
    return f"{value * 1e3:.3f} ms" if unit == "s" else f"{value:,.0f} instructions"


def _without(gm: fx.GraphModule, activations: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s modules whose graph skips ``activations`` (the identity)."""
    graph = copy.deepcopy(gm.graph)
    by_name = {node.name: node for node in graph.nodes}
    for activation in activations:
        node = by_name[activation.name]
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    return fx.GraphModule(gm, graph)


def _damage_table(gm, chain, segments, calib, importance, say) -> dict[tuple[int, int], float]:
    """D(a, b) for each segment: what removing its inner activations costs (see plan_depth)."""
    score = importance or (lambda module: -relative_error(reference, float64_outputs(module, calib)))
    reference = float64_outputs(gm, calib)
    base = score(gm) if importance is not None else 0.0
    damage, seen = {}, {}
    for (a, b) in segments:
        inner = tuple(k for k in range(a, b - 1) if chain.gaps[k].activation is not None)
        if inner not in seen:
            seen[inner] = 0.0 if not inner else base - score(_without(gm, [chain.gaps[k].activation for k in inner]))
        damage[(a, b)] = seen[inner]
    say(f"importance: {len(seen)} activation sets scored")
    return damage


def _planned(gm: fx.GraphModule, plan: DepthPlan) -> fx.GraphModule:
    planned = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    apply_plan(planned, plan)
    planned.recompile()
    return planned


def apply_depth_plan(
    model: nn.Module, plan: DepthPlan | str | Path, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    pipeline: Any = "default",
) -> fx.GraphModule:
    """The planned model as a trainable GraphModule: ``model`` optimized with ``pipeline`` (the
    one the plan was made with), the plan's activations replaced by the identity and its
    groups' paddings moved. Fine-tune it (``fxopt.finetune.distill``), then compile it with
    ``pipeline=plan.compile_pipeline(path)``, which merges the groups exactly."""
    from fxopt.api import optimize

    if not isinstance(plan, DepthPlan):
        plan = DepthPlan.load(plan)
    inputs = ir.as_input_tuple(example_inputs)
    expected = [list(t.shape) for t in inputs]
    if plan.input_shapes != expected:
        raise InputError(f"the depth plan was made for input shapes {plan.input_shapes}, these inputs are {expected}: "
                         "plan again for this shape (merged kernels and latencies depend on it)")
    gm = optimize(model, inputs, pipeline).module
    apply_plan(gm, plan)
    gm.recompile()
    ir.propagate_shapes(gm, inputs)
    return gm
