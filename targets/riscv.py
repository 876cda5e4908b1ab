"""RISC-V 64-bit Linux targets: RV64GC scalar, and RV64GCV with the vector extension (RVV).

qemu-user emulates RVV with a chosen VLEN (``-cpu rv64,v=true,vlen=N``); LLVM's RVV code is
vector-length agnostic, so one build runs at any VLEN >= 128. ``capabilities.vector_bits`` is
the VLEN the schedules may assume."""

from __future__ import annotations

from . import Capabilities, Target, register_target

_RV64GC = ["+m", "+a", "+f", "+d", "+c"]

RISCV64 = register_target(Target(
    name="riscv64",
    description="RISC-V RV64GC Linux (scalar); run under qemu-riscv64 here",
    tvm={"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mabi": "lp64d", "mattr": _RV64GC},
    capabilities=Capabilities(vector_bits=0),
    toolchain="riscv64-linux-gnu-",
    runner="qemu",
))

RISCV64_RVV = register_target(RISCV64.derive(
    "riscv64-rvv", "RISC-V RV64GCV Linux with the vector extension, VLEN 128; run under qemu-riscv64",
    tvm={"mattr": [*_RV64GC, "+v"]},
    capabilities=Capabilities(vector_bits=128),
    qemu_cpu="rv64,v=true,vlen=128",
))

register_target(RISCV64_RVV.derive(
    "spacemit-x60", "SpacemiT X60 class core (K1/M1 boards): RV64GCV, VLEN 256, 8 cores",
    tvm={"mcpu": "spacemit-x60"},
    capabilities=Capabilities(vector_bits=256),
    qemu_cpu="rv64,v=true,vlen=256",
    cores=8,
))
