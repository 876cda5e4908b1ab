"""MetaSchedule tuning for CPU targets, with a database reused across builds and models.

    summary = tune(mod, tvm_target, config)               # tune the tasks the database lacks
    mod, applied = apply_database(mod, tvm_target, path)   # tuned schedules onto the PrimFuncs
    mod, summary = tune_and_apply(mod, tvm_target, config) # both

``mod`` is a Relax IRModule at the point where schedules are applied: legalized and fused
(``LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR``), PrimFuncs not yet
scheduled. Every fused PrimFunc without the ``tirx.is_scheduled`` attribute is a task.

**Database.** A directory (``TuneConfig.database``) holding one MetaSchedule JSON database per
tuning target, in a subdirectory named by :func:`target_key` (kind, CPU, architecture, core
count and a hash of the whole target), so a database built on the host never serves an arm64
build. A task whose workload (the PrimFunc, compared structurally: shapes and code, not the
model it came from) has a record is not tuned again; records are committed after each batch.
The directory can be copied and shipped with a project.

**Budget.** ``config.trials`` is split evenly over the tasks to tune (the remainder to the
heaviest ones), each share capped by ``max_trials_per_task``: every task gets trials, since an
untuned task keeps a naive loop nest. With fewer trials than tasks, the heaviest tasks get one
each and the others are left to the default schedules (the next build tunes them: they are not
in the database). Tasks are tuned one after another.

**Workers.** Builds run in a persistent pool of worker processes (MetaSchedule's LocalBuilder
starts a new pool for every batch), whose workers never import the CUDA/ROCm/Hexagon tensor
intrinsics (see ``_worker.py``); the main process loads only those of the target's
architecture, which MetaSchedule's CPU schedule rules need.

**Ctrl-C.** The first Ctrl-C (SIGINT, when tuning runs in the main thread) lets the batch in
flight finish, commits it, stops, and re-raises KeyboardInterrupt: the caller asked the program
to stop, so no build is produced from a half-tuned model, but every record committed so far
stays in the database. The interrupted task is marked incomplete (``incomplete.json``) and is
tuned again (starting from its records) by the next build; the finished tasks are not. A
second Ctrl-C raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from fxopt.errors import BuildError, InputError, TargetError
from fxopt.tuning import TuneConfig

from . import _first_line, _tvm, _worker
from .cpu_schedules import SCHEDULED_ATTR, is_scheduled

if TYPE_CHECKING:  # pragma: no cover
    import tvm

__all__ = ["SCHEDULED_ATTR", "TuneSummary", "tune", "apply_database", "tune_and_apply", "tuning_target",
           "target_key", "database_dir"]

log = logging.getLogger("fxopt.tuning")

_MS_LOGGER = "tvm.s_tir.meta_schedule"
_WORKLOADS = "database_workload.json"
_RECORDS = "database_tuning_record.json"
_INCOMPLETE = "incomplete.json"
_TARGET_FILE = "target.json"
_MAX_BUILDS_PER_WORKER = 64  # builder workers are recycled (MetaSchedule: memory grows in them)
_INTRINSICS_BY_ARCH = {"x86_64": "x86", "i386": "x86", "i686": "x86", "aarch64": "arm_cpu", "arm": "arm_cpu",
                       "riscv64": "riscv_cpu", "riscv32": "riscv_cpu"}


@dataclass
class TuneSummary:
    """What a tuning call did; ``to_json`` goes into the build report and manifest."""

    database: str  # the target's directory inside the database
    target_key: str
    tasks: int = 0  # tunable tasks (fused PrimFuncs not yet scheduled)
    reused: int = 0  # tasks whose workload the database already had
    tuned: int = 0  # tasks tuned by this call (an interrupted one included)
    measured: int = 0  # candidates measured by this call
    failed: int = 0  # of which failed to build or run
    seconds: float = 0.0
    interrupted: bool = False
    applied: int | None = None  # PrimFuncs given a schedule from the database (apply_database)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        return data


# --------------------------------------------------------------------------------------------
# Targets and the database layout


def _plain(value: Any) -> Any:
    """A tvm_ffi Map/Array (a target's export) as plain JSON data."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return str(value)


def _cpu_count() -> int:
    from fxopt.tuning import _cpu_count as count

    return count()


def tuning_target(tvm_target: "tvm.target.Target | Mapping[str, Any]", target: Any = None) -> "tvm.target.Target":
    """The target MetaSchedule tunes for: ``tvm_target`` (a Target or a resolved target dict,
    see ``tvm_backend.resolve_target``) with ``num-cores`` (which MetaSchedule requires): the
    fxopt ``target``'s ``cores`` when it names them, else the dict's own, else this machine's
    CPU count."""
    cores = getattr(target, "cores", None)
    tvm = _tvm()
    if not isinstance(tvm_target, tvm.target.Target):
        if not isinstance(tvm_target, Mapping):
            raise InputError(f"tvm_target must be a tvm.target.Target or a target dict, got {type(tvm_target).__name__}")
        tvm_target = tvm.target.Target(dict(tvm_target))
    data = _plain(tvm_target.export())
    if cores is not None:
        data["num-cores"] = int(cores)
    elif not data.get("num-cores"):
        data["num-cores"] = _cpu_count()
    return tvm.target.Target(data)


def _target_data(target: "tvm.target.Target") -> dict[str, Any]:
    return _plain(target.export())


def target_key(tvm_target: "tvm.target.Target | Mapping[str, Any]") -> str:
    """The database subdirectory of a target: readable fields and a hash of the whole tuning
    target (``llvm-emeraldrapids-x86_64-2c-1a2b3c4d5e``); a dict and the Target made from it
    give the same key."""
    data = _target_data(tuning_target(tvm_target))
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:10]
    arch = str(data.get("mtriple") or "host").split("-", 1)[0]
    fields = [data.get("kind", "target"), data.get("mcpu") or data.get("arch") or "generic", arch,
              f"{data.get('num-cores')}c", digest]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(str(f) for f in fields))


