"""fxopt.capture: models torch.fx cannot trace, captured with torch.export and raised into the
module-level form; the same optimized graph whichever path captured a traceable model."""

import importlib
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import capture, ir
from fxopt.errors import InputError, TraceError
from fxopt.examples import small_cnn
from fxopt.testing import op_counts, randomize_norm_stats


def seeded(model: nn.Module, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norm_stats(model, seed).eval()


def stats_of(report, pass_name: str) -> dict:
    """A pass's stats summed over its report rows (a fixpoint runs it several times)."""
    total: dict = {}
    for row in report.passes:
        if row.name == pass_name:
            for key, value in row.stats.items():
                total[key] = total.get(key, 0) + value
    return total


def assert_close_to(reference: torch.Tensor, actual: torch.Tensor) -> None:
    torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def conv_bn(c_in, c_out, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


# ---------------------------------------------------------------------------------------------
# Models torch.fx cannot trace, one per way it fails


class ShapeIteration(nn.Module):
    """Loops over a tensor's shape (iterating a Proxy) to flatten the spatial dims."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2)
        self.block = conv_bn(8, 8, groups=8)
        self.fc = nn.Linear(8, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.block(self.stem(x))
        size = 1
        for d in y.shape[2:]:
            size = size * d
        y = y.reshape(y.shape[0], y.shape[1], size).mean(-1)
        return self.bn(self.fc(y))


class CondBranch(nn.Module):
    """A data-dependent branch written with torch.cond: the sign of the input's mean picks it."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.positive = nn.Conv2d(8, 8, 1)
        self.negative = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.stem(x)
        y = torch.cond(x.mean() > 0, lambda t: self.positive(t), lambda t: self.negative(t).relu(), (y,))
        return self.head(y)


class ListComprehension(nn.Module):
    """MixNet-style mixed kernels: a list comprehension over the chunks of a Proxy."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.splits = (4, 4, 4)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, k, padding=k // 2, groups=4, bias=False) for k in (3, 5, 7))
        self.bn = nn.BatchNorm2d(12)
        self.proj = conv_bn(12, 16, k=1)

    def forward(self, x):
        y = self.stem(x)
        parts = [conv(t) for t, conv in zip(torch.split(y, self.splits, 1), self.convs)]
        y = F.relu(self.bn(torch.cat(parts, 1)))
        return self.proj(y)


UNTRACEABLE = [
    # model, input shape, fold_bn conv_bn, fold_bn linear_bn, canonicalize functionalize (in-place ReLUs)
    (ShapeIteration, (2, 3, 16, 16), 2, 1, 2),
    (CondBranch, (1, 3, 12, 12), 2, 0, 1),
    (ListComprehension, (1, 3, 12, 12), 2, 0, 2),
]


@pytest.mark.parametrize("cls, shape, conv_bn_count, linear_bn_count, functionalized", UNTRACEABLE,
                         ids=[m[0].__name__ for m in UNTRACEABLE])
def test_untraceable_models_are_captured_optimized_and_compiled(cls, shape, conv_bn_count, linear_bn_count,
                                                                functionalized):
    model = seeded(cls())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with pytest.raises(TraceError, match="torch.fx cannot trace"):
        ir.trace(model, (x,), capture="fx")
    compiled = fxopt.compile(model, (x,), target="host")
    report = compiled.report
    assert report.capture == "export" and report.capture_note.startswith("torch.fx failed")
    assert stats_of(report, "canonicalize").get("functionalize", 0) == functionalized
    folded = stats_of(report, "fold_bn")
    assert folded.get("conv_bn", 0) == conv_bn_count and folded.get("linear_bn", 0) == linear_bn_count
    assert report.verification["ok"] and report.build["check"]["ok"]
    others = [x, -x, torch.randn(shape)]  # -x takes CondBranch's other branch
    for inputs in others:
        assert_close_to(model(inputs), compiled.run(inputs))
        assert_close_to(model(inputs), compiled.module(inputs))


def test_cond_keeps_both_branches_and_raises_around_them():
    model = seeded(CondBranch())
    x = torch.rand(1, 3, 12, 12)
    gm = ir.trace(model, (x,))
    assert gm.meta["fxopt"]["capture"] == "export"
    cond = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(cond) == 1
    assert op_counts(gm)["batch_norm"] == 2 and op_counts(gm)["conv2d"] == 2  # stem and head; branches stay inside
    for inputs in (x, -x):
        torch.testing.assert_close(gm(inputs), model(inputs))


# ---------------------------------------------------------------------------------------------
# What raising produces


class Spellings(nn.Module):
    """Most ops raising knows, with in-place ops, views and a tuple output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act6 = nn.ReLU6(inplace=True)
        self.fc = nn.Linear(7, 4)
        self.bn1 = nn.BatchNorm1d(4)
        self.fc3 = nn.Linear(4, 5)

    def forward(self, x):
        y = nn.functional.hardswish(self.act6(self.bn(self.conv(x))))
        y = F.relu(y, inplace=True)
        y = y + torch.sigmoid(y)
        y += 1
        y = y * y.mean((2, 3), keepdim=True)
        z = torch.cat([F.max_pool2d(y, 2), F.avg_pool2d(y, 2)], 1)
        z = z.view(z.size(0), 2, 8, z.size(2), z.size(3)).transpose(1, 2).contiguous().view(1, -1, 4, 4)
        a, b = torch.chunk(z, 2, 1)
        g = F.adaptive_avg_pool2d(a[:, 1:] - b[:, :-1], 1)
        f = torch.flatten(g, 1) + g.view(g.size(0), -1)
        f = F.dropout(self.bn1(self.fc(f)), 0.5, training=False)
        f = F.leaky_relu(F.gelu(f), 0.2)
        f = self.fc3(F.silu(f).unsqueeze(1))
        f = F.softmax(F.hardsigmoid(f.permute(0, 2, 1)), dim=1)
        f = F.pad(F.elu(f) / 2, (1, 1))
        return torch.tanh(f), F.mish(f)


def test_raised_graph_reads_like_a_traced_one():
    model = seeded(Spellings())
    x = torch.randn(1, 3, 8, 8)
    gm = ir.trace(model, (x,), capture="export")
    assert gm.meta["fxopt"]["capture"] == "export" and "functionalized" not in gm.meta["fxopt"]
    leftover = [n.target for n in gm.graph.nodes if n.op == "call_function" and capture._is_aten(n.target)]
    assert leftover == []  # every ATen op took a torch spelling
    modules = {name: type(m) for name, m in gm.named_children()}
    assert modules == {"conv": nn.Conv2d, "bn": nn.BatchNorm2d, "fc": nn.Linear, "bn1": nn.BatchNorm1d, "fc3": nn.Linear}
    assert not gm.bn.training and gm.bn.eps == model.bn.eps
    torch.testing.assert_close(gm.bn.running_var, model.bn.running_var)
    inplace = [f.key for n in gm.graph.nodes if (f := ir.classify(n, gm)) is not None and f.inplace]
    assert inplace == ["relu6", "relu", "add"]  # for canonicalize to functionalize, as after fx
    torch.testing.assert_close(gm(x), model(x))
    assert ir.shape_of(next(n for n in gm.graph.nodes if n.target == "fc")) == (1, 4)


def test_core_aten_program_is_raised_too():
    """A program after run_decompositions(): convolution, _native_batch_norm_legit_no_training +
    getitem, addmm with a transposed weight, max_pool2d_with_indices, _softmax, hardtanh(0, 6)."""
    model = seeded(Spellings())
    x = torch.randn(1, 3, 8, 8)
    program = capture.export(model, (x,)).run_decompositions()
    gm = ir.trace(program, (x,))
    counts = op_counts(gm)
    assert (counts["conv2d"], counts["batch_norm"], counts["linear"]) == (1, 2, 2)
    assert counts["relu6"] == 1 and counts["max_pool2d"] == 1 and counts["softmax"] == 1
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # transposed weights went into the Linears
    assert set(dict(gm.named_children())) == {"conv", "bn", "fc", "bn1", "fc3"}
    torch.testing.assert_close(gm(x), model(x))
    optimized = fxopt.optimize(program, (x,), pipeline="canonicalize,fold_bn")
    assert optimized.report.passes[1].stats == {"conv_bn": 1, "linear_bn": 1}


class SharedAndFunctional(nn.Module):
    """A conv module called twice, a functional conv on a parameter, a reflect-padded conv and a
    buffer used by an op raising has no module for."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x):
        y = self.shared(self.shared(x))
        y = F.conv2d(y, self.weight)
        y = self.bn(self.reflect(y)) * self.scale
        return torch.clamp(y, -1, 1)  # no op key: stays an ATen call after export


def test_shared_modules_functional_weights_padding_modes_and_constants():
    model = seeded(SharedAndFunctional())
    x = torch.randn(1, 4, 6, 6)
    gm = ir.trace(model, (x,), capture="export")
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("shared") == 2  # one module, called twice, as fx has it
    assert gm.get_submodule("reflect").padding_mode == "reflect" and gm.get_submodule("reflect").padding == (1, 1)
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["scale"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function" and capture._is_aten(n.target)] == \
        [torch.ops.aten.clamp.default]
    torch.testing.assert_close(gm(x), model(x))
    # weights are copies: the raised graph and the model do not share storage
    with torch.no_grad():
        gm.get_submodule("shared").weight.zero_()
    assert model.shared.weight.abs().sum() > 0
    fx_sig = ir.graph_signature(fxopt.optimize(model, (x,), capture="fx").module)
    export_sig = ir.graph_signature(fxopt.optimize(model, (x,), capture="export").module)
    assert fx_sig == export_sig


class MutatedView(nn.Module):
    """An in-place op through a view fxopt has no spelling for (diagonal): the raised graph is
    functionalized instead of trusting alias analysis."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y.diagonal(dim1=2, dim2=3).mul_(3)
        return y.relu()


def test_mutation_through_an_unknown_view_is_functionalized():
    model = seeded(MutatedView())
    x = torch.randn(1, 3, 5, 5)
    gm = ir.trace(model, (x,), capture="export")
    assert gm.meta["fxopt"].get("functionalized") is True
    assert not any(n.op == "call_function" and capture._is_aten(n.target) and n.target._schema.is_mutable
                   for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))
    optimized = fxopt.optimize(model, (x,), pipeline="canonicalize,fold_bn", capture="export")
    assert optimized.report.passes[1].stats == {"conv_bn": 1}


# ---------------------------------------------------------------------------------------------
# The same optimized graph whichever path captured it


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(8, 8)
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3), nn.BatchNorm1d(3))

    def forward(self, x):
        y = torch.relu(x + self.b(self.a(x)))
        return self.head(self.pool(y) * torch.sigmoid(y.mean((2, 3), keepdim=True)))


