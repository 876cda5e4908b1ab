"""Standalone C for a static-shape Relax model: no TVM runtime, no OS needed.

    emit(mod, target, directory)  Relax pipeline -> kernels + plain C for ``main`` -> StandaloneSources

After fxopt's CPU pipeline (or TVM's, per the target's schedule strategy), the lowered Relax
``main`` of a model with static shapes is a straight line: input checks
(``vm.builtin.check_tensor_info`` / ``match_shape``), ``R.vm.alloc_storage`` of constant sizes,
``R.vm.alloc_tensor`` views into them, direct calls of the kernels (destination-passing style),
``vm.builtin.reshape`` views and ``R.vm.kill_object``. This module walks that line and writes:

* ``fxopt_kernels.o``: the LLVM object for the target; every kernel is ``__tvm_ffi_<name>``
  (the tvm-ffi packed ABI), built without its argument checks (``tirx.disable_assert``: the glue
  passes static tensors that match by construction), which halves the code on rv32;
* ``fxopt_model.c``: ``DLTensor``s and packed-call argument arrays (read-only, in flash), one
  static arena (the tensors' storages and each kernel call's workspace, placed by liveness:
  what is not alive at the same time shares bytes), and ``fxopt_model_run``;
* ``fxopt_model.h``: the entry point and the sizes of the inputs and outputs;
* ``fxopt_model_constants.bin`` + ``.S``: the weights as one binary blob (each constant 64-byte
  aligned, identical constants once), linked with ``.incbin``.

The runtime callbacks the kernels need (workspace from the arena, serial parallel launch, error
messages) are fxopt's small C shim, ``targets/standalone_c/fxopt_runtime.c``. Compiling, linking
and running are :mod:`fxopt.targets.standalone`'s (no TVM needed there).

Anything else in ``main`` (dynamic shapes, extern packed functions, control flow) is declined
with an UnsupportedOpError naming the binding.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fxopt.errors import BuildError, TargetError, UnsupportedOpError

from .. import Target, get_target

__all__ = ["ALIGN", "StandaloneSources", "emit"]

ALIGN = 64  # bytes: storages, constants, workspace blocks (what TVM's kernels assume)
_C_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# DLPack type codes
_DL_CODES = {"int": 0, "uint": 1, "float": 2, "bfloat": 4, "bool": 6}
# Builtins of a static main that need no code: the shapes were checked when the C was written.
_NO_CODE_BUILTINS = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape",
                     "vm.builtin.check_shape_info", "vm.builtin.check_prim_value_info",
                     "vm.builtin.check_tuple_info")
_NO_CODE_OPS = ("relax.vm.kill_object", "relax.null_value")
_WORKSPACE_DEPTH = 16  # fxopt_runtime.c: FXOPT_WORKSPACE_DEPTH
_WORKSPACE_CALL = re.compile(r"TVMBackendAllocWorkspace\([^,()]+, [^,()]+, T\.uint64\((\d+)\)")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class StandaloneSources:
    """What :func:`emit` wrote, and the figures the C build needs."""

    directory: Path
    files: list[str]  # written, relative to directory
    inputs: list[dict]  # {"name", "shape", "dtype", "bytes"}
    outputs: list[dict]
    arena_bytes: int  # one static buffer: tensor storages and each call's workspace, planned by liveness
    storage_bytes: int  # the tensor storages alone, planned by liveness
    storage_bytes_unplanned: int  # the tensor storages one after another (what planning saved)
    workspace_bytes: int  # the most workspace one kernel call holds (TVMBackendAllocWorkspace)
    constants_bytes: int  # the blob, with alignment padding
    kernel_names: list[str]
    calls: int  # kernel calls per inference

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


# --------------------------------------------------------------------------------------------
# Values of main's variables as the walk sees them


@dataclass
class _Tensor:
    shape: tuple[int, ...]
    dtype: str
    base: str  # "input", "arena" (a storage), "const"
    index: int  # input index, storage id or constant id
    offset: int = 0  # bytes from the base
    cname: str | None = None  # the DLTensor in C, once one is needed

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _dtype_bytes(self.dtype)


@dataclass
class _Storage:
    nbytes: int
    first: int  # binding index of alloc_storage
    last: int  # last binding index that uses a tensor in it
    offset: int = -1  # in the arena, once planned


def _dtype_bytes(dtype: str) -> int:
    bits, lanes = _dtype_fields(dtype)[1:]
    return (bits * lanes + 7) // 8


def _dtype_fields(dtype: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"(bool|bfloat|float|int|uint)(\d*)(?:x(\d+))?", dtype)
    if not match:
        raise UnsupportedOpError(f"dtype {dtype!r} has no DLPack code the standalone emitter knows")
    kind, bits, lanes = match.group(1), match.group(2), match.group(3)
    bits = 8 if kind == "bool" else int(bits or 32)
    return _DL_CODES[kind], bits, int(lanes or 1)


def _static_shape(ty, what: str) -> tuple[tuple[int, ...], str]:
    shape = getattr(ty, "shape", None)
    dtype = str(getattr(ty, "dtype", ""))
    values = getattr(shape, "values", None)
    if values is None or not dtype:
        raise UnsupportedOpError(f"{what} has type {ty}; the standalone runtime takes tensors of static shape only")
    dims = []
    for d in values:
        v = getattr(d, "value", d)
        if not isinstance(v, (int, np.integer)):
            raise UnsupportedOpError(
                f"{what} has the symbolic dimension {d} (type {ty}): the standalone runtime needs static shapes; "
                "compile with fixed-size example inputs, or use the TVM runtime (--runtime tvm) for dynamic shapes")
        dims.append(int(v))
    return tuple(dims), dtype


def _var_name(var) -> str:
    return str(getattr(var, "name", None) or getattr(var, "name_hint", None) or var)


def _int_values(shape_expr, what: str) -> list[int]:
    values = getattr(shape_expr, "values", None)
    if values is None:
        raise UnsupportedOpError(f"{what}: expected a constant shape, got {shape_expr}")
    out = []
    for d in values:
        v = getattr(d, "value", d)
        if not isinstance(v, (int, np.integer)):
            raise UnsupportedOpError(f"{what}: the size {d} is not a constant; the standalone runtime needs static shapes")
        out.append(int(v))
    return out


# --------------------------------------------------------------------------------------------
# The walk


class _Emitter:
    def __init__(self, func) -> None:
        self.func = func
        self.values: dict[Any, Any] = {}  # relax Var -> _Tensor | _Storage | list (tuple) | None
        self.inputs: list[_Tensor] = []
        self.storages: list[_Storage] = []
        self.constants: list[bytes] = []  # blob entries, deduplicated by content
        self.const_offsets: list[int] = []
        self._const_ids: dict[Any, int] = {}  # Constant object (hash = handle) -> constant id
        self._const_by_digest: dict[bytes, int] = {}
        self.calls: list[tuple[str, list]] = []  # (kernel, args as _Tensor | ("int", v) | ("float", v))
        self.call_steps: list[int] = []  # binding index of each call
        self.workspaces: dict[int, int] = {}  # call index -> its workspace (an id in self.storages)
        self.tensors: list[_Tensor] = []  # those that need a DLTensor
        self.outputs: list[_Tensor] = []
        self.step = 0

    # -- helpers ----------------------------------------------------------------------------

    def _where(self, binding) -> str:
        return f"binding `{_var_name(binding.var)} = ...` of main (#{self.step})"

    def _use(self, tensor: _Tensor) -> None:
        if tensor.base == "arena":
            storage = self.storages[tensor.index]
            storage.last = max(storage.last, self.step)

    def _const(self, const) -> _Tensor:
        if const not in self._const_ids:
            array = np.ascontiguousarray(const.value.numpy())
            raw = array.tobytes()
            digest = hashlib.sha256(raw + str(array.dtype).encode()).digest()
            if digest not in self._const_by_digest:
                self._const_by_digest[digest] = len(self.constants)
                self.constants.append(raw)
            self._const_ids[const] = self._const_by_digest[digest]
            tensor = _Tensor(tuple(int(d) for d in array.shape), str(array.dtype), "const", self._const_ids[const])
            self.values[("const", const)] = tensor
        return self.values[("const", const)]

    def _tensor(self, expr, what: str) -> _Tensor:
        name = type(expr).__name__
        if name in ("GenericConst", "Constant") and hasattr(expr, "value") and hasattr(expr.value, "numpy"):
            return self._const(expr)
        value = self.values.get(expr)
        if isinstance(value, _Tensor):
            return value
        raise UnsupportedOpError(f"{what}: argument {expr} is not a tensor the standalone emitter knows "
                                 f"({name}); only tensors, constants and scalar literals are supported")

    def _flatten(self, value, what: str) -> list[_Tensor]:
        if isinstance(value, _Tensor):
            return [value]
        if isinstance(value, list):
            return [t for v in value for t in self._flatten(v, what)]
        raise UnsupportedOpError(f"{what}: main returns {value!r}, not tensors")

    def _value_of(self, expr, what: str):
        name = type(expr).__name__
        if name == "Tuple":
            return [self._value_of(f, what) for f in expr.fields]
        if name in ("GenericConst", "Constant"):
            return self._const(expr)
        if expr in self.values:
            return self.values[expr]
        raise UnsupportedOpError(f"{what}: {expr} ({name}) is not a value the standalone emitter knows")

    # -- main -------------------------------------------------------------------------------

    def run(self) -> None:
        func = self.func
        for i, param in enumerate(func.params):
            shape, dtype = _static_shape(param.ty, f"input {i} ({_var_name(param)!r}) of main")
            tensor = _Tensor(shape, dtype, "input", i)
            self.inputs.append(tensor)
            self.values[param] = tensor
        body = func.body
        if type(body).__name__ != "SeqExpr":
            raise UnsupportedOpError(f"main's body is a {type(body).__name__}, not a sequence of bindings")
        for block in body.blocks:
            for binding in block.bindings:
                self.step += 1
                self._binding(binding)
        self.step += 1
        self.outputs = self._flatten(self._value_of(body.body, "the return value of main"), "main")
        for tensor in self.outputs:
            self._use(tensor)

    def _binding(self, binding) -> None:
        where = self._where(binding)
        if type(binding).__name__ != "VarBinding":
            raise UnsupportedOpError(f"{where}: a {type(binding).__name__} (dynamic shape matching); the standalone "
                                     "runtime needs static shapes")
        var, value = binding.var, binding.value
        kind = type(value).__name__
        if kind == "Tuple":
            self.values[var] = [self._value_of(f, where) for f in value.fields]
            return
        if kind == "TupleGetItem":
            items = self._value_of(value.tuple_value, where)
            self.values[var] = items[int(value.index)]
            return
        if kind in ("Var", "DataflowVar"):
            self.values[var] = self._value_of(value, where)
            return
        if kind in ("GenericConst", "Constant"):
            self.values[var] = self._const(value)
            return
        if kind != "Call":
            raise UnsupportedOpError(f"{where}: a {kind} ({str(value)[:80]}); the standalone emitter handles a "
                                     "straight line of calls (no control flow)")
        op = value.op
        op_kind = type(op).__name__
        if op_kind == "Op":
            self._op(var, value, op.name, where)
        elif op_kind == "ExternFunc":
            self._builtin(var, value, str(op.global_symbol), where)
        elif op_kind == "GlobalVar":
            self._kernel(var, value, op.name_hint, where)
        else:
            raise UnsupportedOpError(f"{where}: a call of {op_kind} {op}; not supported by the standalone emitter")

    def _op(self, var, call, name: str, where: str) -> None:
        if name == "relax.vm.alloc_storage":
            (nbytes,) = _int_values(call.args[0], f"{where}: alloc_storage")
            scope = str(getattr(call.args[3], "value", "global")) if len(call.args) > 3 else "global"
            if scope != "global":
                raise UnsupportedOpError(f"{where}: storage scope {scope!r}; the standalone runtime has CPU memory only")
            self.storages.append(_Storage(int(nbytes), self.step, self.step))
            self.values[var] = len(self.storages) - 1
        elif name == "relax.vm.alloc_tensor":
            storage = self.values.get(call.args[0])
            if not isinstance(storage, int):
                raise UnsupportedOpError(f"{where}: alloc_tensor from {call.args[0]}, which is not a static storage")
            offset = int(getattr(call.args[1], "value", call.args[1]))
            shape = tuple(_int_values(call.args[2], f"{where}: alloc_tensor"))
            dtype = str(getattr(call.args[3], "value", call.args[3]))
            tensor = _Tensor(shape, dtype, "arena", storage, offset)
            if offset + tensor.nbytes > self.storages[storage].nbytes:
                raise BuildError(f"{where}: a {tensor.nbytes}-byte tensor at offset {offset} does not fit its "
                                 f"{self.storages[storage].nbytes}-byte storage")
            self.values[var] = tensor
        elif name in _NO_CODE_OPS:
            self.values[var] = None
        else:
            raise UnsupportedOpError(f"{where}: the Relax VM operator {name!r} is not supported by the standalone "
                                     "emitter (it handles alloc_storage, alloc_tensor, kill_object and direct kernel "
                                     "calls); build with the TVM runtime (--runtime tvm) instead")

    def _builtin(self, var, call, symbol: str, where: str) -> None:
        if symbol in _NO_CODE_BUILTINS:
            # static shapes: the checks held when the input types were read
            self.values[var] = None
        elif symbol == "vm.builtin.reshape":
            source = self._tensor(call.args[0], where)
            shape = tuple(_int_values(call.args[1], f"{where}: reshape"))
            view = _Tensor(shape, source.dtype, source.base, source.index, source.offset)
            if view.nbytes != source.nbytes:
                raise BuildError(f"{where}: reshape from {source.shape} to {shape} changes the size")
            self._use(source)
            self.values[var] = view
        else:
            raise UnsupportedOpError(f"{where}: the packed function {symbol!r} is not supported by the standalone "
                                     "emitter (it needs the TVM runtime); build with --runtime tvm, or change the "
                                     "model so that TVM lowers this op to a kernel")

    def _kernel(self, var, call, name: str, where: str) -> None:
        if not _C_NAME.match(name):
            raise UnsupportedOpError(f"{where}: kernel name {name!r} is not a C identifier")
        args: list = []
        for a in call.args:
            kind = type(a).__name__
            if kind in ("IntImm", "FloatImm") or (kind == "PrimValue"):
                v = getattr(a, "value", a)
                v = getattr(v, "value", v)
                args.append(("float" if isinstance(v, float) else "int", v))
                continue
            if kind == "StringImm":
                raise UnsupportedOpError(f"{where}: kernel {name} takes a string argument; not supported")
            tensor = self._tensor(a, f"{where} (kernel {name})")
            self._use(tensor)
            args.append(tensor)
        self.calls.append((name, args))
        self.call_steps.append(self.step)
        self.values[var] = None

    # -- the arena --------------------------------------------------------------------------

    def add_workspaces(self, sizes: dict[str, int]) -> None:
        """Each call of a kernel that allocates workspace gets a storage alive during that call
        only: the planner overlaps it with tensors that are dead by then or not yet made."""
        for i, (name, _) in enumerate(self.calls):
            if sizes.get(name, 0) > 0:
                step = self.call_steps[i]
                self.storages.append(_Storage(sizes[name], step, step))
                self.workspaces[i] = len(self.storages) - 1

    def plan(self) -> int:
        """Offsets of the storages: largest first, each at the lowest aligned offset that no
        storage alive at the same time occupies. Returns the peak."""
        placed: list[_Storage] = []
        for storage in sorted(self.storages, key=lambda s: (-s.nbytes, s.first)):
            busy = sorted((p.offset, p.offset + _align(p.nbytes)) for p in placed
                          if p.first <= storage.last and storage.first <= p.last)
            offset = 0
            for lo, hi in busy:
                if offset + _align(storage.nbytes) <= lo:
                    break
                offset = max(offset, hi)
            storage.offset = offset
            placed.append(storage)
        return max((s.offset + _align(s.nbytes) for s in self.storages), default=0)


# --------------------------------------------------------------------------------------------
# Workspace: the kernels' TVMBackendAllocWorkspace calls, read from the lowered TIR


def _workspace_sizes(tvm, tir_mod, target) -> dict[str, int]:
    """Per kernel, an upper bound of the workspace it holds at once: the sum of its (64-byte
    aligned) TVMBackendAllocWorkspace sizes after TVM's TIR lowering."""
    # as tvm.tirx.build lowers the kernels (its steps 3-6, host only)
    tir_mod = tvm.tirx.transform.BindTarget(target.with_host(target))(tir_mod)
    pipeline, finalize_host, _ = tvm.tirx.get_tir_pipeline("default")
    with target:
        lowered = finalize_host()(pipeline(tir_mod))
    sizes_of: dict[str, int] = {}
    for gvar, func in lowered.functions.items():
        # (this TVM has no Python TIR visitor; the printed TIR names each call with its size)
        text = func.script()
        calls = text.count("TVMBackendAllocWorkspace(")
        sizes = [int(n) for n in _WORKSPACE_CALL.findall(text)]
        if len(sizes) != calls:
            raise UnsupportedOpError(f"kernel {gvar.name_hint} allocates a workspace of non-constant size; the "
                                     "standalone runtime needs static sizes")
        if len(sizes) > _WORKSPACE_DEPTH:
            raise UnsupportedOpError(f"kernel {gvar.name_hint} allocates {len(sizes)} workspace blocks; fxopt's "
                                     f"runtime shim holds at most {_WORKSPACE_DEPTH} (FXOPT_WORKSPACE_DEPTH)")
        sizes_of[gvar.name_hint] = sum(_align(n) for n in sizes)
    return sizes_of


