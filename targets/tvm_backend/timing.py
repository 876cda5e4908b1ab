"""What :mod:`fxopt.measure` needs from TVM besides RPC: the identity of a lowered workload,
and timing on this machine with a fixed number of threads.

Why a workload digest of its own: a Relax module's script text names its constants
(``metadata["ir.GenericConst"][3]``) but does not show their values, and a measurement depends
on them where kernels specialise on the weights (sparse kernels on the zero pattern). The
digest is the script text plus every constant's dtype, shape and bytes, in the order the
module uses them (about 50 ms for MobileNetV2's 14 MB of weights).

Why timing runs in a thread of its own: TVM's CPU thread pool is per calling thread and takes
its size from ``TVM_NUM_THREADS`` (else half the hardware threads on x86) when it is first used;
``runtime.config_threadpool`` can shrink an existing pool but not grow it, and it binds the
calling thread to a core. A thread of fxopt's own gets a pool of exactly the requested size,
bound to the cores this process may use, and the caller's threads are left as they were. It is
one long-lived thread per thread count, not a fresh thread per measurement: TVM does not free
the pool of a thread that ends, and its workers, left behind, slowed every later measurement
(8 measurements in a row of one model: 0.22 ms, growing to 0.38 ms, 2 threads more each time).
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from fxopt.errors import BuildError, FxoptError

from . import CompiledLibrary, _tvm

__all__ = ["workload_digest", "time_local"]

# TVM's ThreadGroup::AffinityMode values.
_ONE_CORE_PER_THREAD = -2
_SHARE_ALL_CORES = -3


def workload_digest(mod) -> str:
    """sha256 of a Relax module's script text and of its constants (dtype, shape, bytes)."""
    tvm = _tvm()
    from tvm import relax

    digest = hashlib.sha256(mod.script().encode())

    def visit(expr) -> None:
        if isinstance(expr, tvm.ir.Constant):
            value = getattr(expr, "value", None)
            if hasattr(value, "numpy"):
                array = value.numpy()
                digest.update(f"\0{array.dtype}{array.shape}\0".encode())
                digest.update(array.tobytes())

    for _, func in sorted(mod.functions_items(), key=lambda item: item[0].name_hint):
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return digest.hexdigest()


_TIMING_THREADS: dict[int, ThreadPoolExecutor] = {}
_TIMING_LOCK = threading.Lock()


def _timing_thread(threads: int) -> ThreadPoolExecutor:
    """The one thread that times with ``threads`` pool threads (its TVM pool lives as long)."""
    with _TIMING_LOCK:
        if threads not in _TIMING_THREADS:
            _TIMING_THREADS[threads] = ThreadPoolExecutor(1, thread_name_prefix=f"fxopt-measure-{threads}")
        return _TIMING_THREADS[threads]


def time_local(lib: CompiledLibrary, inputs: Sequence[Any], *, repeat: int, number: int,
               warmup: int, threads: int) -> list[float]:
    """Seconds per run of ``lib`` on this machine with ``threads`` pool threads: ``warmup`` runs
    discarded, then ``repeat`` samples, each the mean of ``number`` runs."""
    tvm = _tvm()
    configure = tvm.get_global_func("runtime.config_threadpool")
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
            cpus = sorted(os.sched_getaffinity(0))
            if threads <= len(cpus):  # one core per thread
                configure(_ONE_CORE_PER_THREAD, threads, [str(c) for c in cpus[:threads]])
            else:  # more threads than cores: they share them all
                configure(_SHARE_ALL_CORES, threads, [str(c) for c in cpus])
            if warmup:
                lib.time(*inputs, repeat=warmup, number=1)
            outcome["samples"] = lib.time(*inputs, repeat=repeat, number=number)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc
        # (no reset to TVM's default afterwards: it would shrink this long-lived thread's pool,
        # and a pool cannot grow again)

    _timing_thread(threads).submit(work).result()
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, FxoptError) or not isinstance(error, Exception):
            raise error
        raise BuildError(f"timing the compiled model on this machine failed: {error}") from error
    return outcome["samples"]