def _pytorchcv(module: str, factory: str):
    return lambda: getattr(importlib.import_module(module), factory)()


ZOO = [
    ("small_cnn", small_cnn, (1, 3, 32, 32)),
    ("residual", Residual, (2, 8, 10, 10)),
    ("shared_functional", SharedAndFunctional, (1, 4, 6, 6)),
    ("mobilenetv2_w1", _pytorchcv("pytorchcv.models.mobilenetv2", "mobilenetv2_w1"), (1, 3, 224, 224)),
    ("shufflenetv2_w1", _pytorchcv("pytorchcv.models.shufflenetv2", "shufflenetv2_w1"), (1, 3, 224, 224)),
    ("resnet18", _pytorchcv("pytorchcv.models.resnet", "resnet18"), (1, 3, 224, 224)),
]


@pytest.mark.parametrize("make, shape", [z[1:] for z in ZOO], ids=[z[0] for z in ZOO])
def test_both_capture_paths_give_the_same_optimized_graph(make, shape):
    model = seeded(make())
    x = torch.randn(shape)
    by_fx = fxopt.optimize(model, (x,), verify="off", capture="fx")
    by_export = fxopt.optimize(model, (x,), verify="off", capture="export")
    assert (by_fx.report.capture, by_export.report.capture) == ("fx", "export")
    fx_sig, export_sig = ir.graph_signature(by_fx.module), ir.graph_signature(by_export.module)
    first = next((i for i, (a, b) in enumerate(zip(fx_sig, export_sig)) if a != b), None)
    assert fx_sig == export_sig, (f"{len(fx_sig)} vs {len(export_sig)} entries; first difference at {first}: "
                                  f"{fx_sig[first] if first is not None else '-'} vs "
                                  f"{export_sig[first] if first is not None else '-'}")
    assert stats_of(by_fx.report, "fold_bn") == stats_of(by_export.report, "fold_bn")
    assert_close_to(by_fx.module(x), by_export.module(x))


