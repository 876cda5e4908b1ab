"""fxopt/onnx_import.py: ONNX models become GraphModules of ordinary torch modules and functions,
compared with ONNX Runtime on the original model; every pass fires on them as on traced models;
unsupported ops and symbolic shapes are named."""

import importlib
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import fxopt
from fxopt import onnx_import
from fxopt.cli import main
from fxopt.errors import InputError, UnsupportedOpError
from fxopt.testing import randomize_norm_stats

ort = pytest.importorskip("onnxruntime")

RNG = np.random.default_rng(0)


def const(name, *shape, positive=False):
    value = RNG.standard_normal(shape).astype(np.float32)
    return numpy_helper.from_array(np.abs(value) + 0.5 if positive else value, name)


def ints(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def make_model(nodes, shape, initializers=(), opset=17, dims=None, out=None):
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims or shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)  # (the output's type)
    onnx.checker.check_model(model)
    return model


def ort_outputs(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {session.get_inputs()[0].name: x.numpy()})]


def assert_matches_ort(module, model, shape, seeds=(1, 2)):
    for seed in seeds:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        (expected,) = ort_outputs(model, x)
        with torch.no_grad():
            actual = module(x)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(1.0, expected.abs().max().item()))


def bn(name, x, y, c):
    return ([helper.make_node("BatchNormalization", [x, f"{name}.s", f"{name}.b", f"{name}.m", f"{name}.v"], [y],
                              name=name, epsilon=1e-3)],
            [const(f"{name}.s", c), const(f"{name}.b", c), const(f"{name}.m", c), const(f"{name}.v", c, positive=True)])


def case_conv_asymmetric_pads():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[0, 0, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["y"])]
    return nodes, [const("w", 8, 3, 3, 3), const("b", 8)], (1, 3, 9, 9)


def case_conv_same_upper_bn_hardswish():
    norm, params = bn("bn", "c", "n", 8)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", auto_pad="SAME_UPPER", strides=[2, 2], group=1),
             *norm, helper.make_node("HardSwish", ["n"], ["y"])]
    return nodes, [const("w", 8, 3, 3, 3), *params], (1, 3, 9, 9)  # (pads 1 on each side)


def case_conv_same_lower_asymmetric():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER", strides=[2, 2])]
    return nodes, [const("w", 4, 3, 3, 3)], (1, 3, 10, 10)


def case_depthwise_dilated_clip():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[2, 2, 2, 2], dilations=[2, 2], group=4),
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"]),
             helper.make_node("Clip", ["r", "lo2", "hi2"], ["y"])]
    inits = [const("w", 4, 1, 3, 3), numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6, np.float32), "hi"),
             numpy_helper.from_array(np.array(-1, np.float32), "lo2"),
             numpy_helper.from_array(np.array(5, np.float32), "hi2")]
    return nodes, inits, (1, 4, 8, 8)


def case_gemm_alpha_beta_softmax():
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w", "c"], ["g"], name="fc", alpha=0.5, beta=2.0, transB=0),
             helper.make_node("Softmax", ["g"], ["y"], axis=-1)]
    return nodes, [const("w", 48, 10), const("c", 1, 10)], (2, 3, 4, 4)


def case_matmul_add_sigmoid_reshape_zero():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Sigmoid", ["a"], ["y"])]
    return nodes, [ints("shape", [0, 3, -1]), const("w", 16, 5), const("b", 5)], (1, 3, 4, 4)


def case_pools():
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                              ceil_mode=1),
             helper.make_node("AveragePool", ["p"], ["q"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["q"], ["r"], kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1],
                              count_include_pad=1),
             helper.make_node("MaxPool", ["r"], ["s"], kernel_shape=[2, 2], pads=[1, 1, 0, 0]),
             helper.make_node("GlobalAveragePool", ["s"], ["g"]),
             helper.make_node("GlobalMaxPool", ["s"], ["h"]),
             helper.make_node("Concat", ["g", "h"], ["y"], axis=1)]
    return nodes, [], (1, 3, 11, 11)


