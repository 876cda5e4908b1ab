"""fxopt.prune: structured plans (ratio and latency goals), applying and lowering them, and
unstructured magnitude sparsity."""

import json
import math

import pytest
import torch
from channel_models import Net, resnet_ish
from torch import nn

import fxopt
import fxopt.measure
from fxopt import examples, ir, prune, verify
from fxopt.errors import InputError
from fxopt.measure import Measurement
from fxopt.pass_manager import PassContext, PreconditionError, apply
from fxopt.prune import PrunePlan
from fxopt.spec import build_pass
from fxopt.testing import randomize_norm_stats


def tiny():
    return examples.tiny_mobilenetv2(), torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    model, x = tiny()
    plan = prune.plan_prune(model, x, ratio=0.5)
    return model, x, plan, plan.save(tmp_path_factory.mktemp("prune") / "plan.json")


def test_plan_removes_the_ratio_of_each_group(tiny_plan):
    model, x, plan, path = tiny_plan
    assert plan.removed == sum(g["removed"] for g in plan.groups) and plan.ratio == pytest.approx(0.5, abs=0.01)
    for group in plan.groups:
        if group["removable"]:
            assert group["removed"] == min(int(0.5 * group["removable"] + 0.5), group["channels"] - 1)
    head = next(g for g in plan.groups if g["layers"] == ["head.2"])
    assert head["removed"] == 0 and "graph output" in head["reason"]
    # a residual stage is one group: its producers lose the same channels
    stage = next(g for g in plan.groups if len(g["layers"]) == 3)
    assert len({tuple(plan.channels[name]) for name in stage["layers"]}) == 1
    assert plan.params[1] < 0.4 * plan.params[0] and plan.macs[1] < 0.4 * plan.macs[0]
    assert set(plan.layer_shapes) == set(plan.channels) and 0 < plan.calibration_error < 10
    assert PrunePlan.load(path) == plan and not path.with_name("plan.json.tmp").exists()


def test_apply_removes_the_channels_and_runs(tiny_plan):
    model, x, plan, path = tiny_plan
    pruned = prune.apply_prune_plan(model, path, x)
    zeroed = prune.apply_prune_plan(model, plan, x, lower=False)
    assert ir.count_params(pruned) == plan.params[1] < ir.count_params(zeroed)
    assert pruned.get_submodule("features.5.body.0").out_channels == 48  # 96 hidden channels, half gone
    assert pruned(x).shape == model(x).shape == (1, 10)
    verify.check_equivalent(zeroed, pruned, (x,))  # lowering is exact


def test_compile_pipeline_prunes_the_original_model(tiny_plan):
    model, x, plan, path = tiny_plan
    optimized = fxopt.optimize(model, x, pipeline=plan.compile_pipeline(path))
    rows = {row.name: row for row in optimized.report.passes}
    assert rows["apply_prune_plan"].stats["channels_zeroed"] == sum(len(c) for c in plan.channels.values())
    assert ir.count_params(optimized.module) == plan.params[1]
    verify.check_equivalent(prune.apply_prune_plan(model, path, x), optimized.module, (x,))


def test_compile_the_original_model_with_the_plan(tmp_path):
    model = randomize_norm_stats(Net(3, [("conv", 8, 3, 1, False, True, "relu"), ("conv", 8, 1, 1, False, True, "relu")],
                                     "pool"), 0).eval()
    x = torch.randn(1, 3, 8, 8)
    path = prune.plan_prune(model, x, ratio=0.5).save(tmp_path / "plan.json")
    compiled = fxopt.compile(model, (x,), "host", pipeline=PrunePlan.load(path).compile_pipeline(path))
    torch.testing.assert_close(compiled.run(x), prune.apply_prune_plan(model, path, x)(x), rtol=1e-4, atol=1e-5)


