"""Targets: what a build is for, as data.

A :class:`Target` names a TVM target dict, the capabilities that passes may read
(``ctx.target.capabilities``; passes never branch on target names), the default fx pipeline,
the schedule strategy, the cross toolchain and how a build is run. Each family of targets is
one small module (``host.py``, later ``arm.py``, ``cuda.py`` ...) that defines its targets and
registers them; importing this package fills the registry.

This package does not import ``tvm``: ``fxopt.optimize`` works with torch alone. The one
module that talks to TVM is :mod:`fxopt.targets.tvm_backend`.
"""

from __future__ import annotations

import copy
import difflib
import os
import platform
import re
import threading
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

from fxopt.errors import TargetError

__all__ = [
    "Capabilities",
    "Target",
    "RUNNERS",
    "LAYOUTS",
    "register_target",
    "get_target",
    "list_targets",
    "host_arch",
    "allowed_cpus",
]

RUNNERS = ("native", "qemu", "rpc", "gpu")
RUNTIMES = ("tvm", "standalone")  # the TVM runtime (Relax VM), or fxopt's standalone C (targets/standalone.py)
OFFLOAD_LIBRARIES = ("cublas", "cudnn", "cutlass")  # vendor libraries a CUDA target may hand ops to
LAYOUTS = ("NCHW", "NHWC")

_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def _normalize_arch(arch: str) -> str:
    arch = arch.lower()
    return _ARCH_ALIASES.get(arch, arch)