def database_dir(database: str | Path, tvm_target: "tvm.target.Target | Mapping[str, Any]") -> Path:
    """The directory of ``tvm_target``'s records inside the database ``database``."""
    return Path(database).expanduser() / target_key(tvm_target)


def _open_database(directory: Path, create: bool):
    from tvm.s_tir import meta_schedule as ms

    if not create and not ((directory / _WORKLOADS).is_file() and (directory / _RECORDS).is_file()):
        return None
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    try:
        return ms.database.JSONDatabase(work_dir=str(directory), allow_missing=create, module_equality="structural")
    except Exception as exc:  # noqa: BLE001 - TVM raises several kinds for a damaged file
        # A damaged database (a truncated write, an edit) is never trusted: its files are moved
        # aside (kept for the user, not read again) and the target's database starts afresh.
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for name in (_WORKLOADS, _RECORDS, _INCOMPLETE):
            if (directory / name).is_file():
                (directory / name).rename(directory / f"{name}.damaged-{stamp}")
                moved.append(f"{name}.damaged-{stamp}")
        log.warning("the tuning database %s cannot be read (%s): not used; its files were moved aside (%s) and "
                    "a new database is started", directory, _first_line(exc), ", ".join(moved))
        if not create:
            return None
        try:
            return ms.database.JSONDatabase(work_dir=str(directory), allow_missing=True, module_equality="structural")
        except Exception as again:  # noqa: BLE001
            raise BuildError(f"the tuning database {directory} cannot be read or started afresh: "
                             f"{_first_line(again)}; delete the directory") from again


def _workload_id(mod) -> str:
    import tvm_ffi

    return format(int(tvm_ffi.structural_hash(mod)) & (2**64 - 1), "016x")


def _read_incomplete(directory: Path) -> set[str]:
    try:
        return set(json.loads((directory / _INCOMPLETE).read_text()))
    except (OSError, ValueError, TypeError):
        return set()


def _write_incomplete(directory: Path, ids: set[str]) -> None:
    path = directory / _INCOMPLETE
    if not ids:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(ids)) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Tasks


