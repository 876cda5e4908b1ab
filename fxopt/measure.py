"""How fast a model runs on a target: one interface, three backends, results cached on disk.

Latency-aware decisions (which convs to merge in depth compression, dense or sparse kernel per
layer, tuning) need a cost per candidate, measured where the model will run. ``measure`` builds
the candidate through the TVM adapter and asks the target how to measure it:

``local``      seconds per run on this machine (targets with runner ``native``): the VM's
               ``time_evaluator`` after ``warmup`` discarded runs, ``repeat`` samples of
               ``number`` runs each, the median reported. TVM's thread pool gets exactly
               ``threads`` threads (default: the target's ``cores``, else every core this
               process may use), each bound to one core; the timing runs in a thread of its own
               so that this binding does not stay on the caller's threads (see
               ``fxopt.targets.tvm_backend.timing``).
``qemu-insn``  guest instructions per run of a cross build under qemu-user (targets with
               runner ``qemu``), counted by fxopt's qemu plugin between marker system calls
               that the runner issues around each run, with ``TVM_NUM_THREADS=1``: exactly
               repeatable where wall time under an emulator varies by 5-15 %. An instruction
               is not a unit of time: a vector instruction (RVV, NEON) counts 1 whatever its
               vector length, so counts compare builds of the same ISA and the same qemu
               ``-cpu`` only (``Measurement.comparable``). The runs right after loading still
               do one-time work (the second run of a process counts ~0.6 % more than the
               third), hence ``warmup`` >= 1. Targets that run natively get no
               counts: the host target is built for ``-mcpu=native`` (AVX-512 on many x86
               machines), which qemu's emulator cannot execute, and time is the better
               measure where the CPU is real; measure them with ``local``.
``rpc``        seconds per run on a device of a TVM RPC device farm (targets with runner
               ``rpc``, or any target when ``rpc=RPCConfig(...)`` is given): the library is
               exported with the target's toolchain, uploaded and timed there; a device that
               dies or hangs costs at most ``session_timeout_s`` and is retried on another
               (see ``fxopt.targets.tvm_backend.rpc``). ``threads`` (default: the target's
               ``cores``, else the server's own) sets the device's pool with
               ``runtime.config_threadpool``, which can shrink the pool its server started with
               but not grow it: start servers with ``TVM_NUM_THREADS`` set to the device's cores.

Results are cached in ``~/.cache/fxopt/measure/<key>.json`` (``$XDG_CACHE_HOME`` is honoured,
``cache_dir`` overrides it), so a latency table is measured once. The key is a sha256 over
everything that can change the number: the target (its JSON and the concrete TVM target it
resolves to here), the workload (the lowered Relax module's script text and the bytes of its
constants: kernels may specialise on weight values, as sparse ones do on the zero pattern),
the input shapes and dtypes (not their values), the backend and its settings (repeat, number,
warmup, threads; this CPU's model for ``local``; the device key and tracker for ``rpc``; the qemu
version, ``-cpu``, cross compiler and runner and plugin sources for ``qemu-insn``), and the
versions of tvm, tvm-ffi, LLVM, torch and fxopt. A file that cannot be read is ignored and
written again; ``cache=False`` measures and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fxopt.api import __version__
from fxopt.errors import InputError, MeasureError
from fxopt.targets import Target, get_target
from fxopt.targets.tvm_backend.rpc import RPCConfig

__all__ = ["BACKENDS", "Measurement", "RPCConfig", "measure", "measure_library", "default_backend"]

BACKENDS = ("local", "qemu-insn", "rpc")
_UNITS = {"local": "s", "rpc": "s", "qemu-insn": "insn"}
_FORMAT = 1


@dataclass(frozen=True)
class Measurement:
    """One measured cost: ``value`` is the median of ``samples``, seconds per run (unit "s") or
    guest instructions per run (unit "insn"; compare counts only between measurements for which
    :meth:`comparable` is true: same ISA and emulated CPU). ``key`` names the cache entry
    (None for :func:`measure_library`); ``settings`` are the backend's; ``notes`` say what went
    wrong on the way (an RPC device lost and retried)."""

    value: float
    unit: str
    samples: tuple[float, ...]
    backend: str
    target: str
    cached: bool
    key: str | None
    isa: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict, compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)

    def comparable(self, other: "Measurement") -> bool:
        """True when the two values measure the same thing: times always compare; instruction
        counts only for the same ISA, features and emulated CPU (an RVV instruction counts 1
        whatever the vector length)."""
        if self.unit != other.unit:
            return False
        return self.unit != "insn" or self.isa == other.isa

    def __str__(self) -> str:
        if self.unit == "s":
            shown = f"{self.value * 1e3:.4g} ms"
        else:
            shown = f"{self.value:,.0f} instructions"
        extra = ", cached" if self.cached else ""
        return f"{shown} (median of {len(self.samples)}, {self.backend} on {self.target}{extra})"


def default_backend(target: Target | str) -> str:
    """The backend a target is measured with when none is named: from its runner."""
    target = get_target(target)
    if target.runner == "native":
        return "local"
    if target.runner == "qemu":
        return "qemu-insn"
    if target.runner == "rpc":
        return "rpc"
    if target.runs_here():  # a GPU target on a machine with the GPU
        return "local"
    raise MeasureError(
        f"target {target.name!r} runs on a GPU this machine does not have; measure it on a device "
        "farm with backend='rpc', rpc=RPCConfig(tracker_host=..., tracker_port=..., key=...)"
    )


# --------------------------------------------------------------------------------------------
# Public entry points


def measure(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    target: Target | str = "host",
    *,
    backend: str | None = None,
    repeat: int = 10,
    warmup: int = 2,
    number: int = 1,
    threads: int | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    rpc: RPCConfig | None = None,
) -> Measurement:
    """Cost of running ``module`` (an ``nn.Module`` or fx GraphModule in eval mode) on
    ``example_inputs`` when compiled for ``target``, measured with ``backend`` (None: the
    target's own, see :func:`default_backend`; ``rpc=`` alone means ``"rpc"``).

    The module is lowered first (the workload's identity is the lowered Relax module), then
    looked up in the cache; only a miss builds and measures. ``repeat`` samples are taken after
    ``warmup`` discarded runs, each sample the mean of ``number`` runs (qemu-insn: ``number`` is
    1, each run counted alone). ``threads``: see the module docstring (qemu-insn: always 1).
    """
    from fxopt.targets import tvm_backend

    target = get_target(target)
    backend = _choose_backend(target, backend, rpc)
    inputs = _check_inputs(example_inputs)
    _check_module(module)
    settings = _settings(target, backend, repeat, warmup, number, threads, rpc)
    mod = tvm_backend.lower(module, inputs)
    key, identity = _cache_key(target, mod, inputs, backend, settings)
    root = _cache_root(cache_dir)
    if cache:
        hit = _load(root, key)
        if hit is not None:
            return hit
    if backend == "rpc":  # a farm that is not there fails now, not after the build
        from fxopt.targets.tvm_backend import rpc as rpc_backend

        rpc_backend.check_tracker(rpc, _device_key(target, rpc))
    lib = tvm_backend.build(mod, target)
    result = _measure_built(lib, inputs, target, backend, settings, rpc)
    result = replace(result, key=key)
    if cache:
        _store(root, result, identity)
    return result


def measure_library(
    lib,
    inputs: Sequence[torch.Tensor | np.ndarray] | torch.Tensor | np.ndarray,
    *,
    backend: str | None = None,
    repeat: int = 10,
    warmup: int = 2,
    number: int = 1,
    threads: int | None = None,
    rpc: RPCConfig | None = None,
) -> Measurement:
    """Cost of an already built ``CompiledLibrary`` (from ``tvm_backend.build`` or ``load``) on
    ``inputs``, for the target it was built for. Not cached: a library has no workload to key
    it by (``measure`` has); ``key`` is None."""
    target = getattr(lib, "target", None)
    if not isinstance(target, Target) or not hasattr(lib, "save"):
        raise InputError(f"measure_library() takes a CompiledLibrary (tvm_backend.build or load), got "
                         f"{type(lib).__name__}; use measure() for an nn.Module")
    backend = _choose_backend(target, backend, rpc)
    inputs = _check_inputs(inputs)
    settings = _settings(target, backend, repeat, warmup, number, threads, rpc)
    return _measure_built(lib, inputs, target, backend, settings, rpc)


# --------------------------------------------------------------------------------------------
# Checks


def _choose_backend(target: Target, backend: str | None, rpc: RPCConfig | None) -> str:
    if rpc is not None and not isinstance(rpc, RPCConfig):
        raise MeasureError(f"rpc must be an RPCConfig(tracker_host=..., tracker_port=..., key=...), "
                           f"got {type(rpc).__name__}")
    if backend is None:
        backend = "rpc" if rpc is not None else default_backend(target)
    if backend not in BACKENDS:
        import difflib

        close = difflib.get_close_matches(str(backend), BACKENDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MeasureError(f"unknown measurement backend {backend!r}{hint}; use one of "
                           f"{', '.join(BACKENDS)}, or backend=None for the target's own")
    if rpc is not None and backend != "rpc":
        raise MeasureError(f"rpc=RPCConfig(...) is for backend='rpc', not backend={backend!r}; "
                           "drop one of them")
    if backend == "rpc" and rpc is None:
        raise MeasureError("backend='rpc' needs the device farm: pass rpc=RPCConfig(tracker_host=..., "
                           "tracker_port=..., key=...) naming a running TVM RPC tracker")
    if backend == "local" and not target.runs_here():
        raise MeasureError(
            f"backend 'local' times on this machine, and a {target.name} build ({target.arch}, runner "
            f"{target.runner!r}) does not run here; use backend='qemu-insn' (instruction counts under "
            "qemu-user) or backend='rpc' (a device of a TVM RPC farm)"
        )
    if backend == "qemu-insn":
        if target.tvm.get("kind") != "llvm":
            raise MeasureError(f"backend 'qemu-insn' counts instructions of CPU builds; target "
                               f"{target.name!r} is a {target.tvm.get('kind')} target: use backend='rpc'")
        if target.runner != "qemu":
            raise MeasureError(
                f"backend 'qemu-insn' counts instructions of emulated builds, and target {target.name!r} "
                f"runs natively (runner {target.runner!r}; a -mcpu=native build may use instructions "
                "qemu cannot emulate): use backend='local' to time it, or an emulated target such as "
                "'riscv64' or 'arm64'"
            )
    return backend


def _check_inputs(inputs) -> tuple:
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise InputError(f"example inputs must be a non-empty tuple of tensors, got {type(inputs).__name__}")
    for i, t in enumerate(inputs):
        if not isinstance(t, (torch.Tensor, np.ndarray)):
            raise InputError(f"example input {i} is a {type(t).__name__}; pass torch tensors")
    return tuple(inputs)


def _check_module(module) -> None:
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"measure() takes an nn.Module or fx GraphModule, got {type(module).__name__}; "
                         "use measure_library() for a CompiledLibrary")
    if module.training:
        raise InputError(f"{type(module).__name__} is in training mode; measure() times inference: call "
                         "module.eval() first (BatchNorm and dropout differ in training mode)")


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MeasureError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _settings(target: Target, backend: str, repeat: int, warmup: int, number: int,
              threads: int | None, rpc: RPCConfig | None) -> dict:
    _count("repeat", repeat, 1)
    _count("warmup", warmup, 0)
    _count("number", number, 1)
    if threads is not None:
        _count("threads", threads, 1)
    if backend == "qemu-insn":
        if threads not in (None, 1):
            raise MeasureError(f"backend 'qemu-insn' counts with one thread (counts with more vary from run to "
                               f"run: the pool's spin-waits), got threads={threads}")
        if number != 1:
            raise MeasureError(f"backend 'qemu-insn' counts each run alone; leave number=1 (got {number})")
        return {"repeat": repeat, "warmup": warmup, "number": 1, "threads": 1}
    if backend == "local":
        from fxopt.targets import allowed_cpus

        threads = threads or target.cores or len(allowed_cpus())
    else:  # rpc: the device's pool as its server started it, unless asked
        threads = threads or target.cores
    settings = {"repeat": repeat, "warmup": warmup, "number": number, "threads": threads}
    if backend == "rpc":
        settings["device_key"] = _device_key(target, rpc)
        settings["tracker"] = rpc.tracker
    return settings


def _device_key(target: Target, rpc: RPCConfig) -> str:
    return rpc.key or target.name


# --------------------------------------------------------------------------------------------
# Measuring a built library


def _arrays(inputs: Sequence) -> list[np.ndarray]:
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().numpy()
        out.append(np.ascontiguousarray(t))
    return out


def _isa(target: Target) -> str:
    tvm = target.tvm
    parts = [target.arch]
    if tvm.get("mcpu"):
        parts.append(f"mcpu={tvm['mcpu']}")
    if tvm.get("mattr"):
        parts.append("mattr=" + ",".join(tvm["mattr"]))
    parts.append(f"qemu-cpu={target.qemu_cpu or 'default'}")
    return " ".join(parts)


def _measure_built(lib, inputs: Sequence, target: Target, backend: str, settings: dict,
                   rpc: RPCConfig | None) -> Measurement:
    notes: list[str] = []
    isa = ""
    if backend == "local":
        from fxopt.targets.tvm_backend.timing import time_local

        samples = time_local(lib, inputs, repeat=settings["repeat"], number=settings["number"],
                             warmup=settings["warmup"], threads=settings["threads"])
        value = statistics.median(samples)
    elif backend == "rpc":
        from fxopt.targets.tvm_backend import rpc as rpc_backend

        kind = target.tvm.get("kind", "llvm")
        device = {"llvm": "cpu", "c": "cpu"}.get(kind, kind)
        with tempfile.TemporaryDirectory(prefix="fxopt-measure-") as scratch:
            path = lib.save(Path(scratch) / target.library)
            samples, notes = rpc_backend.time_remote(
                path, _arrays(inputs), config=rpc, key=settings["device_key"], device=device,
                repeat=settings["repeat"], number=settings["number"], warmup=settings["warmup"],
                threads=settings["threads"])
        value = statistics.median(samples)
    else:  # qemu-insn
        from fxopt.targets import runners

        isa = _isa(target)
        runtime = runners.runtime_for(target)
        with tempfile.TemporaryDirectory(prefix="fxopt-measure-") as scratch:
            path = lib.save(Path(scratch) / target.library)
            samples, _ = runners.count_instructions(target, runtime.runner, path, _arrays(inputs),
                                                    repeat=settings["repeat"], warmup=settings["warmup"])
        value = statistics.median_low(samples)  # a count that was measured
    return Measurement(value=value, unit=_UNITS[backend], samples=tuple(samples), backend=backend,
                       target=target.name, cached=False, key=None, isa=isa, settings=dict(settings),
                       notes=tuple(notes))


# --------------------------------------------------------------------------------------------
# The cache


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "fxopt" / "measure"


@lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("model name", "Model", "uarch", "isa"):
                return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def _tool_version(command: tuple[str, ...]) -> str:
    """First line of ``command`` (``qemu-riscv64 --version``), or "missing"."""
    if shutil.which(command[0]) is None:
        return "missing"
    try:
        proc = subprocess.run(list(command), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _environment(target: Target, backend: str) -> dict:
    """What the backend's result depends on beyond the settings."""
    if backend == "local":
        return {"cpu": _cpu_model()}
    if backend == "qemu-insn":
        from fxopt.targets.runtime_build import qemu_command, sources_digest

        qemu = qemu_command(target.arch)[0]
        cxx = f"{target.toolchain}g++" if target.toolchain else "g++"
        return {"qemu": _tool_version((qemu, "--version")), "qemu_cpu": target.qemu_cpu,
                "cxx": _tool_version((cxx, "--version")), "runtime_sources": sources_digest()}
    return {}


def _cache_key(target: Target, mod, inputs: Sequence, backend: str, settings: dict) -> tuple[str, dict]:
    from fxopt.targets import tvm_backend
    from fxopt.targets.tvm_backend.timing import workload_digest

    identity = {
        "format": _FORMAT,
        "target": target.to_json(),
        "resolved_target": tvm_backend.resolve_target(target),
        "workload": workload_digest(mod),
        "inputs": [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in inputs],
        "backend": backend,
        "settings": settings,
        "environment": _environment(target, backend),
        "versions": {**tvm_backend.versions(), "torch": torch.__version__, "fxopt": __version__},
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), identity


_KEY = re.compile(r"^[0-9a-f]{64}$")


def _load(root: Path, key: str) -> Measurement | None:
    path = root / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("format") != _FORMAT:
            return None  # another fxopt version's entry: measured again and rewritten
        samples = tuple(data["samples"])
        ok = (data["format"] == _FORMAT and data["key"] == key and data["unit"] in ("s", "insn")
              and data["backend"] in BACKENDS and isinstance(data["target"], str) and samples
              and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in samples)
              and isinstance(data["value"], (int, float)) and isinstance(data["settings"], dict))
        if not ok:
            raise ValueError("fields of the wrong kind")
        return Measurement(value=data["value"], unit=data["unit"], samples=samples, backend=data["backend"],
                           target=data["target"], cached=True, key=key, isa=str(data.get("isa", "")),
                           settings=data["settings"], notes=tuple(map(str, data.get("notes", ()))))
    except FileNotFoundError:
        return None  # not measured yet
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        import warnings  # damaged (a truncated write, a disk error, an edit): never trusted

        warnings.warn(f"fxopt.measure: the cache entry {path} is damaged ({type(exc).__name__}: {exc}); "
                      "it is not used: measuring again and rewriting it", stacklevel=3)
        return None


def _store(root: Path, result: Measurement, identity: dict) -> None:
    if not result.key or not _KEY.match(result.key):
        return
    data = {"format": _FORMAT, "key": result.key, "value": result.value, "unit": result.unit,
            "samples": list(result.samples), "backend": result.backend, "target": result.target,
            "isa": result.isa, "settings": dict(result.settings), "notes": list(result.notes),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "identity": identity}
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{result.key[:16]}-", suffix=".tmp", dir=root)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True, default=str)
            handle.write("\n")
        os.replace(tmp, root / f"{result.key}.json")
    except OSError as exc:  # a read-only cache costs re-measuring, nothing else
        import warnings

        warnings.warn(f"fxopt.measure: cannot write the measurement cache in {root}: {exc}", stacklevel=3)
