"""Capture with torch.export and raise the ATen graph into fxopt's module-level form.

torch.fx symbolic tracing fails on ordinary models (iterating a tensor's shape or a Proxy,
data-dependent control flow written with ``torch.cond``, library code). ``torch.export`` captures
most of them, but as an ATen-level graph whose parameters are lifted to placeholders. ``raise_program``
turns that graph back into the form ``fxopt.ir.trace`` gives for a traceable model, so that every
pass matches it the same way:

* ``aten.conv{1,2,3}d`` / ``aten.convolution`` (not transposed), ``aten.linear`` / ``aten.addmm`` /
  ``aten.mm`` with a transposed constant weight, ``aten.batch_norm`` /
  ``aten._native_batch_norm_legit_no_training`` / ``aten.native_batch_norm`` (eval, running
  statistics) with constant weights become ``call_module`` nodes of fresh ``nn.Conv*d`` /
  ``nn.Linear`` / ``nn.BatchNorm*d`` modules holding copies of the weights, named after the
  module that owned them in the original model (a module called twice stays one module);
* stateless ops become the canonical ``call_function`` of ``ir.classify`` (``operator.add``,
  ``F.relu``, ``torch.cat``, ``torch.flatten``, ``torch.mean``, ``F.max_pool2d`` ...), in-place
  ops their in-place spelling (``torch.relu_``, ``F.relu6(x, inplace=True)``, ``operator.iadd``) so
  that ``canonicalize`` functionalizes them with the same alias checks as a traced graph;
* view ops become the torch functions ``canonicalize`` knows to alias (``torch.reshape``,
  ``torch.permute``, ``torch.transpose``, ``operator.getitem`` with slices, ``torch.split`` ...);
* everything else stays a ``call_function`` of the ATen op (passes leave it alone, and the
  TVM lowering exports it again), with constants as ``get_attr`` nodes.

A program whose only way to stay correct would need alias analysis of ATen view ops that fxopt
does not know (an in-place op next to such a view) is functionalized first
(``run_decompositions({})``), which removes every mutation.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import logging
import operator
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from fxopt.errors import InputError, TraceError

aten = torch.ops.aten

_INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------------------------------------
# Capture


@contextlib.contextmanager
def _quiet():
    """torch 2.13 warns about its own pytree API from inside torch.export."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
        yield


def export(model: nn.Module, inputs: Sequence[torch.Tensor]) -> ExportedProgram:
    """``torch.export.export(model, inputs)`` (static shapes), or a TraceError saying why not."""
    stderr = io.StringIO()
    try:
        with _quiet(), _quiet_logs(), contextlib.redirect_stderr(stderr), torch.no_grad():
            return torch.export.export(model, tuple(inputs))
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds
        # torch prints the partial graph of a failed export to stderr; the error names the line instead
        stderr = io.StringIO(stderr.getvalue().replace(str(getattr(exc, "partial_fx_graph", "")) + "\n", ""))
        raise TraceError(describe_export_failure(exc)) from exc
    finally:
        sys.stderr.write(stderr.getvalue())