@contextlib.contextmanager
def _cpu_intrinsics(target: "tvm.target.Target") -> Iterator[None]:
    """Load only the target architecture's tensor intrinsics (MetaSchedule's x86/ARM/RISC-V
    rules name them) instead of all of ``tvm.s_tir.tensor_intrin``, which TuneContext imports
    (CUDA, ROCm, Hexagon: 20-50 s). The stub package is removed afterwards, so a later import of
    the real package (a GPU build) still registers everything."""
    import importlib

    installed = _worker.install_intrin_stub()
    try:
        arch = str(_target_data(target).get("mtriple") or "").split("-", 1)[0]
        arch = arch or _host_arch()
        submodule = _INTRINSICS_BY_ARCH.get(arch)
        if submodule is not None:
            importlib.import_module(f"{_worker.INTRIN_PACKAGE}.{submodule}")
        yield
    finally:
        if installed:
            sys.modules.pop(_worker.INTRIN_PACKAGE, None)
            import tvm.s_tir

            if hasattr(tvm.s_tir, "tensor_intrin"):
                delattr(tvm.s_tir, "tensor_intrin")


def _host_arch() -> str:
    from fxopt.targets import host_arch

    return host_arch()


def _tasks(mod, target) -> list:
    """MetaSchedule tasks of the module's unscheduled PrimFuncs, heaviest first."""
    tvm = _tvm()
    from tvm.s_tir import meta_schedule as ms

    if not isinstance(mod, tvm.IRModule):
        raise BuildError(f"tune() expects a Relax IRModule, got {type(mod).__name__}")
    try:
        tasks = ms.relax_integration.extract_tasks(mod, target)
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"MetaSchedule could not extract tuning tasks: {_first_line(exc)}") from exc
    tasks = [t for t in tasks if not is_scheduled(t.dispatched[0]["main"])]
    return sorted(tasks, key=lambda t: -_flops(t) * t.weight)


def _flops(task) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:  # noqa: BLE001 - only used to order tasks
        return 0.0


def _has_record(database, task, target) -> bool:
    try:
        mod = task.dispatched[0]
        return bool(database.has_workload(mod)) and database.query_tuning_record(mod, target, "main") is not None
    except Exception:  # noqa: BLE001
        return False


def _shares(config: TuneConfig, tasks: list) -> list[tuple[Any, int]]:
    """``config.trials`` split over ``tasks`` (heaviest first): equal shares, the remainder to
    the heaviest, each capped by max_trials_per_task; tasks with no share are dropped."""
    if not tasks or config.trials <= 0:
        return []
    base, extra = divmod(config.trials, len(tasks))
    shares = []
    for index, task in enumerate(tasks):
        share = base + (1 if index < extra else 0)
        if config.max_trials_per_task is not None:
            share = min(share, config.max_trials_per_task)
        if share > 0:
            shares.append((task, share))
    return shares


_BAD_FFI = ("0.1.15",)  # MetaSchedule segfaults in tvm::ffi::ToJSONGraph (TuneContextInitialize)


def _check_ffi() -> None:
    import tvm_ffi

    version = str(getattr(tvm_ffi, "__version__", ""))
    if version.startswith(_BAD_FFI):
        raise BuildError(f"MetaSchedule crashes (a segfault in tvm::ffi::ToJSONGraph) with apache-tvm-ffi {version}; "
                         "install the pinned version: pip install 'apache-tvm-ffi==0.1.14.post0' (or reinstall fxopt)")


def _check_tunable(target, config: TuneConfig, fx_target) -> None:
    data = _target_data(target)
    if data.get("kind") != "llvm":
        raise TargetError(f"tuning supports LLVM CPU targets; this target is {data.get('kind')!r}: build without tuning")
    if fx_target is not None:
        runs_here = fx_target.runs_here()
        name = f"target {fx_target.name!r} (runner {fx_target.runner!r})"
    else:
        arch = str(data.get("mtriple") or "").split("-", 1)[0]
        runs_here = not arch or arch == _host_arch()
        name = f"target {data.get('mtriple')}"
    if not runs_here and config.rpc is None:
        raise TargetError(
            f"tuning measures candidates on the target, and {name} does not run on this machine; give "
            "TuneConfig(rpc={...}) to measure on a device of a TVM RPC tracker, or build without tuning "
            "(a database tuned on the device can be used with trials=0)")


# --------------------------------------------------------------------------------------------
# Builder, runner, progress and Ctrl-C


class _Stop(Exception):
    """Raised from the measure callback to end the task scheduler's loop after a batch."""


