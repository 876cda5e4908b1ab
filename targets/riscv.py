"""RISC-V 64-bit Linux targets: RV64GC scalar, and RV64GCV with the vector extension (RVV).

qemu-user emulates RVV with a chosen VLEN (``-cpu rv64,v=true,vlen=N``); LLVM's RVV code is
vector-length agnostic, so one build runs at any VLEN >= 128. ``capabilities.vector_bits`` is
the VLEN the schedules may assume."""

from __future__ import annotations

from dataclasses import replace

from . import Capabilities, Target, register_target

_RV64GC = ["+m", "+a", "+f", "+d", "+c"]

RISCV64 = register_target(Target(
    name="riscv64",
    description="RISC-V RV64GC Linux (scalar); run under qemu-riscv64 here",
    tvm={"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mabi": "lp64d", "mattr": _RV64GC},
    capabilities=Capabilities(vector_bits=0, sparse_kernels=True, preferred_layout="NHWC"),
    toolchain="riscv64-linux-gnu-",
    runner="qemu",
))

RISCV64_RVV = register_target(RISCV64.derive(
    "riscv64-rvv", "RISC-V RV64GCV Linux with the vector extension, VLEN 128; run under qemu-riscv64",
    tvm={"mattr": [*_RV64GC, "+v"]},
    capabilities=replace(RISCV64.capabilities, vector_bits=128),
    qemu_cpu="rv64,v=true,vlen=128,vext_spec=v1.0",
))

# By extensions, not mcpu: LLVM's spacemit-x60 CPU also enables extensions that qemu 7.2
# cannot emulate, and a build fxopt cannot run is a build it cannot verify.
register_target(RISCV64_RVV.derive(
    "spacemit-x60", "SpacemiT X60 class core (K1/M1 boards): RV64GCV with Zba/Zbb/Zbs, VLEN 256, 8 cores",
    tvm={"mattr": [*_RV64GC, "+v", "+zba", "+zbb", "+zbs"]},
    capabilities=replace(RISCV64_RVV.capabilities, vector_bits=256),  # derived: keeps the NHWC layout
    qemu_cpu="rv64,v=true,vlen=256,vext_spec=v1.0,zba=true,zbb=true,zbs=true",
    cores=8,
))