def test_apply_prune_plan_pass_is_lossy_and_idempotent(tiny_plan):
    model, x, plan, path = tiny_plan
    gm = fxopt.optimize(model, x).module
    step = build_pass({"name": "apply_prune_plan", "plan": str(path)})
    assert not step.exact
    first = apply(step, gm, PassContext(example_inputs=(x,), verify="off"))
    assert first.stats == {"channels_zeroed": sum(len(c) for c in plan.channels.values()),
                           "layers_pruned": len(plan.channels)}
    assert not apply(step, gm, PassContext(example_inputs=(x,), verify="off")).changed
    with pytest.raises(PreconditionError, match="needs plan=FILE"):
        apply(build_pass("apply_prune_plan"), gm, PassContext())


def test_plan_does_not_fit_another_model(tiny_plan, tmp_path):
    model, x, plan, path = tiny_plan
    with pytest.raises(InputError, match="does not fit this model: it names layer"):
        prune.apply_prune_plan(examples.small_cnn(), path, torch.randn(1, 3, 32, 32))
    data = json.loads(path.read_text())
    name = next(iter(data["layer_shapes"]))
    data["layer_shapes"][name][0] += 1
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    with pytest.raises(InputError, match=f"layer '{name}' has weight shape"):
        prune.apply_prune_plan(model, edited, x)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{", "not readable JSON"),
    ('{"format": "fxopt-depth-plan/1"}', "'format' must be 'fxopt-prune-plan/1'"),
    ('{"format": "fxopt-prune-plan/1", "model": "m"}', "missing"),
])
def test_plan_load_bad_files(tmp_path, content, message):
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        PrunePlan.load(path)


def test_resnet_block_prunes_residual_channels_together():
    torch.manual_seed(0)
    model = randomize_norm_stats(resnet_ish(8), 1).eval()
    x = torch.randn(1, 3, 12, 12)
    plan = prune.plan_prune(model, x, ratio=0.25, norm="l2")
    residual = plan.channels["stem.0"]
    assert len(residual) == 2 and plan.channels["layer1.conv2"] == plan.channels["layer2.conv2"] == residual
    assert len(plan.channels["layer1.conv1"]) == len(plan.channels["layer2.conv1"]) == 2
    pruned = prune.apply_prune_plan(model, plan, x)
    assert pruned.get_submodule("fc").in_features == 6 and pruned.get_submodule("layer1.conv1").weight.shape == (6, 6, 3, 3)
    verify.check_equivalent(prune.apply_prune_plan(model, plan, x, lower=False), pruned, (x,))
    assert prune.plan_prune(model, x, ratio=0.0).removed == 0


@pytest.mark.parametrize("options, message", [
    ({"ratio": -0.1}, "ratio=-0.1 must be in"),
    ({"ratio": 1.0}, "ratio=1.0 must be in"),
    ({"ratio": True}, "ratio=True must be in"),
    ({"ratio": "half"}, "ratio='half' must be in"),
    ({}, "give plan_prune one goal"),
    ({"ratio": 0.5, "speedup": 2.0}, "got ratio, speedup"),
    ({"budget": -1.0}, "budget=-1.0 must be a positive"),
    ({"speedup": 0}, "speedup=0 must be a positive"),
    ({"ratio": 0.5, "norm": "l3"}, "norm='l3' is not one of"),
    ({"speedup": 2.0, "ratios": [0.5, 1.0]}, "must be candidate ratios in"),
])
def test_plan_prune_bad_arguments(options, message):
    model, x = tiny()
    with pytest.raises(InputError, match=message):
        prune.plan_prune(model, x, **options)


def mac_measure(module, inputs, target=None, **options):
    """A model costs its multiply-adds, a nanosecond each: deterministic, nothing built."""
    value = ir.count_macs(module) * 1e-9
    return Measurement(value=value, unit="s", samples=(value,), backend="synthetic", target="host", cached=False,
                       key=None)