# --------------------------------------------------------------------------------------------
# C text


def _model_c(em: _Emitter, arena_bytes: int, const_offsets: list[int], model: str, target: Target) -> str:
    lines = [f"/* fxopt standalone model: {model} for target {target.name}. Generated; do not edit. */",
             "#include <stdint.h>", "#include <string.h>", '#include "fxopt_runtime.h"', '#include "fxopt_model.h"',
             ""]
    for name in sorted({name for name, _ in em.calls}):
        lines.append(f"FXOPT_KERNEL({name});")
    lines += ["", "/* the weights: fxopt_model_constants.bin, linked by fxopt_model_constants.S (.incbin) */",
              "extern const uint8_t fxopt_model_constants[];", "",
              f"/* the tensors' storages and each kernel call's workspace, placed by liveness "
              f"({arena_bytes} bytes) */",
              "static uint8_t fxopt_arena[FXOPT_MODEL_ARENA_BYTES] FXOPT_ARENA_ATTRIBUTES;", ""]

    def data_expr(t: _Tensor) -> str:
        if t.base == "arena":
            return f"(void*)(fxopt_arena + {em.storages[t.index].offset + t.offset})"
        if t.base == "const":
            return f"(void*)(fxopt_model_constants + {const_offsets[t.index] + t.offset})"
        return "NULL"  # inputs: set by fxopt_model_run

    shapes: dict[tuple[int, ...], str] = {}
    declared: dict[tuple, str] = {}
    from_inputs: list[tuple[str, int, int]] = []

    def dltensor(t: _Tensor) -> str:
        key = (t.shape, t.dtype, t.base, t.index, t.offset)
        if key in declared:
            return declared[key]
        if t.shape not in shapes:
            shapes[t.shape] = f"fxopt_shape{len(shapes)}"
            dims = ", ".join(str(d) for d in t.shape) or "1"
            lines.append(f"static const int64_t {shapes[t.shape]}[] = {{{dims}}};")
        code, bits, lanes = _dtype_fields(t.dtype)
        name = f"fxopt_t{len(declared)}"
        const = "const "
        if t.base == "input":  # its data pointer is set by fxopt_model_run
            const = ""
            from_inputs.append((name, t.index, t.offset))
        lines.append(f"static {const}DLTensor {name} = {{{data_expr(t)}, {{kDLCPU, 0}}, {len(t.shape)}, "
                     f"{{{code}, {bits}, {lanes}}}, (int64_t*){shapes[t.shape]}, NULL, 0}};")
        declared[key] = name
        return name

    for t in em.inputs:
        dltensor(t)
    call_arrays = []
    for i, (name, args) in enumerate(em.calls):
        items = []
        for a in args:
            if isinstance(a, _Tensor):
                items.append(f"FXOPT_ARG_TENSOR(&{dltensor(a)})")
            elif a[0] == "int":
                items.append(f"FXOPT_ARG_INT({int(a[1])})")
            else:
                items.append(f"FXOPT_ARG_FLOAT({float(a[1])!r})")
        call_arrays.append(f"static const TVMFFIAny fxopt_call{i}[] = {{{', '.join(items)}}};")
    lines += [""] + call_arrays + [""]
    lines.append(f"const size_t fxopt_model_input_bytes[FXOPT_MODEL_NUM_INPUTS] = "
                 f"{{{', '.join(str(t.nbytes) for t in em.inputs)}}};")
    lines.append(f"const size_t fxopt_model_output_bytes[FXOPT_MODEL_NUM_OUTPUTS] = "
                 f"{{{', '.join(str(t.nbytes) for t in em.outputs)}}};")
    lines += ["", "int fxopt_model_run(const void* const* inputs, void* const* outputs) {",
              "  TVMFFIAny result;",
              "  fxopt_runtime_begin();"]
    for i, t in enumerate(em.inputs):
        lines.append(f"  if (!fxopt_runtime_aligned(inputs[{i}], {i})) return -1;")
    for name, index, offset in from_inputs:
        lines.append(f"  {name}.data = (void*)((const uint8_t*)inputs[{index}] + {offset});")
    workspace_set = False
    for i, (name, args) in enumerate(em.calls):
        if i in em.workspaces:
            ws = em.storages[em.workspaces[i]]
            lines.append(f"  fxopt_runtime_workspace(fxopt_arena + {ws.offset}, {_align(ws.nbytes)});")
            workspace_set = True
        elif workspace_set:  # the last call's workspace may hold live tensors now
            lines.append("  fxopt_runtime_workspace(NULL, 0);")
            workspace_set = False
        lines.append(f"  FXOPT_CALL({name}, fxopt_call{i}, {len(args)});")
    for i, t in enumerate(em.outputs):
        if t.base == "input":
            source = f"(const uint8_t*)inputs[{t.index}] + {t.offset}"
        else:
            source = f"(const uint8_t*){data_expr(t)}"
        lines.append(f"  memcpy(outputs[{i}], {source}, {t.nbytes});")
    lines += ["  return 0;", "}", ""]
    return "\n".join(lines)


