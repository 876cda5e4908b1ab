"""Export an optimized graph to ONNX, checked in ONNX Runtime against its reference.

``export`` writes what fxopt's passes made of a model (BatchNorms folded, branches merged,
pruned channels removed) so that ONNX Runtime, TensorRT or OpenVINO users deploy that graph:

1. the GraphModule is copied; fxopt's block-sparse layers (``lower_sparse_weights``) become the
   dense ``nn.Conv2d`` / ``nn.Linear`` they were made from (ONNX has no block-sparse op: the
   zeros of a pruned weight stay, ONNX Runtime runs them dense; the result says so in ``notes``);
2. ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``: the torch.export-based
   one needs onnxscript, which fxopt does not depend on), opset 17 by default, inputs named as
   the graph's placeholders and outputs ``output_0``, ``output_1`` ... (the names of fxopt's build
   manifest); ``dynamic_batch=True`` makes dimension 0 of every input and output symbolic; nodes
   computing constants (the exporter's spelling of ``F.pad``'s pad list, ``Identity`` of a weight)
   are folded into initializers;
3. ``onnx.checker`` (with shape inference), then, when onnxruntime is installed, the model runs
   in ONNX Runtime on the example inputs and on fresh seeded random inputs (also at batch 2 with
   ``dynamic_batch``), compared with the reference (the eager model) at fxopt's build tolerance;
4. the file is written only when all of that passed (a temporary file renamed into place), so a
   failed export leaves no file behind.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from fxopt import verify as verification
from fxopt.errors import BuildError, InputError, UnsupportedOpError, VerificationError

DEFAULT_OPSET = 17
SPARSE_NOTE = ("ONNX has no block-sparse op: {layers} exported as dense Conv/Gemm holding their zeros "
               "(ONNX Runtime runs them dense)")


@dataclass
class OnnxExport:
    """What ``export`` wrote and how it was checked."""

    path: Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    ops: dict[str, int]  # ONNX op_type -> count
    comparison: verification.Comparison | None  # worst over the checked inputs; None when not run
    checked_with: str  # "onnxruntime 1.x", or why outputs were not compared
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        ops = ", ".join(f"{op}={n}" for op, n in sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0])))
        if self.comparison is not None:
            check = (f"matches the reference in {self.checked_with} (max abs error {self.comparison.max_abs_error:.3g}, "
                     f"relative to output scale {self.comparison.max_rel_error:.3g})")
        else:
            check = f"outputs not compared: {self.checked_with}"
        return f"ONNX opset {self.opset}, {sum(self.ops.values())} nodes ({ops}); {check}"


def export(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    *,
    reference: nn.Module | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    check: bool = True,
    trials: int = 2,
    seed: int = 0,
) -> OnnxExport:
    """Export ``module`` (an fx.GraphModule from ``fxopt.optimize``) to the ONNX file ``path``.

    ``reference`` is what the ONNX model is compared with (default: ``module`` itself); ``check``
    runs it in ONNX Runtime on the example inputs and ``trials`` seeded random ones. Raises
    UnsupportedOpError when the exporter cannot express an op, VerificationError when ONNX
    Runtime disagrees with the reference; in both cases no file is written.
    """
    import onnx

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory: give the ONNX file to write, e.g. {path / 'model.onnx'}")
    inputs = tuple(example_inputs)
    if not isinstance(opset, int) or not 9 <= opset <= 20:
        raise InputError(f"ONNX opset {opset!r} is not supported by the TorchScript exporter: use 9 to 20 (default 17)")
    exportable, notes = exportable_module(module)
    input_names = _input_names(module, len(inputs))
    with torch.no_grad():
        outputs = exportable(*inputs)
    output_names = [f"output_{i}" for i in range(len(outputs))]
    proto = fold_constants(onnx.load_from_string(
        _export_bytes(exportable, inputs, input_names, output_names, opset, dynamic_batch)))
    data = proto.SerializeToString()
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"the exported ONNX model does not pass onnx.checker: {type(exc).__name__}: {exc}") from exc
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    comparison, checked_with = None, "check=False"
    if check:
        comparison, checked_with = _check(data, reference if reference is not None else module, inputs, input_names,
                                          dynamic_batch, trials, seed)
    _write_atomically(path, data)
    return OnnxExport(path, opset, input_names, output_names, ops, comparison, checked_with, notes)


def _input_names(module: nn.Module, count: int) -> list[str]:
    if isinstance(module, fx.GraphModule):
        names = [n.name for n in module.graph.nodes if n.op == "placeholder"]
        if len(names) == count:
            return names
    return [f"input_{i}" for i in range(count)]


class _FlatOutputs(nn.Module):
    """The module with its outputs flattened to a tuple of tensors (ONNX outputs are a flat list)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(pytree.tree_leaves(self.module(*inputs)))


