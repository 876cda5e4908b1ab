"""The TVM adapter: this package is the only part of fxopt that imports ``tvm``.

    lower(module, example_inputs)  torch.export + Relax frontend -> tvm.IRModule
    build(mod, target, tune=)      per-target Relax pipeline + codegen -> CompiledLibrary
    CompiledLibrary.run/save/time  run on this machine, export a shared library, time it
    CompiledLibrary.kernel_times   where the time of a run goes, per kernel
    load(path, target)             a saved library back as a CompiledLibrary

Beside it: ``cpu_schedules`` (fxopt's CPU layout, legalization and schedule rules),
``tuning`` (MetaSchedule with a database), ``rpc`` and ``timing`` (for :mod:`fxopt.measure`).

``tvm`` is imported lazily, inside the functions, so that importing this module costs nothing
and fxopt without TVM still imports. Notes on TVM 0.27 (Relax only) that shaped this module:

* Target strings (``"llvm -mcpu=native"``) are gone: targets are JSON dicts, and ``native`` is not
  a CPU name LLVM accepts, so :func:`resolve_target` asks LLVM for the host CPU and triple.
* ``tvm.compile`` without ``relax_pipeline`` does not fuse on CPU, and TVM's CPU pipeline
  schedules no kernel; :func:`build` passes fxopt's CPU pipeline (or, with the target's
  schedule strategy ``tvm``, TVM's own) explicitly.
* The Relax ``main`` of an imported ExportedProgram always returns a tuple (one field per
  output); the VM hands back a ``tvm_ffi`` Array of Tensors, possibly nested.
* The VM logs "Scope Saving:" / "Scope Loaded:" warnings on stderr (C++ ``LOG(WARNING)``, no
  switch to turn them off) when a library is exported or loaded; they are filtered out here at
  the file-descriptor level, other stderr output passes through.
* Each built library carries its own input/output signature as an extra Relax function
  (``fxopt_signature``, a JSON string as a uint8 tensor), so a loaded library validates inputs
  without the manifest.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time as _time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from fxopt.errors import ArtifactError, BuildError, InputError, TargetError

from .. import Target, get_target

if TYPE_CHECKING:  # pragma: no cover
    import tvm

__all__ = ["versions", "resolve_target", "lower", "build", "load", "CompiledLibrary"]

SIGNATURE_FUNC = "fxopt_signature"
_ENTRY = "main"
# C++ LOG(WARNING) lines of TVM that say nothing to an fxopt user.
_VM_NOISE = (b"Scope Saving:", b"Scope Loaded:", b"BlockBuilder destroyed with remaining blocks")


# --------------------------------------------------------------------------------------------
# TVM import and small helpers


def _tvm():
    # TVM's thread pool defaults to half the hardware threads on x86 (it assumes SMT), one
    # thread on a 2-core machine: run on every core this process may use unless told otherwise.
    if "TVM_NUM_THREADS" not in os.environ:
        from .. import allowed_cpus

        os.environ["TVM_NUM_THREADS"] = str(len(allowed_cpus()) or 1)
    try:
        import tvm  # noqa: F401
        from tvm import relax  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the venv has it
        raise BuildError(
            f"Apache TVM is not importable ({exc}); install the pinned version with "
            "`pip install apache-tvm==0.27.0.post1`"
        ) from exc
    return tvm


def versions() -> dict[str, str]:
    """Versions of the compiler stack that a build depends on: tvm, tvm_ffi, llvm (major)."""
    tvm = _tvm()
    import tvm_ffi
    from tvm.target import codegen

    return {
        "tvm": str(tvm.__version__),
        "tvm_ffi": str(getattr(tvm_ffi, "__version__", "unknown")),
        "llvm": str(codegen.llvm_version_major()),
    }


@contextlib.contextmanager
def _quiet_vm_stderr() -> Iterator[None]:
    """Drop the VM's "Scope Saving/Loaded" log lines from fd 2; re-emit everything else."""
    fd = 2  # TVM's C++ logging writes to file descriptor 2, whatever sys.stderr is now
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed or odd stderr must not break a build
        pass
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [
                line
                for line in tmp.read().splitlines(keepends=True)
                if not any(noise in line for noise in _VM_NOISE)
            ]
            if kept:
                os.write(fd, b"".join(kept))