def test_graph_signature_sees_what_passes_match():
    model = seeded(Residual())
    x = torch.randn(2, 8, 10, 10)
    gm = ir.trace(model, (x,))
    signature = ir.graph_signature(gm)
    keys = [entry[0] for entry in signature]
    assert keys[:4] == ["conv2d", "batch_norm", "relu", "conv2d"] and keys[-1] == "output"
    conv = signature[0]
    assert conv[1] == ("Conv2d", 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, False, "zeros")
    assert conv[2] == (2, 8, 10, 10) and conv[3] == ((("input", 0),),)
    add = signature[keys.index("add")]
    assert add[3] == ((("input", 0),), (("op", keys.index("batch_norm", 2)),))
    # a different hyper-parameter changes the signature
    other = seeded(Residual())
    other.pool = nn.MaxPool2d(3, 2, 0)
    assert ir.graph_signature(ir.trace(other, (x,))) != signature


# ---------------------------------------------------------------------------------------------
# Errors and options


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent Python control flow: neither path captures it
            return y * 2
        return y


def test_both_paths_failing_name_both_reasons_and_the_line():
    with pytest.raises(TraceError) as info:
        fxopt.optimize(Branchy().eval(), (torch.randn(1, 3, 4, 4),))
    message = str(info.value)
    assert message.startswith("neither torch.fx nor torch.export can capture Branchy")
    assert "torch.fx cannot trace this model" in message and "torch.export cannot capture this model" in message
    assert message.count("test_capture.py") == 2 and message.count("if y.sum() > 0:") == 2
    assert "torch.cond" in message