def exportable_module(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``module`` that the ONNX exporter can trace (sparse layers made dense), its
    outputs a flat tuple, and notes on what changed."""
    from fxopt import ir, sparse_ops

    copied = copy.deepcopy(module).eval()
    notes = []
    if isinstance(copied, fx.GraphModule):
        for node in copied.graph.nodes:
            if node.op == "call_function" and _is_fxopt_op(node.target):
                raise UnsupportedOpError(
                    f"node {node.name!r} calls {node.target}, which has no ONNX form: export the graph built "
                    "without lower_sparse_weights, or with the sparse layers as modules (sparse_ops.SparseConv1x1)")
    dense = []
    for name, layer in list(copied.named_modules()):
        if isinstance(layer, sparse_ops.SparseConv1x1):
            m, k = layer.weight_shape
            replacement = nn.Conv2d(k, m, 1, bias=layer.bias is not None, dtype=layer.values.dtype)
            weight = layer.dense_weight().reshape(m, k, 1, 1)
        elif isinstance(layer, sparse_ops.SparseLinear):
            m, k = layer.weight_shape
            replacement = nn.Linear(k, m, bias=layer.bias is not None, dtype=layer.values.dtype)
            weight = layer.dense_weight()
        else:
            continue
        with torch.no_grad():
            replacement.weight.copy_(weight)
            if layer.bias is not None:
                replacement.bias.copy_(layer.bias)
        ir.set_module(copied, name, replacement.eval())
        dense.append(name)
    if dense:
        layers = f"{len(dense)} sparse layer(s) ({', '.join(dense[:4])}{' ...' if len(dense) > 4 else ''})"
        notes.append(SPARSE_NOTE.format(layers=layers))
    if isinstance(copied, fx.GraphModule):
        # outputs as a flat tuple in pytree order, in the graph itself: initializers keep the
        # module's own names (a wrapper module would prefix them)
        output = next(n for n in copied.graph.nodes if n.op == "output")
        leaves = pytree.tree_leaves(output.args[0])
        if all(isinstance(leaf, fx.Node) for leaf in leaves):
            output.args = (tuple(leaves),)
            copied.recompile()
            return copied, notes
    return _FlatOutputs(copied).eval(), notes


def _is_fxopt_op(target: Any) -> bool:
    """``torch.ops.fxopt.*`` (fxopt's sparse kernels), as an op overload or an overload packet."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.startswith("fxopt::")
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "fxopt"


@contextlib.contextmanager
def _quiet_exporter():
    """The TorchScript exporter warns that it is the legacy one on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        yield


def _export_bytes(module: nn.Module, inputs: tuple[torch.Tensor, ...], input_names: list[str],
                  output_names: list[str], opset: int, dynamic_batch: bool) -> bytes:
    buffer = io.BytesIO()
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]} if dynamic_batch else None
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(module, inputs, buffer, dynamo=False, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds
        first = next((line for line in str(exc).strip().splitlines() if line.strip()), type(exc).__name__)
        raise UnsupportedOpError(
            f"torch.onnx.export (TorchScript exporter, opset {opset}) cannot export this graph: "
            f"{type(exc).__name__}: {first}\n  what to do: try a newer opset (--opset 18), or build without the "
            "pass that introduced the op") from exc
    return buffer.getvalue()


_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def fold_constants(model):
    """Replace the nodes whose inputs are all constant by initializers (the TorchScript exporter
    spells F.pad's pad list as a ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast chain);
    initializers that no node reads any more are dropped."""
    from onnx import numpy_helper

    from fxopt.onnx_import import evaluate_node

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    outputs = {o.name for o in graph.output}
    known = {t.name: None for t in graph.initializer}  # arrays read lazily: most are weights
    arrays: dict[str, Any] = {}
    kept, folded = [], []

    def value(name: str):
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(next(t for t in graph.initializer if t.name == name))
        return arrays[name]

    alias: dict[str, str] = {}  # Identity of a constant: its users read the constant itself (no copy)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
        if node.op_type == "Identity" and node.input[0] in known and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
            continue
        foldable = (opset is not None and node.domain in ("", "ai.onnx") and node.op_type not in _NOT_FOLDED
                    and all(not name or name in known for name in node.input)
                    and not any(name in outputs for name in node.output)
                    and not any(a.type in (5, 10) for a in node.attribute))  # (GRAPH, GRAPHS: If / Loop bodies)
        if foldable:
            try:
                results = evaluate_node(node, [value(n) if n else None for n in node.input], opset)
            except Exception:  # noqa: BLE001 - left to the runtime
                results = None
            if results is not None:
                for name, result in zip(node.output, results):
                    known[name] = None
                    arrays[name] = result
                    folded.append(numpy_helper.from_array(result, name))
                continue
        kept.append(node)
    if not folded and not alias:
        return model
    used = {name for node in kept for name in node.input} | outputs
    initializers = [t for t in [*graph.initializer, *folded] if t.name in used]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return model


def _check(data: bytes, reference: nn.Module, inputs: tuple[torch.Tensor, ...], input_names: list[str],
           dynamic_batch: bool, trials: int, seed: int) -> tuple[verification.Comparison | None, str]:
    """Run the ONNX model in ONNX Runtime and compare with ``reference`` (build tolerance)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed (pip install onnxruntime to compare outputs)"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    cases = [("the example inputs", inputs)]
    cases += [(f"random inputs (seed {seed + t})", verification.random_inputs_like(inputs, seed + t))
              for t in range(1, trials + 1)]
    if dynamic_batch:
        doubled = tuple(torch.cat([x, x]) for x in verification.random_inputs_like(inputs, seed + trials + 1))
        cases.append(("random inputs at batch 2 (dynamic_batch)", doubled))
    worst = verification.Comparison(True, 0.0, 0.0)
    rtol, atol = verification.BUILD_TOLERANCE
    for what, case in cases:
        expected = pytree.tree_leaves(verification.run_reference(reference, case))
        feed = {name: x.detach().cpu().numpy() for name, x in zip(input_names, case)}
        try:
            actual = [torch.from_numpy(a) for a in session.run(None, feed)]
        except Exception as exc:  # noqa: BLE001
            raise VerificationError(f"ONNX Runtime cannot run the exported model on {what}: {type(exc).__name__}: "
                                    f"{exc}" + ("; the graph may have the batch size baked in: export without "
                                                "dynamic_batch" if "batch 2" in what else "")) from exc
        comparison = verification.compare_outputs(expected, actual, rtol, atol)
        if not comparison.ok:
            raise VerificationError(f"the exported ONNX model does not match the reference in ONNX Runtime on {what}: "
                                    f"{comparison.detail}" + ("; the graph may have the batch size baked in: export "
                                                              "without dynamic_batch" if "batch 2" in what else ""))
        if comparison.max_rel_error >= worst.max_rel_error:
            worst = comparison
    return worst, f"onnxruntime {ort.__version__}"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
