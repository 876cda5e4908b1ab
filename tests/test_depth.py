import copy
import itertools
import json
import math
import random

import pytest
import torch
from torch import nn

import fxopt
import fxopt.measure
from fxopt import depth, examples, ir, kernels, verify
from fxopt.depth import DepthPlan, min_cost, solve
from fxopt.errors import InputError
from fxopt.measure import Measurement
from fxopt.pass_manager import PassContext, apply
from fxopt.passes.merge_convs import ConvChain, kept_activation, optimal_partition
from fxopt.spec import build_pass
from fxopt.testing import op_counts, randomize_norm_stats

# ---------------------------------------------------------------------------------------------
# The dynamic programs against brute force


def partitions(n):
    """Every split of [0, n) into consecutive segments, as boundary lists 0 = k_0 < ... < k_m = n."""
    for r in range(n):
        for inner in itertools.combinations(range(1, n), r):
            yield [0, *inner, n]


def random_segments(rng, n):
    """{(a, b): (integer cost, float damage)}; some multi-conv segments missing or of infinite
    cost (not allowed), every single-conv segment present."""
    segments = {}
    for a in range(n):
        for b in range(a + 1, n + 1):
            if b - a > 1 and rng.random() < 0.3:
                continue
            cost = math.inf if b - a > 1 and rng.random() < 0.1 else rng.randint(0, 6)
            damage = 0.0 if b - a == 1 else rng.uniform(-0.2, 1.0)
            segments[(a, b)] = (cost, damage)
    return segments


def brute_force(n, segments, budget):
    """(least damage, its boundaries) over splits whose cost fits the budget; None when none fits."""
    best = None
    for bounds in partitions(n):
        pieces = list(zip(bounds, bounds[1:]))
        if any(p not in segments for p in pieces):
            continue
        cost = sum(segments[p][0] for p in pieces)
        damage = 0.0
        for p in pieces:
            damage += segments[p][1]
        if cost <= budget and (best is None or damage < best[0]):
            best = (damage, bounds)
    return best


def test_solve_equals_brute_force():
    rng = random.Random(0)
    feasible = infeasible = 0
    for _ in range(200):
        n = rng.randint(2, 6)
        segments = random_segments(rng, n)
        budget = rng.randint(0, 4 * n)
        expected = brute_force(n, segments, budget)
        solution = solve(n, segments, budget, precision=budget)
        if expected is None:
            infeasible += 1
            assert solution is None, (n, segments, budget, solution)
            continue
        feasible += 1
        assert solution is not None, (n, segments, budget, expected)
        assert abs(solution.damage - expected[0]) <= 1e-12, (n, segments, budget, solution, expected)
        bounds = solution.boundaries
        assert bounds[0] == 0 and bounds[-1] == n and bounds == sorted(set(bounds))
        pieces = list(zip(bounds, bounds[1:]))
        assert solution.cost == sum(segments[p][0] for p in pieces) <= budget
        assert abs(sum(segments[p][1] for p in pieces) - solution.damage) <= 1e-12
    assert feasible > 50 and infeasible > 5  # both outcomes were exercised


def test_solve_with_coarse_precision_stays_within_budget():
    """Costs are rounded up: a coarse table can only lose plans, never accept one over budget."""
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(2, 6)
        segments = {key: (cost + rng.random(), damage) for key, (cost, damage) in random_segments(rng, n).items()}
        budget = rng.uniform(1.0, 4.0 * n)
        exact = brute_force(n, segments, budget)
        solution = solve(n, segments, budget, precision=rng.choice([3, 10, 100]))
        if solution is None:
            continue
        assert exact is not None
        assert solution.cost <= budget + 1e-9
        assert solution.damage >= exact[0] - 1e-12


def test_solve_negative_budget_and_single_segments():
    segments = {(0, 1): (1, 0.0), (1, 2): (1, 0.0), (0, 2): (1, 0.5)}
    assert solve(2, segments, -1) is None
    assert solve(2, segments, 1, precision=1).boundaries == [0, 2]  # only the merged segment fits
    assert solve(2, segments, 2, precision=2).boundaries == [0, 1, 2]  # both fit: no damage wins


def test_solve_zero_budget_accepts_only_free_plans():
    assert solve(1, {(0, 1): (5.0, 0.0)}, 0.0) is None