def _make_builder(workers: int, timeout_s: float):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PersistentBuilder(PyBuilder):
        """MetaSchedule's LocalBuilder with one pool kept for the whole tuning run (recycling
        each worker after a number of builds) and light workers (``_worker.init_worker``)."""

        def __init__(self) -> None:
            super().__init__()
            # The workers' stderr (LLVM and TVM warnings) would break the progress line: kept for debugging only.
            stderr = None if log.isEnabledFor(logging.DEBUG) else subprocess.DEVNULL
            self.pool = PopenPoolExecutor(max_workers=workers, timeout=timeout_s, initializer=_worker.init_worker,
                                          maximum_process_uses=_MAX_BUILDS_PER_WORKER, stderr=stderr)

        def build(self, build_inputs):
            jobs = [(item.mod, item.target) for item in build_inputs]
            results = []
            for outcome in self.pool.map_with_error_catching(_worker.build_one, jobs):
                if outcome.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(outcome.value, None))
                elif outcome.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {timeout_s} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {outcome.value}"))
            return results

        def shutdown(self) -> None:
            self.pool.shutdown()

    return PersistentBuilder()


def _make_runner(config: TuneConfig, target, fx_target):
    from tvm.s_tir import meta_schedule as ms

    if config.rpc is not None:
        # The RPC measure backend (targets/tvm_backend/rpc.py) provides the runner; this is
        # the only place tuning depends on it.
        try:
            from . import rpc  # type: ignore[attr-defined]

            make = rpc.tuning_runner
        except (ImportError, AttributeError) as exc:
            raise TargetError("TuneConfig.rpc needs the RPC measure backend (fxopt.targets.tvm_backend.rpc."
                              "tuning_runner), which this fxopt version does not have yet") from exc
        return make(config.rpc, target=target, fx_target=fx_target, timeout_s=config.timeout_s)
    return ms.runner.LocalRunner(timeout_sec=config.timeout_s, initializer=_worker.init_worker)


def _shutdown(obj) -> None:
    for attr in ("shutdown",):
        method = getattr(obj, attr, None)
        if callable(method):
            with contextlib.suppress(Exception):
                method()
            return
    pool = getattr(obj, "pool", None)
    if pool is not None:
        with contextlib.suppress(Exception):
            pool.shutdown()


def _make_cost_model(config: TuneConfig):
    from tvm.s_tir import meta_schedule as ms

    if config.cost_model == "xgb":
        try:
            import xgboost  # noqa: F401
        except ImportError as exc:
            raise InputError("TuneConfig.cost_model='xgb' needs the xgboost package (pip install xgboost-cpu); "
                             "or use cost_model='random'") from exc
        return ms.cost_model.XGBModel(num_tuning_cores=config.worker_count)
    return ms.cost_model.RandomModel(seed=config.seed)


def _make_strategy(config: TuneConfig, share: int):
    from tvm.s_tir import meta_schedule as ms

    if config.cost_model == "xgb":
        if share >= 128:
            return ms.search_strategy.EvolutionarySearch()  # MetaSchedule's defaults: population 512, 4 generations
        # A small share: a smaller population and fewer generations cost a third of the search time
        # (measured: 16 trials per task, 89 s instead of 209 s for three convs) for kernels as fast.
        return ms.search_strategy.EvolutionarySearch(population_size=128, genetic_num_iters=2, init_min_unmeasured=50)
    return ms.search_strategy.ReplayTrace()


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _Progress:
    """A one-line progress bar with an estimate of the time left, on stderr when it is a TTY and
    not quietened (``fxopt.progress.enabled``: ``fxopt --quiet`` turns it off)."""

    def __init__(self, total: int, stream=None) -> None:
        from fxopt import progress

        self.stream = stream if stream is not None else sys.stderr
        self.enabled = progress.enabled(self.stream)
        self.total = max(1, total)
        self.done = 0
        self.label = ""
        self.note = ""
        self.start = time.perf_counter()

    def update(self, done: int | None = None, label: str | None = None, note: str | None = None) -> None:
        if done is not None:
            self.done = done
        if label is not None:
            self.label = label
        if note is not None:
            self.note = note
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        left = f"~{_fmt_time(elapsed / self.done * (self.total - self.done))} left" if self.done else "estimating"
        width = shutil.get_terminal_size((100, 20)).columns - 1
        filled = int(20 * min(self.done, self.total) / self.total)
        bar = "#" * filled + "-" * (20 - filled)
        text = (f"tuning [{bar}] {self.done}/{self.total} trials, {_fmt_time(elapsed)} elapsed, {left}"
                f"  {self.note or self.label}")
        with contextlib.suppress(Exception):
            self.stream.write("\r" + text[:width].ljust(width))
            self.stream.flush()

    def clear(self) -> None:
        """Blank the bar's line, so that a log line can be written there (the next update redraws)."""
        if self.enabled:
            with contextlib.suppress(Exception):
                self.stream.write("\r" + " " * (shutil.get_terminal_size((100, 20)).columns - 1) + "\r")
                self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            with contextlib.suppress(Exception):
                self.stream.write("\n")
                self.stream.flush()


