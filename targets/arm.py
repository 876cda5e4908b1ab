"""AArch64 Linux targets (NEON): built with the aarch64 cross toolchain, run under qemu-aarch64
here or natively on the device. Presets name a core: LLVM tunes for it and may use its
extensions (fp16 arithmetic on Armv8.2 cores)."""

from __future__ import annotations

from dataclasses import replace

from . import Capabilities, Target, register_target

ARM64 = register_target(Target(
    name="arm64",
    description="AArch64 Linux, NEON (generic Armv8-A); run under qemu-aarch64 here",
    tvm={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    capabilities=Capabilities(vector_bits=128, sparse_kernels=True, preferred_layout="NHWC"),
    toolchain="aarch64-linux-gnu-",
    runner="qemu",
))

for core, description in (("cortex-a76", "big core of 2019-2022 phones"), ("cortex-a55", "little core of most phones")):
    register_target(ARM64.derive(
        core, f"Arm {core} ({description}): AArch64 Armv8.2-A with NEON and fp16",
        tvm={"mcpu": core, "mattr": ["+neon", "+fullfp16"]},
        capabilities=replace(ARM64.capabilities, fp16=True),
    ))
