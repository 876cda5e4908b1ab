"""lower_sparse_weights (passes/sparse_weights.py): structure and numerics at densities 5-50% and
every block shape, the block choice, the declines, the measured decision (synthetic and one real
measurement on the host) and bad options."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt.measure
from fxopt import sparse_ops as so
from fxopt import spec
from fxopt.errors import PassError, SpecError
from fxopt.measure import Measurement
from fxopt.pass_manager import PassContext, apply, create_pass
from fxopt.targets import Capabilities, get_target
from fxopt.testing import check_pass, op_counts


def sparsify(module, density, seed=0, block=(1, 1)):
    """Zero all but ``density`` of ``module``'s weights, at random, in whole ``block`` blocks."""
    generator = torch.Generator().manual_seed(seed)
    w = module.weight.data
    rows, cols = w.shape[0], w.shape[1]
    r, c = block
    keep = torch.rand(-(-rows // r), -(-cols // c), generator=generator) < density
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    w.mul_(mask.reshape(rows, cols, *([1] * (w.dim() - 2))).to(w.dtype))
    return module


class PointwiseNet(nn.Module):
    """stem 3x3 -> sparse 1x1 -> depthwise 3x3 -> sparse 1x1 (no bias) -> pool -> sparse linear."""

    def __init__(self, density, block=(1, 1)):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pw1 = sparsify(nn.Conv2d(16, 32, 1), density, 1, block)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw2 = sparsify(nn.Conv2d(32, 24, 1, bias=False), density, 2, block)
        self.fc = sparsify(nn.Linear(24, 10), density, 3, block)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw1(x))
        x = F.relu6(self.dw(x))
        x = self.pw2(x)
        return self.fc(x.mean((2, 3)))


DENSITY = {"name": "lower_sparse_weights", "decide": "density", "max_density": 0.6}


def x_in(size=9):
    return torch.randn(2, 3, size, size)


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.3, 0.5])
def test_sparse_layers_become_sparse_ops_exactly(density):
    gm, result = check_pass(DENSITY, PointwiseNet(density), (x_in(),), stats={"conv1x1": 2, "linear": 1},
                            ops_after={"conv2d": 2, "linear": 0})
    assert isinstance(gm.pw1, so.SparseConv1x1) and isinstance(gm.fc, so.SparseLinear)
    assert gm.pw2.bias is None and not result.declines
    info = next(n for n in gm.graph.nodes if n.target == "pw1").meta["fxopt"]["sparse"]
    assert info["block"] == "1x1" and info["density"] < 0.6


@pytest.mark.parametrize("block", so.BLOCK_SHAPES)
def test_each_block_shape_is_exact(block):
    name = f"{block[0]}x{block[1]}"
    gm, _ = check_pass({**DENSITY, "blocks": name}, PointwiseNet(0.2), (x_in(),), stats={"conv1x1": 2, "linear": 1})
    assert {gm.pw1.block, gm.pw2.block, gm.fc.block} == {block}


@pytest.mark.parametrize("block", [(4, 1), (8, 1), (1, 4)])
def test_density_choice_is_the_largest_block_storing_the_fewest_values(block):
    """A pattern zero in whole R x C blocks gets those blocks; unstructured zeros get 1x1."""
    gm, _ = check_pass(DENSITY, PointwiseNet(0.3, block=block), (x_in(),), stats={"conv1x1": 2, "linear": 1})
    assert gm.pw1.block == block and gm.pw2.block == block
    unstructured, _ = check_pass(DENSITY, PointwiseNet(0.3), (x_in(),))
    assert unstructured.pw1.block == (1, 1)


def test_functional_conv_and_a_module_called_twice():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = sparsify(nn.Conv2d(8, 8, 1), 0.2)
            self.weight = nn.Parameter(sparsify(nn.Conv2d(8, 4, 1), 0.2, seed=5).weight.data)

        def forward(self, x):
            y = self.pw(self.pw(x))  # one module, two calls: the user's module is left alone
            return F.conv2d(y, self.weight)

    gm, _ = check_pass(DENSITY, Shared(), (torch.randn(1, 8, 5, 5),), stats={"conv1x1": 3}, ops_after={"conv2d": 0})
    assert sum(isinstance(m, so.SparseConv1x1) for m in gm.modules()) == 3