def test_optimal_partition_equals_brute_force():
    rng = random.Random(2)
    for _ in range(200):
        n = rng.randint(1, 6)
        table = {(a, b): (math.inf if b - a > 1 and rng.random() < 0.3 else rng.uniform(0, 5))
                 for a in range(n) for b in range(a + 1, n + 1)}
        if rng.random() < 0.1:
            table[(0, 1)] = math.inf  # sometimes no partition exists at all
        total, groups = optimal_partition(n, lambda a, b: table[(a, b)])
        expected = min(sum(table[p] for p in zip(bounds, bounds[1:])) for bounds in partitions(n))
        if math.isinf(expected):
            assert total == math.inf and groups == []
            continue
        assert abs(total - expected) <= 1e-9
        assert groups[0][0] == 0 and groups[-1][1] == n
        assert all(first[1] == second[0] for first, second in zip(groups, groups[1:]))
        assert abs(sum(table[g] for g in groups) - total) <= 1e-9


def test_min_cost_is_the_least_total_cost():
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(2, 6)
        segments = random_segments(rng, n)
        expected = min(sum(segments.get(p, (math.inf, 0))[0] for p in zip(bounds, bounds[1:]))
                       for bounds in partitions(n))
        assert min_cost(n, segments) == expected
        if math.isfinite(expected):  # and a budget of exactly that is the least that solve accepts
            assert solve(n, segments, expected, precision=int(expected)) is not None
            if expected >= 1:
                assert solve(n, segments, expected - 1, precision=int(expected) - 1) is None


# ---------------------------------------------------------------------------------------------
# DepthPlan files


def block_plan(**changes):
    fields = dict(model="Block", target="host", input_shapes=[[1, 3, 16, 16]], unit="s", baseline=2e-4,
                  remainder=5e-5, budget=1.6e-4, predicted=1.5e-4,
                  removed_activations=[{"after": "c1", "op": "relu"}, {"after": "c2", "op": "relu"}],
                  merges=[{"convs": ["c1", "c2", "c3"], "kernel": [3, 3], "stride": [1, 1], "padding": "moved"}],
                  segments=[{"convs": ["c1", "c3"], "cost": 1e-4, "damage": 0.25}],
                  conv_shapes={"c1": [16, 8, 1, 1], "c2": [16, 1, 3, 3], "c3": [8, 16, 1, 1]})
    return DepthPlan(**{**fields, **changes})


def test_plan_json_round_trip(tmp_path):
    plan = block_plan(calibration_error=0.125)
    path = plan.save(tmp_path / "sub" / "plan.json")
    data = json.loads(path.read_text())
    assert data["format"] == depth.FORMAT and data["predicted_speedup"] == round(2e-4 / 1.5e-4, 4)
    loaded = DepthPlan.load(path)
    assert loaded == plan
    assert not list(path.parent.glob("*.tmp"))


