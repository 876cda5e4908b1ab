"""The standalone runtime: a model as plain C plus TVM's kernels, without the TVM runtime.

    build(mod, target, model=)       emit the C (tvm_backend.standalone), compile it with the
                                     target's C toolchain -> StandaloneLibrary
    StandaloneLibrary.run(*inputs)   run the example program here (natively, qemu-user, or
                                     qemu-system for a microcontroller)
    StandaloneLibrary.write(dir)     the files of a build directory
    check(manifest, target)          run a build directory's example program on its golden inputs

A standalone build directory is a C library for the user's firmware or program:
``libfxopt_model.a`` (with the sources it is made of: ``fxopt_model.c/.h``, the kernels object,
the weights blob, fxopt's runtime shim), an example ``main.c`` and the ``Makefile`` that built
both. On Linux targets the example is a static executable (no dlopen, no C++ runtime); on
``riscv32-mcu`` it is a bare-metal ELF for qemu's ``virt`` machine (picolibc, semihosting for
file I/O). Each build reports its flash (code + constants) and peak RAM (arena + static data +
the stack a run used, measured by painting the stack) and fails when a board's ``flash_bytes``
or ``ram_bytes`` is exceeded.

This module does not import ``tvm`` (the emitter in ``tvm_backend.standalone`` does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from fxopt.errors import BuildError, TargetError

from . import Target, host_arch
from .runtime_build import qemu_command

__all__ = ["EXAMPLE", "LIBRARY", "StandaloneLibrary", "build", "check_limits", "count_instructions", "run_example",
           "toolchain_for"]

LIBRARY = "libfxopt_model.a"
EXAMPLE = "model.elf"
_SHIM = Path(__file__).resolve().parent / "standalone_c"
_SHIM_FILES = ("fxopt_runtime.c", "fxopt_runtime.h", "main.c")
_TIMEOUT_S = 600
_STACK_LINE = re.compile(r"fxopt: ok stack (\d+) workspace (\d+)")

# qemu-system machine for bare-metal targets: RAM of the virt machine starts at 0x80000000; the
# example is linked with its "flash" there and its RAM 16 MiB above (room for any test model).
_VIRT = {"flash": 0x80000000, "flash_size": 0x1000000, "ram": 0x81000000, "ram_size": 0x1000000}
_QEMU_SYSTEM = {"riscv32": "qemu-system-riscv32", "riscv64": "qemu-system-riscv64"}


# --------------------------------------------------------------------------------------------
# Toolchains


@dataclass(frozen=True)
class Toolchain:
    """How the C of a standalone build is compiled and linked for a target."""

    cc: str  # the C compiler command (``riscv64-unknown-elf-gcc``)
    prefix: str  # binutils prefix (``riscv64-unknown-elf-``; "" for the host)
    arch_flags: tuple[str, ...]  # -march/-mabi ... (the target's cflags)
    libc_flags: tuple[str, ...]  # picolibc's specs on bare metal
    example_ldflags: tuple[str, ...]  # the example program's link (qemu virt memory map, or -static)
    bare_metal: bool
    package: str  # the Debian package that has the compiler


def _bare_metal(target: Target) -> bool:
    triple = str(target.tvm.get("mtriple") or "")
    return triple.endswith(("-elf", "-none")) or "-none-" in triple


def _family(arch: str) -> str:
    """riscv32 and riscv64 share a compiler (multilib); other architectures must match."""
    arch = arch.lower()
    return "riscv" if arch.startswith("riscv") else {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch)


def toolchain_for(target: Target) -> Toolchain:
    """The C toolchain of ``target``, checked to be installed; TargetError names the package."""
    if target.tvm.get("kind") != "llvm":
        raise TargetError(f"the standalone runtime is for CPU targets; target {target.name!r} is "
                          f"{target.tvm.get('kind')}")
    bare = _bare_metal(target)
    prefix = target.toolchain or ""
    if not prefix and target.arch != host_arch():
        raise TargetError(f"target {target.name!r} is for {target.arch} but names no cross toolchain "
                          f"(toolchain = \"{target.arch}-linux-gnu-\")")
    cc = f"{prefix}gcc"
    package = ("gcc-" + prefix.rstrip("-")) if prefix else "gcc"
    if bare:
        package += " picolibc-" + prefix.rstrip("-")
    if shutil.which(cc) is None:
        raise TargetError(f"the standalone build for {target.name} needs the C compiler {cc}, which is not "
                          f"installed; install the Debian package(s) {package} (`apt-get install {package}`)")
    machine = subprocess.run([cc, "-dumpmachine"], capture_output=True, text=True).stdout.strip()
    if _family(machine.split("-", 1)[0]) != _family(target.arch):
        raise TargetError(f"{cc} compiles for {machine}, but target {target.name!r} is for {target.arch}; give the "
                          f"target the toolchain for {target.arch} (its `toolchain` prefix)")
    if bare:
        specs = subprocess.run([cc, "-print-file-name=picolibc.specs"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(specs):
            raise TargetError(f"{cc} finds no picolibc.specs: install the Debian package picolibc-"
                              f"{prefix.rstrip('-')} (`apt-get install picolibc-{prefix.rstrip('-')}`)")
        ld = (f"-Wl,--defsym=__flash={_VIRT['flash']:#x}", f"-Wl,--defsym=__flash_size={_VIRT['flash_size']:#x}",
              f"-Wl,--defsym=__ram={_VIRT['ram']:#x}", f"-Wl,--defsym=__ram_size={_VIRT['ram_size']:#x}",
              "-Wl,--defsym=__stack_size=0x20000", "--oslib=semihost", "--crt0=semihost")
        return Toolchain(cc, prefix, tuple(target.cflags), ("--specs=picolibc.specs",), ld, True, package)
    return Toolchain(cc, prefix, tuple(target.cflags), (), ("-static",), False, package)


def _makefile(target: Target, tc: Toolchain, model: str) -> str:
    probe = " size_probe.elf" if tc.bare_metal else ""
    probe_ld = " ".join(a for a in tc.example_ldflags if not a.startswith(("--oslib", "--crt0")))
    lines = [
        f"# fxopt standalone model {model} for target {target.name}: {target.description}",
        "#   make            libfxopt_model.a (link it into your program with fxopt_model.h) and the example",
        "#                   program model.elf (main.c: reads input_<i>.bin, writes output_<i>.bin)",
        "# Override CROSS, ARCH_FLAGS, CFLAGS or EXAMPLE_LDFLAGS on the command line for your board.",
        f"CROSS ?= {tc.prefix}",
        "CC := $(CROSS)gcc",
        "AR := $(CROSS)ar",
        f"ARCH_FLAGS ?= {' '.join(tc.arch_flags)}",
        f"LIBC_FLAGS ?= {' '.join(tc.libc_flags)}",
        "CFLAGS ?= -O2 -std=gnu11 -ffunction-sections -fdata-sections -Wall",
        f"EXAMPLE_LDFLAGS ?= {' '.join(tc.example_ldflags)} -Wl,--gc-sections",
        "LDLIBS ?= -lm",
        "COMPILED := fxopt_model.o fxopt_runtime.o fxopt_model_constants.o",
        "OBJS := $(COMPILED) fxopt_kernels.o  # fxopt_kernels.o: TVM's kernels, generated (a source here)",
        "",
        f"all: {LIBRARY} {EXAMPLE}{probe}",
        "",
        f"{LIBRARY}: $(OBJS)",
        "\trm -f $@ && $(AR) rcs $@ $^",
        "",
        "%.o: %.c fxopt_model.h fxopt_runtime.h",
        "\t$(CC) $(ARCH_FLAGS) $(LIBC_FLAGS) $(CFLAGS) -c $< -o $@",
        "",
        "fxopt_model_constants.o: fxopt_model_constants.S fxopt_model_constants.bin",
        "\t$(CC) $(ARCH_FLAGS) -Wa,-I$(CURDIR) -c $< -o $@  # .incbin finds the blob beside the Makefile",
        "",
        f"{EXAMPLE}: main.o {LIBRARY}",
        "\t$(CC) $(ARCH_FLAGS) $(LIBC_FLAGS) -o $@ main.o $(EXAMPLE_LDFLAGS) " + LIBRARY + " $(LDLIBS)",
        "",
    ]
    if tc.bare_metal:
        lines += [
            "# the least firmware that runs the model (no stdio): what the model costs in flash and RAM",
            f"size_probe.elf: size_probe.o {LIBRARY}",
            f"\t$(CC) $(ARCH_FLAGS) $(LIBC_FLAGS) --crt0=minimal -o $@ size_probe.o {probe_ld} -Wl,--gc-sections "
            + LIBRARY + " $(LDLIBS)",
            "",
        ]
    lines += ["clean:", f"\trm -f $(COMPILED) main.o size_probe.o {LIBRARY} {EXAMPLE} size_probe.elf", "",
              ".PHONY: all clean", ""]
    return "\n".join(lines)


_SIZE_PROBE = """/* fxopt: the least program that runs the model, to measure its flash and RAM */
#include <stdint.h>
#include "fxopt_model.h"
static uint8_t in[FXOPT_MODEL_NUM_INPUTS][(FXOPT_MODEL_IO_MAX_BYTES + 63u) & ~63u] __attribute__((aligned(64)));
static uint8_t out[FXOPT_MODEL_NUM_OUTPUTS][(FXOPT_MODEL_IO_MAX_BYTES + 63u) & ~63u] __attribute__((aligned(64)));
int main(void) {
  const void* inputs[FXOPT_MODEL_NUM_INPUTS];
  void* outputs[FXOPT_MODEL_NUM_OUTPUTS];
  for (int i = 0; i < FXOPT_MODEL_NUM_INPUTS; ++i) inputs[i] = in[i];
  for (int i = 0; i < FXOPT_MODEL_NUM_OUTPUTS; ++i) outputs[i] = out[i];
  return fxopt_model_run(inputs, outputs);
}
"""


def _make(directory: Path, target: Target) -> None:
    make = shutil.which("make")
    if make is None:
        raise TargetError("the standalone build needs GNU make (Debian package make)")
    try:
        proc = subprocess.run([make, "-C", str(directory), "-j1"], capture_output=True, text=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"compiling the standalone model for {target.name} did not finish in {_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        text = proc.stderr + proc.stdout
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        first = next((ln for ln in lines if re.search(r"error|undefined reference|cannot find", ln)),
                     lines[-1] if lines else "")
        undefined = re.findall(r"undefined reference to `([^']+)'", text)
        hint = (f" (the kernels need {', '.join(sorted(set(undefined)))}, which neither fxopt's runtime shim nor "
                "the C library provides: the model uses a TVM feature the standalone runtime lacks)") if undefined else ""
        raise BuildError(f"compiling the standalone model for {target.name} failed: {first}{hint} "
                         f"(run `make -C {directory}` to see it all)")


# --------------------------------------------------------------------------------------------
# Sizes


_RAM_ONLY = (".bss", ".sbss", ".tbss", ".noinit")
_FLASH_AND_RAM = (".data", ".sdata", ".tdata")


def section_sizes(elf_or_object: Path, prefix: str) -> dict[str, int]:
    """Flash and RAM bytes of an ELF file or object by its sections (``size -A``): code,
    read-only data and initialized data in flash; initialized data and zeroed data in RAM.
    The linker's stack and heap reservations are left out (the stack is measured)."""
    tool = shutil.which(f"{prefix}size") or shutil.which("size")
    if tool is None:
        raise TargetError(f"{prefix}size (binutils) is needed to measure the build")
    proc = subprocess.run([tool, "-A", str(elf_or_object)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{tool} -A {elf_or_object} failed: {proc.stderr.strip()}")
    flash = ram = 0
    linked = elf_or_object.suffix == ".elf" or elf_or_object.suffix == ""
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[0].startswith(".") or not parts[1].isdigit():
            continue
        name, size, addr = parts[0], int(parts[1]), int(parts[2])
        if linked and addr == 0:
            continue  # not loaded (.comment, attributes, debug)
        if name.startswith((".stack", ".heap", ".comment", ".note", ".riscv.attributes", ".debug", ".rela",
                            ".symtab", ".strtab", ".shstrtab", ".eh_frame")) and name != ".note.gnu.build-id":
            continue
        if name.startswith(_RAM_ONLY):
            ram += size
        elif name.startswith(_FLASH_AND_RAM):
            ram += size
            flash += size
        elif name.startswith((".text", ".rodata", ".srodata", ".init", ".fini", ".preinit", ".data.rel.ro")):
            flash += size
    return {"flash": flash, "ram": ram}


def check_limits(target: Target, sizes: dict, where: str = "") -> None:
    """BuildError when the build needs more flash or RAM than the target (board) has."""
    source = where or f"target {target.name}"
    problems = []
    if target.flash_bytes is not None and sizes["flash_bytes"] > target.flash_bytes:
        problems.append(f"flash: it needs {sizes['flash_bytes']} bytes (code {sizes['code_bytes']} + constants "
                        f"{sizes['constants_bytes']}), {source} has flash_bytes = {target.flash_bytes}")
    if target.ram_bytes is not None and sizes["ram_bytes"] > target.ram_bytes:
        problems.append(f"RAM: it needs {sizes['ram_bytes']} bytes (arena {sizes['arena_bytes']} + static data "
                        f"{sizes['static_ram_bytes']} + stack {sizes['stack_bytes']}), {source} has ram_bytes = "
                        f"{target.ram_bytes}")
    if problems:
        raise BuildError(f"the model does not fit {source}: " + "; ".join(problems)
                         + ". Make the model smaller (fewer channels, fxopt's prune plans), or use a board with more "
                         "memory (flash_bytes / ram_bytes in its TOML file)")


# --------------------------------------------------------------------------------------------
# Running


def command_prefix(target: Target) -> list[str]:
    """What runs the example program of ``target`` here; TargetError says why it cannot."""
    if target.run_command:
        return list(target.run_command)
    if _bare_metal(target):
        qemu = _QEMU_SYSTEM.get(target.arch)
        if qemu is None:
            raise TargetError(f"no qemu-system machine for bare-metal {target.arch} targets")
        if shutil.which(qemu) is None:
            raise TargetError(f"{qemu} is not installed; install the Debian package qemu-system-misc "
                              "(`apt-get install qemu-system-misc`)")
        cpu = ["-cpu", target.qemu_cpu] if target.qemu_cpu else []
        return [qemu, "-machine", "virt", *cpu, "-bios", "none", "-nographic", "-monitor", "none",
                "-semihosting-config", "enable=on,target=native", "-kernel"]
    if target.arch == host_arch():
        return []
    return qemu_command(target.arch, cpu=target.qemu_cpu)


def run_example(target: Target, example: Path, inputs: Sequence[np.ndarray], outputs: Sequence[dict], *,
                extra: Sequence[str] = (), prefix: Sequence[str] | None = None) -> tuple[list[np.ndarray], dict]:
    """Run the example program on ``inputs``: the outputs (shapes and dtypes from ``outputs``) and
    what it said ({"stack_bytes", "workspace_bytes", "stdout"})."""
    prefix = command_prefix(target) if prefix is None else list(prefix)
    with tempfile.TemporaryDirectory(prefix="fxopt-standalone-") as scratch:
        scratch = Path(scratch)
        for i, array in enumerate(inputs):
            (scratch / f"input_{i}.bin").write_bytes(np.ascontiguousarray(array).tobytes())
        command = [*prefix, str(example.resolve()), *extra]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_S, cwd=scratch)
        except subprocess.TimeoutExpired as exc:
            raise BuildError(f"`{' '.join(command[:3])} ...` did not finish in {_TIMEOUT_S} s") from exc
        said = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0:
            detail = next((ln for ln in said.splitlines() if ln.startswith("fxopt:")), said[-300:] or
                          f"exit code {proc.returncode}")
            raise BuildError(f"the standalone model failed on {target.name} (`{' '.join(command)}`): {detail}")
        match = _STACK_LINE.search(said)
        arrays = []
        for i, spec in enumerate(outputs):
            raw = (scratch / f"output_{i}.bin").read_bytes()
            arrays.append(np.frombuffer(raw, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"]).copy())
    info = {"stack_bytes": int(match.group(1)) if match else None,
            "workspace_bytes": int(match.group(2)) if match else None, "stdout": said}
    return arrays, info


def count_instructions(target: Target, example: Path, inputs: Sequence[np.ndarray], outputs: Sequence[dict], *,
                       repeat: int) -> tuple[list[int], int]:
    """Guest instructions of each of ``repeat`` runs of a Linux target's example program under
    qemu-user with fxopt's counting plugin (the first run is not counted): (per-run, whole process).
    The example brackets each counted run with the plugin's marker system calls (main.c)."""
    from .runners import _parse_counts
    from .runtime_build import build_insn_plugin

    if _bare_metal(target):
        raise TargetError(f"instruction counts use qemu-user; {target.name} is bare metal (qemu-system)")
    plugin = build_insn_plugin()
    with tempfile.TemporaryDirectory(prefix="fxopt-standalone-insn-") as scratch:
        counts = Path(scratch) / "counts.txt"
        prefix = [*qemu_command(target.arch, cpu=target.qemu_cpu), "-plugin", f"file={plugin},out={counts}"]
        run_example(target, example, inputs, outputs, extra=[str(repeat)], prefix=prefix)
        text = counts.read_text()
    return _parse_counts(text, repeat)


# --------------------------------------------------------------------------------------------
# The build


@dataclass
class StandaloneLibrary:
    """A model built as standalone C for a target: its files, figures, and a way to run it."""

    target: Target
    directory: Path  # the built files (a scratch directory owned by this object)
    sources: dict  # what the emitter reported (tvm_backend.standalone.StandaloneSources.to_json())
    sizes: dict = field(default_factory=dict)
    _scratch: object = field(default=None, repr=False)

    library_name = LIBRARY
    standalone = True

    @property
    def signature(self) -> dict:
        return {"inputs": self.sources["inputs"], "outputs": self.sources["outputs"]}

    def run(self, *tensors) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t) for t in tensors]
        expected = self.sources["inputs"]
        if len(arrays) != len(expected):
            raise BuildError(f"the standalone model takes {len(expected)} input(s), got {len(arrays)}")
        for i, (array, spec) in enumerate(zip(arrays, expected)):
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                raise BuildError(f"input {i} ({spec['name']}): expected {spec['dtype']}{spec['shape']}, got "
                                 f"{array.dtype}{list(array.shape)}; the standalone model has static shapes")
        outputs, info = run_example(self.target, self.directory / EXAMPLE, arrays, self.sources["outputs"])
        self.last_run = info
        return outputs

    def files(self) -> list[str]:
        return sorted(p.name for p in self.directory.iterdir() if p.is_file() and not p.name.endswith(".o")
                      or p.name == "fxopt_kernels.o")

    def write(self, directory: Path) -> list[str]:
        """Copy the build's files (sources, library, example, Makefile, figures) into ``directory``."""
        names = []
        for name in self.files():
            shutil.copy2(self.directory / name, directory / name)
            names.append(name)
        (directory / "README.txt").write_text(readme(self.target, self.sources, self.sizes))
        return names + ["README.txt"]


def build(mod, target: Target, *, model: str = "model", example_inputs: Sequence[np.ndarray] = ()) -> StandaloneLibrary:
    """Emit and compile ``mod`` (a Relax IRModule from ``tvm_backend.lower``) as standalone C for
    ``target``. With ``example_inputs`` the example program is run once (here, or under qemu) to
    measure the stack, and the flash/RAM figures are checked against the target's limits."""
    from .tvm_backend import standalone as emitter

    tc = toolchain_for(target)  # a missing compiler fails before TVM works
    scratch = tempfile.TemporaryDirectory(prefix="fxopt-standalone-build-")
    directory = Path(scratch.name)
    sources = emitter.emit(mod, target, directory, model=model)
    for name in _SHIM_FILES:
        shutil.copy2(_SHIM / name, directory / name)
    if tc.bare_metal:
        (directory / "size_probe.c").write_text(_SIZE_PROBE)
    (directory / "Makefile").write_text(_makefile(target, tc, model))
    _make(directory, target)
    library = StandaloneLibrary(target, directory, sources.to_json(), _scratch=scratch)
    stack = None
    if example_inputs:
        _, info = run_example(target, directory / EXAMPLE, example_inputs, sources.outputs)
        stack = info["stack_bytes"]
    library.sizes = measure(directory, tc, sources, stack)
    (directory / "fxopt_sizes.json").write_text(json.dumps(library.sizes, indent=2) + "\n")
    check_limits(target, library.sizes)
    return library


def measure(directory: Path, tc: Toolchain, sources, stack: int | None) -> dict:
    """Flash and RAM of the model. Bare metal: the least firmware that runs it (size_probe.elf,
    so the C library and soft-float routines it pulls in count), less its I/O buffers. Linux:
    the library's own objects."""
    objects = {name: section_sizes(directory / name, tc.prefix) for name in
               ("fxopt_model.o", "fxopt_runtime.o", "fxopt_kernels.o", "fxopt_model_constants.o")}
    # the probe's (and the example's) I/O buffers: every input and output FXOPT_MODEL_IO_MAX_BYTES
    io = (len(sources.inputs) + len(sources.outputs)) * _align64(max(s["bytes"] for s in sources.inputs + sources.outputs))
    if tc.bare_metal:
        whole = section_sizes(directory / "size_probe.elf", tc.prefix)
        flash, static_ram = whole["flash"], whole["ram"] - io - sources.arena_bytes
        scope = "firmware"
    else:
        flash = sum(s["flash"] for s in objects.values())
        static_ram = sum(s["ram"] for s in objects.values()) - sources.arena_bytes
        scope = "library"
    constants = sources.constants_bytes
    return {
        "scope": scope,  # what flash/RAM cover: the least firmware (bare metal) or the library's objects
        "flash_bytes": flash,
        "code_bytes": flash - constants,
        "constants_bytes": constants,
        "kernels_code_bytes": objects["fxopt_kernels.o"]["flash"],
        "ram_bytes": sources.arena_bytes + max(static_ram, 0) + (stack or 0),
        "arena_bytes": sources.arena_bytes,
        "storage_bytes": sources.storage_bytes,
        "storage_bytes_unplanned": sources.storage_bytes_unplanned,
        "workspace_bytes": sources.workspace_bytes,
        "static_ram_bytes": max(static_ram, 0),
        "stack_bytes": stack,
        "io_bytes": io,
        "kernels": len(sources.kernel_names),
        "kernel_calls": sources.calls,
    }


def _align64(n: int) -> int:
    return (n + 63) // 64 * 64


def readme(target: Target, sources: dict, sizes: dict) -> str:
    def tensors(kind: str, specs: list[dict]) -> str:
        return "\n".join(f"    {kind} {i}: {s['name']} {s['dtype']}{s['shape']} ({s['bytes']} bytes)"
                         for i, s in enumerate(specs))

    stack = f"{sizes.get('stack_bytes')} bytes measured" if sizes.get("stack_bytes") is not None else "not measured"
    scope = ("the least firmware that runs the model, C library and soft-float routines included"
             if sizes.get("scope") == "firmware" else "the library's objects")
    return f"""fxopt standalone build for target {target.name}: {target.description}
No TVM runtime, no dynamic loading, no heap: plain C, TVM's kernels as an object file.

{tensors('input', sources['inputs'])}
{tensors('output', sources['outputs'])}

    #include "fxopt_model.h"
    int status = fxopt_model_run(inputs, outputs);  /* 0, or -1: fxopt_model_last_error() */

Inputs must be {64}-byte aligned; the call is not reentrant (one static arena).
Flash: {sizes.get('flash_bytes')} bytes (code {sizes.get('code_bytes')} + constants {sizes.get('constants_bytes')}; {scope})
RAM:   {sizes.get('ram_bytes')} bytes (arena {sizes.get('arena_bytes')} + static data {sizes.get('static_ram_bytes')} + stack, {stack})

Files: libfxopt_model.a (link this), fxopt_model.h (the API), the sources it is built from
(fxopt_model.c, fxopt_runtime.c/.h, fxopt_kernels.o, fxopt_model_constants.S/.bin), main.c
(example: reads input_<i>.bin, writes output_<i>.bin), Makefile (`make` rebuilds all; set
CROSS, ARCH_FLAGS, EXAMPLE_LDFLAGS for your board), {EXAMPLE} (the example, built for
{'qemu-system virt with semihosting' if _bare_metal(target) else 'Linux, static'}), golden input_*.npy / expected_output_*.npy,
manifest.json (sha256 of every file), report.json.
Here (with fxopt installed): fxopt check <this directory>
"""


def check(manifest, target: Target) -> list[np.ndarray]:
    """Outputs of a standalone build directory's example program on its golden inputs."""
    data = manifest.data
    inputs = [np.load(manifest.file(e["golden"]), allow_pickle=False) for e in data["inputs"]]
    outputs = [{"shape": e["shape"], "dtype": e["dtype"]} for e in data["outputs"]]
    arrays, _ = run_example(target, manifest.file(EXAMPLE), inputs, outputs)
    return arrays
