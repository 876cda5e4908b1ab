"""Running a build with its target's runner: the C++ ``fxopt-run`` program, natively, under
qemu-user, or through a board's ``run_command``. Used where the TVM runtime in this Python
process cannot run the build (another architecture), and shipped in every CPU build directory.
``count_instructions`` runs it under qemu-user with fxopt's counting plugin (fxopt.measure's
``qemu-insn`` backend).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from fxopt.errors import BuildError, TargetError

from . import Target, host_arch
from .runtime_build import RuntimeBuild, build_insn_plugin, build_runtime, qemu_command

RUNNER = "fxopt-run"
_TIMEOUT_S = 900  # a hung emulated run must not hang a build


def ships_runner(target: Target) -> bool:
    """CPU targets get the runner and runtime in their build directory."""
    return target.tvm.get("kind") == "llvm"


def runtime_for(target: Target) -> RuntimeBuild:
    """The runner (and runtime libraries) built for ``target``, from the cache when it exists."""
    triple = target.tvm.get("mtriple") or f"{host_arch()}-linux-gnu"
    return build_runtime(target.toolchain, str(triple))


def command_prefix(target: Target) -> list[str]:
    """What runs a program of ``target`` on this machine: nothing (native), qemu-user, or the
    board's command; TargetError saying why when there is no way."""
    if target.run_command:
        return list(target.run_command)
    if target.tvm.get("kind") != "llvm":
        raise TargetError(f"a {target.name} build runs on its GPU, which this machine lacks")
    if target.arch == host_arch():
        return []
    if target.runner == "qemu":
        return qemu_command(target.arch, cpu=target.qemu_cpu)
    raise TargetError(f"a {target.name} build ({target.arch}) cannot run on this {host_arch()} machine and the "
                      f"target names no emulator or run_command")


def _run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"`{' '.join(command[:4])} ...` did not finish in {_TIMEOUT_S} s") from exc


def _failure(command: list[str], proc: subprocess.CompletedProcess) -> BuildError:
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    detail = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else f"exit code {proc.returncode}")
    if proc.returncode == -4 or proc.returncode == 132:
        detail += " (illegal instruction: the CPU or emulator lacks an extension the build uses)"
    return BuildError(f"`{' '.join(command)}` failed: {detail}")


def _input_arguments(inputs: Sequence[np.ndarray], directory: Path) -> list[str]:
    """``inputs`` saved as .npy files in ``directory``, as the runner's ``--input`` arguments."""
    arguments: list[str] = []
    for i, array in enumerate(inputs):
        np.save(directory / f"input_{i}.npy", np.ascontiguousarray(array))
        arguments += ["--input", str(directory / f"input_{i}.npy")]
    return arguments