def test_export_failure_alone_names_the_line(capfd):
    with pytest.raises(TraceError, match=r"(?s)torch.export cannot capture.*test_capture.py:\d+ in forward: if y.sum"):
        ir.trace(Branchy().eval(), (torch.randn(1, 3, 4, 4),), capture="export")
    assert "def forward" not in capfd.readouterr().err  # torch's partial-graph dump is not repeated


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: ir.trace(small_cnn(), x, capture="jit"), "capture='jit' is not one of"),
        (lambda x: ir.trace(small_cnn(), x, leaf_modules=["head"], capture="export"), "leaf_modules only apply"),
        (lambda x: ir.trace(capture.export(small_cnn(), x), x, capture="fx"), "already captured by torch.export"),
        (lambda x: fxopt.optimize(small_cnn(), x, capture="nope"), "capture='nope'"),
    ],
    ids=["unknown", "leaf-export", "program-fx", "optimize"],
)
def test_capture_option_errors(call, message):
    with pytest.raises(InputError, match=message):
        call((torch.randn(1, 3, 32, 32),))


def test_leaf_modules_still_win_in_auto():
    """auto tries fx first, with the leaves: a model made traceable by a leaf stays on fx."""
    gm = ir.trace(nn.Sequential(seeded(ShapeIteration())), (torch.randn(2, 3, 16, 16),), leaf_modules=[ShapeIteration])
    assert gm.meta["fxopt"]["capture"] == "fx"


# ---------------------------------------------------------------------------------------------
# Saved programs


def test_saved_program_round_trip(tmp_path):
    model = seeded(ShapeIteration())
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "model.pt2"
    torch.export.save(capture.export(model, (x,)), path)
    program = capture.load_program(path)
    assert [p.describe() for p in capture.program_inputs(program)] == ["'x' (2x3x16x16 float32)"]
    inputs = capture.program_example_inputs(program, None)
    assert inputs[0].shape == (2, 3, 16, 16)
    optimized = fxopt.optimize(program, inputs)
    assert optimized.report.capture == "export" and optimized.report.model == "ExportedProgram"
    assert stats_of(optimized.report, "fold_bn") == {"conv_bn": 2, "linear_bn": 1}
    assert_close_to(model(inputs[0]), optimized.module(inputs[0]))
    with pytest.raises(InputError, match=r"--input-shape 1x3x16x16 does not match the program's input 'x' \(2x3x16x16"):
        capture.program_example_inputs(program, [(1, 3, 16, 16)])
    with pytest.raises(InputError, match="takes 1 input"):
        capture.program_example_inputs(program, [(2, 3, 16, 16), (1,)])
    with pytest.raises(InputError, match="--input-dtype float64 does not match"):
        capture.program_example_inputs(program, None, [torch.float64])