def case_pad_and_activations():
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
             helper.make_node("Pad", ["p", "pads2", "value"], ["q"], mode="constant"),
             helper.make_node("Pad", ["q", "pads3"], ["e"], mode="edge"),
             helper.make_node("HardSigmoid", ["e"], ["h"], alpha=0.25, beta=0.4),
             helper.make_node("HardSigmoid", ["h"], ["h2"], alpha=1 / 6, beta=0.5),
             helper.make_node("LeakyRelu", ["h2"], ["l"], alpha=0.2),
             helper.make_node("Elu", ["l"], ["el"], alpha=0.7),
             helper.make_node("Tanh", ["el"], ["y"])]
    return nodes, [ints("pads", [0, 0, 1, 2, 0, 0, 2, 1]), ints("pads2", [0, 1, 0, 0, 0, 2, 1, 1]),
                   numpy_helper.from_array(np.array(0.5, np.float32), "value"),
                   ints("pads3", [0, 0, 1, 1, 0, 0, 1, 1])], (1, 3, 6, 6)


def case_channel_shuffle_split_slice():
    # the Reshape target shape is computed from Shape(x): folded at import time
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
             helper.make_node("Concat", ["n1", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "back"], ["s"]),
             helper.make_node("Split", ["s", "sizes"], ["a", "b"], axis=1),
             helper.make_node("Slice", ["b", "starts", "ends", "axes", "steps"], ["c"]),
             helper.make_node("Mul", ["a", "scale"], ["m"]),
             helper.make_node("Div", ["m", "six"], ["d"]),
             None]
    inits = [ints("zero", 0), ints("zero1", [0]), ints("rest", [2, 4, 5, 5]), ints("back", [1, 8, 5, 5]),
             ints("sizes", [3, 5]), ints("starts", [1, 0]), ints("ends", [4, 2**63 - 1]), ints("axes", [1, 3]),
             ints("steps", [1, 1]), const("scale", 1, 3, 1, 1), numpy_helper.from_array(np.array([6], np.float32), "six"),
             ints("starts2", [0]), ints("ends2", [5]), ints("axes2", [2]), ints("steps2", [2])]
    nodes[-1] = helper.make_node("Concat", ["d", "c"], ["e"], axis=1)
    nodes.append(helper.make_node("Slice", ["e", "starts2", "ends2", "axes2", "steps2"], ["y"]))
    return nodes, inits, (1, 8, 5, 5), [1, 6, 3, 5]  # (the output shape: ONNX shape inference cannot tell)


def case_squeeze_unsqueeze_reduce():
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
             helper.make_node("Squeeze", ["m", "sq"], ["s"]),
             helper.make_node("Unsqueeze", ["s", "uq"], ["u"]),
             helper.make_node("Add", ["u", "one"], ["y"])]
    return nodes, [ints("axes", [2, 3]), ints("sq", [2, 3]), ints("uq", [1, -1]),
                   numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "one")], (2, 4, 3, 3)


CASES = [case_conv_asymmetric_pads, case_conv_same_upper_bn_hardswish, case_conv_same_lower_asymmetric,
         case_depthwise_dilated_clip,
         case_gemm_alpha_beta_softmax, case_matmul_add_sigmoid_reshape_zero, case_pools, case_pad_and_activations,
         case_channel_shuffle_split_slice, case_squeeze_unsqueeze_reduce]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
def test_ops_match_onnx_runtime(case):
    nodes, inits, shape, *out = case()
    model = make_model(nodes, shape, inits, opset=18 if case is case_squeeze_unsqueeze_reduce else 17,
                       out=out[0] if out else None)
    imported = onnx_import.import_onnx(model)
    assert [tuple(x.shape) for x in imported.example_inputs] == [shape]
    assert imported.input_names == ["x"] and imported.output_names == ["y"]
    assert_matches_ort(imported.module, model, shape)


