"""The ``host`` target: the build machine itself, LLVM for its own CPU, run natively.

Capabilities are read once from ``/proc/cpuinfo`` (no TVM needed): the widest SIMD width the
CPU has (AVX-512 -> 512, AVX/AVX2 -> 256, SSE2 or NEON -> 128) and native fp16 arithmetic
(``avx512_fp16`` on x86, ``asimdhp`` on AArch64). The TVM dict leaves ``mcpu`` as ``native``
and the triple out; ``tvm_backend.resolve_target`` fills both from LLVM's view of this machine.
"""

from __future__ import annotations

import platform
from pathlib import Path

from . import Capabilities, Target, host_arch, register_target

_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """CPU feature flags of the first processor in /proc/cpuinfo (empty where unavailable)."""
    if cpuinfo is None:
        try:
            cpuinfo = _CPUINFO.read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / AArch64
            return frozenset(value.split())
    return frozenset()


def capabilities_from_flags(arch: str, flags: frozenset[str]) -> Capabilities:
    """Capabilities of a CPU of architecture ``arch`` with feature ``flags``."""
    if arch == "x86_64":
        if "avx512f" in flags:
            bits = 512
        elif "avx2" in flags or "avx" in flags:
            bits = 256
        elif "sse2" in flags:
            bits = 128
        else:
            bits = 0
        fp16 = "avx512_fp16" in flags
    elif arch == "aarch64":
        bits = 128 if ("asimd" in flags or not flags) else 0  # NEON is mandatory on AArch64
        fp16 = "asimdhp" in flags
    else:
        bits, fp16 = 0, False
    return Capabilities(vector_bits=bits, fp16=fp16, sparse_kernels=True, preferred_layout="NHWC")


HOST = register_target(
    Target(
        name="host",
        description=(
            f"this machine ({host_arch()} {platform.system()}): LLVM for the build machine's "
            "own CPU, run natively"
        ),
        tvm={"kind": "llvm", "mcpu": "native"},
        capabilities=capabilities_from_flags(host_arch(), cpu_flags()),
        pipeline="default",
        schedule="default",
        toolchain=None,
        runner="native",
        library="model.so",
    )
)
