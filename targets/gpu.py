"""GPU targets: CUDA (NVIDIA, run where a driver and GPU are present) and the mobile-GPU APIs
OpenCL and Vulkan (compiled and packaged here; run on the device). Kernels are scheduled by
TVM's default GPU pipeline (dlight rules); the host side is LLVM for the build machine."""

from __future__ import annotations

from . import Capabilities, Target, register_target

_HOST = {"kind": "llvm"}

CUDA = register_target(Target(
    name="cuda",
    description="NVIDIA GPU with CUDA, sm_80 (A100) by default: derive a board/preset to change 'arch'",
    tvm={"kind": "cuda", "arch": "sm_80", "host": _HOST},
    capabilities=Capabilities(vector_bits=0, fp16=True),
    runner="gpu",
))

register_target(CUDA.derive("cuda-sm90", "NVIDIA Hopper GPU (H100/H200) with CUDA, sm_90", tvm={"arch": "sm_90"}))

register_target(CUDA.derive(
    "cuda-offload",
    "NVIDIA GPU, sm_80, with matmuls offloaded to cuBLAS and convs to cuDNN (needs a TVM built with them)",
    offload=("cublas", "cudnn"),
))

register_target(Target(
    name="opencl",
    description="mobile GPU through OpenCL (Adreno, Mali): compiled and packaged here, run on the device",
    tvm={"kind": "opencl", "host": _HOST},
    capabilities=Capabilities(fp16=True),
    runner="gpu",
))

register_target(Target(
    name="vulkan",
    description="mobile GPU through Vulkan (SPIR-V): needs a TVM build with Vulkan codegen",
    tvm={"kind": "vulkan", "host": _HOST},
    capabilities=Capabilities(fp16=True),
    runner="gpu",
))