@pytest.mark.parametrize("layer, reason", [
    (nn.Conv2d(8, 8, 1, stride=2), "strided"),
    (nn.Conv2d(8, 8, 1, padding=1), "padded"),
    (nn.Conv2d(8, 8, 1, groups=8), "depthwise (groups=8)"),
    (nn.Conv2d(8, 8, 1, groups=2), "grouped (groups=2)"),
    (nn.Conv2d(8, 8, 3, padding=1), "a 3x3 kernel"),
], ids=["strided", "padded", "depthwise", "grouped", "3x3"])
def test_declines_convs_without_a_sparse_kernel(layer, reason):
    check_pass(DENSITY, nn.Sequential(sparsify(layer, 0.2)), (torch.randn(1, 8, 6, 6),), stats={},
               declines=[reason])


def test_declines_dense_layers_and_skips_dense_3x3():
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1), sparsify(nn.Conv2d(8, 8, 1), 0.2))
    _, result = check_pass(DENSITY, model, (torch.randn(1, 8, 6, 6),), stats={"conv1x1": 1})
    reasons = [d.reason for d in result.declines]
    assert len(reasons) == 1 and "density 1.000 >= max_density 0.6: dense" in reasons[0]
    _, result = check_pass({**DENSITY, "max_density": 0.1}, PointwiseNet(0.2), (x_in(),), stats={})
    assert len(result.declines) == 3


def _run(pass_spec, model, x, target):
    from fxopt import ir

    gm = ir.trace(model.eval(), (x,))
    ctx = PassContext(example_inputs=(x,), target=get_target(target) if isinstance(target, str) else target)
    return gm, apply(create_pass(**pass_spec) if isinstance(pass_spec, dict) else pass_spec, gm, ctx)


def test_declines_on_a_target_without_sparse_kernels():
    host = get_target("host")
    assert host.capabilities.sparse_kernels
    for name in ("arm64", "riscv64", "riscv64-rvv"):
        assert get_target(name).capabilities.sparse_kernels, name
    plain = host.derive("host-no-sparse", "host without sparse kernels",
                        capabilities=Capabilities(vector_bits=host.capabilities.vector_bits, sparse_kernels=False))
    gm, result = _run(DENSITY, PointwiseNet(0.1), x_in(), plain)
    assert not result.changed and op_counts(gm)["conv2d"] == 4
    assert len(result.declines) == 3
    assert all("has no sparse kernels (capabilities.sparse_kernels is false)" in d.reason for d in result.declines)


def test_not_in_the_default_pipeline():
    assert "lower_sparse_weights" not in spec.to_text(spec.resolve("default").spec())


# -- measured decisions (synthetic costs: the decision logic, nothing built)


def fake_measure(costs):
    """A measure() that answers from ``costs``: "dense", "_ChannelsLast", "_ChannelsFirst" (the
    layout transposes) or the block "RxC"."""
    calls = []

    def measure(module, inputs, target=None, **options):
        if isinstance(module, so._SparseWeights):
            key = f"{module.block[0]}x{module.block[1]}"
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            key = "dense"
        else:
            key = type(module).__name__
        calls.append((key, tuple(inputs[0].shape)))
        return Measurement(costs[key], "s", (costs[key],), "local", "host", False, None)

    measure.calls = calls
    return measure


def test_measured_keeps_the_fastest_block_and_charges_layout_transposes(monkeypatch):
    measure = fake_measure({"dense": 10e-3, "1x1": 3e-3, "1x4": 2e-3, "4x1": 1e-3, "8x1": 1e-3,
                            "_ChannelsLast": 1e-3, "_ChannelsFirst": 1e-3})
    monkeypatch.setattr(fxopt.measure, "measure", measure)
    model = nn.Sequential(sparsify(nn.Conv2d(16, 16, 1), 0.3, block=(1, 4)))
    gm, result = _run({"name": "lower_sparse_weights"}, model, torch.randn(1, 16, 8, 8), "host")
    assert result.stats == {"conv1x1": 1} and gm.get_submodule("0").block == (1, 4)
    # candidates: the blocks storing at most twice the fewest values (here 1x1 and 1x4, same count)
    assert sorted(k for k, _ in measure.calls) == ["1x1", "1x4", "_ChannelsFirst", "_ChannelsFirst", "_ChannelsLast",
                                                   "_ChannelsLast", "dense"]
    info = next(n for n in gm.graph.nodes if n.op == "call_module").meta["fxopt"]["sparse"]["measured"]
    assert info["layout_transposes"] == pytest.approx(2e-3) and info["dense"] == 10e-3


