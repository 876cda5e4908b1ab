"""The TVM runtime and the ``fxopt-run`` runner, built for a target architecture and cached.

    build_runtime(toolchain, triple)   compile runtime + runner (or reuse the cached build)
    qemu_command(arch, cpu=...)        the qemu-user command line that runs a foreign binary
    build_insn_plugin()                qemu-user plugin that counts the runner's instructions

A build directory for a CPU target needs, beside the model library, a program that loads it and
runs the Relax VM on that machine. The apache-tvm and apache-tvm-ffi wheels ship the C++ sources
of their runtime; this module compiles the part a CPU model needs (tvm-ffi core and module
loading, CPU device, tensors, workspace and thread pool, Relax VM) together with
``runtime/fxopt_run.cc`` into one executable, ``fxopt-run``, with any g++ toolchain: the host's
or a cross compiler (``aarch64-linux-gnu-``, ``riscv64-linux-gnu-``). The runner is linked
statically against the runtime, libstdc++ and libgcc (and libatomic where the target needs it)
and exports the runtime's C API (the ``TVM*`` symbols; the runtime's objects are linked whole,
which keeps their static registrations), so the model library binds to it when it is dlopen'ed
and a build directory needs the runner and the model only; on the target, only glibc.

Six support headers that the runtime sources include are not in the wheel; fxopt has its own
small versions under ``runtime/include`` and ``runtime/src`` (see their comments).

This module does not import ``tvm``: it finds the installed sources with
``importlib.util.find_spec`` and their versions with ``importlib.metadata``.

Builds are cached under ``~/.cache/fxopt/runtime/<key>`` (``$XDG_CACHE_HOME`` is honoured), the
key being a hash of the triple's architecture, the toolchain and its version, the flags, the tvm
and tvm_ffi versions and fxopt's own C++ sources. A build is written to a temporary directory and
renamed into place, so the cache holds complete builds only; concurrent builds of one key wait
for each other (a file lock) instead of compiling twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from fxopt.errors import BuildError, TargetError

from . import _normalize_arch, allowed_cpus, host_arch

__all__ = [
    "RUNNER_NAME",
    "RuntimeBuild",
    "RuntimeSources",
    "build_insn_plugin",
    "build_runtime",
    "qemu_command",
    "runtime_sources",
    "sources_digest",
]

RUNNER_NAME = "fxopt-run"

_HERE = Path(__file__).resolve().parent / "runtime"
_RUNNER_SOURCE = _HERE / "fxopt_run.cc"
_PLUGIN_SOURCE = _HERE / "qemu_insn_plugin.cc"
_FORMAT = 2  # bump when the layout of a cached build changes

# tvm-ffi: objects, functions, errors, tensors, JSON, and module loading (dlopen, system-lib).
_FFI_SOURCES = (
    "backtrace.cc",
    "container.cc",
    "custom_allocator.cc",
    "dtype.cc",
    "error.cc",
    "function.cc",
    "init_once.cc",
    "object.cc",
    "tensor.cc",
    "extra/env_c_api.cc",
    "extra/env_context.cc",
    "extra/json_parser.cc",
    "extra/json_writer.cc",
    "extra/library_module.cc",
    "extra/library_module_dynamic_lib.cc",
    "extra/library_module_system_lib.cc",
    "extra/module.cc",
)
# tvm runtime: CPU device, tensors, workspace and thread pool, backend context symbols, Relax VM.
# Left out: RPC, disco, contrib libraries, the LM/KV-cache VM extras, builtin_fp16.cc (it needs
# a compiler-rt header; model libraries define the fp16 conversions they use themselves).
_RUNTIME_SOURCES = (
    "cpu_device_api.cc",
    "device_api.cc",
    "file_utils.cc",
    "logging.cc",
    "module.cc",
    "tensor.cc",
    "workspace_pool.cc",
    "thread_pool.cc",
    "threading_backend.cc",
    "memory/memory_manager.cc",
    "vm/builtin.cc",
    "vm/bytecode.cc",
    "vm/executable.cc",
    "vm/vm.cc",
)

_CXXFLAGS = ("-std=c++17", "-O2", "-g0")
_DEFINES = (
    "-DNDEBUG",
    "-DTVM_FFI_USE_LIBBACKTRACE=0",
    "-DTVM_FFI_BACKTRACE_ON_SEGFAULT=0",
    "-DTVM_LOG_DEBUG=0",
)
# Architectures whose sub-word atomics (std::atomic<bool> in thread_pool.cc) call libatomic.
_NEEDS_LIBATOMIC = ("riscv64", "riscv32", "arm", "mips", "mipsel", "ppc")

# qemu-user binary and the Debian cross C library that -L points at, per architecture.
_QEMU = {
    "x86_64": ("qemu-x86_64", "x86_64-linux-gnu", "libc6-amd64-cross"),
    "aarch64": ("qemu-aarch64", "aarch64-linux-gnu", "libc6-arm64-cross"),
    "riscv64": ("qemu-riscv64", "riscv64-linux-gnu", "libc6-riscv64-cross"),
    "arm": ("qemu-arm", "arm-linux-gnueabihf", "libc6-armhf-cross"),
}


@dataclass(frozen=True)
class RuntimeBuild:
    """A built runner and the files a build directory ships beside the model library."""

    runner: Path  # the fxopt-run executable for the target
    libraries: tuple[Path, ...]  # shared libraries the runner needs at run time (none: static)


# --------------------------------------------------------------------------------------------
# Where the sources are


@dataclass(frozen=True)
class RuntimeSources:
    """The runtime sources of the installed apache-tvm and apache-tvm-ffi wheels."""

    tvm: Path  # site-packages/tvm
    tvm_ffi: Path  # site-packages/tvm_ffi
    tvm_version: str
    tvm_ffi_version: str

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(self.tvm_ffi / "src" / "ffi" / f for f in _FFI_SOURCES) + tuple(
            self.tvm / "src" / "runtime" / f for f in _RUNTIME_SOURCES
        )

    @property
    def include_dirs(self) -> tuple[Path, ...]:
        return (
            _HERE / "include",  # fxopt's tvm/support/*.h, ahead of anything else
            self.tvm / "include",
            self.tvm_ffi / "include",
            self.tvm_ffi / "3rdparty" / "dlpack" / "include",
        )


def _package_dir(name: str, dist: str) -> Path:
    # find_spec of a top-level package locates it without running its __init__.
    spec = importlib.util.find_spec(name)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise BuildError(
            f"the Python package {name!r} is not installed, so the TVM runtime sources are "
            f"missing; install it with `pip install {dist}`"
        )
    return Path(locations[0])


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def runtime_sources() -> RuntimeSources:
    """The installed runtime sources (apache-tvm and apache-tvm-ffi), checked to be complete."""
    sources = RuntimeSources(
        tvm=_package_dir("tvm", "apache-tvm"),
        tvm_ffi=_package_dir("tvm_ffi", "apache-tvm-ffi"),
        tvm_version=_version("apache-tvm"),
        tvm_ffi_version=_version("apache-tvm-ffi"),
    )
    missing = [str(p) for p in sources.files if not p.is_file()]
    if missing:
        raise BuildError(
            f"the installed TVM (apache-tvm {sources.tvm_version}, apache-tvm-ffi "
            f"{sources.tvm_ffi_version}) does not ship the runtime source {missing[0]}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + "; fxopt builds its runtime from the sources of the apache-tvm wheel, so install "
            "that (`pip install apache-tvm==0.27.0.post1`)"
        )
    return sources


def _own_sources() -> list[Path]:
    """fxopt's C++ files compiled into the runner (the qemu plugin is built on its own)."""
    return sorted(p for p in _HERE.rglob("*")
                  if p.is_file() and p.suffix in (".cc", ".h") and p != _PLUGIN_SOURCE)