class _Session:
    """Builder, runner, cost model, progress and Ctrl-C handling for one tune() call."""

    def __init__(self, config: TuneConfig, target, fx_target, total: int, summary: TuneSummary) -> None:
        self.config = config
        self.target = target
        self.fx_target = fx_target
        self.summary = summary
        self.progress = _Progress(total)
        self.stop_requested = False
        self.builder = None
        self.runner = None
        self.cost_model = None
        self._previous_handler = None
        self._ms_level = None
        self.batch_failures: list[str] = []
        self.best: float | None = None
        self.default_schedule: Callable | None = None

    def __enter__(self) -> "_Session":
        import cloudpickle

        # _worker's functions run in the worker processes: ship them by value (no fxopt import there).
        cloudpickle.register_pickle_by_value(_worker)
        ms_logger = logging.getLogger(_MS_LOGGER)
        if ms_logger.level == logging.NOTSET:  # MetaSchedule's INFO logs (TIR dumps...) only when asked for
            self._ms_level = ms_logger.level
            ms_logger.setLevel(logging.WARNING)
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self.cost_model = _make_cost_model(self.config)
            self.builder = _make_builder(self.config.worker_count, self.config.timeout_s)
            self.runner = _make_runner(self.config, self.target, self.fx_target)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.progress.close()
        for obj in (self.builder, self.runner):
            if obj is not None:
                _shutdown(obj)
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None
        if self._ms_level is not None:
            logging.getLogger(_MS_LOGGER).setLevel(self._ms_level)
        import cloudpickle

        with contextlib.suppress(Exception):
            cloudpickle.unregister_pickle_by_value(_worker)

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.progress.update(note="Ctrl-C: stopping after this batch (Ctrl-C again to abort now)")
        if not self.progress.enabled:
            log.warning("interrupted: stopping after the batch in flight (Ctrl-C again to abort now)")

    def on_batch(self, builder_results, runner_results) -> None:
        for built, ran in zip(builder_results, runner_results):
            error = built.error_msg or ran.error_msg
            if error:
                self.summary.failed += 1
                self.batch_failures.append(str(error).strip().splitlines()[0] if str(error).strip() else "error")
            elif ran.run_secs:
                seconds = sum(float(s) for s in ran.run_secs) / len(ran.run_secs)
                self.best = seconds if self.best is None else min(self.best, seconds)
        self.summary.measured += len(builder_results)
        self.progress.update(done=self.summary.measured)
        if self.stop_requested:
            raise _Stop()

    def _commit_default(self, task, database) -> None:
        """Measure the default schedule of ``task`` and commit it as a tuning record, so that
        the tuned schedule applied later is never slower than the untuned build's."""
        if self.default_schedule is None:
            return
        from tvm.s_tir import meta_schedule as ms

        func = task.dispatched[0]["main"]
        try:
            sch = self.default_schedule(func, self.target)
            if sch is None:
                return
            args_info = ms.arg_info.ArgInfo.from_prim_func(func)
            built = self.builder.build([ms.builder.BuilderInput(sch.mod, self.target)])[0]
            if built.error_msg:
                log.debug("default schedule of %s did not build: %s", task.task_name, built.error_msg)
                return
            try:
                (future,) = self.runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args_info)])
                result = future.result()
            finally:
                with contextlib.suppress(OSError):
                    os.remove(built.artifact_path)
            if result.error_msg or not result.run_secs:
                log.debug("default schedule of %s did not run: %s", task.task_name, str(result.error_msg)[-1500:])
                return
            workload = database.commit_workload(task.dispatched[0])
            database.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, workload, [float(v) for v in result.run_secs], self.target, args_info))
            seconds = sum(float(v) for v in result.run_secs) / len(result.run_secs)
            self.best = seconds if self.best is None else min(self.best, seconds)
        except Exception as exc:  # noqa: BLE001 - the seed is an optimization; tuning goes on without it
            log.debug("default schedule of %s not seeded: %s", task.task_name, _first_line(exc))

    def tune_task(self, index: int, count: int, task, share: int, database) -> None:
        from tvm.s_tir import meta_schedule as ms

        self.best = None
        self.batch_failures = []
        label = f"task {index + 1}/{count}: {task.task_name}"
        self.progress.update(label=label)
        context = ms.TuneContext(
            mod=task.dispatched[0], target=self.target, space_generator="post-order-apply",
            search_strategy=_make_strategy(self.config, share), task_name=task.task_name,
            logger=logging.getLogger(f"{_MS_LOGGER}.fxopt"),
            rand_state=(self.config.seed * 1_000_003 + index) % (2**31 - 1) or 1,
            num_threads=self.config.worker_count,
        ).clone()
        self._commit_default(task, database)
        scheduler = ms.task_scheduler.TaskScheduler.create("round-robin")
        callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _measure_callback(self)]
        start, trials_before = time.perf_counter(), self.summary.measured
        try:
            scheduler.tune(tasks=[context], task_weights=[1.0], max_trials_global=share, max_trials_per_task=share,
                           num_trials_per_iter=min(self.config.trials_per_batch, share), builder=self.builder,
                           runner=self.runner, measure_callbacks=callbacks, database=database,
                           cost_model=self.cost_model)
        except BaseException as exc:
            if self.stop_requested:
                raise _Stop() from exc
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise BuildError(f"tuning {task.task_name} failed: {_first_line(exc)}") from exc
        measured = self.summary.measured - trials_before
        best = f"best {self.best * 1e6:.1f} us" if self.best is not None else "no candidate ran"
        self.progress.clear()
        log.info("%s: %d trials in %.1f s, %s", label, measured, time.perf_counter() - start, best)
        if measured and self.best is None:
            reasons = sorted(set(self.batch_failures))
            log.warning("tuning %s: all %d candidates failed (%s); it keeps the default schedule", task.task_name,
                        measured, "; ".join(reasons[:3]))