def test_latency_goal_picks_the_least_ratio_that_fits(monkeypatch):
    monkeypatch.setattr(fxopt.measure, "measure", mac_measure)
    model, x = tiny()
    plan = prune.plan_prune(model, x, speedup=2.0)
    assert plan.baseline == pytest.approx(plan.macs[0] * 1e-9) and plan.budget == pytest.approx(plan.baseline / 2)
    assert plan.predicted == pytest.approx(plan.macs[1] * 1e-9) and plan.predicted <= plan.budget
    chosen = min(r for r in prune.RATIOS if plan.measured.get(f"{r:g}", math.inf) <= plan.budget)
    below = round(chosen - 0.05, 2)
    assert plan.measured[f"{below:g}"] > plan.budget  # bisection measured the step below: it does not fit
    assert len(plan.measured) <= 6 and plan.target == "host" and plan.unit == "s"
    with pytest.raises(InputError, match="no ratio up to 0.95 reaches"):
        prune.plan_prune(model, x, speedup=1e4)
    relaxed = prune.plan_prune(model, x, speedup=0.5)
    assert relaxed.removed == 0 and "nothing is pruned" in relaxed.notes[0]


def test_mobilenetv2_w1_half_of_its_channels():
    from pytorchcv.models.mobilenetv2 import mobilenetv2_w1

    model = randomize_norm_stats(mobilenetv2_w1(), 0).eval()
    model.features.final_pool = nn.AdaptiveAvgPool2d(1)  # (its 7x7 pool needs 224x224; a quarter of the work)
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    plan = prune.plan_prune(model, x, ratio=0.5, calibration=x)
    assert plan.ratio == pytest.approx(0.5, abs=0.01) and plan.removable > 9000
    pruned = prune.apply_prune_plan(model, plan, x)
    assert pruned(x).shape == (1, 1000)
    assert ir.count_params(pruned) == plan.params[1] < 0.4 * plan.params[0]
    assert plan.macs[1] < 0.3 * plan.macs[0]


# ---------------------------------------------------------------------------------------------
# Unstructured


def weights(model):
    return {name: m.weight.detach() for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_sparsify_global_keeps_the_largest_share():
    model = examples.small_cnn()
    before = weights(model)
    sparse = prune.plan_sparsify(model, 0.3)
    after = weights(sparse)
    total = sum(w.numel() for w in before.values())
    kept = torch.cat([w.flatten() for w in after.values()])
    assert int((kept != 0).sum()) == round(0.3 * total)
    dropped = torch.cat([b.flatten()[a.flatten() == 0] for b, a in zip(before.values(), after.values())])
    assert float(kept[kept != 0].abs().min()) >= float(dropped.abs().max())
    assert all(bool((w != 0).all()) for w in weights(model).values())  # the model itself is untouched


def test_sparsify_per_layer_and_chosen_layers():
    model = examples.small_cnn()
    sparse = prune.plan_sparsify(model, 0.1, scope="layer")
    for w in weights(sparse).values():
        assert int((w != 0).sum()) == max(1, math.floor(0.1 * w.numel() + 0.5))
    pointwise = prune.plan_sparsify(model, 0.5, scope="layer", layers=lambda name, m: m.weight[0, 0].numel() == 1)
    for name, w in weights(pointwise).items():
        dense = w[0, 0].numel() != 1 if w.dim() == 4 else False
        assert bool((w != 0).all()) == dense, name
    only = prune.plan_sparsify(model, 0.5, layers=["head.3"])
    assert int((only.head[3].weight != 0).sum()) == only.head[3].weight.numel() // 2
    assert torch.equal(prune.plan_sparsify(model, 1.0).head[3].weight, model.head[3].weight)
    traced = fxopt.optimize(model, torch.randn(1, 3, 32, 32)).module
    assert int((prune.plan_sparsify(traced, 0.2).get_submodule("head.3").weight != 0).sum()) > 0


@pytest.mark.parametrize("density", [0, 1.5, -0.2, True, "0.5", float("nan")])
def test_sparsify_bad_density(density):
    with pytest.raises(InputError, match="density=.* must be in \\(0, 1\\]"):
        prune.plan_sparsify(examples.small_cnn(), density)


def test_sparsify_bad_options():
    with pytest.raises(InputError, match="scope='row' is not one of"):
        prune.plan_sparsify(examples.small_cnn(), 0.5, scope="row")
    with pytest.raises(InputError, match=r"layers \['nope'\] are not convs or linears"):
        prune.plan_sparsify(examples.small_cnn(), 0.5, layers=["nope"])
    with pytest.raises(InputError, match="has no conv or linear"):
        prune.plan_sparsify(nn.Sequential(nn.ReLU()), 0.5)