# --------------------------------------------------------------------------------------------
# Toolchains


def _triple_arch(triple: str) -> str:
    arch = _normalize_arch(triple.split("-", 1)[0])
    if arch.startswith(("armv7", "armv6", "armhf", "armel")):
        return "arm"
    return arch


def _debian_package(toolchain: str | None) -> str:
    if not toolchain:
        return "g++"
    return "g++-" + toolchain.rstrip("-").replace("_", "-")


@dataclass(frozen=True)
class _Compiler:
    cxx: str  # the command
    path: str  # resolved path
    version: str  # first line of `cxx -v` that names the version
    machine: str  # `Target:` of `cxx -v`, e.g. riscv64-linux-gnu


def _compiler(toolchain: str | None, triple: str) -> _Compiler:
    cxx = f"{toolchain}g++" if toolchain else "g++"
    path = shutil.which(cxx)
    want = _triple_arch(triple)
    if path is None:
        if toolchain is None and want != host_arch():
            raise TargetError(
                f"the runtime for {triple} needs a cross compiler and no toolchain was given; "
                f"pass toolchain='{want}-linux-gnu-' (Debian package "
                f"{_debian_package(want + '-linux-gnu-')})"
            )
        raise TargetError(
            f"the C++ compiler {cxx!r} is not installed; install the Debian package "
            f"{_debian_package(toolchain)} (`apt-get install {_debian_package(toolchain)}`)"
        )
    try:
        proc = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TargetError(f"the C++ compiler {path} does not run: {exc}") from exc
    text = proc.stdout + proc.stderr
    machine = re.search(r"^Target:\s*(\S+)", text, re.M)
    version = re.search(r"^.*\bversion\s+\d\S*.*$", text, re.M)
    if proc.returncode != 0 or machine is None:
        raise TargetError(f"{path} -v did not say which machine it compiles for:\n{text.strip()}")
    compiler = _Compiler(cxx, path, version.group(0).strip() if version else "unknown",
                         machine.group(1))
    got = _triple_arch(compiler.machine)
    if got != want:
        hint = (
            f"pass toolchain='{want}-linux-gnu-' (Debian package "
            f"{_debian_package(want + '-linux-gnu-')})"
        )
        raise TargetError(
            f"{cxx} compiles for {compiler.machine}, but the runtime is for {triple}; {hint}"
        )
    return compiler