_CALLBACK_CLASS = None


def _measure_callback(session: _Session):
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is None:
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

        @derived_object
        class ProgressCallback(PyMeasureCallback):
            """After each batch (placed after AddToDatabase: the batch is committed): progress,
            failure counts, and the stop after a Ctrl-C."""

            def __init__(self, on_batch) -> None:
                super().__init__()
                self.on_batch = on_batch

            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
                self.on_batch(builder_results, runner_results)

        _CALLBACK_CLASS = ProgressCallback
    return _CALLBACK_CLASS(session.on_batch)


# --------------------------------------------------------------------------------------------
# Public entry points


def tune(mod: "tvm.IRModule", tvm_target: "tvm.target.Target | Mapping[str, Any]", config: TuneConfig, *,
         target: Any = None, default_schedule: Callable | None = None) -> TuneSummary:
    """Tune the unscheduled PrimFuncs of ``mod`` that the database does not have yet.

    ``tvm_target`` is the resolved target (a dict from ``resolve_target`` or a Target);
    ``target``, the fxopt Target, is optional and tells whether the target runs here and its
    core count. Returns a :class:`TuneSummary` (``applied`` is left None: see
    :func:`apply_database`). Raises TargetError for a non-CPU target, or for one that does not
    run here without ``config.rpc``; KeyboardInterrupt after a Ctrl-C (see the module doc).

    ``default_schedule(func, target) -> Schedule | None`` is the schedule the build would use
    without tuning: it is measured first and committed as a record of each task, so the database
    keeps whichever is faster. Without it, a small budget (a few trials per task) can leave the
    database with schedules slower than the defaults: 200 trials on MobileNetV2 gave 2x slower
    kernels than fxopt's rules.
    """
    if not isinstance(config, TuneConfig):
        raise InputError(f"tune= must be a fxopt.TuneConfig, got {type(config).__name__}")
    _tvm()
    from tvm.s_tir import meta_schedule as ms  # noqa: F401 - fails early if MetaSchedule is missing

    start = time.perf_counter()
    ms_target = tuning_target(tvm_target, target)
    _check_tunable(ms_target, config, target)
    directory = config.database_path / target_key(ms_target)
    summary = TuneSummary(database=str(directory), target_key=directory.name)
    with _cpu_intrinsics(ms_target):
        tasks = _tasks(mod, ms_target)
        summary.tasks = len(tasks)
        if not tasks or config.trials == 0:
            database = _open_database(directory, create=False)
            summary.reused = sum(_has_record(database, t, ms_target) for t in tasks) if database is not None else 0
            summary.seconds = time.perf_counter() - start
            return summary
        database = _open_database(directory, create=True)
        if not (directory / _TARGET_FILE).is_file():  # for people reading the database
            (directory / _TARGET_FILE).write_text(json.dumps(_target_data(ms_target), indent=1, sort_keys=True) + "\n")
        incomplete = _read_incomplete(directory)
        todo = [t for t in tasks if _workload_id(t.dispatched[0]) in incomplete or not _has_record(database, t, ms_target)]
        summary.reused = len(tasks) - len(todo)
        shares = _shares(config, todo)
        if len(shares) < len(todo):
            log.warning("%d trials for %d tasks: %d task(s) left to the default schedules; give at least %d trials",
                        config.trials, len(todo), len(todo) - len(shares), len(todo))
        if not shares:
            summary.seconds = time.perf_counter() - start
            return summary
        _check_ffi()
        log.info("tuning %d of %d tasks (%d in the database %s), %d trials", len(shares), len(tasks), summary.reused,
                 directory, sum(s for _, s in shares))
        finished = 0
        with _Session(config, ms_target, target, sum(s for _, s in shares), summary) as session:
            session.default_schedule = default_schedule
            for index, (task, share) in enumerate(shares):
                workload = _workload_id(task.dispatched[0])
                _write_incomplete(directory, incomplete | {workload})  # until the task is finished
                incomplete.add(workload)
                try:
                    session.tune_task(index, len(shares), task, share, database)
                except _Stop:
                    summary.interrupted = True
                    summary.tuned += 1
                    break
                incomplete.discard(workload)
                _write_incomplete(directory, incomplete)
                summary.tuned += 1
                finished += 1
                if session.stop_requested:
                    summary.interrupted = True
                    break
    summary.seconds = time.perf_counter() - start
    if summary.interrupted:
        log.warning("tuning interrupted after %d trials (%d of %d tasks finished); the records are kept in %s and "
                    "the next build goes on from there", summary.measured, finished, len(shares), directory)
        raise KeyboardInterrupt
    return summary


