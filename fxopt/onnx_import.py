"""Import an ONNX model as a torch.fx GraphModule of ordinary torch modules and functions.

Each ONNX node becomes what fxopt's own capture gives for the PyTorch layer it came from, so that
every pass matches it the same way:

* ``Conv`` -> ``nn.Conv{1,2,3}d``, ``BatchNormalization`` -> ``nn.BatchNorm{1,2,3}d``, ``Gemm`` and
  ``MatMul`` with a constant weight -> ``nn.Linear`` (call_module nodes holding copies of the
  initializers; ``alpha``/``beta``/``transB`` are folded into the weights);
* activations, pooling, ``Add``/``Sub``/``Mul``/``Div``, ``Concat``, ``Reshape``/``Flatten``/``Transpose``/
  ``Squeeze``/``Unsqueeze``, ``Slice``/``Split``, ``Pad``, ``ReduceMean``, ``Softmax`` -> the canonical
  ``call_function`` of ``fxopt.ir.classify`` (``F.relu``, ``F.relu6`` for ``Clip(0, 6)``,
  ``operator.add``, ``torch.cat``, ``F.max_pool2d``, ``F.adaptive_avg_pool2d`` for
  ``GlobalAveragePool`` ...); constant operands become buffers (or Python scalars);
* nodes whose inputs are all constant (``Constant``, shape arithmetic such as
  ``Shape -> Gather -> Concat`` feeding a ``Reshape``) are computed at import time with the ONNX
  reference evaluator; ``Shape`` of a computed tensor is read from ONNX shape inference, which
  needs static input shapes: symbolic dimensions (``batch``) take the shape given by the caller
  (``--input-shape``).

An op outside this list raises UnsupportedOpError naming every unsupported node (its ONNX name and
op_type) and the supported ops. Needs ``onnx`` (a dependency of fxopt); not onnxruntime.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call
from torch.nn.utils import skip_init  # weights are copied in: no random initialization

from fxopt.errors import InputError, UnsupportedOpError

_INT64_MAX = 2**63 - 1


def is_onnx(model: Any) -> bool:
    """``model`` names an ONNX file (``*.onnx``) or is an ``onnx.ModelProto``."""
    if isinstance(model, (str, Path)):
        return str(model).lower().endswith(".onnx")
    return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")


def load(source: str | Path | Any):
    """An ``onnx.ModelProto`` from a path (checked with onnx.checker) or the proto itself."""
    import onnx

    if not isinstance(source, (str, Path)):
        return source
    path = Path(source)
    if not path.is_file():
        raise InputError(f"MODEL {str(path)!r}: file does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - onnx raises several kinds
        raise InputError(f"MODEL {str(path)!r} is not a valid ONNX model ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                         "check it with python -m onnx.checker or re-export it") from exc
    return model


@dataclass(frozen=True)
class OnnxInput:
    """A graph input as the ONNX model declares it: dims are ints, or a name/None when symbolic."""

    name: str
    dims: tuple
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{self.name} {'x'.join(str(d) if isinstance(d, int) else (d or '?') for d in self.dims)} " \
               f"{str(self.dtype).removeprefix('torch.')}"

    @property
    def static(self) -> bool:
        return all(isinstance(d, int) for d in self.dims)


def graph_inputs(model) -> list[OnnxInput]:
    """The model's runtime inputs (initializers listed as inputs, as older exporters do, are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise UnsupportedOpError(f"ONNX input {value.name!r} is not a tensor (sequences and maps are not supported)")
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                     for d in tensor_type.shape.dim)
        inputs.append(OnnxInput(value.name, dims, _torch_dtype(tensor_type.elem_type, f"input {value.name!r}")))
    return inputs


def _torch_dtype(elem_type: int, what: str) -> torch.dtype:
    import onnx

    try:
        return torch.from_numpy(np.zeros(0, dtype=onnx.helper.tensor_dtype_to_np_dtype(elem_type))).dtype
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedOpError(f"ONNX {what} has element type {onnx.TensorProto.DataType.Name(elem_type)}, "
                                 "which torch has no dtype for") from exc