def test_plan_load_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        DepthPlan.load(tmp_path / "missing.json")
    path = tmp_path / "plan.json"
    data = block_plan().to_json()
    path.write_text(json.dumps({**data, "format": "fxopt-depth-plan/0"}))
    with pytest.raises(InputError, match="'format' must be 'fxopt-depth-plan/1'"):
        DepthPlan.load(path)
    path.write_text(json.dumps([data]))
    with pytest.raises(InputError, match="'format' must be"):
        DepthPlan.load(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON"):
        DepthPlan.load(path)
    path.write_text(json.dumps({**data, "surprise": 1}))
    with pytest.raises(InputError, match="surprise"):
        DepthPlan.load(path)


# ---------------------------------------------------------------------------------------------
# Applying a plan (hand-written, nothing measured)


class Block(nn.Module):
    """stem → relu → x + c3(relu(bn2(c2(relu(bn1(c1(x))))))): an inverted residual block after a stem."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 16, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)  # folded: a bias, so c2's zero padding cannot compose exactly, it moves
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return x + self.c3(torch.relu(self.bn2(self.c2(torch.relu(self.bn1(self.c1(x)))))))


def block():
    torch.manual_seed(0)
    return randomize_norm_stats(Block(), seed=0).eval()


def block_input():
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_apply_then_compile_handcrafted_plan(tmp_path):
    model, x = block(), block_input()
    path = block_plan().save(tmp_path / "plan.json")
    planned = depth.apply_depth_plan(model, path, x)
    assert op_counts(planned)["relu"] == 1 and op_counts(planned)["conv2d"] == 4
    assert planned.get_submodule("c1").padding == (1, 1) and planned.get_submodule("c2").padding == (0, 0)
    assert model.c1.padding == (0, 0) and model.c2.padding == (1, 1)  # the user's model keeps its modules
    # the planned model is the lossy one: it differs from the model
    assert not verify.compare_outputs(model(x), planned(x), *verify.PASS_TOLERANCE).ok
    # applying the plan again changes nothing
    result = apply(build_pass({"name": "apply_depth_plan", "plan": str(path)}), planned, PassContext(example_inputs=(x,)))
    assert not result.changed, result.stats
    # the compile pipeline from the original model merges the group exactly, its residual add included
    compiled = fxopt.optimize(model, x, pipeline=block_plan().compile_pipeline(path, applied=False))
    assert op_counts(compiled.module) == {"conv2d": 2, "relu": 1}
    verify.check_equivalent(planned, compiled.module, (x,))


def test_compile_pipeline_on_the_planned_model(tmp_path):
    """The planned model's residual block is linear: the default pipeline's fold_branches would
    fold it under another name, so the plan's groups merge first."""
    model, x = block(), block_input()
    path = block_plan().save(tmp_path / "plan.json")
    planned = depth.apply_depth_plan(model, path, x)
    compiled = fxopt.optimize(planned, x, pipeline=block_plan().compile_pipeline(path))
    assert op_counts(compiled.module) == {"conv2d": 2, "relu": 1}
    verify.check_equivalent(planned, compiled.module, (x,))


def test_merge_plan_before_apply_says_to_apply_first(tmp_path):
    path = block_plan().save(tmp_path / "plan.json")
    with pytest.raises(fxopt.PassError, match="apply the plan first"):
        fxopt.optimize(block(), block_input(), pipeline=["canonicalize", {"name": "merge_convs", "plan": str(path)}])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"removed_activations": [{"after": "nope", "op": "relu"}]}, "names conv 'nope'"),
        ({"merges": [{"convs": ["c1", "nope"], "kernel": [3, 3], "stride": [1, 1], "padding": "moved"}]},
         "names conv 'nope'"),
        ({"conv_shapes": {"c1": [16, 8, 3, 3]}}, "weight shape"),
        ({"removed_activations": [{"after": "c1", "op": "relu6"}]}, "removes a relu6"),
        ({"merges": [{"convs": ["c1", "c3"], "kernel": [1, 1], "stride": [1, 1], "padding": "exact"}]},
         "not consecutive"),
    ],
    ids=["activation-conv", "merge-conv", "shape", "activation-kind", "not-consecutive"],
)
def test_plan_that_does_not_fit(tmp_path, changes, message):
    path = block_plan(**changes).save(tmp_path / "plan.json")
    with pytest.raises(InputError, match=message) as info:
        depth.apply_depth_plan(block(), path, block_input())
    assert "does not fit" in str(info.value)


def test_plan_for_other_input_shapes(tmp_path):
    path = block_plan().save(tmp_path / "plan.json")
    with pytest.raises(InputError, match="input shapes"):
        depth.apply_depth_plan(block(), path, torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------
# plan_depth: bad input (nothing measured)


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "either speedup"),
        ({"speedup": 1.5, "budget": 1e-3}, "either speedup"),
        ({"speedup": 0}, "speedup=0"),
        ({"speedup": -1.5}, "speedup=-1.5"),
        ({"speedup": math.nan}, "speedup=nan"),
        ({"budget": 0.0}, "budget=0.0"),
        ({"budget": -1e-3}, "budget=-0.001"),
    ],
    ids=["neither", "both", "zero-speedup", "negative-speedup", "nan-speedup", "zero-budget", "negative-budget"],
)
def test_plan_depth_bad_goal(options, message):
    with pytest.raises(InputError, match=message):
        depth.plan_depth(block(), block_input(), "host", **options)


@pytest.mark.parametrize(
    "calibration",
    [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 16, 16, dtype=torch.float64), (torch.randn(4, 3, 16, 16),) * 2],
    ids=["shape", "dtype", "count"],
)
def test_plan_depth_bad_calibration(calibration, tmp_path):
    with pytest.raises(InputError, match="calibration"):
        depth.plan_depth(block(), block_input(), "host", speedup=1.2, calibration=calibration,
                         measure_options={"repeat": 1, "warmup": 1, "cache_dir": str(tmp_path)})
    assert not any(tmp_path.iterdir())  # refused before measuring anything


