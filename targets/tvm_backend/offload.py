"""Hand convs and matmuls to NVIDIA's libraries (cuBLAS, cuDNN, CUTLASS) through Relax's
pattern-based partitioning (FuseOpsByPattern with the patterns under tvm.relax.backend.cuda);
what no pattern matches stays with TVM's own (dlight-scheduled) kernels."""

from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax

from fxopt.errors import TargetError

_NAMES = {"cublas": "cuBLAS", "cudnn": "cuDNN", "cutlass": "CUTLASS"}


def missing_codegens(libraries) -> list[str]:
    """The libraries this apache-tvm build cannot generate code for (relax.ext.<library>)."""
    return [lib for lib in libraries if tvm.get_global_func(f"relax.ext.{lib}", allow_missing=True) is None]


def partition(mod: tvm.IRModule, libraries) -> tuple[tvm.IRModule, Counter]:
    """``mod`` with the subgraphs each library's patterns match (in the order given) made into
    functions for that library's code generator; also how many each library took."""
    from tvm.relax.backend.cuda import cublas, cudnn, cutlass

    partitioners = {"cublas": lambda m: cublas.partition_for_cublas(m, bind_constants=True),
                    "cudnn": cudnn.partition_for_cudnn, "cutlass": cutlass.partition_for_cutlass}
    for lib in libraries:
        if lib not in partitioners:
            raise TargetError(f"offload library {lib!r} is unknown; use one of {', '.join(partitioners)}")
        mod = partitioners[lib](mod)
    taken = Counter()
    for _, function in mod.functions_items():
        attrs = getattr(function, "attrs", None)
        if isinstance(function, relax.Function) and attrs is not None and "Codegen" in attrs:
            taken[str(attrs["Codegen"])] += 1
    return mod, taken


def offload(mod: tvm.IRModule, libraries, target_name: str) -> tuple[tvm.IRModule, Counter]:
    """Partition and generate the libraries' code (RunCodegen); a clear error where this TVM
    build lacks a library's code generator."""
    missing = missing_codegens(libraries)
    if missing:
        names = ", ".join(_NAMES[lib] for lib in missing)
        flags = " ".join(f"USE_{lib.upper()}=ON" for lib in missing)
        raise TargetError(
            f"target {target_name!r} offloads to {names}, but this apache-tvm build has no code generator "
            f"for it (missing: {', '.join(f'relax.ext.{lib}' for lib in missing)}): build TVM with {flags}, "
            "or use a target without offload (e.g. 'cuda')"
        )
    mod, taken = partition(mod, libraries)
    return relax.transform.RunCodegen()(mod), taken