def input_shapes(declared: Sequence[OnnxInput], shapes: Sequence[Sequence[int]] | None) -> list[tuple[int, ...]]:
    """The static shape of each input: ``shapes`` where given (they must fit the declared fixed
    dims), else the declared shape, which must then be static."""
    if shapes:
        if len(shapes) != len(declared):
            raise InputError(f"the ONNX model has {len(declared)} input(s) ({', '.join(d.describe() for d in declared)}), "
                             f"got {len(shapes)} input shape(s)")
        for given, d in zip(shapes, declared):
            if len(given) != len(d.dims) or any(isinstance(a, int) and a != b for a, b in zip(d.dims, given)):
                raise InputError(f"input shape {'x'.join(map(str, given))} does not fit ONNX input {d.describe()}")
        return [tuple(int(s) for s in given) for given in shapes]
    symbolic = [d for d in declared if not d.static]
    if symbolic:
        raise InputError(f"ONNX input {symbolic[0].describe()} has symbolic dimensions: give the shape of each input "
                         "(CLI: --input-shape 1x3x224x224; Python: the example inputs)")
    return [tuple(d.dims) for d in declared]


@dataclass
class Imported:
    """An imported ONNX model: the GraphModule, seeded example inputs of the shapes it was built
    for, and the ONNX input and output names (in the order of the module's inputs and outputs)."""

    module: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]


def import_onnx(source, shapes: Sequence[Sequence[int]] | None = None, *, seed: int = 0,
                name: str | None = None) -> Imported:
    """Build a GraphModule computing the ONNX model ``source`` (a path or ``onnx.ModelProto``).

    ``shapes`` gives the static shape of each input (required where the model's are symbolic).
    """
    model = load(source)
    declared = graph_inputs(model)
    static = input_shapes(declared, shapes)
    if name is None:
        stem = Path(source).stem if isinstance(source, (str, Path)) else (model.graph.name or "onnx_model")
        name = _identifier(stem) or "OnnxModel"
    generator = torch.Generator().manual_seed(seed)
    inputs = tuple(torch.randn(shape, generator=generator).to(d.dtype) if d.dtype.is_floating_point
                   else torch.randint(0, 2 if d.dtype == torch.bool else 10, shape, generator=generator).to(d.dtype)
                   for shape, d in zip(static, declared))
    gm = _Builder(model, declared, inputs).build(name)
    return Imported(gm, inputs, [d.name for d in declared], [o.name for o in model.graph.output])


def _identifier(text: str) -> str:
    text = re.sub(r"\W+", "_", text).strip("_")
    return ("m_" + text) if text[:1].isdigit() else text


# ---------------------------------------------------------------------------------------------
# The builder


class _Unknown:
    """The value of an unsupported node's output (its users are not converted either)."""


class _Const:
    """A value known at import time."""

    def __init__(self, value: torch.Tensor):
        self.value = value