def test_layers_become_modules_and_functions_fxopt_knows():
    nodes, inits, shape = case_conv_same_upper_bn_hardswish()
    gm = onnx_import.import_onnx(make_model(nodes, shape, inits)).module
    assert [type(m).__name__ for m in gm.children()] == ["Conv2d", "BatchNorm2d"]
    from fxopt.testing import op_counts

    assert op_counts(fxopt.trace(gm, (torch.randn(shape),))) == {"conv2d": 1, "batch_norm": 1, "hardswish": 1}
    nodes, inits, shape = case_gemm_alpha_beta_softmax()
    gm = onnx_import.import_onnx(make_model(nodes, shape, inits)).module
    assert [type(m).__name__ for m in gm.children()] == ["Linear"]


def test_unsupported_ops_are_named_with_the_supported_list(tmp_path, capsys):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("LRN", ["c"], ["l"], name="norm7", size=3),
             helper.make_node("Erf", ["l"], ["e"], name="erf9"),  # after an unsupported op: not reported again
             helper.make_node("Erf", ["c"], ["f"], name="erf10"),
             helper.make_node("Add", ["e", "f"], ["y"])]
    model = make_model(nodes, (1, 3, 8, 8), [const("w", 4, 3, 1, 1)])
    with pytest.raises(UnsupportedOpError) as info:
        onnx_import.import_onnx(model)
    message = str(info.value)
    assert "2 node(s) fxopt cannot import: 'norm7' (LRN); 'erf10' (Erf)" in message
    assert "supported ops: Add, AveragePool, BatchNormalization" in message and "what to do" in message
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert main(["build", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'norm7' (LRN)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_custom_domains_and_inputs_torch_rejects_are_named():
    nodes = [helper.make_node("Concat", ["x", "c"], ["y1"], name="cat", axis=1),
             helper.make_node("Gelu", ["x"], ["y2"], name="mine", domain="com.example"),
             helper.make_node("Add", ["y1", "y2"], ["y"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 4, 4])],
                              [const("c", 1, 2, 5, 5)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpError) as info:
        onnx_import.import_onnx(model)
    assert "'cat' (Concat): its torch form fails on these inputs (RuntimeError: " in str(info.value)
    assert "'mine' (Gelu): custom domain 'com.example'" in str(info.value)


def test_a_computed_weight_is_declined_with_the_reason():
    nodes = [helper.make_node("Relu", ["x"], ["w"]), helper.make_node("Conv", ["x", "w"], ["y"], name="c")]
    with pytest.raises(UnsupportedOpError, match=r"'c' \(Conv\): the weight \(input 1\) is computed in the graph"):
        onnx_import.import_onnx(make_model(nodes, (1, 1, 3, 3)))


def test_symbolic_dims_need_input_shapes():
    nodes, inits, shape = case_conv_asymmetric_pads()
    model = make_model(nodes, shape, inits, dims=["batch", 3, "h", "w"])
    with pytest.raises(InputError, match=r"ONNX input x batchx3xhxw float32 has symbolic dimensions.*--input-shape"):
        onnx_import.import_onnx(model)
    with pytest.raises(InputError, match="does not fit ONNX input x batchx3xhxw"):
        onnx_import.import_onnx(model, [(2, 4, 9, 9)])
    imported = onnx_import.import_onnx(model, [(2, 3, 7, 7)])
    assert_matches_ort(imported.module, model, (2, 3, 7, 7))
    optimized = fxopt.optimize(model, (torch.randn(2, 3, 7, 7),))  # the API takes a ModelProto (or a path)
    assert_matches_ort(optimized.module, model, (2, 3, 7, 7))


def export_with_batch_norms(model, x, path):
    """The TorchScript exporter in PRESERVE mode keeps BatchNormalization nodes (EVAL mode would
    fuse them into the convs itself), as ONNX files from other frameworks have them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load(str(path))


def import_and_optimize(model, shape, path):
    proto = export_with_batch_norms(model, torch.randn(shape), path)
    batch_norms = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    optimized = fxopt.optimize(str(path), (torch.randn(shape),))
    folded = sum(row.stats.get("conv_bn", 0) for row in optimized.report.passes if row.name == "fold_bn")
    return proto, optimized, batch_norms, folded


def test_pytorchcv_import_folds_every_batch_norm_and_matches_onnx_runtime(tmp_path):
    from pytorchcv.models.resnet import resnet10

    model = randomize_norm_stats(resnet10(), seed=3).eval()
    model.features.final_pool = nn.AdaptiveAvgPool2d(1)  # (so that a 64x64 input fits)
    proto, optimized, batch_norms, folded = import_and_optimize(model, (1, 3, 64, 64), tmp_path / "resnet10.onnx")
    assert batch_norms == 12 and folded == batch_norms
    assert not any(isinstance(m, nn.BatchNorm2d) for m in optimized.module.modules())
    assert optimized.report.model == "resnet10" and optimized.report.verification["max_rel_error"] < 1e-4
    assert_matches_ort(optimized.module, proto, (1, 3, 64, 64))


def conv_bn_model(tmp_path):
    """A small ONNX file with a conv -> BatchNormalization -> HardSwish chain."""
    nodes, inits, shape = case_conv_same_upper_bn_hardswish()
    path = tmp_path / "convbn.onnx"
    onnx.save(make_model(nodes, shape, inits), str(path))
    return path, shape


def test_cli_builds_an_onnx_model_and_the_build_checks(tmp_path, capsys):
    path, shape = conv_bn_model(tmp_path)
    out = tmp_path / "build"
    code = main(["build", str(path), "--target", "host", "-o", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "conv_bn=1" in stdout and "convbn.onnx" in stdout and f"wrote {out}" in stdout
    assert main(["check", str(out)]) == 0
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["shape"] for i in manifest["inputs"]] == [list(shape)]
    assert main(["build", str(path), "--input-dtype", "float16", "-o", str(tmp_path / "b2")]) == 2
    assert "declares its input dtypes" in capsys.readouterr().err


def test_cli_export_onnx_of_an_onnx_model(tmp_path, capsys):
    source, shape = conv_bn_model(tmp_path)
    out = tmp_path / "convbn.opt.onnx"
    assert main(["export-onnx", str(source), "-o", str(out)]) == 0, capsys.readouterr().err
    proto, optimized = onnx.load(str(source)), onnx.load(str(out))
    assert [n.op_type for n in proto.graph.node] == ["Conv", "BatchNormalization", "HardSwish"]
    assert [n.op_type for n in optimized.graph.node] == ["Conv", "HardSwish"]
    x = torch.randn(shape)
    torch.testing.assert_close(ort_outputs(optimized, x)[0], ort_outputs(proto, x)[0], rtol=1e-4, atol=1e-5)


PYTORCHCV = [("mobilenetv2", "mobilenetv2_w1"), ("shufflenetv2", "shufflenetv2_wd2"), ("ghostnet", "ghostnet"),
             ("mobilenetv3", "mobilenetv3_small_w7d20"), ("squeezenet", "squeezenet_v1_1"), ("resnet", "resnet18")]


@pytest.mark.slow
@pytest.mark.parametrize("module, factory", PYTORCHCV, ids=[m[1] for m in PYTORCHCV])
def test_pytorchcv_import_round_trip(tmp_path, module, factory):
    model = randomize_norm_stats(getattr(importlib.import_module(f"pytorchcv.models.{module}"), factory)(), seed=3).eval()
    proto, optimized, batch_norms, folded = import_and_optimize(model, (1, 3, 224, 224), tmp_path / f"{factory}.onnx")
    assert folded >= batch_norms - 2  # (BNs after a concat fold by other passes)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in optimized.module.modules())
    assert_matches_ort(optimized.module, proto, (1, 3, 224, 224), seeds=(1,))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(optimized.module(x), model(x), rtol=1e-4, atol=1e-4 * model(x).abs().max().item())
