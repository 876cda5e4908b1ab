"""TuneConfig: what a tuned build asks of MetaSchedule (torch-free and tvm-free: plain data).

    fxopt.compile(model, (x,), "host", tune=TuneConfig(trials=400, database="tuning-db"))
    fxopt build MODEL --input-shape 1x3x224x224 -o build/m --tune 400 --tune-db tuning-db

The tuning itself lives in ``fxopt.targets.tvm_backend.tuning``. The database is a directory
that is reused across builds and models (a workload already in it is not tuned again) and can
be shipped with a project; it holds one subdirectory per tuning target.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fxopt.errors import InputError

__all__ = ["TuneConfig", "COST_MODELS", "default_database"]

# "random" (the default): no learned model; candidates are sampled at random from MetaSchedule's
# design space (every sample is tiled, parallelized, vectorized and unrolled by the CPU rules).
# "xgb": an XGBoost model of program features guides an evolutionary search (needs the xgboost
# package, not a dependency of fxopt). Measured on this 2-core machine with 16 and 64 trials per
# task, xgb found no faster kernels and its search cost 1-3x the wall time of random sampling:
# a model trained on one or a few batches predicts little, and evolving a population of
# hundreds costs tens of seconds per batch. It is worth trying with hundreds of trials per task.
COST_MODELS = ("random", "xgb")


def default_database() -> Path:
    """Where a TuneConfig without ``database`` keeps its records: ``$XDG_CACHE_HOME/fxopt/tuning-db``
    (``~/.cache/fxopt/tuning-db``), shared by every build of this user."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fxopt" / "tuning-db"


@dataclass(frozen=True)
class TuneConfig:
    """How to tune a build with MetaSchedule.

    trials               total measured candidates for the model, split evenly over the tasks
                         (fused kernels) that the database does not have yet; 0 tunes nothing and
                         only applies what the database has
    database             the database directory (default: :func:`default_database`)
    max_trials_per_task  cap on one task's share (default: trials / tasks)
    trials_per_batch     candidates built and measured together (default 16; each batch ends
                         with a commit to the database and a progress update)
    workers              builder processes and search threads (default: the CPU count)
    seed                 seed of the search (same seed, same database: same candidates)
    cost_model           "random" (random sampling of the design space; the default, best for
                         small budgets) or "xgb" (a learned cost model guiding an evolutionary
                         search; needs the xgboost package; for hundreds of trials per task)
    timeout_s            limit of one candidate's build and of its run
    rpc                  measure on a device of a TVM RPC tracker instead of this machine
                         (tracker address, key...; passed to the RPC measure backend); required
                         to tune for a target that does not run here
    """

    trials: int
    database: str | Path | None = None
    max_trials_per_task: int | None = None
    trials_per_batch: int = 16
    workers: int | None = None
    seed: int = 0
    cost_model: str = "random"
    timeout_s: float = 30.0
    rpc: Mapping[str, Any] | None = field(default=None, hash=False)

    def __new__(cls, *args: Any, **kwargs: Any) -> "TuneConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise InputError(f"TuneConfig has no option {', '.join(map(repr, unknown))}; options: {', '.join(names)}")
        if len(args) > len(names):
            raise InputError(f"TuneConfig takes at most {len(names)} options, got {len(args)} positional values")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        def fail(name: str, what: str) -> None:
            raise InputError(f"TuneConfig.{name} must be {what}, got {getattr(self, name)!r}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_int(self.trials) or self.trials < 0:
            fail("trials", "a non-negative integer (0: only apply the database)")
        if self.database is not None:
            if not isinstance(self.database, (str, os.PathLike)) or not str(self.database):
                fail("database", "a directory path")
            if Path(self.database).exists() and not Path(self.database).is_dir():
                fail("database", "a directory (this path is a file)")
        if self.max_trials_per_task is not None and (not is_int(self.max_trials_per_task) or self.max_trials_per_task < 1):
            fail("max_trials_per_task", "a positive integer or None")
        if not is_int(self.trials_per_batch) or self.trials_per_batch < 1:
            fail("trials_per_batch", "a positive integer")
        if self.workers is not None and (not is_int(self.workers) or self.workers < 1):
            fail("workers", "a positive integer or None (all CPUs)")
        if not is_int(self.seed) or self.seed < 0:
            fail("seed", "a non-negative integer")
        if self.cost_model not in COST_MODELS:
            fail("cost_model", f"one of {', '.join(map(repr, COST_MODELS))}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            fail("timeout_s", "a positive number of seconds")
        if self.rpc is not None and not isinstance(self.rpc, Mapping):
            fail("rpc", "a mapping (tracker address, key...) or None")
        if self.rpc is not None:
            object.__setattr__(self, "rpc", dict(self.rpc))

    @property
    def database_path(self) -> Path:
        """The database directory this config uses (the default one when ``database`` is None)."""
        return Path(self.database).expanduser() if self.database is not None else default_database()

    @property
    def worker_count(self) -> int:
        return self.workers or _cpu_count()

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["database"] = str(self.database_path)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TuneConfig":
        """A TuneConfig from a dict (a TOML table, JSON); unknown keys are an InputError."""
        if not isinstance(data, Mapping):
            raise InputError(f"a tuning config must be a table of options, got {type(data).__name__}")
        return cls(**dict(data))


def _cpu_count() -> int:
    from fxopt.targets import allowed_cpus

    return len(allowed_cpus()) or 1
