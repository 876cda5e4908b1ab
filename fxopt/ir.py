"""The fx IR fxopt works on: tracing, canonical op keys, module access, shapes.

A traced model is a module-level ``fx.GraphModule``: convs, linears and norms stay
``call_module`` nodes (their weights live in modules), everything stateless is a
``call_function``. ``op_key`` names an op the same way whichever spelling the model used
(``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu_()`` all read ``"relu"``); the
``canonicalize`` pass then rewrites every spelling to the canonical one, using
``classify`` from this module as the single source of truth.
"""

from __future__ import annotations

import copy
import inspect
import linecache
import operator
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from fxopt.errors import InputError, TraceError

# ---------------------------------------------------------------------------------------------
# Tracing


class _FxoptTracer(fx.Tracer):
    """Module-level tracer that remembers which submodule it is inside, for error messages.

    ``leaf_modules`` adds leaves: classes, or strings naming a module path or a class name.
    """

    def __init__(self, leaf_modules: Sequence[type | str] = ()):
        super().__init__()
        self.extra_leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.extra_leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.scopes: list[tuple[str, type]] = []  # (qualname, class) of the modules being traced

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        names = self.extra_leaf_names
        if qualname in names or type(m).__name__ in names or type(m).__qualname__ in names:
            return True
        if isinstance(m, self.extra_leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.scopes.append((self.path_of_module(m), type(m)))
        result = super().call_module(m, forward, args, kwargs)
        self.scopes.pop()  # not reached on failure: the innermost scope names the culprit
        return result


_THIS_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_TORCH_PACKAGE = os.path.dirname(os.path.abspath(torch.__file__))


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """Innermost traceback frame in the model's own code (not torch, not fxopt)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if path.startswith((_THIS_PACKAGE, _TORCH_PACKAGE)) or frame.filename.startswith("<"):
            continue
        return frame
    return None


def _describe_trace_failure(exc: Exception, tracer: _FxoptTracer) -> str:
    lines = [f"torch.fx cannot trace this model: {type(exc).__name__}: {exc}"]
    frame = _user_frame(exc)
    if frame is not None:
        code = frame.line or linecache.getline(frame.filename, frame.lineno).strip()
        lines.append(f"  at {frame.filename}:{frame.lineno} in {frame.name}: {code}")
    if tracer.scopes:
        qualname, cls = tracer.scopes[-1]
        where = qualname or "<root>"
        lines.append(f"  inside submodule '{where}' ({cls.__module__}.{cls.__qualname__})")
        if qualname:
            lines.append(
                f"  what to do: if '{where}' only does tensor math that needs no optimization, keep it "
                f"opaque with leaf_modules=[{cls.__qualname__}] (CLI: --leaf {cls.__qualname__}); "
                "otherwise replace data-dependent Python control flow on tensors "
                "(if/for over tensor values or shapes) with tensor operations"
            )
    if len(lines) < 4:
        lines.append(
            "  what to do: replace data-dependent Python control flow on tensors (if/for over "
            "tensor values or shapes) with tensor operations, or mark the failing submodule as a leaf "
            "with leaf_modules=[...]"
        )
    return "\n".join(lines)


def as_input_tuple(example_inputs: Sequence[Any] | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of tensors (a single tensor is one input), or an InputError."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise InputError(
                f"example input {i} is a {type(x).__name__}, not a torch.Tensor: pass tensors only "
                "(non-tensor arguments should be fixed in the model or bound with functools.partial)"
            )
    return inputs


def check_example_inputs(model: nn.Module, example_inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of tensors that the model's forward accepts, or an InputError."""
    inputs = as_input_tuple(example_inputs)
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    if params and (len(inputs) < len(required) or (not varargs and len(inputs) > len(positional))):
        names = ", ".join(p.name for p in positional)
        raise InputError(
            f"{type(model).__name__}.forward({names}) takes {len(required)}"
            f"{'' if len(required) == len(positional) else f' to {len(positional)}'} input(s), "
            f"but {len(inputs)} example input(s) were given"
        )
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:
        described = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in inputs)
        raise InputError(
            f"the model fails on the example inputs [{described}]: {type(exc).__name__}: {exc}\n"
            "  what to do: give inputs of the shape and dtype the model expects "
            "(CLI: --input-shape 1x3x224x224 --input-dtype float32)"
        ) from exc
    return inputs


def training_submodules(model: nn.Module) -> list[str]:
    """Qualified names of submodules whose behaviour depends on train/eval mode and are in training."""
    mode_dependent = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)
    return [name or "<root>" for name, m in model.named_modules() if m.training and isinstance(m, mode_dependent)]


