"""RISC-V 32-bit microcontrollers, bare metal: no OS, no C++ runtime, so no TVM runtime.

Builds use fxopt's standalone runtime (``targets/standalone.py``): the model as plain C with a
static arena, TVM's kernels as an LLVM object, compiled with Debian's ``gcc-riscv64-unknown-elf``
(multilib: rv32 included) against picolibc, and run here bare-metal under
``qemu-system-riscv32`` (``virt`` machine, semihosting for file I/O). ``cflags`` carry the
``-march``/``-mabi`` that match the TVM dict's ``mattr``/``mabi``; a board TOML derived from one
of these adds ``flash_bytes``/``ram_bytes`` (and may change the ISA with both).
"""

from __future__ import annotations

from . import Capabilities, Target, register_target

RISCV32_MCU = register_target(Target(
    name="riscv32-mcu",
    description="RISC-V RV32IMAC microcontroller, bare metal, soft float; standalone C, run under qemu-system-riscv32",
    tvm={"kind": "llvm", "mtriple": "riscv32-unknown-elf", "mabi": "ilp32", "mattr": ["+m", "+a", "+c"]},
    capabilities=Capabilities(vector_bits=0, sparse_kernels=False, preferred_layout="NHWC"),
    toolchain="riscv64-unknown-elf-",
    runner="qemu",
    cores=1,
    runtime="standalone",
    cflags=("-march=rv32imac", "-mabi=ilp32"),
    library="libfxopt_model.a",
))

register_target(RISCV32_MCU.derive(
    "riscv32-mcu-f", "RISC-V RV32IMAFC microcontroller with a single-precision FPU, bare metal; standalone C, "
    "run under qemu-system-riscv32",
    tvm={"mabi": "ilp32f", "mattr": ["+m", "+a", "+f", "+c"]},
    cflags=("-march=rv32imafc", "-mabi=ilp32f"),
))