def _model_h(em: _Emitter, arena_bytes: int, model: str, target: Target, sig_inputs: list[dict],
             sig_outputs: list[dict]) -> str:
    def describe(kind: str, specs: list[dict]) -> list[str]:
        return [f" *   {kind} {i}: {s['name']} {s['dtype']}[{']['.join(str(d) for d in s['shape'])}] "
                f"({s['bytes']} bytes)" for i, s in enumerate(specs)]

    return "\n".join([
        f"/* fxopt standalone model: {model} for target {target.name}. Generated; do not edit.",
        " *",
        " *   int fxopt_model_run(const void* const* inputs, void* const* outputs);",
        " *",
        " * runs one inference: inputs[i] and outputs[i] point to dense row-major buffers of the sizes",
        " * below (inputs FXOPT_MODEL_ALIGN-byte aligned); returns 0, or -1 with fxopt_model_last_error()",
        " * saying what failed. Not reentrant: one static arena holds the intermediate tensors.",
        *describe("input", sig_inputs),
        *describe("output", sig_outputs),
        " */",
        "#ifndef FXOPT_MODEL_H_", "#define FXOPT_MODEL_H_", "#include <stddef.h>", "",
        "#ifdef __cplusplus", 'extern "C" {', "#endif", "",
        f"#define FXOPT_MODEL_NUM_INPUTS {len(em.inputs)}",
        f"#define FXOPT_MODEL_NUM_OUTPUTS {len(em.outputs)}",
        f"#define FXOPT_MODEL_ALIGN {ALIGN}",
        f"#define FXOPT_MODEL_ARENA_BYTES {arena_bytes}u",
        *[f"#define FXOPT_MODEL_INPUT{i}_BYTES {t.nbytes}u" for i, t in enumerate(em.inputs)],
        *[f"#define FXOPT_MODEL_OUTPUT{i}_BYTES {t.nbytes}u" for i, t in enumerate(em.outputs)],
        f"#define FXOPT_MODEL_IO_MAX_BYTES {max(t.nbytes for t in em.inputs + em.outputs)}u",
        "", "extern const size_t fxopt_model_input_bytes[FXOPT_MODEL_NUM_INPUTS];",
        "extern const size_t fxopt_model_output_bytes[FXOPT_MODEL_NUM_OUTPUTS];",
        "int fxopt_model_run(const void* const* inputs, void* const* outputs);",
        "const char* fxopt_model_last_error(void);",
        "size_t fxopt_model_workspace_peak(void); /* most workspace bytes held at once so far */",
        "", "#ifdef __cplusplus", "}", "#endif", "#endif  /* FXOPT_MODEL_H_ */", ""])