class _Builder:
    def __init__(self, model, declared: list[OnnxInput], inputs: tuple[torch.Tensor, ...]):
        self.model = model
        self.declared, self.inputs = declared, inputs
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[str, Any] = {"": None}  # "" is an omitted optional input
        self.names: set[str] = set()
        self.unsupported: list[str] = []
        # each node's value as a meta tensor (shape and dtype, no data): later nodes read static shapes
        self.examples: dict[fx.Node, Any] = {}

    # -- graph construction helpers

    def unique(self, base: str) -> str:
        base = _identifier(base) or "node"
        name, i = base, 1
        while name in self.names or hasattr(self.root, name):
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def constant_node(self, value: torch.Tensor, base: str) -> fx.Node:
        name = self.unique(base)
        self.root.register_buffer(name, value.clone())
        node = self.graph.get_attr(name)
        self.examples[node] = value.to("meta")
        return node

    def module(self, base: str, module: nn.Module, args: tuple) -> fx.Node:
        name = self.unique(base)
        self.root.add_module(name, module.eval())
        return self._run(self.graph.call_module(name, args), module, args, {})

    def function(self, fn: Callable, args: tuple, kwargs: dict | None = None) -> fx.Node:
        return self._run(self.graph.call_function(fn, args, kwargs or {}), fn, args, kwargs or {})

    def _run(self, node: fx.Node, fn: Callable, args: tuple, kwargs: dict) -> fx.Node:
        """Compute the node's shape and dtype (on meta tensors)."""
        args, kwargs = fx.node.map_arg((args, kwargs), self.examples.__getitem__)
        with torch.no_grad():
            if isinstance(fn, nn.Module):
                state = {name: value.to("meta") for name, value in fn.state_dict(keep_vars=True).items()}
                self.examples[node] = functional_call(fn, state, args, kwargs)
            else:
                self.examples[node] = fn(*args, **kwargs)
        return node

    def shape_of(self, value: Any) -> tuple[int, ...]:
        example = value.value if isinstance(value, _Const) else self.examples[value]
        return tuple(example.shape)

    # -- building

    def build(self, class_name: str) -> fx.GraphModule:
        from onnx import numpy_helper

        for tensor in self.model.graph.initializer:
            self.env[tensor.name] = _Const(torch.from_numpy(np.array(numpy_helper.to_array(tensor))))
        for d, example in zip(self.declared, self.inputs):
            self.env[d.name] = self.graph.placeholder(self.unique(d.name))
            self.examples[self.env[d.name]] = torch.empty(example.shape, dtype=example.dtype, device="meta")
        for index, node in enumerate(self.model.graph.node):
            self.convert(node, index)
        if self.unsupported:
            raise UnsupportedOpError(
                f"the ONNX model has {len(self.unsupported)} node(s) fxopt cannot import: "
                + "; ".join(self.unsupported[:8]) + (" ..." if len(self.unsupported) > 8 else "")
                + f"\n  supported ops: {', '.join(sorted(SUPPORTED_OPS))} (and any op whose inputs are all constant)"
                + "\n  what to do: build the PyTorch model itself (MODEL as package.module:factory or a saved "
                  ".pt2), or re-export the ONNX model without these ops")
        outputs = []
        for value in self.model.graph.output:
            result = self.env[value.name]
            if isinstance(result, _Const):
                result = self.constant_node(result.value, value.name)
            outputs.append(result)
        self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        gm = fx.GraphModule(self.root, self.graph, class_name=class_name)
        gm.eval()
        return gm

    def convert(self, node, index: int) -> None:
        values = [self.env.get(name, _Unknown) if name else None for name in node.input]
        if any(v is _Unknown for v in values):
            for name in node.output:
                self.env[name] = _Unknown
            return
        label = f"{node.name or f'#{index}'!r} ({node.op_type})"
        try:
            if node.domain not in ("", "ai.onnx"):
                raise _Decline(f"custom domain {node.domain!r}")
            if node.op_type == "Shape" and isinstance(values[0], fx.Node):
                results = [_Const(self._shape_of(node))]
            elif all(v is None or isinstance(v, _Const) for v in values) and node.op_type not in _NOT_FOLDED:
                results = [_Const(v) for v in self._fold(node, values)]
            else:
                converter = _CONVERTERS.get(node.op_type)
                if converter is None:
                    raise _Decline("")
                results = converter(_Node(self, node, values, label))
                if not isinstance(results, (list, tuple)):
                    results = [results]
        except _Decline as decline:
            self.unsupported.append(f"{label}{': ' + str(decline) if str(decline) else ''}")
            results = [_Unknown] * len(node.output)
        except Exception as exc:  # noqa: BLE001 - the torch op rejects these inputs (shapes, dtypes)
            first = next((line for line in str(exc).splitlines() if line.strip()), "")
            self.unsupported.append(f"{label}: its torch form fails on these inputs ({type(exc).__name__}: {first})")
            results = [_Unknown] * len(node.output)
        for name, result in zip(node.output, results):
            if name:
                self.env[name] = result

    def _shape_of(self, node) -> torch.Tensor:
        shape = self.shape_of(self.env[node.input[0]])
        attrs = _attributes(node)
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        return torch.tensor(shape[slice(start, end)], dtype=torch.int64)

    def _fold(self, node, values: list) -> list[torch.Tensor]:
        try:
            results = evaluate_node(node, [None if v is None else v.value.numpy() for v in values], self.opset)
        except Exception as exc:  # noqa: BLE001
            raise _Decline(f"cannot compute it at import time ({type(exc).__name__}: {exc})") from exc
        return [torch.from_numpy(np.array(r)) for r in results]