def apply_database(mod: "tvm.IRModule", tvm_target: "tvm.target.Target | Mapping[str, Any]",
                   database_path: str | Path, *, target: Any = None) -> tuple["tvm.IRModule", int]:
    """Replace the PrimFuncs of ``mod`` whose workload the database (the root directory, as in
    TuneConfig.database) has for ``tvm_target`` by their best tuned schedule, marked
    ``tirx.is_scheduled``; other PrimFuncs are left as they are. Returns the module and how many
    PrimFuncs got a schedule. A missing database applies nothing (and creates nothing).
    ``target`` (the fxopt Target, optional) as for :func:`tune`."""
    tvm = _tvm()
    from tvm import relax

    ms_target = tuning_target(tvm_target, target)
    directory = Path(database_path).expanduser() / target_key(ms_target)
    database = _open_database(directory, create=False)
    if database is None:
        return mod, 0
    before = {gv.name_hint: is_scheduled(f) for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    try:
        with ms_target, database:
            result = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"applying the tuning database {directory} failed: {_first_line(exc)}") from exc
    applied = 0
    for gv, func in list(result.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or before.get(gv.name_hint, True):
            continue
        original = mod[gv.name_hint] if gv.name_hint in before else None
        if original is not None and func.same_as(original):
            continue
        if not is_scheduled(func):
            result[gv] = func.with_attr(SCHEDULED_ATTR, True)
        applied += 1
    return result, applied


def tune_and_apply(mod: "tvm.IRModule", tvm_target: "tvm.target.Target | Mapping[str, Any]", config: TuneConfig, *,
                   target: Any = None) -> tuple["tvm.IRModule", TuneSummary]:
    """:func:`tune`, then :func:`apply_database` with the same database; the summary's
    ``applied`` says how many PrimFuncs got a tuned schedule."""
    summary = tune(mod, tvm_target, config, target=target)
    mod, summary.applied = apply_database(mod, tvm_target, config.database_path, target=target)
    return mod, summary