def check_eval_mode(model: nn.Module) -> None:
    training = training_submodules(model)
    if training:
        shown = ", ".join(f"'{n}'" for n in training[:3]) + (" ..." if len(training) > 3 else "")
        raise InputError(
            f"the model is in training mode ({len(training)} BatchNorm/Dropout submodules train, e.g. {shown}); "
            "fxopt optimizes inference graphs: call model.eval() first"
        )


CAPTURES = ("auto", "fx", "export")


def trace(
    model: nn.Module | "torch.export.ExportedProgram",
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    leaf_modules: Sequence[type | str] = (),
    capture: str = "auto",
) -> fx.GraphModule:
    """Capture ``model`` as a module-level fx.GraphModule with shapes in ``node.meta``.

    ``capture`` picks the path: "fx" (torch.fx symbolic tracing), "export" (torch.export, then
    raised into the same module-level form by ``fxopt.capture``), or "auto": fx first, export
    when fx cannot trace the model. ``model`` may also be an ExportedProgram (a saved .pt2), which
    is raised directly. ``gm.meta["fxopt"]["capture"]`` says which path was used.

    The model is copied first: passes replace modules and tensors freely, and the user's model
    must stay untouched. Raises InputError for inputs the model rejects and TraceError, naming
    the source line (and for fx the submodule), when no path can capture it.
    """
    from torch.export import ExportedProgram

    if capture not in CAPTURES:
        raise InputError(f"capture={capture!r} is not one of {', '.join(repr(c) for c in CAPTURES)}")
    if isinstance(model, ExportedProgram):
        if capture == "fx":
            raise InputError("an ExportedProgram is already captured by torch.export: use capture='export' or 'auto'")
        if leaf_modules:
            raise InputError("leaf_modules only apply to torch.fx tracing, not to an ExportedProgram: drop them")
        return _raise_exported(model, check_example_inputs(model.module(), example_inputs), "ExportedProgram")
    inputs = check_example_inputs(model, example_inputs)
    if capture == "export":
        if leaf_modules:
            raise InputError("leaf_modules only apply to torch.fx tracing: drop them, or use capture='fx' or 'auto'")
        return _trace_export(model, inputs)
    try:
        return _trace_fx(model, inputs, leaf_modules)
    except TraceError as fx_error:
        if capture == "fx":
            raise
        try:
            gm = _trace_export(model, inputs)
        except TraceError as export_error:
            raise TraceError(
                f"neither torch.fx nor torch.export can capture {type(model).__name__}:\n{fx_error}\n{export_error}"
            ) from export_error
        gm.meta["fxopt"]["capture_note"] = _fallback_note(fx_error)
        return gm


def _fallback_note(fx_error: TraceError) -> str:
    """One line for the report: why auto capture fell back to torch.export."""
    cause = fx_error.__cause__
    text = str(cause if cause is not None else fx_error).strip()
    first = text.splitlines()[0] if text else type(cause).__name__
    sentence = first.split(". ")[0].rstrip(".").removeprefix("torch.fx cannot trace this model: ")
    kind = f"{type(cause).__name__}: " if cause is not None else ""
    at = next((line.strip() for line in str(fx_error).splitlines() if line.startswith("  at ")), "")
    where = ""
    if at:
        location = at.removeprefix("at ").split(" in ")[0]
        path, _, line = location.rpartition(":")
        where = f" at {os.path.basename(path)}:{line}"
    return f"torch.fx failed: {kind}{sentence}{where}"


def _trace_fx(model: nn.Module, inputs: tuple[torch.Tensor, ...], leaf_modules: Sequence[type | str]) -> fx.GraphModule:
    model = copy.deepcopy(model)
    tracer = _FxoptTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise TraceError(_describe_trace_failure(exc, tracer)) from exc
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.train(model.training)
    gm.meta["fxopt"] = {"capture": "fx"}
    try:
        propagate_shapes(gm, inputs)
    except Exception as exc:
        raise TraceError(
            f"the traced graph of {type(model).__name__} does not run on the example inputs "
            f"({type(exc).__name__}: {exc}); the model's forward probably branches on its inputs in a "
            "way torch.fx recorded for one case only: mark that submodule as a leaf"
        ) from exc
    return gm


def _trace_export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    from fxopt import capture

    # torch.export does not modify the model, and raising copies every weight it keeps
    return _raise_exported(capture.export(model, inputs), inputs, type(model).__name__)