def evaluate_node(node, arrays: Sequence[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Run one ONNX node of the default domain on constant inputs (None: an omitted optional
    input) with the ONNX reference evaluator."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if a is not None else "" for i, a in enumerate(arrays)]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.input[:]
    copy.input.extend(names)
    del copy.output[:]
    outputs = [f"out{i}" for i in range(len(node.output))]
    copy.output.extend(outputs)
    feeds = {n: a for n, a in zip(names, arrays) if n}
    graph = onnx.helper.make_graph(
        [copy], "fold",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in feeds.items()],
        [onnx.helper.make_empty_tensor_value_info(o) for o in outputs])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)]


class _Decline(Exception):
    """A node the converter cannot import; the message says why."""


_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _attributes(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Node:
    """One ONNX node being converted: its inputs, attributes and the builder."""

    def __init__(self, builder: _Builder, node, values: list, label: str):
        self.b, self.node, self.values, self.label = builder, node, values, label
        self.attrs = _attributes(node)
        self.base = node.name or node.op_type.lower()

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def input(self, i: int) -> Any:
        """An input as a graph value: an fx.Node, a get_attr node for a constant, None when omitted."""
        value = self.values[i] if i < len(self.values) else None
        if isinstance(value, _Const):
            return self.b.constant_node(value.value, f"{self.base}_const{i}")
        return value

    def runtime(self, i: int = 0) -> fx.Node:
        value = self.values[i] if i < len(self.values) else None
        if not isinstance(value, fx.Node):
            return self.input(i)
        return value

    def const(self, i: int, what: str, required: bool = True) -> torch.Tensor | None:
        value = self.values[i] if i < len(self.values) else None
        if value is None:
            if required:
                raise _Decline(f"{what} is missing")
            return None
        if not isinstance(value, _Const):
            raise _Decline(f"{what} (input {i}) is computed in the graph; fxopt imports it only as a constant "
                           "(an initializer or a Constant)")
        return value.value

    def ints(self, i: int, attr: str, what: str) -> list[int] | None:
        """An int list given as input ``i`` (newer opsets) or attribute ``attr`` (older ones)."""
        if i < len(self.values) and self.values[i] is not None:
            return [int(v) for v in self.const(i, what).reshape(-1).tolist()]
        value = self.attr(attr)
        return None if value is None else [int(v) for v in value]

    def shape(self, i: int = 0) -> tuple[int, ...]:
        return self.b.shape_of(self.values[i])

    def only_first_output(self) -> None:
        if any(self.node.output[1:]):
            raise _Decline("its extra outputs are used (only the first is supported)")

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self.b.function(fn, args, kwargs)


# ---------------------------------------------------------------------------------------------
# Converters


def _spatial_pads(n: _Node, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """ONNX ``pads`` (begins then ends) of a conv or pool, with ``auto_pad`` resolved on static shapes."""
    spatial = len(kernel)
    auto_pad = n.attr("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        return [int(p) for p in n.attr("pads", [0] * 2 * spatial)]
    if auto_pad == "VALID":
        return [0] * 2 * spatial
    sizes = n.shape(0)[2:]
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _torch_pad(pads: Sequence[int], rank: int) -> list[int]:
    """ONNX pads over all ``rank`` dims (begins then ends) as F.pad's list (last dim first),
    leaving out the leading dims that are not padded."""
    half = len(pads) // 2
    pairs = [(pads[d], pads[d + half]) for d in range(half)]
    while pairs and pairs[0] == (0, 0):
        pairs.pop(0)
    return [p for pair in reversed(pairs) for p in pair]


def _pad_input(n: _Node, x: fx.Node, pads: list[int], value: float) -> tuple[fx.Node, list[int]]:
    """Symmetric pads stay in the op; asymmetric ones become an F.pad before it."""
    spatial = len(pads) // 2
    if pads[:spatial] == pads[spatial:]:
        return x, pads[:spatial]
    full = [0, 0] + pads[:spatial] + [0, 0] + pads[spatial:]
    return n.call(F.pad, x, _torch_pad(full, spatial + 2), "constant", value), [0] * spatial


_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _conv(n: _Node):
    weight = n.const(1, "the weight")
    bias = n.const(2, "the bias", required=False)
    spatial = weight.dim() - 2
    if spatial not in _CONV_CLASSES:
        raise _Decline(f"a {spatial}-D conv")
    strides = n.attr("strides", [1] * spatial)
    dilations = n.attr("dilations", [1] * spatial)
    groups = n.attr("group", 1)
    pads = _spatial_pads(n, weight.shape[2:], strides, dilations)
    x, padding = _pad_input(n, n.runtime(0), pads, 0.0)
    conv = skip_init(_CONV_CLASSES[spatial], weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                                  stride=tuple(strides), padding=tuple(padding), dilation=tuple(dilations),
                                  groups=groups, bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return n.b.module(n.base, conv, (x,))


_NORM_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _batch_norm(n: _Node):
    if n.attr("training_mode", 0):
        raise _Decline("training_mode=1 (batch statistics)")
    n.only_first_output()
    scale, shift, mean, var = (n.const(i, what) for i, what in
                               ((1, "scale"), (2, "B"), (3, "input_mean"), (4, "input_var")))
    rank = len(n.shape(0))
    if rank not in _NORM_CLASSES:
        raise _Decline(f"a rank-{rank} input")
    norm = _NORM_CLASSES[rank](mean.numel(), eps=n.attr("epsilon", 1e-5), dtype=mean.dtype)
    with torch.no_grad():
        norm.weight.copy_(scale)
        norm.bias.copy_(shift)
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
    return n.b.module(n.base, norm, (n.runtime(0),))


def _linear(n: _Node, weight: torch.Tensor, bias: torch.Tensor | None) -> fx.Node:
    linear = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return n.b.module(n.base, linear, (n.runtime(0),))


def _gemm(n: _Node):
    if n.attr("transA", 0):
        raise _Decline("transA=1")
    b = n.const(1, "B (the weight)")
    c = n.const(2, "C (the bias)", required=False)
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    weight = (b if n.attr("transB", 0) else b.t()) * alpha
    bias = None
    if c is not None:
        if c.numel() not in (1, weight.shape[0]) or (c.dim() == 2 and c.shape[0] != 1):
            raise _Decline(f"C of shape {tuple(c.shape)} is not a bias of {weight.shape[0]} features")
        bias = (c.reshape(-1) * beta).expand(weight.shape[0]).to(weight.dtype).clone()
    return _linear(n, weight.contiguous(), bias)


def _matmul(n: _Node):
    if isinstance(n.values[1], _Const) and n.values[1].value.dim() == 2 and isinstance(n.values[0], fx.Node):
        return _linear(n, n.values[1].value.t().contiguous(), None)
    return n.call(torch.matmul, n.runtime(0), n.runtime(1))


def _operand(n: _Node, i: int, other: int) -> Any:
    """A binary op's operand: a Python scalar for a one-element constant that broadcasting does
    not widen, else a graph value."""
    value = n.values[i]
    if isinstance(value, _Const) and value.value.numel() == 1 and value.value.dtype.is_floating_point:
        if value.value.dim() <= len(n.shape(other)):
            return float(value.value.reshape(()))
    return n.input(i)


def _binary(fn: Callable) -> Callable:
    def convert(n: _Node):
        a, b = _operand(n, 0, 1), _operand(n, 1, 0)
        if fn is operator.truediv and not _is_float(n, 0):
            return n.call(torch.div, a, b, rounding_mode="trunc")
        return n.call(fn, a, b)

    return convert


def _is_float(n: _Node, i: int) -> bool:
    value = n.values[i]
    if isinstance(value, _Const):
        return value.value.dtype.is_floating_point
    return n.b.examples[value].is_floating_point()


def _clip(n: _Node):
    if n.b.opset < 11:
        low, high = n.attr("min"), n.attr("max")
    else:
        low_t, high_t = n.const(1, "min", required=False), n.const(2, "max", required=False)
        low = None if low_t is None else float(low_t.reshape(()))
        high = None if high_t is None else float(high_t.reshape(()))
    x = n.runtime(0)
    if low == 0 and high == 6:
        return n.call(F.relu6, x)
    if low == 0 and (high is None or high == math.inf):
        return n.call(F.relu, x)
    if low is not None and high is not None:
        return n.call(F.hardtanh, x, low, high)
    return n.call(torch.clamp, x, min=low, max=high)


def _hard_sigmoid(n: _Node):
    alpha, beta = n.attr("alpha", 0.2), n.attr("beta", 0.5)
    x = n.runtime(0)
    if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5:
        return n.call(F.hardsigmoid, x)
    return n.call(F.hardtanh, n.call(operator.add, n.call(operator.mul, x, alpha), beta), 0.0, 1.0)


def _pool_settings(n: _Node, rank: int) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(n.attr("kernel_shape"))
    spatial = len(kernel)
    strides = list(n.attr("strides", [1] * spatial))
    dilations = list(n.attr("dilations", [1] * spatial))
    return kernel, strides, dilations, _spatial_pads(n, kernel, strides, dilations)


_MAX_POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _max_pool(n: _Node):
    n.only_first_output()
    kernel, strides, dilations, pads = _pool_settings(n, len(n.shape(0)))
    if len(kernel) not in _MAX_POOLS:
        raise _Decline(f"a {len(kernel)}-D pool")
    x, padding = _pad_input(n, n.runtime(0), pads, -math.inf)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        x, padding = n.call(F.pad, x, _torch_pad([0, 0, *padding, 0, 0, *padding], len(kernel) + 2), "constant",
                            -math.inf), [0] * len(kernel)
    return n.call(_MAX_POOLS[len(kernel)], x, tuple(kernel), tuple(strides), tuple(padding), tuple(dilations),
                  bool(n.attr("ceil_mode", 0)))


def _avg_pool(n: _Node):
    kernel, strides, dilations, pads = _pool_settings(n, len(n.shape(0)))
    if len(kernel) not in _AVG_POOLS:
        raise _Decline(f"a {len(kernel)}-D pool")
    if any(d != 1 for d in dilations):
        raise _Decline("dilated average pooling")
    include_pad = bool(n.attr("count_include_pad", 0))
    spatial = len(kernel)
    x, padding = n.runtime(0), pads[:spatial]
    if pads[:spatial] != pads[spatial:] or any(2 * p > k for p, k in zip(padding, kernel)):
        if not include_pad and any(pads):
            raise _Decline("asymmetric or large pads with count_include_pad=0")
        x, padding = _pad_input(n, x, pads, 0.0) if pads[:spatial] != pads[spatial:] else (x, padding)
        if any(2 * p > k for p, k in zip(padding, kernel)):
            x = n.call(F.pad, x, _torch_pad([0, 0, *padding, 0, 0, *padding], spatial + 2), "constant", 0.0)
            padding = [0] * spatial
    args = (x, tuple(kernel), tuple(strides), tuple(padding), bool(n.attr("ceil_mode", 0)), include_pad)
    return n.call(_AVG_POOLS[spatial], *args)


def _global_pool(average: bool) -> Callable:
    def convert(n: _Node):
        rank = len(n.shape(0))
        x = n.runtime(0)
        if rank == 4:
            return n.call(F.adaptive_avg_pool2d if average else F.adaptive_max_pool2d, x, 1)
        if rank == 3 and average:
            return n.call(F.adaptive_avg_pool1d, x, 1)
        dims = tuple(range(2, rank))
        if average:
            return n.call(torch.mean, x, dims, keepdim=True)
        return n.call(torch.amax, x, dims, keepdim=True)

    return convert


def _reshape(n: _Node):
    shape = [int(s) for s in n.const(1, "the target shape").tolist()] if n.b.opset >= 5 else list(n.attr("shape"))
    source = n.shape(0)
    if not n.attr("allowzero", 0):
        shape = [source[i] if s == 0 else s for i, s in enumerate(shape)]
    x = n.runtime(0)
    if len(shape) == 2 and len(source) >= 2 and shape[0] == source[0] and (shape[1] == -1 or shape[1] == math.prod(source[1:])):
        return n.call(torch.flatten, x, 1)
    return n.call(torch.reshape, x, tuple(shape))


def _flatten(n: _Node):
    axis = n.attr("axis", 1)
    rank = len(n.shape(0))
    axis = axis + rank if axis < 0 else axis
    x = n.runtime(0)
    if axis == 1:
        return n.call(torch.flatten, x, 1)
    return n.call(torch.reshape, x, (math.prod(n.shape(0)[:axis]), -1))


def _transpose(n: _Node):
    rank = len(n.shape(0))
    perm = n.attr("perm", list(reversed(range(rank))))
    return n.call(torch.permute, n.runtime(0), tuple(perm))


def _squeeze(n: _Node):
    shape = n.shape(0)
    axes = n.ints(1, "axes", "axes")
    axes = [a % len(shape) for a in axes] if axes is not None else [d for d, size in enumerate(shape) if size == 1]
    return n.call(torch.reshape, n.runtime(0), tuple(size for d, size in enumerate(shape) if d not in axes))


def _unsqueeze(n: _Node):
    shape = list(n.shape(0))
    axes = n.ints(1, "axes", "axes")
    rank = len(shape) + len(axes)
    for axis in sorted(a % rank for a in axes):
        shape.insert(axis, 1)
    return n.call(torch.reshape, n.runtime(0), tuple(shape))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad(n: _Node):
    mode = n.attr("mode", "constant")
    if mode not in _PAD_MODES:
        raise _Decline(f"mode {mode!r}")
    rank = len(n.shape(0))
    if n.b.opset < 11:
        pads, value = list(n.attr("pads")), float(n.attr("value", 0.0))
    else:
        pads = [int(p) for p in n.const(1, "pads").tolist()]
        value_t = n.const(2, "constant_value", required=False)
        value = 0.0 if value_t is None or value_t.numel() == 0 else float(value_t.reshape(()))
        axes = n.ints(3, "", "axes") if len(n.values) > 3 and n.values[3] is not None else None
        if axes is not None:
            full = [0] * (2 * rank)
            for j, axis in enumerate(axes):
                axis = axis + rank if axis < 0 else axis
                full[axis], full[axis + rank] = pads[j], pads[j + len(axes)]
            pads = full
    torch_pads = _torch_pad(pads, rank)
    x = n.runtime(0)
    if not torch_pads:
        return x
    if mode == "constant":
        return n.call(F.pad, x, torch_pads, "constant", value)
    return n.call(F.pad, x, torch_pads, _PAD_MODES[mode])


def _slice(n: _Node):
    rank = len(n.shape(0))
    if n.b.opset < 10:
        starts, ends = list(n.attr("starts")), list(n.attr("ends"))
        axes = list(n.attr("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = n.ints(1, "", "starts"), n.ints(2, "", "ends")
        axes = n.ints(3, "", "axes") if len(n.values) > 3 and n.values[3] is not None else list(range(len(starts)))
        steps = n.ints(4, "", "steps") if len(n.values) > 4 and n.values[4] is not None else [1] * len(starts)
    index = [slice(None)] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step <= 0:
            raise _Decline(f"step {step} (torch slices need a positive step)")
        axis = axis + rank if axis < 0 else axis
        end = None if end >= _INT64_MAX // 2 else end
        start = None if start == 0 else max(start, -_INT64_MAX // 2)
        index[axis] = slice(start, end, None if step == 1 else step)
    while index and index[-1] == slice(None):
        index.pop()
    return n.call(operator.getitem, n.runtime(0), tuple(index))


def _split(n: _Node):
    shape = n.shape(0)
    axis = n.attr("axis", 0)
    axis = axis + len(shape) if axis < 0 else axis
    sizes = n.ints(1, "split", "split") if n.b.opset >= 13 else n.attr("split")
    outputs = len(n.node.output)
    if sizes is None:
        size = math.ceil(shape[axis] / outputs)
        sizes = [min(size, shape[axis] - i * size) for i in range(outputs)]
    parts = n.call(torch.split, n.runtime(0), [int(s) for s in sizes], axis)
    return [n.call(operator.getitem, parts, i) for i in range(outputs)]


def _concat(n: _Node):
    return n.call(torch.cat, [n.input(i) for i in range(len(n.values))], n.attr("axis"))


def _reduce_mean(n: _Node):
    axes = n.ints(1, "axes", "axes") if n.b.opset >= 18 else n.attr("axes")
    if axes is None:
        axes = list(range(len(n.shape(0))))
    return n.call(torch.mean, n.runtime(0), tuple(axes), keepdim=bool(n.attr("keepdims", 1)))


def _softmax(n: _Node):
    rank = len(n.shape(0))
    axis = n.attr("axis", -1 if n.b.opset >= 13 else 1)
    axis = axis + rank if axis < 0 else axis
    if n.b.opset < 13 and axis != rank - 1:
        raise _Decline(f"opset {n.b.opset} Softmax over axis {axis} flattens the trailing dims")
    return n.call(F.softmax, n.runtime(0), axis)


def _passthrough(n: _Node):
    n.only_first_output()
    return n.values[0]


def _unary(fn: Callable, **attrs: tuple[str, Any]) -> Callable:
    def convert(n: _Node):
        return n.call(fn, n.runtime(0), *(n.attr(name, default) for name, default in attrs.values()))

    return convert


_CONVERTERS: dict[str, Callable[[_Node], Any]] = {
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _binary(operator.add),
    "Sub": _binary(operator.sub),
    "Mul": _binary(operator.mul),
    "Div": _binary(operator.truediv),
    "Relu": _unary(F.relu),
    "Clip": _clip,
    "Sigmoid": _unary(torch.sigmoid),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _unary(F.hardswish),
    "Tanh": _unary(torch.tanh),
    "LeakyRelu": _unary(F.leaky_relu, alpha=("alpha", 0.01)),
    "Elu": _unary(F.elu, alpha=("alpha", 1.0)),
    "Softmax": _softmax,
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": _global_pool(average=True),
    "GlobalMaxPool": _global_pool(average=False),
    "ReduceMean": _reduce_mean,
    "Concat": _concat,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Slice": _slice,
    "Split": _split,
    "Pad": _pad,
    "Identity": _passthrough,
    "Dropout": _passthrough,
}

SUPPORTED_OPS = frozenset(_CONVERTERS) | {"Shape", "Constant"}