@contextlib.contextmanager
def _quiet_logs(*names: str):
    """torch logs the failures it then raises (graph dumps, tracebacks): the exception says it once."""
    loggers = [logging.getLogger(n) for n in names or ("torch.export", "torch._export",
                                                         "torch.fx.experimental.symbolic_shapes")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def describe_export_failure(exc: BaseException) -> str:
    """First line of a torch.export error and the user's source line that raised it."""
    from fxopt.ir import _user_frame

    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    lines = [f"torch.export cannot capture this model: {type(exc).__name__}: {first}"]
    frame = _user_frame(exc)
    if frame is not None:
        where = (frame.filename, frame.lineno, frame.name, frame.line)
    else:
        # torch.export names the user frame in its message ("The following call raised this error")
        matches = [m for m in _FRAME.finditer(text) if not _is_library_file(m.group(1))]
        where = (matches[-1].group(1), int(matches[-1].group(2)), matches[-1].group(3), None) if matches else None
    if where is not None:
        filename, lineno, name, code = where
        code = code or linecache.getline(filename, lineno).strip()
        lines.append(f"  at {filename}:{lineno} in {name}" + (f": {code}" if code else ""))
    lines.append("  what to do: write data-dependent branches with torch.cond, keep Python control flow to "
                 "static shapes and constants, and pass tensors only")
    return "\n".join(lines)


def _is_library_file(filename: str) -> bool:
    from fxopt.ir import _THIS_PACKAGE, _TORCH_PACKAGE

    path = os.path.abspath(filename)
    return path.startswith((_THIS_PACKAGE, _TORCH_PACKAGE))


# ---------------------------------------------------------------------------------------------
# Saved programs


def load_program(path: str | Path) -> ExportedProgram:
    """A program saved with ``torch.export.save``, or an InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"MODEL {str(path)!r}: file does not exist")
    try:
        with _quiet(), _quiet_logs("torch.export"), _weights_only_loads():
            return torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        if "Weights only load failed" in str(exc):
            raise InputError(
                f"MODEL {str(path)!r} holds pickled Python objects besides tensors: fxopt does not unpickle them "
                "(unpickling a file can run any code; torch.load runs with weights_only=True); save the program "
                "again with torch.export.save from a model of tensors only, if you trust where it came from"
            ) from exc
        raise InputError(
            f"MODEL {str(path)!r} is not a saved ExportedProgram ({type(exc).__name__}: {_first_line(exc)}); "
            "write it with torch.export.save(torch.export.export(model.eval(), inputs), 'model.pt2')"
        ) from exc


@contextlib.contextmanager
def _weights_only_loads():
    """torch.export.load retries a failed ``torch.load(weights_only=True)`` with
    ``weights_only=False`` (full unpickling: a crafted .pt2 could run code). While a program
    loads, every torch.load is weights-only, so such a file fails instead."""
    original = torch.load

    def weights_only(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = weights_only
    try:
        yield
    finally:
        torch.load = original


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


@dataclass(frozen=True)
class ProgramInput:
    name: str
    shape: tuple  # ints, or None for a dimension that is dynamic in the program
    dtype: torch.dtype

    @property
    def dynamic(self) -> bool:
        return any(d is None for d in self.shape)

    def describe(self) -> str:
        dims = "x".join("?" if d is None else str(d) for d in self.shape)
        return f"'{self.name}' ({dims or 'scalar'} {str(self.dtype).removeprefix('torch.')})"


def program_inputs(ep: ExportedProgram) -> list[ProgramInput]:
    """Name, shape (None for dynamic dims) and dtype of each user input of ``ep``."""
    _check_calling_convention(ep)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    result = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        value = placeholders[spec.arg.name].meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise InputError(f"the program's input '{spec.arg.name}' is not a tensor ({type(value).__name__}): "
                             "fxopt builds programs whose inputs are tensors only")
        shape = tuple(d if isinstance(d, int) else None for d in value.shape)
        result.append(ProgramInput(spec.arg.name, shape, value.dtype))
    return result


def program_example_inputs(ep: ExportedProgram, shapes: Sequence[Sequence[int]] | None,
                           dtypes: Sequence[torch.dtype] | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs for a saved program: the program's own static shapes, or ``shapes``
    (which must then agree with every static dimension; they fix dynamic ones)."""
    declared = program_inputs(ep)
    if shapes is None or len(shapes) == 0:
        dynamic = [p for p in declared if p.dynamic]
        if dynamic:
            raise InputError(
                f"the program has dynamic input dimensions ({', '.join(p.describe() for p in dynamic)}): "
                "give every input's static shape with --input-shape (one per input, in order)"
            )
        shapes = [p.shape for p in declared]
    if len(shapes) != len(declared):
        raise InputError(f"the program takes {len(declared)} input(s) ({', '.join(p.describe() for p in declared)}), "
                         f"but {len(shapes)} --input-shape were given")
    for given, p in zip(shapes, declared):
        if len(given) != len(p.shape) or any(d is not None and d != g for d, g in zip(p.shape, given)):
            raise InputError(
                f"--input-shape {'x'.join(map(str, given))} does not match the program's input {p.describe()}: "
                "a saved ExportedProgram was captured for fixed shapes; omit --input-shape to use them"
            )
    if dtypes is not None:
        for dtype, p in zip(dtypes, declared):
            if dtype != p.dtype:
                raise InputError(f"--input-dtype {str(dtype).removeprefix('torch.')} does not match the program's "
                                 f"input {p.describe()}")
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for shape, p in zip(shapes, declared):
        if p.dtype.is_floating_point:
            inputs.append(torch.randn(tuple(shape), generator=generator).to(p.dtype))
        else:
            high = 2 if p.dtype == torch.bool else 10
            inputs.append(torch.randint(0, high, tuple(shape), generator=generator).to(p.dtype))
    return tuple(inputs)


def _check_calling_convention(ep: ExportedProgram) -> None:
    """Positional tensor inputs and no mutated state: what a deployment build can run."""
    in_spec = ep.call_spec.in_spec
    if in_spec is not None and in_spec.num_children == 2:
        kwargs_spec = in_spec.child(1) if hasattr(in_spec, "child") else in_spec.children_specs[1]
        if kwargs_spec.num_leaves:
            raise InputError("the program takes keyword inputs: export it with positional tensor inputs only")
    mutations = [s for s in ep.graph_signature.output_specs
                 if s.kind not in (OutputKind.USER_OUTPUT,)]
    if mutations:
        kinds = sorted({s.kind.name.lower() for s in mutations})
        targets = [s.target for s in mutations if getattr(s, "target", None)]
        shown = f" (e.g. '{targets[0]}')" if targets else ""
        raise TraceError(
            f"the exported program mutates state{shown}: {', '.join(kinds)}; fxopt optimizes inference graphs: "
            "export the model in eval mode (model.eval()) without updating buffers or inputs in forward"
        )
    state = {s.arg.name: s.target for s in ep.graph_signature.input_specs
             if s.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)}
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and _is_aten(n.target)]
    for node in calls:
        if node.target in (aten.batch_norm.default, aten.native_batch_norm.default):
            a = _bind(node)
            if a.get("training") and isinstance(a.get("running_mean"), fx.Node):
                raise TraceError(
                    f"the exported program runs BatchNorm in training mode (it updates "
                    f"'{state.get(a['running_mean'].name, a['running_mean'].name)}'): export the model in eval mode "
                    "(model.eval()); fxopt optimizes inference graphs")
    for node in calls:
        written = [arg for arg, spec in zip(node.args, node.target._schema.arguments)
                   if spec.alias_info is not None and spec.alias_info.is_write]
        for arg in written:
            if isinstance(arg, fx.Node) and arg.name in state:
                raise TraceError(
                    f"the exported program mutates state ('{state[arg.name]}' in {node.target}): export the model "
                    "in eval mode (model.eval()) without updating buffers in forward; fxopt optimizes inference graphs")
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (InputKind.CUSTOM_OBJ, InputKind.TOKEN):
            raise TraceError(f"the exported program uses {spec.kind.name.lower()} input '{spec.arg.name}' "
                             "(script objects or effect tokens), which fxopt cannot raise into an fx graph")