def _raise_exported(ep: Any, inputs: tuple[torch.Tensor, ...], name: str) -> fx.GraphModule:
    from fxopt import capture

    gm = capture.raise_program(ep, name)
    try:
        propagate_shapes(gm, inputs)
    except Exception as exc:
        raise TraceError(
            f"the graph raised from torch.export's program of {name} does not run on the example inputs "
            f"({type(exc).__name__}: {exc}); this is an fxopt bug: retry with capture='fx' where possible, "
            "and report it"
        ) from exc
    return gm


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """Run the graph once, storing each node's TensorMetadata in ``node.meta['tensor_meta']``."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


def tensor_meta(node: fx.Node) -> TensorMetadata | None:
    meta = node.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) else None


def shape_of(node: fx.Node) -> torch.Size | None:
    meta = tensor_meta(node)
    return meta.shape if meta is not None else None


# ---------------------------------------------------------------------------------------------
# Modules


def set_module(gm: nn.Module, qualname: str, module: nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, module)


def add_module(gm: nn.Module, base_name: str, module: nn.Module) -> str:
    """Register ``module`` under a fresh qualified name near ``base_name``; returns the name."""
    candidate, i = base_name, 0
    while _has_attr_path(gm, candidate):
        i += 1
        candidate = f"{base_name}_{i}"
    set_module(gm, candidate, module)
    return candidate


def add_buffer(gm: nn.Module, base_name: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` as a buffer of ``gm`` under a fresh name near ``base_name``; returns the name."""
    candidate, i = base_name, 0
    while _has_attr_path(gm, candidate):
        i += 1
        candidate = f"{base_name}_{i}"
    gm.register_buffer(candidate, tensor)
    return candidate


def run_node(gm: fx.GraphModule, node: fx.Node, value_of: Callable[[fx.Node], Any]) -> Any:
    """Run one call node eagerly, its node arguments replaced by ``value_of(arg)``."""
    args, kwargs = fx.node.map_arg(node.args, value_of), fx.node.map_arg(node.kwargs, value_of)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    return gm.get_submodule(node.target)(*args, **kwargs)


def _has_attr_path(gm: nn.Module, qualname: str) -> bool:
    obj: Any = gm
    for part in qualname.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def get_attr_value(gm: nn.Module, qualname: str) -> Any:
    obj: Any = gm
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def delete_unused_attributes(gm: fx.GraphModule, qualnames: Iterable[str]) -> int:
    """Delete the parameters and buffers among ``qualnames`` that no get_attr node reads and
    no called module owns (its forward may read them); returns how many went."""
    read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    deleted = 0
    for qualname in set(qualnames) - read:
        owner, _, attr = qualname.rpartition(".")
        if any(owner == c or owner.startswith(c + ".") for c in called) or not _has_attr_path(gm, qualname):
            continue
        delattr(gm.get_submodule(owner) if owner else gm, attr)
        deleted += 1
    return deleted


def module_users(gm: fx.GraphModule, qualname: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == qualname]


def constant_value(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node (a parameter or buffer), else None."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = get_attr_value(gm, arg.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


# ---------------------------------------------------------------------------------------------
# Canonical op keys
#
# One table says, for every spelling fxopt recognizes, which op it is (the key), how to write it
# canonically, and whether it mutates its first input. Parametric ops (conv, linear, batch norm)
# are canonical as call_module; everything stateless is canonical as a call_function.


@dataclass(frozen=True)
class OpForm:
    """What ``classify`` knows about one node."""

    key: str
    canonical: Callable | None = None  # call_function target of the canonical spelling
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    inplace: bool = False  # mutates args[0]
    is_canonical: bool = False


CONV_MODULES = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}
CONV_FUNCTIONS = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
                  torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d"}