def host_arch() -> str:
    """The build machine's architecture as the first field of an LLVM triple (``x86_64``)."""
    return _normalize_arch(platform.machine())


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on. Asked from a fresh thread that first widens its own mask
    to every CPU (the kernel keeps only those allowed): the calling thread's mask can be one
    core, since TVM binds a thread to a core when its thread pool starts."""
    result: list[int] = []

    def probe() -> None:
        try:
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
            result.extend(sorted(os.sched_getaffinity(0)))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            result.extend(range(os.cpu_count() or 1))

    thread = threading.Thread(target=probe, name="fxopt-cpus")
    thread.start()
    thread.join()
    return result


@dataclass(frozen=True)
class Capabilities:
    """What passes may read from ``ctx.target``; never target names."""

    vector_bits: int = 0  # widest SIMD register the target uses (512 for AVX-512); 0 = unknown
    fp16: bool = False  # native fp16 arithmetic
    sparse_kernels: bool = False  # fxopt's sparse conv/linear kernels exist for this target
    preferred_layout: str = "NCHW"  # the layout the target's convs run in (the CPU pipeline converts to NHWC)

    def __post_init__(self) -> None:
        if not isinstance(self.vector_bits, int) or self.vector_bits < 0:
            raise TargetError(
                f"capabilities.vector_bits must be a non-negative int, got {self.vector_bits!r}"
            )
        if self.preferred_layout not in LAYOUTS:
            raise TargetError(
                f"capabilities.preferred_layout must be one of {', '.join(LAYOUTS)}, "
                f"got {self.preferred_layout!r}"
            )


@dataclass(frozen=True)
class Target:
    """A compilation target, as data (see ARCHITECTURE.md, section 3 "Target")."""

    name: str
    description: str
    # TVM target dict, e.g. {"kind": "llvm", "mcpu": "native"}; "mcpu": "native" means the
    # build machine's CPU and a missing "mtriple" means the build machine's triple (both resolved
    # by tvm_backend.resolve_target). Stored read-only; not part of the hash.
    tvm: Mapping[str, Any] = field(hash=False)
    capabilities: Capabilities = Capabilities()
    pipeline: str = "default"  # default fx pipeline name
    schedule: str = "default"  # schedule strategy name
    toolchain: str | None = None  # cross compiler prefix ("aarch64-linux-gnu-"); None = host cc
    runner: str = "native"  # how a build is run: native, qemu, rpc, gpu
    library: str = "model.so"  # file name of the compiled library in a build directory
    qemu_cpu: str | None = None  # qemu-user -cpu value ("rv64,v=true,vlen=128") for emulated runs
    cores: int | None = None  # cores of the device (threads the runner may use); None = all
    run_command: tuple[str, ...] = ()  # command prefix that runs the runner on the device (a board's ssh, say)
    base: str | None = None  # the target a preset or board file derives from
    offload: tuple[str, ...] = ()  # CUDA: libraries that take the ops their patterns match, in order
    runtime: str = "tvm"  # default runtime; "standalone" for targets without an OS for the TVM runtime
    cflags: tuple[str, ...] = ()  # C compiler flags of standalone builds (-march/-mabi of a microcontroller)
    flash_bytes: int | None = None  # a board's flash; standalone builds that need more fail
    ram_bytes: int | None = None  # a board's RAM (arena + static data + stack); None = no limit

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise TargetError(
                f"target name {self.name!r} is not valid: use lower-case letters, digits, '_' "
                "and '-', starting with a letter"
            )
        if not isinstance(self.tvm, Mapping) or not isinstance(self.tvm.get("kind"), str):
            raise TargetError(
                f"target {self.name!r}: tvm must be a TVM target dict with a 'kind' "
                f"(e.g. {{'kind': 'llvm', 'mcpu': 'native'}}), got {self.tvm!r}"
            )
        if self.runner not in RUNNERS:
            raise TargetError(
                f"target {self.name!r}: runner {self.runner!r} is unknown; "
                f"use one of {', '.join(RUNNERS)}"
            )
        if not isinstance(self.capabilities, Capabilities):
            raise TargetError(
                f"target {self.name!r}: capabilities must be a Capabilities, "
                f"got {type(self.capabilities).__name__}"
            )
        if self.cores is not None and (not isinstance(self.cores, int) or self.cores < 1):
            raise TargetError(f"target {self.name!r}: cores must be a positive integer, got {self.cores!r}")
        if not isinstance(self.run_command, tuple) or not all(isinstance(a, str) for a in self.run_command):
            raise TargetError(f"target {self.name!r}: run_command must be a list of strings, got {self.run_command!r}")
        if not isinstance(self.offload, tuple) or any(lib not in OFFLOAD_LIBRARIES for lib in self.offload):
            raise TargetError(f"target {self.name!r}: offload must list libraries among "
                              f"{', '.join(OFFLOAD_LIBRARIES)}, got {self.offload!r}")
        if self.offload and self.tvm.get("kind") != "cuda":
            raise TargetError(f"target {self.name!r}: offload to {', '.join(self.offload)} is for CUDA targets; "
                              f"this one is {self.tvm.get('kind')}")
        if self.runtime not in RUNTIMES:
            raise TargetError(f"target {self.name!r}: runtime {self.runtime!r} is unknown; use one of {', '.join(RUNTIMES)}")
        if not isinstance(self.cflags, tuple) or not all(isinstance(a, str) for a in self.cflags):
            raise TargetError(f"target {self.name!r}: cflags must be a list of strings, got {self.cflags!r}")
        for key in ("flash_bytes", "ram_bytes"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise TargetError(f"target {self.name!r}: {key} must be a positive number of bytes, got {value!r}")
        if not self.library or "/" in self.library:
            raise TargetError(
                f"target {self.name!r}: library must be a plain file name, got {self.library!r}"
            )
        # Freeze the TVM dict: a registered target is shared by every build.
        object.__setattr__(self, "tvm", MappingProxyType(copy.deepcopy(dict(self.tvm))))

    @property
    def arch(self) -> str:
        """Architecture the code is generated for: the mtriple's first field, or the host's."""
        triple = self.tvm.get("mtriple")
        if triple:
            return _normalize_arch(str(triple).split("-", 1)[0])
        return host_arch()

    def runs_here(self) -> bool:
        """True when a build for this target can be run in this process on this machine."""
        if self.runner == "gpu":
            return self.tvm.get("kind") == "cuda" and _cuda_driver_present()
        return self.runner == "native" and self.arch == host_arch()

    def to_json(self) -> dict:
        """Plain JSON-able dict (for manifests and ``fxopt targets --json``)."""
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data["tvm"] = copy.deepcopy(dict(self.tvm))
        data["capabilities"] = asdict(self.capabilities)
        data["run_command"] = list(self.run_command)
        data["offload"] = list(self.offload)
        data["cflags"] = list(self.cflags)
        return data

    def derive(self, name: str, description: str, *, tvm: Mapping[str, Any] | None = None, **changes: Any) -> "Target":
        """A preset or board: this target with ``tvm`` keys overridden and other fields changed."""
        merged = {**self.tvm, **(tvm or {})}
        return replace(self, name=name, description=description, tvm=merged, base=self.name, **changes)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Target":
        """Inverse of :meth:`to_json` (reading a manifest, or a board's TOML override)."""
        data = dict(data)
        caps = data.pop("capabilities", {}) or {}
        _reject_unknown("field(s)", data, cls)
        _reject_unknown("capabilities", caps, Capabilities)
        for key in ("run_command", "offload", "cflags"):
            if key in data and isinstance(data[key], list):
                data[key] = tuple(data[key])
        try:
            return cls(capabilities=Capabilities(**caps), **data)
        except TypeError as exc:  # a missing required field
            raise TargetError(f"target spec is incomplete: {exc}") from None


def _reject_unknown(what: str, given: Mapping[str, Any], cls: type) -> None:
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(given) - known)
    if unknown:
        raise TargetError(
            f"target spec has unknown {what} {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def _cuda_driver_present() -> bool:
    """An NVIDIA driver that initializes and sees at least one GPU (fxopt's build-time stub of
    libcuda.so.1 has no cuInit, so it never passes)."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except (OSError, AttributeError):
        return False


_REGISTRY: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add ``target`` to the registry and return it; a second target of the same name is refused."""
    if not isinstance(target, Target):
        raise TargetError(f"register_target expects a Target, got {type(target).__name__}")
    if target.name in _REGISTRY:
        raise TargetError(
            f"a target named {target.name!r} is already registered "
            f"({_REGISTRY[target.name].description}); choose another name"
        )
    _REGISTRY[target.name] = target
    return target


def get_target(name_or_target: str | Target) -> Target:
    """The registered target of that name (a Target is returned unchanged)."""
    if isinstance(name_or_target, Target):
        return name_or_target
    if isinstance(name_or_target, str) and name_or_target.endswith(".toml"):
        from .boards import load_board

        return load_board(name_or_target)
    if not isinstance(name_or_target, str):
        raise TargetError(
            f"a target is a name or a Target, got {type(name_or_target).__name__}"
        )
    try:
        return _REGISTRY[name_or_target]
    except KeyError:
        pass
    known = sorted(_REGISTRY)
    close = difflib.get_close_matches(name_or_target, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise TargetError(
        f"unknown target {name_or_target!r}; known targets: {', '.join(known) or '(none)'}."
        f"{hint} Run `fxopt targets` to list them with their descriptions."
    )


def list_targets() -> list[Target]:
    """Every registered target, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


# Family modules register their targets on import.
from . import arm, gpu, host, mcu, riscv  # noqa: E402,F401