_CONSTANTS_S = """/* fxopt standalone model: the weights ({nbytes} bytes), linked from the binary blob. */
  .section .rodata.fxopt_model_constants,"a"
  .balign {align}
  .global fxopt_model_constants
  .type fxopt_model_constants, %object
fxopt_model_constants:
  .incbin "fxopt_model_constants.bin"
  .size fxopt_model_constants, {nbytes}
  .section .note.GNU-stack,"",%progbits
"""


# --------------------------------------------------------------------------------------------
# Entry point


def emit(mod, target: Target | str, directory: Path | str, *, model: str = "model") -> StandaloneSources:
    """Run the target's Relax pipeline on ``mod`` (from :func:`lower`), build the kernels and
    write the standalone C sources into ``directory``. UnsupportedOpError names the binding of
    ``main`` that cannot be written as C (dynamic shapes, a builtin that needs the runtime)."""
    from . import _cpu_pipeline, _first_line, _signature, _tvm, resolve_target

    target = get_target(target)
    if target.tvm.get("kind") != "llvm":
        raise TargetError(f"the standalone runtime is for CPU targets; target {target.name!r} is "
                          f"{target.tvm.get('kind')}")
    tvm = _tvm()
    from tvm import relax

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    resolved = resolve_target(target)
    tvm_target = tvm.target.Target(resolved)
    signature = _signature(mod)
    for spec in signature["inputs"] + signature["outputs"]:
        if spec["shape"] is None or any(d is None for d in spec["shape"]):
            raise UnsupportedOpError(
                f"{spec['name']} has shape {spec['shape']} (dtype {spec['dtype']}): the standalone runtime needs "
                "static shapes; compile with fixed-size example inputs, or use the TVM runtime (--runtime tvm)")
    if target.schedule == "tvm":
        pipeline = relax.get_default_pipeline(tvm_target)
    else:
        pipeline = _cpu_pipeline(mod, target, tvm_target, None, {}, {})
    try:
        with tvm_target:
            lowered = pipeline(mod)
    except Exception as exc:  # noqa: BLE001 - TVM raises many kinds
        raise BuildError(f"TVM's Relax pipeline failed for target {target.name!r}: {_first_line(exc)}") from exc
    em = _Emitter(lowered["main"])
    em.run()
    unplanned = sum(_align(s.nbytes) for s in em.storages)
    storage_bytes = em.plan()  # the tensors alone (a figure), then with the workspaces (the arena)
    tir_mod = tvm.IRModule({gv: f for gv, f in lowered.functions.items() if type(f).__name__ == "PrimFunc"})
    workspaces = _workspace_sizes(tvm, tir_mod, tvm_target) if tir_mod.functions else {}
    em.add_workspaces(workspaces)
    arena = em.plan()
    workspace = max((em.storages[i].nbytes for i in em.workspaces.values()), default=0)
    used = {name for name, _ in em.calls}
    try:
        # build the lowered module as it is: the kernels keep the names main calls. Without the
        # kernels' argument checks (type, ndim, dtype, shape, strides, device of every tensor, with
        # their messages: about 4 KB per kernel on rv32, most of its code): fxopt_model.c passes
        # static DLTensors that match by construction, and checks what its caller gives.
        with tvm.transform.PassContext(config={"tirx.disable_assert": True}):
            executable = relax.build(lowered, target=tvm_target, relax_pipeline=None)
        executable.mod.imports[0].write_to_file(str(directory / "fxopt_kernels.o"))
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"TVM could not build the kernels for target {target.name!r}: {_first_line(exc)}") from exc
    files = ["fxopt_kernels.o"]

    offsets, blob = [], bytearray()
    for raw in em.constants:
        offsets.append(len(blob))
        blob += raw + bytes(_align(len(raw)) - len(raw))
    (directory / "fxopt_model_constants.bin").write_bytes(bytes(blob))
    (directory / "fxopt_model_constants.S").write_text(_CONSTANTS_S.format(nbytes=len(blob), align=ALIGN))

    def specs(tensors: list[_Tensor], sig: list[dict]) -> list[dict]:
        return [{"name": s["name"], "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes}
                for t, s in zip(tensors, sig)]

    if len(em.outputs) != len(signature["outputs"]):
        raise BuildError(f"main returns {len(em.outputs)} tensors, its type says {len(signature['outputs'])}")
    inputs, outputs = specs(em.inputs, signature["inputs"]), specs(em.outputs, signature["outputs"])
    (directory / "fxopt_model.c").write_text(_model_c(em, arena, offsets, model, target))
    (directory / "fxopt_model.h").write_text(_model_h(em, max(arena, 1), model, target, inputs, outputs))
    files += ["fxopt_model.c", "fxopt_model.h", "fxopt_model_constants.bin", "fxopt_model_constants.S"]
    result = StandaloneSources(directory, files, inputs, outputs, max(arena, 1), storage_bytes, unplanned,
                               workspace, len(blob), sorted(used), len(em.calls))
    (directory / "fxopt_model.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    result.files.append("fxopt_model.json")
    return result