def test_measured_declines_when_dense_is_faster_with_both_figures(monkeypatch):
    # 4 ms dense alone is 2.5 ms inside an NHWC network (it loses one transpose each way); the
    # sparse kernel's 1 ms gains the same two, 1.5 ms: 2.5 ms
    costs = {"dense": 4e-3, "1x1": 1e-3, "_ChannelsLast": 0.25e-3, "_ChannelsFirst": 1.25e-3}
    monkeypatch.setattr(fxopt.measure, "measure", fake_measure(costs))
    model = nn.Sequential(sparsify(nn.Conv2d(16, 16, 1), 0.1))
    _, result = _run({"name": "lower_sparse_weights", "blocks": "1x1"}, model, torch.randn(1, 16, 8, 8), "host")
    assert not result.changed
    reason = result.declines[0].reason
    assert "inside an NHWC network: dense 2.5 ms <= sparse 2.5 ms (with 1.5 ms of layout transposes)" in reason


def test_measured_linear_has_no_layout_cost(monkeypatch):
    measure = fake_measure({"dense": 4e-3, "1x1": 3e-3})
    monkeypatch.setattr(fxopt.measure, "measure", measure)
    model = nn.Sequential(sparsify(nn.Linear(16, 16), 0.1))
    _, result = _run({"name": "lower_sparse_weights", "blocks": "1x1"}, model, torch.randn(2, 16), "riscv64")
    assert result.stats == {"linear": 1} and [k for k, _ in measure.calls] == ["dense", "1x1"]


def test_measured_needs_a_target():
    with pytest.raises(PassError, match="give optimize\\(\\) a target, or use decide='density'"):
        _run({"name": "lower_sparse_weights"}, nn.Sequential(sparsify(nn.Conv2d(8, 8, 1), 0.1)),
             torch.randn(1, 8, 4, 4), None)


def test_measured_on_the_host(monkeypatch, tmp_path):
    """One real decision: a 5%-dense 1x1 conv on a 56x56 map, measured dense and sparse."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = nn.Sequential(sparsify(nn.Conv2d(64, 64, 1), 0.05))
    x = torch.randn(1, 64, 56, 56)
    gm, result = _run({"name": "lower_sparse_weights", "blocks": "1x1"}, model, x, "host")
    declined = [d.reason for d in result.declines]
    assert result.stats == {"conv1x1": 1} or (declined and "measured on host" in declined[0]), declined
    if result.changed:
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
        measured = next(n for n in gm.graph.nodes if n.op == "call_module").meta["fxopt"]["sparse"]["measured"]
        assert measured["unit"] == "s" and measured["1x1"] > 0


# -- bad options


@pytest.mark.parametrize("value", [0, 1.5, -0.1, True, "half"])
def test_max_density_out_of_range_names_the_option(value):
    with pytest.raises(SpecError, match=r"option .?max_density.*(is out of range|must be float)"):
        create_pass("lower_sparse_weights", max_density=value)


def test_max_density_out_of_range_in_a_spec_text():
    with pytest.raises(SpecError, match="max_density=2 is out of range.*in \\(0, 1\\]"):
        spec.resolve("lower_sparse_weights{max_density=2}")
    assert spec.resolve("lower_sparse_weights{max_density=1}").passes[0].max_density == 1


def test_bad_decide_and_blocks():
    with pytest.raises(SpecError, match="decide='fast' is not one of 'measured', 'density'"):
        create_pass("lower_sparse_weights", decide="fast")
    with pytest.raises(SpecError, match="blocks='2x2'.*1x1, 1x4, 4x1, 8x1"):
        create_pass("lower_sparse_weights", blocks="2x2")


def test_declines_weights_computed_in_the_graph():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(sparsify(nn.Linear(8, 8), 0.1).weight.data)

        def forward(self, x):
            return F.linear(x, self.weight * 2)

    check_pass(DENSITY, Computed(), (torch.randn(2, 8),), stats={}, declines=["not a constant parameter or buffer"])