def run(target: Target, runner: Path, library: Path, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``library`` on ``inputs``, run by ``runner`` the target's way."""
    prefix = command_prefix(target)
    with tempfile.TemporaryDirectory(prefix="fxopt-run-") as scratch:
        scratch = Path(scratch)
        command = [*prefix, str(runner), str(library), *_input_arguments(inputs, scratch), "--output-dir", str(scratch)]
        proc = _run(command)
        if proc.returncode != 0:
            raise _failure(command, proc)
        outputs = sorted(scratch.glob("output_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
        return [np.load(p, allow_pickle=False) for p in outputs]


def count_instructions(target: Target, runner: Path, library: Path, inputs: Sequence[np.ndarray], *,
                       repeat: int, warmup: int = 0, plugin: Path | None = None) -> tuple[list[int], int]:
    """Guest instructions of each of ``repeat`` runs of ``library`` under qemu-user, and of the
    whole process: (per-run counts, total).

    The runner brackets each timed run with marker system calls and the plugin counts between
    them (see runtime/qemu_insn_plugin.cc), so start-up, file reading and loading are not in
    the per-run counts. The first run and ``warmup`` more are not counted. ``TVM_NUM_THREADS=1``:
    with more threads the pool's spin-waits make the count vary from run to run.
    """
    if target.tvm.get("kind") != "llvm":
        raise TargetError(f"instruction counts need a CPU build; target {target.name!r} is for "
                          f"{target.tvm.get('kind')}")
    plugin = plugin or build_insn_plugin()
    qemu = qemu_command(target.arch, cpu=target.qemu_cpu)
    with tempfile.TemporaryDirectory(prefix="fxopt-insn-") as scratch:
        scratch = Path(scratch)
        counts_file = scratch / "counts.txt"
        command = [*qemu, "-plugin", f"file={plugin},out={counts_file}", str(runner), str(library),
                   *_input_arguments(inputs, scratch), "--output-dir", str(scratch / "out"),
                   "--warmup", str(warmup), "--repeat", str(repeat)]
        proc = _run(command, env={**os.environ, "TVM_NUM_THREADS": "1"})
        plugin_lines = [ln for ln in proc.stderr.splitlines() if "plugin" in ln.lower()]
        if proc.returncode != 0 and plugin_lines:
            raise TargetError(f"{qemu[0]} cannot load fxopt's counting plugin: {plugin_lines[0]}. The plugin "
                              "is written for qemu's plugin API version 1 (qemu 7.2 to 8.x) and needs a "
                              "dynamically linked qemu-user (Debian package qemu-user, not qemu-user-static)")
        if proc.returncode != 0:
            raise _failure(command, proc)
        try:
            text = counts_file.read_text()
        except OSError as exc:
            raise BuildError(f"the counting plugin wrote no counts ({counts_file}: {exc.strerror}); "
                             f"qemu said: {proc.stderr.strip()[-300:] or 'nothing'}") from exc
    return _parse_counts(text, repeat)


def _parse_counts(text: str, repeat: int) -> tuple[list[int], int]:
    lines = text.split("\n")
    try:
        if lines[0] != "fxopt-insn-count 1":
            raise ValueError(f"unknown header {lines[0]!r}")
        total = int(lines[1].removeprefix("total "))
        n = int(lines[2].removeprefix("intervals "))
        counts = [int(line) for line in lines[3:3 + n]]
    except (IndexError, ValueError) as exc:
        raise BuildError(f"the counting plugin's output is not readable ({exc}): {text[:200]!r}") from None
    errors = [line for line in lines[3 + n:] if line.startswith("error")]
    if errors or len(counts) != repeat:
        raise BuildError(f"the counting plugin saw {len(counts)} marked runs, expected {repeat}"
                         + (f" ({errors[0]})" if errors else "; is the runner older than the plugin?"))
    return counts, total


_CHECK_LINE = re.compile(r"check output_(\d+): max abs error (\S+), max error / output scale ([^:\s]+)")


def check(target: Target, build_dir: Path, library: str, rtol: float, atol: float) -> tuple[bool, float, float, str]:
    """Run a build directory's runner on its golden input (``--check``): (ok, max abs error,
    max relative error, the runner's report)."""
    prefix = command_prefix(target)
    command = [*prefix, str(build_dir / RUNNER), str(build_dir / library), "--check", str(build_dir),
               "--rtol", repr(rtol), "--atol", repr(atol)]
    proc = _run(command)
    if proc.returncode not in (0, 1):
        raise _failure(command, proc)
    errors = [(float(a), float(r)) for _, a, r in _CHECK_LINE.findall(proc.stdout)]
    worst_abs = max((a for a, _ in errors), default=float("inf"))
    worst_rel = max((r for _, r in errors), default=float("inf"))
    return proc.returncode == 0, worst_abs, worst_rel, proc.stdout.strip()


def copy_runtime(runtime: RuntimeBuild, directory: Path) -> list[str]:
    """Put the runner and its libraries into a build directory; the names written."""
    names = []
    for path in (runtime.runner, *runtime.libraries):
        name = RUNNER if path == runtime.runner else path.name
        shutil.copy2(path, directory / name)
        names.append(name)
    return names


def readme(target: Target, library: str, inputs: int) -> str:
    """How to run a build directory on its device."""
    prefix = command_prefix_or_none(target)
    runs = "cannot run on this machine" if prefix is None else " ".join(prefix) if prefix else "natively"
    input_args = " ".join(f"--input input_{i}.npy" for i in range(inputs))
    if not ships_runner(target):  # a GPU build: a library for the TVM runtime of the device's own install
        return f"""fxopt build for target {target.name}: {target.description}

Files: {library} (the compiled model, for the TVM runtime), input_*.npy (golden inputs),
expected_output_*.npy (what PyTorch computed), report.json, report.html,
manifest.json (shapes, dtypes, versions and the sha256 of every file).

There is no runner for this target: on a machine with the device and fxopt installed,
    fxopt check <this directory>      # loads {library} with the TVM runtime, runs the golden input
or load {library} with tvm.runtime.load_module and run it with tvm.relax.VirtualMachine.
"""
    return f"""fxopt build for target {target.name}: {target.description}

Files: {library} (the compiled model), {RUNNER} (runner with the TVM runtime linked in),
input_*.npy (golden inputs), expected_output_*.npy (what PyTorch computed), report.json,
report.html, manifest.json (shapes, dtypes, versions and the sha256 of every file).

On the device (copy this directory there):
    ./{RUNNER} {library} --check .                 # run the golden input, compare; exit 0 on a match
    ./{RUNNER} {library} {input_args} --output-dir out --repeat 20
Here (with fxopt installed): fxopt check <this directory>   (runs via: {runs})
"""


def command_prefix_or_none(target: Target) -> list[str] | None:
    try:
        return command_prefix(target)
    except TargetError:
        return None
