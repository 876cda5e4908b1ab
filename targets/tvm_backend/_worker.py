"""Set-up of MetaSchedule's builder and runner worker processes, for :mod:`.tuning`.

The worker pools (``tvm.support.popen_pool``) start ``python -m tvm.exec.popen_worker`` and send
it a cloudpickled initializer. This module's functions are pickled *by value*
(``cloudpickle.register_pickle_by_value``, done by :mod:`.tuning`), so a worker never imports
fxopt, and with it torch: they may only use the standard library and ``tvm`` inside their
bodies.

``tvm.s_tir.tensor_intrin`` imports the CUDA, ROCm, Hexagon, Metal... tensor intrinsics
unconditionally (20-50 s on a loaded 2-core machine), and MetaSchedule's default build function
imports it in every fresh builder worker, although a worker only compiles TIR that the main
process has already scheduled (and tensorized): it needs no intrinsic. Long enough to hit the
builder's 30 s timeout, which kills the worker, so that each candidate of a batch failed.
"""

INTRIN_PACKAGE = "tvm.s_tir.tensor_intrin"


def install_intrin_stub() -> bool:
    """Put an empty ``tvm.s_tir.tensor_intrin`` package in ``sys.modules`` (its ``__init__`` not
    run): ``import tvm.s_tir.tensor_intrin`` becomes free, and ``import
    tvm.s_tir.tensor_intrin.x86`` still loads that one submodule. Returns False if the package
    was already imported."""
    import importlib.util
    import sys

    if INTRIN_PACKAGE in sys.modules:
        return False
    import tvm.s_tir

    spec = importlib.util.find_spec(INTRIN_PACKAGE)
    if spec is None:  # pragma: no cover - every apache-tvm wheel has it
        return False
    package = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not executed
    sys.modules[INTRIN_PACKAGE] = package
    tvm.s_tir.tensor_intrin = package
    return True


def init_worker() -> None:
    """Initializer of every builder and runner worker: no GPU intrinsics, and Ctrl-C is the
    parent's to handle (the batch in flight finishes, so the parent can stop cleanly)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_intrin_stub()


def build_one(job):
    """Build one scheduled candidate (``(IRModule, Target)``) in a builder worker and export it
    for the runner: MetaSchedule's default build and export functions."""
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    mod, target = job
    return default_export(default_build(mod, target, None))