# ---------------------------------------------------------------------------------------------
# Raising


class _Decline(Exception):
    """An op that cannot take its canonical form here: it stays an ATen call."""


@dataclass(frozen=True)
class _Const:
    """A lifted parameter, buffer or tensor constant of the program."""

    placeholder: str
    target: str  # qualified name in the original model
    tensor: torch.Tensor
    parameter: bool


class _Tuple:
    """The tuple result of a raised op whose only used element is ``elements[0]``."""

    def __init__(self, elements: dict[int, fx.Node]):
        self.elements = elements


_PARAMETRIC = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def raise_program(ep: ExportedProgram, name: str = "ExportedProgram") -> fx.GraphModule:
    """The module-level fx.GraphModule of ``ep`` (see the module docstring). No shapes yet:
    run ``ir.propagate_shapes`` on it."""
    _check_calling_convention(ep)
    gm = _Raiser(ep, name).run()
    if _needs_functionalization(gm):
        with _quiet():
            functional = ep.run_decompositions({})
        gm = _Raiser(functional, name).run()
        gm.meta["fxopt"]["functionalized"] = True
    return gm


def _is_aten(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload)


def _aliases_input(target: Any) -> bool:
    returns = target._schema.returns
    return any(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _needs_functionalization(gm: fx.GraphModule) -> bool:
    """An in-place op in a graph that also holds ATen view ops canonicalize cannot see through."""
    from fxopt import ir

    mutates = any(
        (form := ir.classify(n, gm)) is not None and form.inplace
        or (n.op == "call_function" and _is_aten(n.target) and n.target._schema.is_mutable)
        for n in gm.graph.nodes
    )
    unknown_views = any(n.op == "call_function" and _is_aten(n.target) and _aliases_input(n.target)
                        for n in gm.graph.nodes)
    return mutates and unknown_views


class _Raiser:
    def __init__(self, ep: ExportedProgram, name: str):
        self.ep = ep
        self.name = name
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.containers: set[str] = {""}  # qualnames of the plain nn.Module containers created here
        self.attr_nodes: dict[str, fx.Node] = {}  # placeholder name -> get_attr node
        self.modules: dict[tuple, str] = {}  # dedup key -> module qualname
        self.pure: set[fx.Node] = set()  # new nodes that may be dropped when unused
        self.copies: dict[str, torch.Tensor] = {}

    # -- driver --------------------------------------------------------------------------------

    def run(self) -> fx.GraphModule:
        specs = {s.arg.name: s for s in self.ep.graph_signature.input_specs}
        state = self.ep.state_dict
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                spec = specs[node.name]
                if spec.kind == InputKind.USER_INPUT:
                    new = self.graph.placeholder(node.name)
                    new.meta = {k: v for k, v in node.meta.items() if k in ("stack_trace",)}
                    self.env[node] = new
                else:
                    tensor = state[spec.target] if spec.target in state else self.ep.constants[spec.target]
                    self.env[node] = _Const(node.name, spec.target, tensor, spec.kind == InputKind.PARAMETER)
            elif node.op == "get_attr":
                self.env[node] = self._get_attr(node)
            elif node.op == "call_function":
                self.env[node] = self._call(node)
            elif node.op == "output":
                self._output(node)
            else:  # pragma: no cover - ExportedProgram graphs hold no call_module/call_method
                raise TraceError(f"unexpected {node.op} node '{node.name}' in the exported program")
        self._drop_unused()
        self.live = set(self.graph.nodes)
        self._install_constants()
        self.root.eval()
        gm = fx.GraphModule(self.root, self.graph, class_name=self.name)
        gm.eval()
        gm.meta["fxopt"] = {"capture": "export"}
        return gm

    def _output(self, node: fx.Node) -> None:
        specs = self.ep.graph_signature.output_specs
        values = node.args[0]
        user = [self._value(v) for v, s in zip(values, specs) if s.kind == OutputKind.USER_OUTPUT]
        out_spec = self.ep.call_spec.out_spec
        result = pytree.tree_unflatten(user, out_spec) if out_spec is not None else tuple(user)
        self.graph.output(result)

    def _drop_unused(self) -> None:
        for node in reversed(list(self.graph.nodes)):
            if node in self.pure and not node.users:
                self.graph.erase_node(node)

    # -- values ------------------------------------------------------------------------------

    def _value(self, value: Any) -> Any:
        """The new-graph value of an ep-graph argument; constants become get_attr nodes."""
        def convert(v):
            if isinstance(v, fx.Node):
                mapped = self.env[v]
                if isinstance(mapped, _Const):
                    return self._attr(mapped)
                if isinstance(mapped, _Tuple):
                    raise _Decline("tuple result used whole")
                return mapped
            return v
        return fx.node.map_aggregate(value, convert)

    def _copy(self, const: _Const) -> torch.Tensor:
        """One detached copy per constant: the user's model is never aliased, shared weights stay shared."""
        if const.placeholder not in self.copies:
            self.copies[const.placeholder] = const.tensor.detach().clone()
        return self.copies[const.placeholder]

    def parameter(self, const: _Const) -> nn.Parameter:
        return nn.Parameter(self._copy(const), requires_grad=const.tensor.requires_grad)

    def _attr(self, const: _Const) -> fx.Node:
        """A get_attr node for ``const``; the tensor is installed at the end, if still used."""
        node = self.attr_nodes.get(const.placeholder)
        if node is None:
            node = self.graph.get_attr(const.placeholder)  # target set by _install_constants
            self.attr_nodes[const.placeholder] = node
            self.pure.add(node)
        return node

    def _install_constants(self) -> None:
        """Install the constants that get_attr nodes still read, after the modules took their names.

        A weight that a raised module already holds is read from that module ('fc.weight')."""
        consts = {c.placeholder: c for c in self.env.values() if isinstance(c, _Const)}
        for placeholder, node in self.attr_nodes.items():
            if node.graph is not self.graph or node not in self.live:
                continue
            const = consts[placeholder]
            tensor = self._copy(const)
            try:
                held = get_path(self.root, const.target)
            except AttributeError:
                held = None
            if held is tensor:
                node.target = const.target
                continue
            node.target = self._install(const.target, self.parameter(const) if const.parameter else tensor)

    def _install(self, qualname: str, value: nn.Module | torch.Tensor) -> str:
        """Put ``value`` into the root at ``qualname`` (containers created as needed), or at a fresh
        name near it when that path is taken or runs through a module that is not a container."""
        base = qualname or "module"
        flat = base.replace(".", "_")  # where the path is taken or runs through a module
        candidate, i = base, 0
        while not self._free(candidate):
            i += 1
            candidate = flat if i == 1 else f"{flat}_{i - 1}"
        parent = self.root
        parts = candidate.split(".")
        for depth, part in enumerate(parts[:-1]):
            path = ".".join(parts[: depth + 1])
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
                self.containers.add(path)
            parent = getattr(parent, part)
        leaf = parts[-1]
        if isinstance(value, nn.Module):
            parent.add_module(leaf, value)
        elif isinstance(value, nn.Parameter):
            parent.register_parameter(leaf, value)
        else:
            parent.register_buffer(leaf, value)
        return candidate

    def _free(self, qualname: str) -> bool:
        parts = qualname.split(".")
        if any(not p.isidentifier() and not p.isdigit() for p in parts):
            return False
        obj: Any = self.root
        for depth, part in enumerate(parts):
            path = ".".join(parts[: depth + 1])
            if not hasattr(obj, part):
                return True
            if depth == len(parts) - 1 or path not in self.containers:
                return False
            obj = getattr(obj, part)
        return False

    def _get_attr(self, node: fx.Node) -> fx.Node:
        """Submodules of higher-order ops (torch.cond branches) move over unchanged."""
        value = getattr(self.ep.graph_module, node.target)
        if isinstance(value, torch.Tensor):  # an unlifted constant: copied like the lifted ones
            value = value.detach().clone()
        qualname = self._install(node.target, value)
        new = self.graph.get_attr(qualname)
        new.meta = {}
        return new

    # -- calls -------------------------------------------------------------------------------

    def _call(self, node: fx.Node) -> Any:
        handler = _HANDLERS.get(node.target)
        if handler is not None:
            try:
                result = handler(self, node, _bind(node))
            except _Decline:
                result = None
            if result is not None:
                return result
        if node.target is operator.getitem and isinstance(self.env.get(node.args[0]), _Tuple):
            element = self.env[node.args[0]].elements.get(node.args[1])
            if element is None:  # pragma: no cover - _only_first_element_used checked this
                raise TraceError(f"'{node.name}' reads an element of a raised tuple result that was dropped")
            return element
        args, kwargs = self._value(node.args), self._value(node.kwargs)
        new = self.graph.call_function(node.target, args, kwargs)
        self._meta(new, node)
        if node.target is operator.getitem or (_is_aten(node.target) and not node.target._schema.is_mutable):
            self.pure.add(new)  # may be dropped if raising leaves it unused (a transposed weight)
        return new

    def _meta(self, new: fx.Node, node: fx.Node) -> None:
        if node.meta.get("stack_trace"):
            new.meta["stack_trace"] = node.meta["stack_trace"]

    def emit(self, node: fx.Node, fn: Callable, args: tuple, kwargs: dict | None = None, pure: bool = True) -> fx.Node:
        new = self.graph.call_function(fn, self._value(tuple(args)), self._value(dict(kwargs or {})))
        self._meta(new, node)
        if pure:
            self.pure.add(new)
        return new

    def emit_module(self, node: fx.Node, key: tuple, owner: str, make: Callable[[], nn.Module], source: fx.Node) -> fx.Node:
        name = self.modules.get(key)
        if name is None:
            name = self._install(owner, make())
            self.modules[key] = name
        new = self.graph.call_module(name, (self._value(source),))
        self._meta(new, node)
        self.pure.add(new)
        return new

    def const(self, value: Any, what: str) -> _Const:
        mapped = self.env.get(value) if isinstance(value, fx.Node) else None
        if not isinstance(mapped, _Const):
            raise _Decline(f"{what} is not a constant")
        return mapped

    def optional_const(self, value: Any, what: str) -> _Const | None:
        return None if value is None else self.const(value, what)


def get_path(root: nn.Module, qualname: str) -> Any:
    obj: Any = root
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _bind(node: fx.Node) -> dict[str, Any]:
    """Arguments of an ATen call by schema name, defaults filled in."""
    target = node.target
    if not _is_aten(target):
        return {}
    named: dict[str, Any] = {}
    positional = list(node.args)
    for argument in target._schema.arguments:
        if not argument.kwarg_only and positional:
            named[argument.name] = positional.pop(0)
        elif argument.name in node.kwargs:
            named[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            named[argument.name] = argument.default_value
    return named


def _owner(target: str) -> str:
    """'features.0.conv.weight' -> 'features.0.conv'."""
    return target.rpartition(".")[0]


def _rank(node: Any) -> int | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def _only_first_element_used(node: fx.Node) -> bool:
    return all(u.target is operator.getitem and u.args[1] == 0 for u in node.users)


def _ints(value: Any, n: int) -> tuple:
    """An int or list argument as an n-tuple (ATen writes ``[1, 1]``, a default may be ``1``)."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return values * n if len(values) == 1 else values


# -- parametric ops ----------------------------------------------------------------------------


def _conv(r: _Raiser, node: fx.Node, a: dict) -> fx.Node | None:
    if a.get("transposed", False):
        return None  # conv_transpose: no canonical form in fxopt
    weight = r.const(a["weight"], "weight")
    bias = r.optional_const(a.get("bias"), "bias")
    dims = weight.tensor.dim() - 2
    cls = _PARAMETRIC.get(dims)
    if cls is None or weight.tensor.is_complex():
        return None
    groups = a.get("groups", 1)
    stride, dilation = _ints(a.get("stride", 1), dims), _ints(a.get("dilation", 1), dims)
    padding = a.get("padding", 0)
    padding = padding if isinstance(padding, str) else _ints(padding, dims)
    source, padding_mode = a["input"], "zeros"
    pad = _padding_mode_pad(source, dims, padding)
    if pad is not None:  # F.pad(x, p, mode) feeding only this conv: Conv*d(padding_mode=mode)
        source, padding, padding_mode = pad
    if any(isinstance(v, fx.Node) for v in (*stride, *dilation, groups, *(padding if not isinstance(padding, str) else ()))):
        return None
    w = weight.tensor

    def make() -> nn.Module:
        module = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=bias is not None, padding_mode=padding_mode,
                     device="meta", dtype=w.dtype)
        module.weight = r.parameter(weight)
        if bias is not None:
            module.bias = r.parameter(bias)
        return module

    key = ("conv", weight.placeholder, bias.placeholder if bias else None, stride, padding, dilation, groups, padding_mode)
    return r.emit_module(node, key, _owner(weight.target), make, source)


def _padding_mode_pad(source: Any, dims: int, padding: Any) -> tuple | None:
    """``aten.pad(x, p, 'reflect'|'replicate'|'circular')`` used only by a conv with zero padding."""
    if not isinstance(source, fx.Node) or source.target is not aten.pad.default or len(source.users) != 1:
        return None
    if isinstance(padding, str) or any(p != 0 for p in padding):
        return None
    a = _bind(source)
    mode, pads = a.get("mode", "constant"), list(a["pad"])
    if mode not in ("reflect", "replicate", "circular") or len(pads) != 2 * dims:
        return None
    # F.pad lists (left, right) pairs from the last dim backwards; Conv*d pads symmetrically
    pairs = [pads[i:i + 2] for i in range(0, len(pads), 2)][::-1]
    if any(left != right or isinstance(left, fx.Node) for left, right in pairs):
        return None
    return a["self"], tuple(left for left, _ in pairs), mode


def _linear_module(r: _Raiser, node: fx.Node, source: Any, weight: _Const, bias: _Const | None) -> fx.Node:
    w = weight.tensor
    if w.dim() != 2 or (bias is not None and bias.tensor.dim() != 1):
        raise _Decline("not a linear layer")

    def make() -> nn.Module:
        module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta", dtype=w.dtype)
        module.weight = r.parameter(weight)
        if bias is not None:
            module.bias = r.parameter(bias)
        return module

    key = ("linear", weight.placeholder, bias.placeholder if bias else None)
    return r.emit_module(node, key, _owner(weight.target), make, source)


def _linear(r: _Raiser, node: fx.Node, a: dict) -> fx.Node | None:
    return _linear_module(r, node, a["input"], r.const(a["weight"], "weight"), r.optional_const(a.get("bias"), "bias"))


def _transposed_weight(r: _Raiser, value: Any) -> _Const:
    """``aten.t(W)`` / ``aten.permute(W, [1, 0])`` / ``aten.transpose(W, 0, 1)`` of a constant W."""
    if not isinstance(value, fx.Node):
        raise _Decline("weight is not a node")
    a = _bind(value)
    if value.target is aten.t.default:
        pass
    elif value.target is aten.permute.default and list(a["dims"]) == [1, 0]:
        pass
    elif value.target is aten.transpose.int and {a["dim0"] % 2, a["dim1"] % 2} == {0, 1}:
        pass
    else:
        raise _Decline("weight is not a transposed constant")
    return r.const(a["self"], "weight")


def _addmm(r: _Raiser, node: fx.Node, a: dict) -> fx.Node | None:
    # addmm(b, x, W^T) = x W^T + b = linear(x, W, b)
    if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
        return None
    return _linear_module(r, node, a["mat1"], _transposed_weight(r, a["mat2"]), r.const(a["self"], "bias"))


def _mm(r: _Raiser, node: fx.Node, a: dict) -> fx.Node | None:
    return _linear_module(r, node, a["self"], _transposed_weight(r, a["mat2"]), None)


def _batch_norm_module(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
    mean = r.const(a["running_mean"], "running_mean")
    var = r.const(a["running_var"], "running_var")
    weight = r.optional_const(a.get("weight"), "weight")
    bias = r.optional_const(a.get("bias"), "bias")
    cls = _NORMS.get(_rank(a["input"]))
    if cls is None:
        raise _Decline("batch norm input rank is not 2-5")
    eps, momentum = float(a.get("eps", 1e-5)), a.get("momentum", 0.1)
    m = mean.tensor

    def make() -> nn.Module:
        module = cls(m.numel(), eps=eps, momentum=momentum, affine=weight is not None or bias is not None, dtype=m.dtype)
        with torch.no_grad():
            module.running_mean.copy_(mean.tensor)
            module.running_var.copy_(var.tensor)
        if module.affine:  # F.batch_norm with only one of weight, bias: the other is the identity
            module.weight = r.parameter(weight) if weight is not None else nn.Parameter(torch.ones_like(m))
            module.bias = r.parameter(bias) if bias is not None else nn.Parameter(torch.zeros_like(m))
        return module.eval()

    key = ("batch_norm", mean.placeholder, var.placeholder, weight.placeholder if weight else None,
           bias.placeholder if bias else None, eps, cls)
    return r.emit_module(node, key, _owner(mean.target), make, a["input"])


def _batch_norm(r: _Raiser, node: fx.Node, a: dict) -> fx.Node | None:
    if a.get("training", False) is not False:
        return None  # batch statistics (track_running_stats=False or training): no module form
    return _batch_norm_module(r, node, a)


def _batch_norm_tuple(r: _Raiser, node: fx.Node, a: dict) -> _Tuple | None:
    if a.get("training", False) is not False or not _only_first_element_used(node):
        return None
    return _Tuple({0: _batch_norm_module(r, node, a)})


# -- stateless ops -----------------------------------------------------------------------------


def _simple(fn: Callable, inplace: bool = False) -> Callable:
    """aten.op(self) -> fn(x); aten.op_(self) -> fn(x, inplace=True)."""
    def handler(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
        return r.emit(node, fn, (a["self"],), {"inplace": True} if inplace else {}, pure=not inplace)
    return handler


def _inplace_function(fn: Callable) -> Callable:
    """aten.op_(self) -> torch.op_(x)."""
    def handler(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
        return r.emit(node, fn, (a["self"],), pure=False)
    return handler


def _binary(fn: Callable, inplace: bool) -> Callable:
    def handler(r: _Raiser, node: fx.Node, a: dict) -> fx.Node | None:
        if a.get("alpha", 1) != 1 or a.get("rounding_mode") is not None:
            return None
        return r.emit(node, fn, (a["self"], a["other"]), pure=not inplace)
    return handler


def _hardtanh(inplace: bool) -> Callable:
    def handler(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
        low, high = a.get("min_val", -1.0), a.get("max_val", 1.0)
        if low == 0 and high == 6:  # relu6 is hardtanh(0, 6) in ATen
            return r.emit(node, F.relu6, (a["self"],), {"inplace": True} if inplace else {}, pure=not inplace)
        if inplace:
            return r.emit(node, F.hardtanh_, (a["self"], low, high), pure=False)
        return r.emit(node, F.hardtanh, (a["self"], low, high))
    return handler


def _leaky_relu(inplace: bool) -> Callable:
    def handler(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
        slope = a.get("negative_slope", 0.01)
        if inplace:
            return r.emit(node, F.leaky_relu_, (a["self"], slope), pure=False)
        return r.emit(node, F.leaky_relu, (a["self"], slope))
    return handler


def _elu(inplace: bool) -> Callable:
    def handler(r: _Raiser, node: fx.Node, a: dict) -> fx.Node | None:
        if a.get("scale", 1) != 1 or a.get("input_scale", 1) != 1:
            return None  # selu / celu spellings
        alpha = a.get("alpha", 1.0)
        if inplace:
            return r.emit(node, F.elu_, (a["self"], alpha), pure=False)
        return r.emit(node, F.elu, (a["self"], alpha))
    return handler


def _gelu(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
    return r.emit(node, F.gelu, (a["self"],), {"approximate": a.get("approximate", "none")})


def _softmax(r: _Raiser, node: fx.Node, a: dict) -> fx.Node | None:
    if a.get("dtype") is not None or a.get("half_to_float", False):
        return None
    return r.emit(node, F.softmax, (a["self"], a["dim"]))


def _max_pool(fn: Callable, tuple_result: bool) -> Callable:
    def handler(r: _Raiser, node: fx.Node, a: dict):
        if tuple_result and not _only_first_element_used(node):
            return None
        new = r.emit(node, fn, (a["self"], a["kernel_size"], a.get("stride") or None, a.get("padding", 0),
                                a.get("dilation", 1), a.get("ceil_mode", False)))
        return _Tuple({0: new}) if tuple_result else new
    return handler


def _avg_pool(fn: Callable, divisor: bool) -> Callable:
    def handler(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
        args = [a["self"], a["kernel_size"], a.get("stride") or None, a.get("padding", 0), a.get("ceil_mode", False),
                a.get("count_include_pad", True)]
        if divisor:
            args.append(a.get("divisor_override"))
        return r.emit(node, fn, tuple(args))
    return handler


def _adaptive(fn: Callable, tuple_result: bool = False) -> Callable:
    def handler(r: _Raiser, node: fx.Node, a: dict):
        if tuple_result and not _only_first_element_used(node):
            return None
        new = r.emit(node, fn, (a["self"], a["output_size"]))
        return _Tuple({0: new}) if tuple_result else new
    return handler


def _mean(r: _Raiser, node: fx.Node, a: dict) -> fx.Node | None:
    if a.get("dtype") is not None:
        return None
    return r.emit(node, torch.mean, (a["self"], a["dim"], a.get("keepdim", False)))


def _cat(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
    return r.emit(node, torch.cat, (list(a["tensors"]), a.get("dim", 0)))


def _flatten(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
    return r.emit(node, torch.flatten, (a["self"], a.get("start_dim", 0), a.get("end_dim", -1)))


def _dropout(r: _Raiser, node: fx.Node, a: dict) -> fx.Node | None:
    if a.get("train", True):
        return None
    return r.emit(node, F.dropout, (a["input"],), {"p": a.get("p", 0.5), "training": False})


def _pad(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
    return r.emit(node, F.pad, (a["self"] if "self" in a else a["input"], list(a["pad"]), a.get("mode", "constant"),
                                a.get("value")))


def _constant_pad(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
    return r.emit(node, F.pad, (a["self"], list(a["pad"]), "constant", a.get("value", 0)))


# -- views -------------------------------------------------------------------------------------


def _view(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
    return r.emit(node, torch.reshape, (a["self"], list(a.get("size", a.get("shape")))))


def _unary_view(fn: Callable, *names: str) -> Callable:
    def handler(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
        return r.emit(node, fn, (a["self"], *[list(a[n]) if isinstance(a[n], (list, tuple)) else a[n] for n in names]))
    return handler


def _method(name: str, *names: str) -> Callable:
    def handler(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
        new = r.graph.call_method(name, r._value((a["self"], *[a[n] for n in names])))
        r._meta(new, node)
        r.pure.add(new)
        return new
    return handler


def _contiguous(r: _Raiser, node: fx.Node, a: dict) -> fx.Node | None:
    if a.get("memory_format") not in (torch.contiguous_format, None, 0):  # 0: the schema default
        return None
    return _method("contiguous")(r, node, a)


def _expand(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
    new = r.graph.call_method("expand", r._value((a["self"], list(a["size"]))))
    r._meta(new, node)
    r.pure.add(new)
    return new


def _slice(r: _Raiser, node: fx.Node, a: dict) -> fx.Node | None:
    rank = _rank(a["self"])
    if rank is None:
        return None
    dim = a.get("dim", 0) % rank
    start, end, step = a.get("start"), a.get("end"), a.get("step", 1)
    if isinstance(end, int) and end >= _INT64_MAX:
        end = None
    if start == 0:
        start = None
    index = (slice(None),) * dim + (slice(start, end, None if step == 1 else step),)
    return r.emit(node, operator.getitem, (a["self"], index))


def _split(r: _Raiser, node: fx.Node, a: dict) -> fx.Node:
    sizes = a.get("split_sizes", a.get("split_size"))
    return r.emit(node, torch.split, (a["self"], list(sizes) if isinstance(sizes, (list, tuple)) else sizes, a.get("dim", 0)))


_HANDLERS: dict[Any, Callable] = {
    aten.conv1d.default: _conv, aten.conv2d.default: _conv, aten.conv3d.default: _conv,
    aten.conv1d.padding: _conv, aten.conv2d.padding: _conv, aten.conv3d.padding: _conv,
    aten.convolution.default: _conv,
    aten.linear.default: _linear, aten.addmm.default: _addmm, aten.mm.default: _mm,
    aten.batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm_tuple,
    aten.native_batch_norm.default: _batch_norm_tuple,
    aten.add.Tensor: _binary(operator.add, False), aten.add.Scalar: _binary(operator.add, False),
    aten.add_.Tensor: _binary(operator.iadd, True), aten.add_.Scalar: _binary(operator.iadd, True),
    aten.sub.Tensor: _binary(operator.sub, False), aten.sub.Scalar: _binary(operator.sub, False),
    aten.sub_.Tensor: _binary(operator.isub, True), aten.sub_.Scalar: _binary(operator.isub, True),
    aten.mul.Tensor: _binary(operator.mul, False), aten.mul.Scalar: _binary(operator.mul, False),
    aten.mul_.Tensor: _binary(operator.imul, True), aten.mul_.Scalar: _binary(operator.imul, True),
    aten.div.Tensor: _binary(operator.truediv, False), aten.div.Scalar: _binary(operator.truediv, False),
    aten.div_.Tensor: _binary(operator.itruediv, True), aten.div_.Scalar: _binary(operator.itruediv, True),
    aten.relu.default: _simple(F.relu), aten.relu_.default: _inplace_function(torch.relu_),
    aten.relu6.default: _simple(F.relu6), aten.relu6_.default: _simple(F.relu6, inplace=True),
    aten.hardtanh.default: _hardtanh(False), aten.hardtanh_.default: _hardtanh(True),
    aten.hardswish.default: _simple(F.hardswish), aten.hardswish_.default: _simple(F.hardswish, inplace=True),
    aten.hardsigmoid.default: _simple(F.hardsigmoid), aten.hardsigmoid_.default: _simple(F.hardsigmoid, inplace=True),
    aten.silu.default: _simple(F.silu), aten.silu_.default: _simple(F.silu, inplace=True),
    aten.mish.default: _simple(F.mish), aten.mish_.default: _simple(F.mish, inplace=True),
    aten.sigmoid.default: _simple(torch.sigmoid), aten.sigmoid_.default: _inplace_function(torch.sigmoid_),
    aten.tanh.default: _simple(torch.tanh), aten.tanh_.default: _inplace_function(torch.tanh_),
    aten.gelu.default: _gelu,
    aten.leaky_relu.default: _leaky_relu(False), aten.leaky_relu_.default: _leaky_relu(True),
    aten.elu.default: _elu(False), aten.elu_.default: _elu(True),
    aten.softmax.int: _softmax, aten._softmax.default: _softmax,
    aten.max_pool1d.default: _max_pool(F.max_pool1d, False),
    aten.max_pool2d.default: _max_pool(F.max_pool2d, False),
    aten.max_pool2d_with_indices.default: _max_pool(F.max_pool2d, True),
    aten.avg_pool1d.default: _avg_pool(F.avg_pool1d, False),
    aten.avg_pool2d.default: _avg_pool(F.avg_pool2d, True),
    aten.adaptive_avg_pool1d.default: _adaptive(F.adaptive_avg_pool1d),
    aten.adaptive_avg_pool2d.default: _adaptive(F.adaptive_avg_pool2d),
    aten._adaptive_avg_pool2d.default: _adaptive(F.adaptive_avg_pool2d),
    aten.adaptive_max_pool2d.default: _adaptive(F.adaptive_max_pool2d, tuple_result=True),
    aten.mean.dim: _mean,
    aten.cat.default: _cat,
    aten.flatten.using_ints: _flatten,
    aten.dropout.default: _dropout, aten.feature_dropout.default: _dropout,
    aten.pad.default: _pad, aten.constant_pad_nd.default: _constant_pad,
    aten.view.default: _view, aten.reshape.default: _view, aten._unsafe_view.default: _view,
    aten.permute.default: _unary_view(torch.permute, "dims"),
    aten.transpose.int: _unary_view(torch.transpose, "dim0", "dim1"),
    aten.t.default: _unary_view(torch.t),
    aten.unsqueeze.default: _unary_view(torch.unsqueeze, "dim"),
    aten.squeeze.dim: _unary_view(torch.squeeze, "dim"),
    aten.squeeze.default: _unary_view(torch.squeeze), aten.squeeze.dims: _unary_view(torch.squeeze, "dim"),
    aten.select.int: _unary_view(torch.select, "dim", "index"),
    aten.narrow.default: _unary_view(torch.narrow, "dim", "start", "length"),
    aten.chunk.default: _unary_view(torch.chunk, "chunks", "dim"),
    aten.unbind.int: _unary_view(torch.unbind, "dim"),
    aten.split.Tensor: _split, aten.split_with_sizes.default: _split,
    aten.slice.Tensor: _slice,
    aten.detach.default: _unary_view(torch.detach),
    aten.contiguous.default: _contiguous,
    aten.expand.default: _expand,
}