# --------------------------------------------------------------------------------------------
# The build


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "fxopt" / "runtime"


def _link_libs(arch: str) -> list[str]:
    libs = ["-static-libstdc++", "-static-libgcc", "-ldl", "-lpthread"]
    if arch in _NEEDS_LIBATOMIC:
        libs += ["-Wl,--push-state,-Bstatic", "-latomic", "-Wl,--pop-state"]
    return libs


def _key(triple: str, toolchain: str | None, compiler: _Compiler, sources: RuntimeSources,
         extra_flags: Sequence[str]) -> tuple[str, dict]:
    h = hashlib.sha256()
    for path in _own_sources():
        h.update(str(path.relative_to(_HERE)).encode() + b"\0" + path.read_bytes() + b"\0")
    if "unknown" in (sources.tvm_version, sources.tvm_ffi_version):
        # A source build of TVM has no version to go by: use what is compiled.
        for path in sources.files:
            h.update(path.read_bytes())
    inputs = {
        "format": _FORMAT,
        # The architecture, not the triple's spelling: riscv64-linux-gnu and
        # riscv64-unknown-linux-gnu build the same runner (the compiler decides the rest).
        "arch": _triple_arch(triple),
        "toolchain": toolchain,
        "compiler": compiler.version,
        "compiler_machine": compiler.machine,
        "cxxflags": list(_CXXFLAGS + _DEFINES),
        "extra_flags": list(extra_flags),
        "link": _link_libs(_triple_arch(triple)),
        "tvm": sources.tvm_version,
        "tvm_ffi": sources.tvm_ffi_version,
        "fxopt_sources": h.hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return f"{_triple_arch(triple)}-{digest}", inputs


def _complete(path: Path) -> RuntimeBuild | None:
    """The build in ``path`` if it is complete (its record lists files that are all there)."""
    try:
        record = json.loads((path / "build.json").read_text())
        runner = path / record["runner"]
        libraries = tuple(path / name for name in record["libraries"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not runner.is_file() or not os.access(runner, os.X_OK):
        return None
    if not all(lib.is_file() for lib in libraries):
        return None
    return RuntimeBuild(runner=runner, libraries=libraries)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: builds of one key may race (still safe)
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_dead_temps(root: Path) -> None:
    """Delete temporary build directories of processes that no longer exist (killed builds)."""
    for tmp in root.glob(".tmp-*"):
        match = re.match(r"\.tmp-.*-pid(\d+)-", tmp.name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # alive, someone else's


def build_runtime(
    toolchain: str | None,
    triple: str,
    *,
    cache_dir: Path | None = None,
    extra_flags: Sequence[str] = (),
) -> RuntimeBuild:
    """The runner ``fxopt-run`` for ``triple``, built with ``toolchain`` (or taken from the cache).

    ``toolchain`` is a cross-compiler prefix such as ``"aarch64-linux-gnu-"`` (``None``: the
    host's ``g++``); ``triple`` is the target's LLVM triple (``riscv64-linux-gnu``), checked
    against what the compiler targets. ``extra_flags`` go to every compile and the link (e.g.
    ``["-mcpu=cortex-a72"]``). A clean build takes about 35 s on two idle cores (60-70 s CPU).

    Raises TargetError when the compiler is missing (naming the Debian package that has it) or
    targets another architecture, and BuildError with the first compiler error when the build
    fails; a failed or interrupted build leaves nothing in the cache but its log.
    """
    if not isinstance(triple, str) or not re.match(r"^[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*$", triple):
        raise TargetError(f"triple must look like 'riscv64-linux-gnu', got {triple!r}")
    if toolchain is not None and (not isinstance(toolchain, str) or not toolchain
                                  or any(c.isspace() for c in toolchain)):
        raise TargetError(
            f"toolchain must be a cross-compiler prefix such as 'aarch64-linux-gnu-' or None, "
            f"got {toolchain!r}"
        )
    extra_flags = [str(f) for f in extra_flags]
    compiler = _compiler(toolchain, triple)
    sources = runtime_sources()
    key, inputs = _key(triple, toolchain, compiler, sources, extra_flags)
    root = _cache_root(cache_dir)
    final = root / key
    found = _complete(final)
    if found is not None:
        return found
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create the runtime cache directory {root}: {exc}") from exc
    with _lock(root / f"{key}.lock"):
        found = _complete(final)  # built by another process while this one waited
        if found is not None:
            return found
        _remove_dead_temps(root)
        if final.exists():  # incomplete (files deleted by hand): build it again
            shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-pid{os.getpid()}-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the renamed build is an ordinary directory
        try:
            record = _build(tmp, compiler, sources, _triple_arch(triple), extra_flags, root, key)
            record["key"] = key
            record["inputs"] = inputs
            (tmp / "build.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (root / f"{key}.failed.log").unlink(missing_ok=True)
    built = _complete(final)
    if built is None:  # pragma: no cover - renamed just now
        raise BuildError(f"the runtime build in {final} is incomplete")
    return built


def _build(tmp: Path, compiler: _Compiler, sources: RuntimeSources, arch: str,
           extra_flags: list[str], root: Path, key: str) -> dict:
    started = time.monotonic()
    work = tmp / "work"
    # The runtime sources include "../support/x.h" and "../../support/x.h" relative to
    # src/runtime and src/runtime/vm; two empty directories on the include path, next to a
    # src/support holding fxopt's versions, resolve both.
    shim = work / "shim"
    (shim / "src" / "runtime" / "vm").mkdir(parents=True)
    shutil.copytree(_HERE / "src" / "support", shim / "src" / "support")
    includes = [f"-I{d}" for d in sources.include_dirs]
    includes += [f"-I{shim / 'src' / 'runtime'}", f"-I{shim / 'src' / 'runtime' / 'vm'}"]
    cflags = [*_CXXFLAGS, *_DEFINES, *extra_flags, *includes]

    # Three translation units: the runner, and the runtime as two unity files (tvm-ffi, tvm).
    # A unity file parses the heavy tvm-ffi headers once instead of once per source: on two
    # cores this builds in about 35 s where 31 separate files take about 50 s (and twice the
    # CPU time), and one unity file about 50 s. The runner goes first so that an error in
    # fxopt's own source shows before the long compiles.
    units = {
        "fxopt_run": [_RUNNER_SOURCE],
        "tvm_ffi": [f for f in sources.files if f.is_relative_to(sources.tvm_ffi)],
        "tvm_runtime": [f for f in sources.files if f.is_relative_to(sources.tvm)],
    }
    jobs: list[tuple[str, list[str]]] = []
    objects: list[Path] = []
    for name, files in units.items():
        if len(files) == 1:
            src = files[0]
        else:
            src = work / f"{name}_unity.cc"
            src.write_text("".join(f'#include "{f}"\n' for f in files))
        obj = work / f"{name}.o"
        objects.append(obj)
        jobs.append((name, [compiler.path, *cflags, "-c", str(src), "-o", str(obj)]))
    per_unit = _run_jobs(jobs, _parallelism(), work, root, key)
    compiled = time.monotonic()

    runner = tmp / RUNNER_NAME
    # The model library imports the runtime's C API (TVMFFIErrorSetRaisedFromCStrParts; with
    # system-lib or "c" kernels also TVMBackend*, TVMFFIEnv*): export exactly that. -rdynamic
    # would also export the statically linked libstdc++ (6000 symbols, 0.6 MB more).
    exports = work / "exports.list"
    exports.write_text("{\n  TVM*;\n  __TVM*;\n};\n")
    link = [
        # Objects (not an archive) are linked whole, static registrations included.
        compiler.path, *extra_flags, "-o", str(runner), *map(str, objects),
        f"-Wl,--dynamic-list={exports}", "-s", *_link_libs(arch),
    ]
    _run_jobs([("link " + RUNNER_NAME, link)], 1, work, root, key)
    shutil.rmtree(work)
    return {
        "runner": RUNNER_NAME,
        "libraries": [],
        "arch": arch,
        "compiler": compiler.path,
        "seconds": {
            "compile": round(compiled - started, 2),
            "link": round(time.monotonic() - compiled, 2),
            **{f"compile {name}": t for name, t in per_unit.items()},
        },
        "runner_bytes": runner.stat().st_size,
    }


def _parallelism() -> int:
    return max(1, len(allowed_cpus()))


_ERROR_LINE = re.compile(
    r"(: (fatal )?error:|undefined reference to|cannot find -l|^ld(\.\w+)?: |ld returned)"
)


def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if _ERROR_LINE.search(line):
            return line
    return lines[-1] if lines else "no output"


def _run_jobs(jobs: list[tuple[str, list[str]]], parallel: int, logdir: Path, root: Path,
              key: str) -> dict[str, float]:
    """Run compiler commands, ``parallel`` at a time; on the first failure stop the others.

    Returns the seconds each job took, by label.
    """
    pending = list(jobs)
    running: list[tuple[str, list[str], subprocess.Popen, Path, float]] = []
    seconds: dict[str, float] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                label, cmd = pending.pop(0)
                log = logdir / f"job{len(jobs) - len(pending)}.log"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
                running.append((label, cmd, proc, log, time.monotonic()))
            time.sleep(0.02)
            for item in list(running):
                label, cmd, proc, log, start = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                seconds[label] = round(time.monotonic() - start, 2)
                if proc.returncode != 0:
                    output = log.read_text(errors="replace")
                    saved = root / f"{key}.failed.log"
                    saved.write_text(f"$ {' '.join(cmd)}\n{output}")
                    raise BuildError(
                        f"building the fxopt runtime failed ({label}): {_first_error(output)} "
                        f"(full log: {saved})"
                    )
    finally:
        for _, _, proc, _, _ in running:  # only the compilers this function started
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return seconds


# --------------------------------------------------------------------------------------------
# qemu-user


def qemu_command(arch: str, *, cpu: str | None = None) -> list[str]:
    """The qemu-user command that runs a Linux program built for ``arch`` on this machine.

    ``["qemu-riscv64", "-L", "/usr/riscv64-linux-gnu", "-cpu", "rv64,v=true,vlen=128"]``: the
    program and its arguments go after it. ``-L`` points at the Debian cross C library that the
    cross toolchain installed (the dynamic loader and glibc of ``arch``); ``cpu`` is qemu's
    ``-cpu`` (needed for RVV: ``rv64,v=true,vlen=128``). Raises TargetError naming the Debian
    package to install when qemu or the C library is missing.
    """
    arch = _triple_arch(arch)
    if arch not in _QEMU:
        raise TargetError(
            f"no qemu-user setup for architecture {arch!r}; known: {', '.join(sorted(_QEMU))}"
        )
    binary, gnu_triple, libc_package = _QEMU[arch]
    path = shutil.which(binary) or shutil.which(f"{binary}-static")
    if path is None:
        raise TargetError(
            f"{binary} is not installed; install the Debian package qemu-user "
            "(`apt-get install qemu-user`)"
        )
    command = [Path(path).name]  # found on PATH
    if arch != host_arch():  # the host's own C library is where the program looks anyway
        sysroot = Path("/usr") / gnu_triple
        if not (sysroot / "lib").is_dir():
            raise TargetError(
                f"the {arch} C library for qemu ({sysroot}) is missing; install the Debian "
                f"package {_debian_package(gnu_triple + '-')} (it brings {libc_package})"
            )
        command += ["-L", str(sysroot)]
    if cpu:
        command += ["-cpu", cpu]
    return command


# --------------------------------------------------------------------------------------------
# The instruction-counting qemu plugin

_PLUGIN_NAME = "libfxopt_insn.so"
_PLUGIN_FLAGS = ("-std=c++17", "-O2", "-g0", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall")


def sources_digest() -> str:
    """sha256 of fxopt's runner and plugin sources (for keys of results they shape)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in _HERE.rglob("*") if p.is_file() and p.suffix in (".cc", ".h")):
        digest.update(str(path.relative_to(_HERE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_insn_plugin(*, cache_dir: Path | None = None) -> Path:
    """The qemu-user plugin ``runtime/qemu_insn_plugin.cc``, built for this machine (the one
    qemu runs on) with the host's ``g++`` and cached, like the runner, under
    ``~/.cache/fxopt/qemu-plugin/<key>/`` (``cache_dir`` instead when given); the key hashes
    the source, the flags and the compiler version. The source declares the few plugin-API
    functions it uses itself, so no qemu header or source package is needed. Builds in about
    a second. Raises TargetError when there is no host C++ compiler, BuildError when it fails.
    """
    compiler = _compiler(None, f"{host_arch()}-linux-gnu")
    source = _PLUGIN_SOURCE.read_bytes()
    inputs = {"format": 1, "compiler": compiler.version, "flags": list(_PLUGIN_FLAGS),
              "source": hashlib.sha256(source).hexdigest()}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    if cache_dir is not None:
        root = Path(cache_dir).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fxopt" / "qemu-plugin"
    final = root / key / _PLUGIN_NAME
    if final.is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create the plugin cache directory {final.parent}: {exc}") from exc
    # A private temporary name, then an atomic rename: concurrent builds never see half a file.
    tmp = final.parent / f".tmp-{os.getpid()}-{_PLUGIN_NAME}"
    command = [compiler.path, *_PLUGIN_FLAGS, "-o", str(tmp), str(_PLUGIN_SOURCE)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"building the qemu plugin failed: `{' '.join(command)}`: {exc}") from exc
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"building the qemu plugin failed: {_first_error(proc.stderr + proc.stdout)} "
                         f"(command: {' '.join(command)})")
    (final.parent / "build.json").write_text(json.dumps({"key": key, "inputs": inputs}, indent=2) + "\n")
    os.replace(tmp, final)
    return final

