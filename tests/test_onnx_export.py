"""fxopt/onnx_export.py and Optimized.to_onnx: the optimized graph as ONNX, run in ONNX Runtime
against the eager model on fresh inputs; sparse layers exported dense; failures write no file."""

import importlib

import onnx
import pytest
import torch
from torch import fx, nn

import fxopt
from fxopt import onnx_export, sparse_ops
from fxopt.cli import main
from fxopt.errors import InputError, UnsupportedOpError, VerificationError
from fxopt.examples import small_cnn, tiny_mobilenetv2
from fxopt.testing import randomize_norm_stats
from reparam_models import ACBlock, DBBBlock, MobileOneBlock, RepGhostBottleneck, RepVGG

ort = pytest.importorskip("onnxruntime")


def ort_run(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(a) for a in session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})]


def assert_matches_eager(path, model, shape, seeds=(11, 12)):
    for seed in seeds:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = model(x)
        (actual,) = ort_run(path, x)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def op_types(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


ZOO = [
    pytest.param(lambda: small_cnn(), (1, 3, 32, 32), id="small_cnn", marks=pytest.mark.slow),  # (in the tests below)
    pytest.param(lambda: tiny_mobilenetv2(), (1, 1, 32, 32), id="tiny_mobilenetv2", marks=pytest.mark.slow),
    pytest.param(lambda: RepVGG(widths=(8, 8, 16, 16, 32), depths=(1, 2, 2, 2, 1), num_classes=10), (1, 3, 32, 32),
                 id="repvgg"),
    pytest.param(lambda: ACBlock(8, 16), (1, 8, 12, 12), id="acblock"),
    pytest.param(lambda: DBBBlock(8, 8), (1, 8, 12, 12), id="dbbblock"),
    pytest.param(lambda: MobileOneBlock(8, 8, 3, 1, 8, 3), (1, 8, 12, 12), id="mobileone_block"),
    pytest.param(lambda: RepGhostBottleneck(8, 16, 8), (1, 8, 12, 12), id="repghost"),
]


@pytest.mark.parametrize("factory, shape", ZOO)
def test_zoo_round_trip_matches_eager_in_onnx_runtime(tmp_path, factory, shape):
    torch.manual_seed(0)
    model = randomize_norm_stats(factory(), seed=1).eval()
    optimized = fxopt.optimize(model, (torch.randn(shape),))
    path = optimized.to_onnx(tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx" and path.is_file()
    ops = op_types(path)
    assert "BatchNormalization" not in ops  # folded (by fxopt; the exporter's own conv-BN fusion has nothing left)
    convs_in_graph = sum(isinstance(m, nn.Conv2d) for m in optimized.module.modules())
    assert ops.count("Conv") == convs_in_graph  # the optimized graph, not the eager one
    assert ops.count("Conv") <= sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert_matches_eager(path, model, shape)


@pytest.fixture(scope="module")
def small():
    """small_cnn optimized once for the tests below (they do not modify it)."""
    return fxopt.optimize(small_cnn(), (torch.randn(1, 3, 32, 32),))


def test_names_follow_the_manifest_and_the_result_says_what_was_checked(tmp_path, small):
    model = small_cnn()
    result = onnx_export.export(small.module, small.example_inputs, tmp_path / "m.onnx", reference=model)
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["x"] == result.input_names
    assert [o.name for o in proto.graph.output] == ["output_0"] == result.output_names
    assert result.opset == 17 and result.comparison.ok and result.checked_with.startswith("onnxruntime")
    assert "matches the reference in onnxruntime" in result.describe() and "Conv=4" in result.describe()


def test_dynamic_batch_runs_at_other_batch_sizes(tmp_path, small):
    model = small_cnn()
    path = small.to_onnx(tmp_path / "m.onnx", dynamic_batch=True)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert_matches_eager(path, model, (3, 3, 32, 32))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return {"a": self.a(y), "b": (self.b(y), y.mean((2, 3)))}


def test_nested_outputs_become_a_flat_list_in_pytree_order(tmp_path):
    model = randomize_norm_stats(TwoHeads()).eval()
    x = torch.randn(1, 3, 8, 8)
    path = fxopt.optimize(model, (x,)).to_onnx(tmp_path / "m.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["output_0", "output_1", "output_2"]
    other = torch.randn(1, 3, 8, 8)
    for actual, expected in zip(ort_run(path, other), torch.utils._pytree.tree_leaves(model(other))):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


class Pointwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            for layer in (self.conv, self.fc):
                layer.weight.mul_((torch.rand_like(layer.weight) < 0.1).float())

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_sparse_layers_are_exported_dense_with_a_note(tmp_path):
    model = Pointwise().eval()
    x = torch.randn(1, 16, 6, 6)
    optimized = fxopt.optimize(model, (x,), [{"name": "lower_sparse_weights", "decide": "density"}], target="host")
    assert sum(isinstance(m, sparse_ops._SparseWeights) for m in optimized.module.modules()) == 2
    result = onnx_export.export(optimized.module, (x,), tmp_path / "m.onnx", reference=model)
    assert len(result.notes) == 1 and "2 sparse layer(s)" in result.notes[0] and "dense" in result.notes[0]
    assert sorted(op_types(result.path)).count("Conv") == 1 and "Gemm" in op_types(result.path)
    weight = next(t for t in onnx.load(str(result.path)).graph.initializer if len(t.dims) == 4)
    assert (onnx.numpy_helper.to_array(weight) == 0).mean() > 0.8  # the pruned zeros are kept
    assert_matches_eager(result.path, model, (1, 16, 6, 6))
    assert sum(isinstance(m, sparse_ops._SparseWeights) for m in optimized.module.modules()) == 2  # not modified


def test_a_graph_calling_the_sparse_op_directly_is_declined(tmp_path):
    layer = sparse_ops.SparseLinear(torch.randn(4, 8))

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return torch.ops.fxopt.sparse_linear(x, self.layer.values, self.layer.col_indices, self.layer.row_ptr,
                                                 [1, 1], [4, 8], None)

    gm = fx.symbolic_trace(Direct())
    with pytest.raises(UnsupportedOpError, match=r"node 'sparse_linear'.*no ONNX form.*without lower_sparse_weights"):
        onnx_export.export(gm, (torch.randn(2, 8),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_mismatch_in_onnx_runtime_writes_no_file(tmp_path, small):
    target = tmp_path / "m.onnx"
    with pytest.raises(VerificationError, match="does not match the reference in ONNX Runtime on the example inputs"):
        onnx_export.export(small.module, small.example_inputs, target, reference=small_cnn(seed=1))
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")  # an existing file is replaced whole, or kept as it was
    with pytest.raises(VerificationError):
        onnx_export.export(small.module, small.example_inputs, target, reference=small_cnn(seed=1))
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_bad_destination_and_opset_are_input_errors(tmp_path, small):
    with pytest.raises(InputError, match="is a directory"):
        small.to_onnx(tmp_path)
    with pytest.raises(InputError, match="opset 99"):
        small.to_onnx(tmp_path / "m.onnx", opset=99)


def test_compiled_to_onnx_writes_the_graph_it_was_built_from(tmp_path, small):
    # (only the optimized module matters here: no TVM build)
    compiled = fxopt.Compiled(small.module, small.report, None, None, small.example_inputs, [], None)
    path = compiled.to_onnx(tmp_path / "m.onnx")
    assert op_types(path).count("Conv") == 4
    assert_matches_eager(path, small_cnn(), (1, 3, 32, 32))


def test_cli_export_onnx(tmp_path, capsys):
    out = tmp_path / "sub" / "m.onnx"
    code = main(["export-onnx", "fxopt.examples:small_cnn", "--input-shape", "1x3x32x32", "--dynamic-batch",
                 "-o", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "fold_bn" in stdout and "matches the reference in onnxruntime" in stdout and f"wrote {out}" in stdout
    assert_matches_eager(out, small_cnn(), (2, 3, 32, 32))
    code = main(["export-onnx", "fxopt.examples:small_cnn", "-o", str(tmp_path / "n.onnx")])
    assert code == 2 and "--input-shape" in capsys.readouterr().err


def _pytorchcv(module, factory):
    return randomize_norm_stats(getattr(importlib.import_module(f"pytorchcv.models.{module}"), factory)(), seed=3).eval()


def test_pytorchcv_resnet10_round_trip(tmp_path):
    """Default tier: one real model, small input (final pool made adaptive so that 64x64 fits)."""
    model = _pytorchcv("resnet", "resnet10")
    model.features.final_pool = nn.AdaptiveAvgPool2d(1)
    x = torch.randn(1, 3, 64, 64)
    optimized = fxopt.optimize(model, (x,))
    path = optimized.to_onnx(tmp_path / "resnet10.onnx")
    assert "BatchNormalization" not in op_types(path) and op_types(path).count("Conv") == 12
    assert_matches_eager(path, model, (1, 3, 64, 64))


PYTORCHCV = [("mobilenetv2", "mobilenetv2_w1"), ("shufflenetv2", "shufflenetv2_wd2"), ("ghostnet", "ghostnet"),
             ("mobilenetv3", "mobilenetv3_small_w7d20"), ("squeezenet", "squeezenet_v1_1"), ("resnet", "resnet18")]


@pytest.mark.slow
@pytest.mark.parametrize("module, factory", PYTORCHCV, ids=[m[1] for m in PYTORCHCV])
def test_pytorchcv_round_trip_matches_eager(tmp_path, module, factory):
    model = _pytorchcv(module, factory)
    optimized = fxopt.optimize(model, (torch.randn(1, 3, 224, 224),))
    path = optimized.to_onnx(tmp_path / f"{factory}.onnx", dynamic_batch=True)
    assert "BatchNormalization" not in op_types(path)
    assert_matches_eager(path, model, (2, 3, 224, 224), seeds=(11,))


def test_without_onnxruntime_the_export_says_outputs_were_not_compared(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    optimized = fxopt.optimize(ACBlock(4, 4).eval(), (torch.randn(1, 4, 6, 6),), "canonicalize")
    result = onnx_export.export(optimized.module, optimized.example_inputs, tmp_path / "m.onnx")
    assert result.comparison is None and "pip install onnxruntime" in result.checked_with
    assert "outputs not compared: onnxruntime is not installed" in result.describe() and result.path.is_file()


class PadConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.shared = self.conv  # a module called twice: its weight is one initializer

    def forward(self, x):
        y = self.conv(nn.functional.pad(x, [0, 1, 0, 1]))
        return y, self.shared(y[:, :3])


def test_constant_chains_are_folded_into_initializers(tmp_path):
    """The TorchScript exporter spells F.pad's pad list as ConstantOfShape/Concat/Reshape/Slice/
    Transpose/Cast nodes: the file holds one Pad with a constant pads initializer."""
    model = PadConv().eval()
    result = onnx_export.export(model, (torch.randn(1, 3, 9, 9),), tmp_path / "m.onnx")  # (a plain nn.Module too)
    proto = onnx.load(str(result.path))
    assert [n.op_type for n in proto.graph.node] == ["Pad", "Conv", "Slice", "Conv"]
    assert sum(len(t.dims) == 4 for t in proto.graph.initializer) == 1
    x = torch.randn(1, 3, 9, 9)
    for actual, expected in zip(ort_run(result.path, x), model(x)):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