def _first_line(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip()
    # TVM errors carry a C++ traceback before the message; keep the message.
    lines = [ln for ln in text.splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(exc).__name__
    for ln in lines:
        if re.match(r"^\w*(Error|Exception)\b", ln.strip()):
            msg = ln.strip()
            break
    else:
        if lines and not lines[0].lstrip().startswith(("File ", "Traceback")):
            msg = lines[0]
    msg = msg.strip()
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Targets


def resolve_target(target: Target | str) -> dict:
    """The concrete TVM target dict for ``target`` on this build machine.

    ``"mcpu": "native"`` becomes LLVM's name for the host CPU (``llvm_get_system_cpu``); an LLVM
    target without ``mtriple`` gets the host triple (``llvm_get_system_triple``). Both only make
    sense when building for the build machine, so a target with a cross toolchain must name its
    CPU and triple.
    """
    target = get_target(target)
    tvm = _tvm()
    from tvm.target import codegen

    resolved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in target.tvm.items()}
    if resolved.get("kind") == "llvm":
        if target.toolchain is not None:
            missing = [k for k in ("mtriple",) if not resolved.get(k)]
            if missing or resolved.get("mcpu") == "native":
                raise TargetError(
                    f"target {target.name!r} cross-compiles with {target.toolchain!r} but its tvm "
                    "dict has no 'mtriple' or uses 'mcpu': 'native' (which means the build "
                    "machine's CPU); give the target's triple and CPU explicitly"
                )
        if resolved.get("mcpu") == "native":
            resolved["mcpu"] = str(codegen.llvm_get_system_cpu())
        if not resolved.get("mtriple"):
            resolved["mtriple"] = str(codegen.llvm_get_system_triple())
    try:
        tvm.target.Target(resolved)
    except Exception as exc:  # noqa: BLE001 - TVM raises ValueError/TVMError/RuntimeError
        raise TargetError(
            f"target {target.name!r}: TVM rejects the target dict {resolved}: {_first_line(exc)}"
        ) from exc
    return resolved


def _device(tvm, resolved: Mapping[str, Any]):
    kind = resolved.get("kind", "llvm")
    if kind in ("llvm", "c"):
        return tvm.cpu(0)
    return tvm.device(str(kind), 0)


# --------------------------------------------------------------------------------------------
# Lowering


def _stack_location(node) -> str:
    """'file:line: code' of the innermost user frame that created an fx node, or ''."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not frames:
        return ""
    path, line, func, code = frames[-1]
    where = f"{path}:{line} in {func}"
    return f"{where}: `{code.strip()}`" if code.strip() else where


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, mtype = list(stack.values())[-1]
    mtype = getattr(mtype, "__name__", None) or str(mtype).rsplit(".", 1)[-1].rstrip("'>")
    return f"module '{path}' ({mtype})" if path else ""


def _describe_node(node, with_op: bool = True) -> str:
    target = getattr(node, "target", None)
    op = f"{getattr(target, 'namespace', 'aten')}.{getattr(target, '__name__', target)}"
    parts = [f"node '{node.name}' ({op})" if with_op else f"node '{node.name}'"]
    for extra in (_module_path(node), _stack_location(node)):
        if extra:
            parts.append(extra)
    return ", ".join(parts)


def _failing_node(exc: BaseException):
    """The fx node the Relax frontend was converting when ``exc`` was raised, if it can tell."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if isinstance(node, torch.fx.Node) and node.op == "call_function":
            found = node  # keep the innermost one
        tb = tb.tb_next
    return found


def _release_frames(tb) -> None:
    """Drop the locals of the finished frames in a traceback (the trace itself stays printable)."""
    traceback.clear_frames(tb)
    tb = tb.tb_next if tb is not None else None  # the first frame is ours, still running
    while tb is not None:
        # Python 3.11 keeps a snapshot dict of f_locals once it has been read (_failing_node does).
        snapshot = tb.tb_frame.f_locals
        if type(snapshot) is dict:
            snapshot.clear()
        tb = tb.tb_next
    gc.collect()


def _unsupported_ops(exc: BaseException) -> list[str]:
    match = re.search(r"Unsupported function types \[([^\]]*)\]", str(exc))
    if not match:
        return []
    return sorted(set(re.findall(r"'([^']+)'", match.group(1))))


def _nodes_using(ep, op_names: Sequence[str]) -> dict[str, list]:
    """Nodes of the decomposed program (as the frontend sees it) per unsupported op name."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = ep.run_decompositions().graph
    except Exception:  # noqa: BLE001 - only used to improve a message
        graph = ep.graph
    found: dict[str, list] = {name: [] for name in op_names}
    for node in graph.nodes:
        name = getattr(node.target, "__name__", None)
        if node.op == "call_function" and name in found:
            found[name].append(node)
    return found


def _check_example_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise InputError(
            f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}"
        )
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise InputError(
                f"example input {i} is a {type(t).__name__}, not a torch.Tensor; lower() takes "
                "tensors only"
            )
    return tuple(example_inputs)


def lower(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    custom_convert_map: Mapping[str, Callable] | None = None,
) -> "tvm.IRModule":
    """Capture ``module`` with torch.export and import it into a Relax IRModule.

    Parameters are bound as constants (``keep_params_as_input=False``), so ``main`` takes the
    example inputs only. ``custom_convert_map`` maps aten op names (``"my_op.default"``) to Relax
    converters ``f(node, importer) -> relax.Var`` for ops the frontend does not know; fxopt's own
    ops (the sparse kernels of :mod:`.sparse`) are always converted. Raises BuildError naming the
    op, the fx node and its source line when the frontend cannot convert it.
    """
    _tvm()
    from tvm.relax.frontend.torch import from_exported_program

    example_inputs = _check_example_inputs(example_inputs)
    name = type(module).__name__
    with warnings.catch_warnings():
        # torch 2.13's own pytree deprecation, raised from inside torch.export.
        warnings.filterwarnings(
            "ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning
        )
        try:
            with torch.no_grad():
                ep = torch.export.export(module, example_inputs)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds
            raise BuildError(
                f"torch.export could not capture {name}: {_first_line(exc)}. Make forward() "
                "traceable for torch.export (no data-dependent Python control flow, tensor "
                "inputs only), or compile a traced fxopt GraphModule instead"
            ) from exc
        from . import sparse

        # fxopt's own ops (sparse kernels read their pattern from ep), then the caller's
        convert_map = {**sparse.converters(ep), **(custom_convert_map or {})}
        try:
            return from_exported_program(ep, keep_params_as_input=False, custom_convert_map=convert_map)
        except Exception as exc:  # noqa: BLE001 - the frontend raises AssertionError, ValueError...
            error = _frontend_error(name, ep, exc)
            # The failed importer's BlockBuilder is still open and referenced from the traceback;
            # free it now (quietly: TVM logs a warning when it goes) instead of at exit.
            with _quiet_vm_stderr():
                _release_frames(exc.__traceback__)
            raise error from exc


def _frontend_error(name: str, ep, exc: BaseException) -> BuildError:
    tvm_version = versions()["tvm"]
    ops = _unsupported_ops(exc)
    if ops:
        users = _nodes_using(ep, ops)
        described = []
        for op in ops:
            nodes = users.get(op) or []
            where = f" (used by {_describe_node(nodes[0], with_op=False)}" if nodes else ""
            if nodes and len(nodes) > 1:
                where += f", and {len(nodes) - 1} more"
            described.append(f"aten.{op}{where + ')' if where else ''}")
        plural = "s" if len(ops) > 1 else ""
        return BuildError(
            f"TVM's Relax frontend (tvm {tvm_version}) cannot convert op{plural} "
            f"{'; '.join(described)} in {name}. Replace {'them' if plural else 'it'} in the "
            "model with supported ops, or pass a converter for "
            f"{', '.join(repr(op) for op in ops)} in lower(custom_convert_map=...)"
        )
    node = _failing_node(exc)
    where = f" while converting {_describe_node(node)}" if node is not None else ""
    return BuildError(
        f"TVM's Relax frontend (tvm {tvm_version}) failed on {name}{where}: "
        f"{type(exc).__name__}: {_first_line(exc)}. The op or its arguments are not supported "
        "by this TVM version; rewrite that part of the model or pass a converter in "
        "lower(custom_convert_map=...)"
    )


# --------------------------------------------------------------------------------------------
# Signatures: input/output names, shapes and dtypes of Relax main


def _dims(shape) -> list[int | None]:
    values = getattr(shape, "values", None)
    if values is None:
        return []
    out: list[int | None] = []
    for d in values:
        v = getattr(d, "value", d)
        out.append(int(v) if isinstance(v, (int, np.integer)) else None)  # None: symbolic
    return out


def _tensor_specs(ty, prefix: str) -> list[dict]:
    fields = getattr(ty, "fields", None)
    if fields is not None:  # a (possibly nested) tuple
        specs: list[dict] = []
        for f in fields:
            specs.extend(_tensor_specs(f, prefix))
        return specs
    shape = getattr(ty, "shape", None)
    return [{"name": prefix, "shape": _dims(shape) if shape is not None else None,
             "dtype": str(getattr(ty, "dtype", "unknown"))}]


def _signature(mod) -> dict:
    func = mod[_ENTRY]
    inputs = []
    for i, param in enumerate(func.params):
        pname = getattr(param, "name", None) or getattr(param, "name_hint", None) or f"input{i}"
        spec = _tensor_specs(param.ty, str(pname))
        inputs.append(spec[0] if len(spec) == 1 else {"name": str(pname), "shape": None,
                                                      "dtype": "tuple"})
    outputs = _tensor_specs(func.ret_ty, "output")
    for i, spec in enumerate(outputs):
        spec["name"] = f"output{i}"
    return {"inputs": inputs, "outputs": outputs}


def _with_signature(mod, signature: dict):
    from tvm import relax

    payload = np.frombuffer(json.dumps(signature, sort_keys=True).encode(), dtype=np.uint8)
    bb = relax.BlockBuilder()
    with bb.function(SIGNATURE_FUNC, []):
        bb.emit_func_output(relax.const(payload.copy()))
    mod = mod.clone()
    mod[SIGNATURE_FUNC] = bb.get()[SIGNATURE_FUNC]
    return mod


# --------------------------------------------------------------------------------------------
# Build


SCHEDULES = ("default", "tvm")


def build(mod: "tvm.IRModule", target: Target | str, *, tune=None) -> "CompiledLibrary":
    """Compile a Relax IRModule for ``target``.

    CPU targets get fxopt's pipeline (:mod:`.cpu_schedules`: NHWC with pre-packed weights, a
    schedule for every kernel from the target's capabilities) when the target's schedule
    strategy is ``default``, or TVM's own CPU pipeline, which schedules nothing, with ``tvm``.
    ``tune`` (a :class:`fxopt.TuneConfig`) tunes the kernels with MetaSchedule first, keeping
    the records in its database; kernels the database has are built with the tuned schedule,
    the others with the default rules. GPU targets use TVM's default (dlight) pipeline.
    """
    target = get_target(target)
    tvm = _tvm()
    from tvm import relax

    if not isinstance(mod, tvm.IRModule) or _ENTRY not in [gv.name_hint for gv in mod.get_global_vars()]:
        raise BuildError(
            f"build() expects a Relax IRModule with a '{_ENTRY}' function (from lower()), "
            f"got {type(mod).__name__}"
        )
    if target.schedule not in SCHEDULES:
        raise TargetError(
            f"target {target.name!r} asks for schedule strategy {target.schedule!r}, which this "
            f"fxopt version does not have; use one of {', '.join(SCHEDULES)}"
        )
    resolved = resolve_target(target)
    tvm_target = tvm.target.Target(resolved)
    kind = resolved["kind"]
    if kind == "cuda":
        _enable_cuda_codegen(tvm)
    elif kind != "llvm" and tvm.get_global_func(f"target.build.{kind}", allow_missing=True) is None:
        raise TargetError(
            f"target {target.name!r}: this apache-tvm build has no {kind} code generator "
            f"(target.build.{kind} is missing); use a TVM built with {kind} support to build for it"
        )
    signature = _signature(mod)
    # CPU: a pipeline must be asked for, or nothing is fused; GPU targets get their own default
    # (dlight schedules) from tvm.compile. Inside `with`: the CUDA compile callback reads the
    # architecture from the current target.
    if tune is not None and kind != "llvm":
        raise TargetError(f"tuning is for CPU targets; target {target.name!r} is {kind}")
    offloaded = None
    if target.offload:
        from . import offload

        mod, offloaded = offload.offload(mod, target.offload, target.name)
    pipeline, tuning_log, fusion_log = {}, {}, {}
    if kind == "llvm" and target.schedule == "tvm":
        pipeline = {"relax_pipeline": relax.get_default_pipeline(tvm_target)}
    elif kind == "llvm":
        pipeline = {"relax_pipeline": _cpu_pipeline(mod, target, tvm_target, tune, tuning_log, fusion_log)}
    try:
        with tvm_target:
            executable = tvm.compile(_with_signature(mod, signature), target=tvm_target, **pipeline)
    except Exception as exc:  # noqa: BLE001 - TVM errors are many types
        raise BuildError(
            f"TVM could not compile the model for target {target.name!r} ({resolved}): "
            f"{type(exc).__name__}: {_first_line(exc)}. Run with the `--debug` flag for TVM's "
            "full trace; if an op is the cause, rewrite it in the model"
        ) from exc
    library = CompiledLibrary(executable, target, signature, resolved=resolved)
    library.tuning = tuning_log or None
    library.fusion = fusion_log["summary"].to_json() if "summary" in fusion_log else None
    library.offloaded = dict(offloaded) if offloaded is not None else None
    return library


def schedule_params(target: Target):
    """The default CPU rules' parameters for ``target``, from its capabilities."""
    from .cpu_schedules import CpuScheduleParams

    cores = target.cores
    if cores is None and target.runs_here():
        from .. import allowed_cpus

        cores = len(allowed_cpus())
    return CpuScheduleParams.from_capabilities(target.capabilities.vector_bits, target.arch, cores or 4)


def fusion_summary(mod: "tvm.IRModule", target: Target | str = "host"):
    """The kernels a CPU build of ``mod`` would have (a :class:`.fusion.FusionSummary`: ops per
    kernel, intermediate tensors, unfused epilogues), without scheduling or building."""
    tvm = _tvm()
    from . import cpu_schedules, fusion

    target = get_target(target)
    if target.tvm.get("kind") != "llvm":
        raise TargetError(f"fusion_summary reads fxopt's CPU pipeline; target {target.name!r} is not a CPU target")
    sink: dict = {}
    tvm_target = tvm.target.Target(resolve_target(target))
    inspect = fusion.inspect_pass(sink)
    with tvm_target:
        passes = cpu_schedules._fusion_passes(tvm_target, schedule_params(target), inspect)
        tvm.transform.Sequential(passes[:passes.index(inspect) + 1])(mod)
    return sink["summary"]


def _cpu_pipeline(mod, target: Target, tvm_target, tune, tuning_log: dict, fusion_log: dict):
    """fxopt's CPU pipeline; with ``tune``, the kernels are tuned first (MetaSchedule, records
    kept in the database) and the database's schedules applied before the default rules.
    ``tuning_log`` receives what tuning did (TuneSummary.to_json()), ``fusion_log`` the kernels
    fusion made (fusion.FusionSummary under "summary")."""
    from . import cpu_schedules, fusion

    params = schedule_params(target)
    tuned = None
    if tune is not None:
        from . import tuning

        fused = cpu_schedules.fused_module(mod, tvm_target, params)
        ordered = cpu_schedules.rules(params)
        summary = tuning.tune(fused, tvm_target, tune, target=target,
                              default_schedule=lambda func, t: cpu_schedules.schedule_function(func, t, ordered)[1])

        @tvm_module_pass("fxopt.ApplyTuningDatabase")
        def apply_tuned(module):
            module, applied = tuning.apply_database(module, tvm_target, tune.database_path, target=target)
            summary.applied = applied
            tuning_log.update(summary.to_json())
            return module

        tuned = apply_tuned

    return cpu_schedules.relax_pipeline(tvm_target, params, tuned=tuned, inspect=fusion.inspect_pass(fusion_log))


def tvm_module_pass(name: str):
    """A Python function ``IRModule -> IRModule`` as a TVM module pass."""
    tvm = _tvm()

    def wrap(function):
        return tvm.transform.module_pass(lambda mod, _ctx: function(mod), opt_level=0, name=name)

    return wrap


# --------------------------------------------------------------------------------------------
# CUDA code generation on a machine without an NVIDIA driver

_CUDA_MODULE_LOADER = "ffi.Module.load_from_bytes.cuda"


def _enable_cuda_codegen(tvm) -> None:
    """Make TVM able to build CUDA modules (nvcc to a fatbin), driver or not.

    TVM's CUDA runtime library links against the driver's libcuda.so.1; where there is none,
    `import tvm` skips it silently and a CUDA build keeps raw CUDA source, which no C++
    runtime can load. Building needs none of the driver's functions, so a stub library with
    that name (generated from the symbols TVM imports, every one failing) is loaded first;
    then TVM's CUDA runtime library. NVRTC needs the cuda-bindings package: without it, nvcc.
    """
    if tvm.get_global_func(_CUDA_MODULE_LOADER, allow_missing=True) is None:
        runtime_cuda = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
        if not runtime_cuda.is_file():
            raise TargetError("this apache-tvm wheel has no CUDA runtime library (lib/libtvm_runtime_cuda.so)")
        import ctypes

        try:
            ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            ctypes.CDLL(str(_driver_stub(runtime_cuda)), mode=ctypes.RTLD_GLOBAL)
        try:
            ctypes.CDLL(str(runtime_cuda), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise TargetError(
                f"TVM's CUDA runtime library does not load ({exc}); install the CUDA toolkit's runtime (libcudart)"
            ) from exc
        if tvm.get_global_func(_CUDA_MODULE_LOADER, allow_missing=True) is None:
            raise TargetError("TVM's CUDA runtime library loaded but registered no CUDA module loader")
    import importlib.util

    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        if shutil.which("nvcc") is None:
            raise TargetError("building for CUDA needs nvcc (the CUDA toolkit) on PATH, or the cuda-bindings package")
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")


def _driver_stub(runtime_cuda: Path) -> Path:
    """A libcuda.so.1 whose every function (those TVM's CUDA runtime imports) fails with
    CUDA_ERROR_NO_DEVICE; built once with the host C compiler and cached. Never shipped."""
    import hashlib
    import subprocess

    nm = shutil.which("nm")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if nm is None or compiler is None:
        raise TargetError("building for CUDA without an NVIDIA driver needs nm and a C compiler (binutils, gcc)")
    listing = subprocess.run([nm, "-D", "--undefined-only", str(runtime_cuda)], capture_output=True, text=True, check=True)
    symbols = sorted({line.split()[-1] for line in listing.stdout.splitlines() if re.match(r"\s*U cu[A-Z]", line)})
    source = "/* generated by fxopt: no NVIDIA driver here, every call fails */\n" + "".join(
        f"int {symbol}(void) {{ return 100; /* CUDA_ERROR_NO_DEVICE */ }}\n" for symbol in symbols)
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    directory = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fxopt" / "cuda-driver-stub" / key
    library = directory / "libcuda.so.1"
    if not library.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            (Path(scratch) / "stub.c").write_text(source)
            built = Path(scratch) / "libcuda.so.1"
            subprocess.run([compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(built),
                            str(Path(scratch) / "stub.c")], check=True, capture_output=True)
            os.replace(built, library)
    return library


# --------------------------------------------------------------------------------------------
# Compiled library


def _as_numpy(x: Any, index: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.dtype == torch.bfloat16:
            raise InputError(f"input {index}: bfloat16 tensors cannot be passed to the runtime")
        return np.ascontiguousarray(x.numpy())
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x)
    raise InputError(
        f"input {index} is a {type(x).__name__}; pass torch tensors or numpy arrays"
    )


def _flatten(value, out: list[np.ndarray]) -> list[np.ndarray]:
    if hasattr(value, "numpy") and callable(value.numpy):  # tvm.runtime.Tensor
        out.append(value.numpy())
    elif isinstance(value, (str, bytes)):
        raise BuildError(f"the compiled model returned a {type(value).__name__}, not tensors")
    elif hasattr(value, "__len__") and hasattr(value, "__getitem__"):  # tvm_ffi Array / tuple
        for i in range(len(value)):
            _flatten(value[i], out)
    else:  # a scalar (PrimValue)
        out.append(np.asarray(value))
    return out


def _fmt_shape(shape) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


class CompiledLibrary:
    """A compiled model for one target: run it here, time it, or save it as a shared library.

    ``signature`` is ``{"inputs": [{"name", "shape", "dtype"}...], "outputs": [...]}``; a
    symbolic dimension is ``None``.
    """

    def __init__(
        self,
        module,
        target: Target,
        signature: dict | None,
        *,
        resolved: Mapping[str, Any] | None = None,
        path: Path | None = None,
    ) -> None:
        self._module = module  # tvm VMExecutable (fresh build) or runtime.Module (loaded)
        self.target = target
        self.signature = signature
        self.resolved_target = dict(resolved) if resolved is not None else None
        self.path = path
        self.tuning: dict | None = None  # what tuning did for this build (TuneSummary.to_json())
        self.fusion: dict | None = None  # the kernels fusion made (fusion.FusionSummary.to_json(); CPU builds)
        self.offloaded: dict | None = None  # CUDA: subgraphs each vendor library took ({"cublas": 3})
        self._loaded = path is not None
        self._vm = None
        self._dev = None

    def __repr__(self) -> str:
        n_in = len(self.signature["inputs"]) if self.signature else "?"
        n_out = len(self.signature["outputs"]) if self.signature else "?"
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"CompiledLibrary(target={self.target.name!r}, inputs={n_in}, outputs={n_out}{where})"

    # -- running ----------------------------------------------------------------------------

    def _check_runs_here(self) -> None:
        if not self.target.runs_here():
            from .. import host_arch

            raise TargetError(
                f"target {self.target.name!r} ({self.target.arch}, runner "
                f"{self.target.runner!r}) does not run on this machine ({host_arch()}); save() "
                "the library and run it with the target's runner"
            )

    def _vm_and_dev(self):
        if self._vm is None:
            self._check_runs_here()
            tvm = _tvm()
            from tvm import relax

            resolved = self.resolved_target or dict(self.target.tvm)
            self._dev = _device(tvm, resolved)
            try:
                self._vm = relax.VirtualMachine(self._module, self._dev)
            except Exception as exc:  # noqa: BLE001
                raise BuildError(
                    f"the TVM runtime could not start the compiled model for target "
                    f"{self.target.name!r}: {_first_line(exc)}"
                ) from exc
        return self._vm, self._dev

    def _arguments(self, tensors: Sequence[Any]) -> list:
        arrays = [_as_numpy(t, i) for i, t in enumerate(tensors)]
        sig = self.signature
        if sig is not None:
            expected = sig["inputs"]
            if len(arrays) != len(expected):
                names = ", ".join(f"{s['name']}{_fmt_shape(s['shape'])} {s['dtype']}" for s in expected)
                raise InputError(
                    f"the compiled model takes {len(expected)} input(s) ({names}), got "
                    f"{len(arrays)}"
                )
            for i, (arr, spec) in enumerate(zip(arrays, expected)):
                want_shape, want_dtype = spec["shape"], spec["dtype"]
                label = f"input {i} ({spec['name']!r})"
                if want_dtype != "tuple" and arr.dtype.name != want_dtype:
                    raise InputError(
                        f"{label}: expected dtype {want_dtype}, got {arr.dtype.name}; convert it "
                        f"(e.g. tensor.to(torch.{want_dtype}))"
                    )
                if want_shape is not None and (
                    arr.ndim != len(want_shape)
                    or any(w is not None and w != g for w, g in zip(want_shape, arr.shape))
                ):
                    raise InputError(
                        f"{label}: expected shape {_fmt_shape(want_shape)}, got "
                        f"{_fmt_shape(arr.shape)}; the library is compiled for fixed shapes, "
                        "compile again with example inputs of the new shape"
                    )
        else:  # a library without fxopt's signature: check the count at least
            vm, _ = self._vm_and_dev()
            arity = vm._get_function_arity(_ENTRY)
            if len(arrays) != arity:
                raise InputError(f"the compiled model takes {arity} input(s), got {len(arrays)}")
        tvm = _tvm()
        _, dev = self._vm_and_dev()
        return [tvm.runtime.tensor(a, dev) for a in arrays]

    def run(self, *tensors: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        """Run ``main`` on this machine; the outputs as a flat list of numpy arrays, in order."""
        self._check_runs_here()
        args = self._arguments(tensors)
        return _flatten(self._call(args), [])

    def _call(self, args: list):
        vm, _ = self._vm_and_dev()
        try:
            return vm[_ENTRY](*args)
        except Exception as exc:  # noqa: BLE001
            raise BuildError(
                f"the compiled model failed at run time on target {self.target.name!r}: "
                f"{_first_line(exc)}"
            ) from exc

    def time(self, *tensors: torch.Tensor | np.ndarray, repeat: int = 10, number: int = 1) -> list[float]:
        """Seconds per run: ``repeat`` measurements, each the mean of ``number`` back-to-back runs.

        Uses the VM's ``time_evaluator`` (which warms up once first); falls back to
        ``time.perf_counter`` around ``run`` where that is not available.
        """
        if repeat < 1 or number < 1:
            raise InputError(f"repeat and number must be >= 1, got repeat={repeat} number={number}")
        self._check_runs_here()
        args = self._arguments(tensors)
        vm, dev = self._vm_and_dev()
        evaluator = getattr(vm, "time_evaluator", None)
        if evaluator is not None:
            try:
                result = evaluator(_ENTRY, dev, number=number, repeat=repeat, min_repeat_ms=0)(*args)
                return [float(r) for r in result.results]
            except Exception:  # noqa: BLE001 - fall back to wall-clock timing below
                pass
        self._call(args)  # warm-up
        times = []
        for _ in range(repeat):
            start = _time.perf_counter()
            for _ in range(number):
                self._call(args)
            times.append((_time.perf_counter() - start) / number)
        return times

    def kernel_times(self, *tensors: torch.Tensor | np.ndarray, runs: int = 10) -> list[dict]:
        """Where the time goes: every function the VM calls (kernels, and its own builtins such as
        ``vm.builtin.alloc_tensor``) with its calls per run and median milliseconds per run,
        slowest first. Timed with the VM's instrumentation hook (wall clock around each call),
        so the figures include a microsecond or so of call overhead each."""
        import statistics

        if runs < 1:
            raise InputError(f"runs must be >= 1, got {runs}")
        self._check_runs_here()
        args = self._arguments(tensors)
        vm, _ = self._vm_and_dev()
        self._call(args)  # warm-up
        per_run: list[dict[str, list[float]]] = []
        started: dict[str, float] = {}

        def instrument(func, symbol, before, ret, *unused):  # noqa: ARG001 - TVM's signature
            if before:
                started[symbol] = _time.perf_counter()
            else:
                current = per_run[-1].setdefault(symbol, [])
                current.append(_time.perf_counter() - started.pop(symbol, _time.perf_counter()))
            return 0

        vm.set_instrument(instrument)
        try:
            for _ in range(runs):
                per_run.append({})
                self._call(args)
        finally:
            vm.set_instrument(None)
        rows = []
        for symbol in per_run[0]:
            totals = [sum(run.get(symbol, [])) * 1e3 for run in per_run]
            rows.append({"kernel": symbol, "calls": len(per_run[0][symbol]), "ms": statistics.median(totals)})
        return sorted(rows, key=lambda row: -row["ms"])

    # -- saving -----------------------------------------------------------------------------

    def save(self, path: Path | str) -> Path:
        """Export the library as a shared object; ``path`` is a file, or a directory to put
        ``target.library`` in. Native targets link with the host C compiler, cross targets with
        ``<toolchain>g++``. Returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / self.target.library
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._loaded:
            # A library loaded from disk: its .so is already the exported form.
            if self.path.resolve() != path.resolve():
                shutil.copyfile(self.path, path)
            return path
        kwargs = {}
        if self.target.toolchain is not None:
            from tvm.support import cc

            compiler = f"{self.target.toolchain}g++"
            if shutil.which(compiler) is None:
                raise TargetError(
                    f"target {self.target.name!r} links with {compiler!r}, which is not on PATH; "
                    f"install the cross toolchain (Debian: apt-get install g++-{self.target.toolchain.rstrip('-')})"
                )
            kwargs["fcompile"] = cc.cross_compiler(compiler)
        try:
            with _quiet_vm_stderr():
                self._module.export_library(str(path), **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise BuildError(
                f"exporting the compiled library to {path} failed: {_first_line(exc)}; check that "
                "a C++ compiler is installed" + (
                    f" ({self.target.toolchain}g++)" if self.target.toolchain else " (g++/cc)")
            ) from exc
        return path


def _read_signature(vm) -> dict | None:
    try:
        raw = vm[SIGNATURE_FUNC]()
        return json.loads(bytes(raw.numpy()).decode())
    except Exception:  # noqa: BLE001 - a library not built by fxopt
        return None


def load(path: Path | str, target: Target | str) -> CompiledLibrary:
    """A library saved by :meth:`CompiledLibrary.save`, ready to run on this machine."""
    target = get_target(target)
    path = Path(path)
    if path.is_dir():
        path = path / target.library
    if not path.is_file():
        raise ArtifactError(f"no compiled library at {path}; build it first (fxopt build ...)")
    if not target.runs_here():
        from .. import host_arch

        raise TargetError(
            f"{path} is built for target {target.name!r} ({target.arch}, runner "
            f"{target.runner!r}) and cannot be loaded on this machine ({host_arch()}); run it "
            "with the target's runner"
        )
    tvm = _tvm()
    try:
        with _quiet_vm_stderr():
            module = tvm.runtime.load_module(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{path} is not a loadable TVM library: {_first_line(exc)}") from exc
    library = CompiledLibrary(module, target, None, path=path)
    vm, _ = library._vm_and_dev()
    library.signature = _read_signature(vm)
    return library