NORM_MODULES = {nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm"}
PARAMETRIC_KEYS = frozenset({*CONV_MODULES.values(), "linear", "batch_norm"})

# Stateless modules: class -> (key, canonical function, kwargs read from the module).
_STATELESS_MODULES: dict[type, tuple[str, Callable, Callable[[nn.Module], dict]]] = {
    nn.ReLU: ("relu", F.relu, lambda m: {}),
    nn.ReLU6: ("relu6", F.relu6, lambda m: {}),
    nn.Hardswish: ("hardswish", F.hardswish, lambda m: {}),
    nn.Hardsigmoid: ("hardsigmoid", F.hardsigmoid, lambda m: {}),
    nn.Sigmoid: ("sigmoid", torch.sigmoid, lambda m: {}),
    nn.SiLU: ("silu", F.silu, lambda m: {}),
    nn.Tanh: ("tanh", torch.tanh, lambda m: {}),
    nn.Mish: ("mish", F.mish, lambda m: {}),
    nn.GELU: ("gelu", F.gelu, lambda m: {"approximate": m.approximate}),
    nn.LeakyReLU: ("leaky_relu", F.leaky_relu, lambda m: {"negative_slope": m.negative_slope}),
    nn.ELU: ("elu", F.elu, lambda m: {"alpha": m.alpha}),
    nn.Hardtanh: ("hardtanh", F.hardtanh, lambda m: {"min_val": m.min_val, "max_val": m.max_val}),
    nn.Softmax: ("softmax", F.softmax, lambda m: {"dim": m.dim}),
    nn.MaxPool1d: ("max_pool1d", F.max_pool1d, lambda m: _pool_kwargs(m, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"))),
    nn.MaxPool2d: ("max_pool2d", F.max_pool2d, lambda m: _pool_kwargs(m, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"))),
    nn.AvgPool1d: ("avg_pool1d", F.avg_pool1d, lambda m: _pool_kwargs(m, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"))),
    nn.AvgPool2d: ("avg_pool2d", F.avg_pool2d, lambda m: _pool_kwargs(m, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"))),
    nn.AdaptiveAvgPool1d: ("adaptive_avg_pool1d", F.adaptive_avg_pool1d, lambda m: {"output_size": m.output_size}),
    nn.AdaptiveAvgPool2d: ("adaptive_avg_pool2d", F.adaptive_avg_pool2d, lambda m: {"output_size": m.output_size}),
    nn.AdaptiveMaxPool2d: ("adaptive_max_pool2d", F.adaptive_max_pool2d, lambda m: {"output_size": m.output_size, "return_indices": m.return_indices}),
    nn.Flatten: ("flatten", torch.flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
}
_NOOP_MODULES = {nn.Identity: "identity", nn.Dropout: "dropout", nn.Dropout1d: "dropout", nn.Dropout2d: "dropout",
                 nn.Dropout3d: "dropout", nn.AlphaDropout: "dropout", nn.FeatureAlphaDropout: "dropout"}


_MODULE_FOR_KEY = {key: cls for cls, (key, _, _) in _STATELESS_MODULES.items()}
# Activations that act on each element alone: they commute with any channel gather or slice.
ELEMENTWISE_ACTIVATIONS = frozenset({"relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "sigmoid", "silu",
                                     "tanh", "gelu", "leaky_relu", "elu", "mish"})


def stateless_module(key: str) -> nn.Module:
    """A default-constructed module computing the stateless op ``key`` (``"relu"`` -> nn.ReLU()):
    stand-ins for measuring an op's cost."""
    return _MODULE_FOR_KEY[key]()


def _pool_kwargs(m: nn.Module, names: Iterable[str]) -> dict:
    return {name: getattr(m, name) for name in names}


# Function and method spellings of stateless ops: target -> (key, canonical, inplace).
# A function whose Python signature has an ``inplace`` parameter is in-place when it is set.
_FUNCTIONS: dict[Any, tuple[str, Callable, bool]] = {}
_METHODS: dict[str, tuple[str, Callable, bool]] = {}


def _spell(key: str, canonical: Callable, functions=(), inplace_functions=(), methods=(), inplace_methods=()):
    for fn in (canonical, *functions):
        _FUNCTIONS[fn] = (key, canonical, False)
    for fn in inplace_functions:
        _FUNCTIONS[fn] = (key, canonical, True)
    for name in methods:
        _METHODS[name] = (key, canonical, False)
    for name in inplace_methods:
        _METHODS[name] = (key, canonical, True)


_spell("add", operator.add, [torch.add], [operator.iadd], ["add", "__add__"], ["add_", "__iadd__"])
_spell("sub", operator.sub, [torch.sub, torch.subtract], [operator.isub], ["sub", "__sub__"], ["sub_", "__isub__"])
_spell("mul", operator.mul, [torch.mul, torch.multiply], [operator.imul], ["mul", "__mul__"], ["mul_", "__imul__"])
_spell("div", operator.truediv, [torch.div, torch.true_divide], [operator.itruediv], ["div", "true_divide", "__truediv__"], ["div_", "__itruediv__"])
_spell("relu", F.relu, [torch.relu], [torch.relu_, F.relu_], ["relu"], ["relu_"])
_spell("relu6", F.relu6, [])
_spell("hardtanh", F.hardtanh, [], [F.hardtanh_])
_spell("hardswish", F.hardswish, [])
_spell("hardsigmoid", F.hardsigmoid, [])
_spell("sigmoid", torch.sigmoid, [F.sigmoid], [torch.sigmoid_], ["sigmoid"], ["sigmoid_"])
_spell("silu", F.silu, [])
_spell("tanh", torch.tanh, [F.tanh], [torch.tanh_], ["tanh"], ["tanh_"])
_spell("mish", F.mish, [])
_spell("gelu", F.gelu, [])
_spell("leaky_relu", F.leaky_relu, [], [F.leaky_relu_])
_spell("elu", F.elu, [], [F.elu_])
_spell("softmax", F.softmax, [torch.softmax], [], ["softmax"])
_spell("max_pool1d", F.max_pool1d, [torch.max_pool1d])
_spell("max_pool2d", F.max_pool2d, [torch.max_pool2d])
_spell("avg_pool1d", F.avg_pool1d, [torch.avg_pool1d])
_spell("avg_pool2d", F.avg_pool2d, [])
_spell("adaptive_avg_pool1d", F.adaptive_avg_pool1d, [torch.adaptive_avg_pool1d])
_spell("adaptive_avg_pool2d", F.adaptive_avg_pool2d, [])
_spell("adaptive_max_pool2d", F.adaptive_max_pool2d, [])
_spell("flatten", torch.flatten, [], [], ["flatten"])
_spell("cat", torch.cat, [torch.concat, torch.concatenate])
_spell("mean", torch.mean, [], [], ["mean"])

_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_BINARY_KEYS = {"add", "sub", "mul", "div"}


def _bind_python(fn: Callable, args: tuple, kwargs: dict) -> inspect.BoundArguments | None:
    try:
        return inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None


def _function_form(key: str, canonical: Callable, target: Any, args: tuple, kwargs: dict, inplace: bool) -> OpForm | None:
    if key in _BINARY_KEYS:
        if len(args) != 2 or set(kwargs) - {"alpha", "rounding_mode"}:
            return None
        if kwargs.get("alpha", 1) != 1 or kwargs.get("rounding_mode") is not None:
            return None  # x + a*y or floor division: a different op, left alone
        form_args, form_kwargs = tuple(args), {}
    else:
        form_args, form_kwargs = tuple(args), dict(kwargs)
        bound = None if isinstance(target, str) else _bind_python(target, args, kwargs)
        if bound is not None and "inplace" in bound.signature.parameters:
            # F.relu(x, True) and F.relu(x, inplace=True): the flag moves into ``inplace``
            arguments = dict(bound.arguments)
            inplace = inplace or bool(arguments.pop("inplace", False))
            first = next(iter(bound.signature.parameters))
            form_args = (arguments.pop(first),)
            form_kwargs = arguments
    is_canonical = (target is canonical and not inplace
                    and _same(args, form_args) and _same(tuple(kwargs.items()), tuple(form_kwargs.items())))
    return OpForm(key, canonical, form_args, form_kwargs, inplace, is_canonical)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y or (not isinstance(x, fx.Node) and x == y) for x, y in zip(a, b))


def classify(node: fx.Node, gm: fx.GraphModule | None = None) -> OpForm | None:
    """What op ``node`` is, however it is spelled; None for ops fxopt does not know."""
    if node.op == "call_module":
        if gm is None:
            return None
        module = gm.get_submodule(node.target)
        cls = type(module)  # exact type: a subclass may override forward
        if cls in CONV_MODULES:
            return OpForm(CONV_MODULES[cls], is_canonical=True)
        if cls is nn.Linear:
            return OpForm("linear", is_canonical=True)
        if cls in NORM_MODULES:
            return OpForm(NORM_MODULES[cls], is_canonical=True)
        if cls in _NOOP_MODULES:
            return OpForm(_NOOP_MODULES[cls], args=tuple(node.args[:1]))
        if cls in _STATELESS_MODULES:
            key, fn, read = _STATELESS_MODULES[cls]
            return OpForm(key, fn, tuple(node.args), {**node.kwargs, **read(module)},
                          inplace=bool(getattr(module, "inplace", False)))
        return None
    if node.op == "call_function":
        target = node.target
        if target in CONV_FUNCTIONS:
            return OpForm(CONV_FUNCTIONS[target], args=tuple(node.args), kwargs=dict(node.kwargs))
        if target in (F.linear, torch._C._nn.linear):
            return OpForm("linear", args=tuple(node.args), kwargs=dict(node.kwargs))
        if target is F.batch_norm:
            return OpForm("batch_norm", args=tuple(node.args), kwargs=dict(node.kwargs))
        if target in _DROPOUT_FUNCTIONS:
            bound = _bind_python(target, tuple(node.args), dict(node.kwargs))
            if bound is not None and bound.arguments.get("training", True) is False:
                return OpForm("dropout", args=tuple(node.args[:1]))
            return None
        if target in _FUNCTIONS:
            key, canonical, inplace = _FUNCTIONS[target]
            return _function_form(key, canonical, target, tuple(node.args), dict(node.kwargs), inplace)
        return None
    if node.op == "call_method" and node.target in _METHODS:
        key, canonical, inplace = _METHODS[node.target]
        return _function_form(key, canonical, node.target, tuple(node.args), dict(node.kwargs), inplace)
    return None


_NO_VALUE = object()


def static_value(node: fx.Node) -> Any:
    """The value of a non-tensor node that depends only on static shapes (``x.shape[1] // 4``,
    ``x.size(0)``), computed from node.meta; ``_NO_VALUE`` when it depends on data."""
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        shape = shape_of(node.args[0])
        return shape if shape is not None else _NO_VALUE
    if node.op == "call_method" and node.target in ("size", "dim") and isinstance(node.args[0], fx.Node):
        shape = shape_of(node.args[0])
        if shape is None:
            return _NO_VALUE
        return len(shape) if node.target == "dim" else shape if len(node.args) == 1 else shape[node.args[1]]
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator"):
        args = []
        for arg in node.args:
            value = static_value(arg) if isinstance(arg, fx.Node) else arg
            if value is _NO_VALUE:
                return _NO_VALUE
            args.append(value)
        try:
            return node.target(*args)
        except Exception:  # noqa: BLE001 - not a static computation after all
            return _NO_VALUE
    return _NO_VALUE


def has_static_value(node: fx.Node) -> bool:
    return static_value(node) is not _NO_VALUE


def writes_in_place(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` writes into its first argument's storage (``x.add_(y)``, ``F.relu(x,
    inplace=True)``, any ``x.method_()``)."""
    form = classify(node, gm)
    if form is not None and form.inplace:
        return True
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        # an ATen op the export capture left as it is (aten.copy_, aten.index_put_): its schema
        # says whether it writes its first argument (``copy_(Tensor(a!) self, ...)``)
        arguments = node.target._schema.arguments
        return bool(arguments) and arguments[0].alias_info is not None and arguments[0].alias_info.is_write
    return node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__")


def eliminate_dead_code(gm: fx.GraphModule) -> bool:
    """Graph.eliminate_dead_code that keeps in-place ops: fx counts ``acc.add_(w)`` as pure when
    its result is unused, and would drop the write."""
    return gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or writes_in_place(n, gm))


def mutated_in_place(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether some user of ``node`` writes into its storage (canonicalize keeps such ops where
    functionalizing them would change results)."""
    return any(user.args and user.args[0] is node and writes_in_place(user, gm) for user in node.users)


def op_key(node: fx.Node, gm: fx.GraphModule | None = None) -> str | None:
    """The canonical name of the op at ``node`` (``"conv2d"``, ``"add"``, ``"relu"`` ...), or None."""
    form = classify(node, gm)
    return form.key if form is not None else None


# ---------------------------------------------------------------------------------------------
# Counting (report rows)


def count_params(gm: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in [*gm.parameters(), *gm.buffers()]:
        if id(tensor) not in seen and tensor.is_floating_point():
            seen.add(id(tensor))
            total += tensor.numel()
    return total


def count_macs(gm: fx.GraphModule) -> int | None:
    """Multiply-accumulates of the convs and linears, from the shapes in node.meta (None if unknown)."""
    total = 0
    for node in gm.graph.nodes:
        key = op_key(node, gm)
        if key not in PARAMETRIC_KEYS - {"batch_norm"}:
            continue
        out_shape = shape_of(node)
        if out_shape is None:
            return None
        weight = node_weight(gm, node)
        if weight is None:
            return None
        # conv weight (out, in/groups, *k) and linear weight (out, in): each output element costs
        # one MAC per weight element of its row
        total += out_shape.numel() * (weight[0].numel())
    return total


def node_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "weight", None)
    if len(node.args) > 1:
        return constant_value(gm, node.args[1])
    return constant_value(gm, node.kwargs.get("weight"))


# ---------------------------------------------------------------------------------------------
# Functional parametric ops as modules

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LINEAR_ARGS = ("input", "weight", "bias")
_CONV_CLASSES = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}
_NORM_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _named_args(names: Sequence[str], node: fx.Node) -> dict[str, Any]:
    named = dict(zip(names, node.args))
    named.update(node.kwargs)
    return named


def _constant(gm: fx.GraphModule, named: dict, name: str, required: bool) -> torch.Tensor | None | str:
    arg = named.get(name)
    if arg is None:
        return "missing weight" if required else None
    value = constant_value(gm, arg)
    return value if value is not None else f"{name} is computed in the graph, not a constant parameter or buffer"


def module_for_function(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, fx.Node] | str:
    """An equivalent module (conv, linear, batch norm) for a functional call with constant weights.

    Returns (module, input node), or the reason it cannot be one. The module holds copies.
    """
    key = op_key(node, gm)
    if node.op != "call_function" or key not in PARAMETRIC_KEYS:
        return "not a functional conv, linear or batch norm"
    if key == "batch_norm":
        bound = _bind_python(F.batch_norm, tuple(node.args), dict(node.kwargs))
        if bound is None:
            return "unrecognized F.batch_norm arguments"
        named = dict(bound.arguments)
        if named.get("training", False) is not False:
            return "batch norm computes batch statistics (training=True)"
        values = {n: _constant(gm, named, n, n.startswith("running")) for n in ("running_mean", "running_var", "weight", "bias")}
        reasons = [v for v in values.values() if isinstance(v, str)]
        if reasons:
            return reasons[0]
        shape = shape_of(named["input"]) if isinstance(named["input"], fx.Node) else None
        if shape is None or len(shape) not in _NORM_CLASSES:
            return "batch norm input rank unknown (run shape propagation) or not 2-5"
        mean = values["running_mean"]
        module = _NORM_CLASSES[len(shape)](mean.numel(), eps=named.get("eps", 1e-5), affine=values["weight"] is not None or values["bias"] is not None, dtype=mean.dtype)
        module.running_mean.copy_(mean)
        module.running_var.copy_(values["running_var"])
        if module.affine:
            module.weight.data.copy_(values["weight"] if values["weight"] is not None else torch.ones_like(mean))
            module.bias.data.copy_(values["bias"] if values["bias"] is not None else torch.zeros_like(mean))
        return module.eval(), named["input"]
    names = _CONV_ARGS if key in _CONV_CLASSES else _LINEAR_ARGS
    named = _named_args(names, node)
    weight = _constant(gm, named, "weight", True)
    bias = _constant(gm, named, "bias", False)
    for value in (weight, bias):
        if isinstance(value, str):
            return value
    settings = {n: named[n] for n in names[3:] if n in named}
    if any(isinstance(v, fx.Node) for v in settings.values()):
        return "stride/padding/dilation/groups are computed in the graph"
    if key == "linear":
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    else:
        groups = settings.get("groups", 1)
        module = _CONV_CLASSES[key](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                                    bias=bias is not None, dtype=weight.dtype, **settings)
    module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return module, named["input"]


# ---------------------------------------------------------------------------------------------
# Graph signature
#
# What the passes see of a graph, independent of how it was captured and of node names: one
# entry per node with an op key, in graph order, with the module type and hyper-parameters or the
# normalized options, the output shape, and where each tensor input comes from. Nodes without
# an op key (views, size arithmetic, getitem ...) are transparent: an input read through them
# names the keyed ops, graph inputs and constants behind them.

# Non-tensor parameters of each stateless op key, with defaults (after the tensor inputs).
_POOL_MAX = (("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False),
             ("return_indices", False))
_POOL_AVG = (("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
             ("count_include_pad", True), ("divisor_override", None))
_OPTION_NAMES: dict[str, tuple[tuple[str, Any], ...]] = {
    "gelu": (("approximate", "none"),),
    "leaky_relu": (("negative_slope", 0.01),),
    "elu": (("alpha", 1.0),),
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0)),
    "softmax": (("dim", None), ("_stacklevel", 3), ("dtype", None)),
    "max_pool1d": _POOL_MAX, "max_pool2d": _POOL_MAX,
    "avg_pool1d": _POOL_AVG[:5], "avg_pool2d": _POOL_AVG,
    "adaptive_avg_pool1d": (("output_size", None),), "adaptive_avg_pool2d": (("output_size", None),),
    "adaptive_max_pool2d": (("output_size", None), ("return_indices", False)),
    "flatten": (("start_dim", 0), ("end_dim", -1)),
    "cat": (("dim", 0),),
    "mean": (("dim", None), ("keepdim", False), ("dtype", None)),
}
_DROPPED_OPTIONS = {"inplace", "_stacklevel"}


def graph_signature(gm: fx.GraphModule) -> list[tuple]:
    """The graph as the passes see it: comparable across capture paths (needs shapes in meta)."""
    refs: dict[fx.Node, frozenset] = {}
    entries: list[tuple] = []
    n_inputs = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            refs[node] = frozenset({("input", n_inputs)})
            n_inputs += 1
            continue
        if node.op == "get_attr":
            value = get_attr_value(gm, node.target)
            refs[node] = frozenset({("const", tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__)})
            continue
        if node.op == "output":
            entries.append(("output", _signature_sources(node.args, refs)))
            continue
        form = classify(node, gm)
        if form is None:
            sources = _signature_sources((node.args, node.kwargs), refs)
            refs[node] = frozenset(ref for group in sources for ref in group)
            continue
        if node.op == "call_module" and form.key in PARAMETRIC_KEYS:
            attrs, args = _module_signature(gm.get_submodule(node.target)), tuple(node.args)
        else:
            attrs, args = _options_signature(form, node), form.args
        shape = shape_of(node)
        entries.append((form.key, attrs, tuple(shape) if shape is not None else None, _signature_sources(args, refs)))
        refs[node] = frozenset({("op", len(entries) - 1)})
    return entries


def _signature_sources(value: Any, refs: dict[fx.Node, frozenset]) -> tuple:
    """For each node in ``value`` (in order): the sorted sources it reads."""
    nodes: list[fx.Node] = []
    fx.node.map_arg(value, nodes.append)
    return tuple(tuple(sorted(refs.get(n, frozenset()), key=repr)) for n in nodes)


def _module_signature(module: nn.Module) -> tuple:
    if isinstance(module, nn.modules.conv._ConvNd):
        return (type(module).__name__, module.in_channels, module.out_channels, tuple(module.kernel_size),
                tuple(module.stride), module.padding if isinstance(module.padding, str) else tuple(module.padding),
                tuple(module.dilation), module.groups, module.bias is not None, module.padding_mode)
    if isinstance(module, nn.Linear):
        return ("Linear", module.in_features, module.out_features, module.bias is not None)
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return (type(module).__name__, module.num_features, module.eps, module.affine, module.track_running_stats)
    return (type(module).__name__,)


def _options_signature(form: OpForm, node: fx.Node) -> tuple:
    """The non-tensor options of a stateless op, bound to names with defaults and normalized."""
    if form.key in _BINARY_KEYS:
        # x + 1 and 1 + x: the tensor inputs are the sources, the scalars the options
        return tuple(sorted((repr(a) for a in form.args if not isinstance(a, fx.Node))))
    if form.key == "cat":
        tensors = form.args[0] if form.args else form.kwargs.get("tensors")
        positional = form.args[1:]
    else:
        tensors = form.args[0] if form.args else form.kwargs.get("input")
        positional = form.args[1:]
    names = _OPTION_NAMES.get(form.key, ())
    options = {name: default for name, default in names}
    options.update(zip((name for name, _ in names), positional))
    options.update({k: v for k, v in form.kwargs.items() if k not in ("input", "tensors")})
    for name in _DROPPED_OPTIONS:
        options.pop(name, None)
    first = tensors[0] if isinstance(tensors, (list, tuple)) and tensors else tensors
    shape = shape_of(first) if isinstance(first, fx.Node) else None
    rank = len(shape) if shape is not None else None
    return tuple(sorted((name, _normalize_option(form.key, name, value, options, rank)) for name, value in options.items()))


def _normalize_option(key: str, name: str, value: Any, options: dict, rank: int | None) -> Any:
    spatial = 1 if key.endswith("1d") else 2 if key.endswith("2d") else None
    if isinstance(value, list):
        value = tuple(value)
    if spatial is not None and name in ("kernel_size", "stride", "padding", "dilation", "output_size"):
        if name == "stride" and (value is None or value == ()):
            value = options.get("kernel_size")
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, tuple):
            value = (value,) * spatial
    if name in ("dim", "start_dim", "end_dim") and rank:
        if isinstance(value, tuple):
            value = tuple(sorted(d % rank for d in value))
        elif isinstance(value, int):
            value = value % rank
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value