def test_dynamic_program_needs_shapes():
    model = small_cnn()
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    with pytest.raises(InputError, match=r"dynamic input dimensions \('x' \(\?x3x32x32 float32\)\).*--input-shape"):
        capture.program_example_inputs(program, None)
    inputs = capture.program_example_inputs(program, [(3, 3, 32, 32)])
    optimized = fxopt.optimize(program, inputs, pipeline="canonicalize,fold_bn")
    assert optimized.report.passes[1].stats == {"conv_bn": 9}
    assert_close_to(model(inputs[0]), optimized.module(inputs[0]))
    with pytest.raises(InputError, match="fails on the example inputs"):
        fxopt.optimize(program, (torch.randn(9, 3, 32, 32),))  # outside the program's range for batch


def test_programs_that_mutate_state_are_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # training mode: updates running stats
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
    with pytest.raises(TraceError, match=r"BatchNorm in training mode \(it updates '1.running_mean'\).*model.eval\(\)"):
        fxopt.optimize(program, (torch.randn(2, 3, 8, 8),))

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return x * 2

    program = torch.export.export(Counter(), (torch.randn(2),))
    with pytest.raises(TraceError, match="mutates state \\('calls'"):
        fxopt.optimize(program, (torch.randn(2),))
    functional = program.run_decompositions()  # the mutation is now an output of the program
    with pytest.raises(TraceError, match="mutates state"):
        fxopt.optimize(functional, (torch.randn(2),))


def test_not_a_program(tmp_path):
    (tmp_path / "junk.pt2").write_text("not a zip")
    with pytest.raises(InputError, match="is not a saved ExportedProgram"):
        capture.load_program(tmp_path / "junk.pt2")
    with pytest.raises(InputError, match="does not exist"):
        capture.load_program(tmp_path / "missing.pt2")


class Views(nn.Module):
    """View ops in all their ATen forms, and in-place ops through views: raising keeps the aliasing
    visible, so canonicalize declines to functionalize what it cannot prove safe."""

    def forward(self, x):
        y = x * 1.0
        y[:, :2].relu_()  # mutates y through a slice: later reads of y see it
        a = y[:, 1:3, ::2] + y.narrow(1, 0, 2)[:, :, ::2]
        b = torch.stack(y.unbind(1), -1).select(-1, 0).unsqueeze(1).expand(-1, 2, -1, -1)
        c, d = y.split([1, 3], dim=1)
        e = c.squeeze(1).permute(0, 2, 1).transpose(1, 2).unsqueeze(1) * d[:, -1:]
        return a.sum() + b[:, :, ::2].sum() + e, y.flatten(2).t() if y.dim() == 2 else y.flatten(2)


def test_views_and_mutation_through_views():
    model = Views().eval()
    x = torch.randn(2, 4, 6, 6)
    gm = ir.trace(model, (x,), capture="export")
    assert "functionalized" not in gm.meta["fxopt"]
    leftover = {n.target for n in gm.graph.nodes if n.op == "call_function" and capture._is_aten(n.target)}
    assert leftover <= {torch.ops.aten.stack.default, torch.ops.aten.sum.default}
    getitems = [n for n in gm.graph.nodes if n.target is operator.getitem and isinstance(n.args[1], tuple)]
    assert getitems and all(all(isinstance(i, slice) for i in n.args[1]) for n in getitems)
    torch.testing.assert_close(gm(x), model(x))
    optimized = fxopt.optimize(model, (x,), pipeline="canonicalize", capture="export")
    declines = optimized.report.passes[0].declines
    assert any("may be a view" in reason for reason in declines), declines
    torch.testing.assert_close(optimized.module(x), model(x))