def test_plan_depth_needs_two_convs(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with pytest.raises(InputError, match="nothing to merge"):
        depth.plan_depth(model, torch.randn(1, 3, 8, 8), "host", speedup=1.2,
                         measure_options={"repeat": 1, "warmup": 1, "cache_dir": str(tmp_path)})


# ---------------------------------------------------------------------------------------------
# End to end on tiny_mobilenetv2: plan, apply, compile


def conditioned(model, seed=1):
    """A copy of ``model`` with conv weights of variance 2/fan_in. tiny_mobilenetv2's default
    init shrinks the signal ~10x every two blocks, so its output hardly depends on the input:
    an output comparison would not see a wrong merge in the early layers, and every activation
    set would score the same damage."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
    return model


def tiny_input():
    return torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def linear_residual_blocks(model, plan):
    """Residual blocks of tiny_mobilenetv2 whose activations the plan removes both."""
    removed = {entry["after"] for entry in plan.removed_activations}
    return [name for name, block in model.named_modules() if getattr(block, "residual", False)
            and {f"{name}.body.0", f"{name}.body.3"} <= removed]


def check_plan_fits(model, x, plan, path, changed=True):
    assert plan.predicted <= plan.budget
    assert plan.input_shapes == [list(x.shape)] and plan.target == "host" and plan.unit == "s"
    if changed:
        assert plan.removed_activations or plan.merges  # the goal needs some change
    chain = ConvChain(fxopt.optimize(model, x).module)
    names = [chain.name(k) for k in range(len(chain))]
    for entry in plan.removed_activations:
        assert entry["after"] in names and entry["op"] == "relu6"
    for merge in plan.merges:
        indices = [names.index(c) for c in merge["convs"]]
        assert len(indices) >= 2 and indices == list(range(indices[0], indices[0] + len(indices)))
    # the chosen segments cover the chain in order, and their costs are what the plan predicts
    bounds = [(names.index(s["convs"][0]), names.index(s["convs"][1])) for s in plan.segments]
    assert bounds[0][0] == 0 and bounds[-1][1] == len(names) - 1
    assert all(first[1] + 1 == second[0] for first, second in zip(bounds, bounds[1:]))
    assert plan.predicted == pytest.approx(plan.remainder + sum(s["cost"] for s in plan.segments))
    assert DepthPlan.load(path) == plan


def check_apply_and_compile(model, x, plan, path):
    """apply_depth_plan removes the plan's activations; compile_pipeline merges its groups exactly."""
    base = fxopt.optimize(model, x).module
    planned = depth.apply_depth_plan(model, path, x)
    assert isinstance(planned, torch.fx.GraphModule)
    assert op_counts(planned)["relu6"] == op_counts(base)["relu6"] - len(plan.removed_activations)
    assert op_counts(planned)["conv2d"] == op_counts(base)["conv2d"]
    compiled = fxopt.optimize(model, x, pipeline=plan.compile_pipeline(path, applied=False))
    merged_away = sum(len(m["convs"]) - 1 for m in plan.merges)
    assert op_counts(compiled.module)["conv2d"] == op_counts(planned)["conv2d"] - merged_away
    assert op_counts(compiled.module)["relu6"] == op_counts(planned)["relu6"]
    verify.check_equivalent(planned, compiled.module, (x,))
    return planned


def check_compile_planned_model(model, x, plan, path):
    """The documented flow: apply, (fine-tune,) then compile the planned model with compile_pipeline."""
    planned = depth.apply_depth_plan(model, path, x)
    compiled = fxopt.optimize(planned, x, pipeline=plan.compile_pipeline(path))
    merged_away = sum(len(m["convs"]) - 1 for m in plan.merges)
    assert op_counts(compiled.module)["conv2d"] == op_counts(planned)["conv2d"] - merged_away
    verify.check_equivalent(planned, compiled.module, (x,))


def check_does_not_fit(model, x, path, tmp_path):
    with pytest.raises(InputError, match="input shapes"):
        depth.apply_depth_plan(examples.small_cnn(), path, torch.randn(1, 3, 64, 64))
    data = json.loads(path.read_text())
    data["removed_activations"] = [*data["removed_activations"], {"after": "features.99.body.0", "op": "relu6"}]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    with pytest.raises(InputError, match="does not fit"):
        depth.apply_depth_plan(model, edited, x)


# -- with synthetic costs: deterministic, nothing built or timed

OVERHEAD, PER_MAC, ACTIVATION = 2e-6, 1e-12, 5e-7  # seconds per conv, per multiply-add, per activation
REMAINDER = 1e-5


def synthetic_group_cost(chain, group, target, removed=frozenset(), **options):
    """A conv costs a fixed overhead, its multiply-adds and its kept activation."""
    merged = group.merged
    _, _, height, width = ir.shape_of(group.input)
    pixels = 1
    for size, k, s, p, d in zip((height, width), merged.kernel_size, merged.stride, merged.padding, merged.dilation):
        pixels *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    out_channels, in_channels, kh, kw = merged.weight.shape
    macs = pixels * out_channels * in_channels // kernels.group_count(merged) * kh * kw
    activation = kept_activation(chain, group.stop - 1, removed)
    return OVERHEAD + macs * PER_MAC + (ACTIVATION if activation else 0.0)


def synthetic_measure(module, inputs, target=None, **options):
    """A model costs REMAINDER and its spine convs one by one; anything else (a call) nothing."""
    value = 0.0
    if isinstance(module, torch.fx.GraphModule):
        chain = ConvChain(module)
        value = REMAINDER + sum(synthetic_group_cost(chain, chain.group(k, k + 1), target) for k in range(len(chain)))
    return Measurement(value=value, unit="s", samples=(value,), backend="synthetic", target="host", cached=False, key=None)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    model, x = conditioned(examples.tiny_mobilenetv2()), tiny_input()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(depth, "group_cost", synthetic_group_cost)
        patch.setattr(fxopt.measure, "measure", synthetic_measure)
        plan = depth.plan_depth(model, x, "host", speedup=1.2)
        with pytest.raises(InputError, match="best reachable") as unreachable:
            depth.plan_depth(model, x, "host", speedup=3.0)
    path = plan.save(tmp_path_factory.mktemp("synthetic") / "plan.json")
    return model, x, plan, path, str(unreachable.value)


def test_synthetic_plan(synthetic):
    model, x, plan, path, _ = synthetic
    check_plan_fits(model, x, plan, path)
    assert plan.merges
    assert plan.remainder == pytest.approx(REMAINDER)
    assert plan.baseline / plan.predicted >= 1.2 and plan.predicted_speedup == pytest.approx(plan.baseline / plan.predicted)
    # calibration_error is the relative squared error of the planned model on the default calibration batch
    calib = torch.randn((8, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = model(calib).double(), depth.apply_depth_plan(model, path, x)(calib).double()
    error = float((actual - expected).pow(2).sum() / expected.pow(2).sum())
    assert error > 0 and plan.calibration_error == pytest.approx(error, rel=1e-3)


def test_synthetic_plan_apply_and_compile(synthetic):
    model, x, plan, path, _ = synthetic
    check_apply_and_compile(model, x, plan, path)


def test_synthetic_plan_compile_planned_model(synthetic):
    model, x, plan, path, _ = synthetic
    assert linear_residual_blocks(model, plan), "the plan should make a residual block linear (what fold_branches folds)"
    check_compile_planned_model(model, x, plan, path)


def test_synthetic_budget_below_reach(synthetic):
    *_, message = synthetic
    assert "best reachable" in message and "ask for less" in message


def test_synthetic_plan_does_not_fit_another_model(synthetic, tmp_path):
    model, x, _, path, _ = synthetic
    check_does_not_fit(model, x, path, tmp_path)


# -- measured on the host (TVM builds): one planning run, shared


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """tiny_mobilenetv2 planned for 1.2x on the host; where this run's latencies allow no such
    plan (merged convs are not always faster, and a busy machine times noisily), the plan for a
    budget every split meets (the least damage) is checked instead."""
    root = tmp_path_factory.mktemp("measured")
    model, x = examples.tiny_mobilenetv2(), tiny_input()
    options = {"repeat": 3, "warmup": 1, "cache_dir": str(root / "cache")}
    try:
        plan = depth.plan_depth(model, x, "host", speedup=1.2, measure_options=options)
        goal = "speedup"
    except InputError as exc:
        assert "best reachable" in str(exc), exc
        plan = depth.plan_depth(model, x, "host", budget=1.0, measure_options=options)  # cached: nothing measured again
        goal = "budget"
    return model, x, plan, plan.save(root / "plan.json"), options, goal


def test_measured_plan(measured):
    model, x, plan, path, _, goal = measured
    check_plan_fits(model, x, plan, path, changed=goal == "speedup")
    if goal == "speedup":
        assert plan.budget == pytest.approx(plan.baseline / 1.2)


def test_measured_plan_apply_and_compile(measured):
    model, x, plan, path, *_ = measured
    check_apply_and_compile(model, x, plan, path)
    check_apply_and_compile(conditioned(model), x, plan, path)  # same structure: the plan fits, outputs say more


def test_measured_plan_compile_planned_model(measured):
    model, x, plan, path, *_ = measured
    check_compile_planned_model(conditioned(model), x, plan, path)


def test_measured_budget_below_reach(measured):
    model, x, _, _, options, _ = measured
    with pytest.raises(InputError, match="best reachable"):
        depth.plan_depth(model, x, "host", budget=1e-9, measure_options=options)


def test_measured_plan_does_not_fit_another_model(measured, tmp_path):
    model, x, _, path, *_ = measured
    check_does_not_fit(model, x, path, tmp_path)
