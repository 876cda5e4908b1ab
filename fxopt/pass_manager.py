"""Pass, PassResult, PassContext, Pipeline, Fixpoint and the pass registry.

A pass is a small dataclass registered under a snake_case name; its options are its fields.
``run(gm, ctx)`` edits the GraphModule in place and returns a Counter of what it did; whether
it changed anything is derived from that Counter. ``apply`` is the one place that runs a pass:
it checks preconditions, times it, wraps failures in a PassError that names the pass and the
passes before it, records a report row and verifies the result when asked to.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import time
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import fx, nn

from fxopt import ir
from fxopt.errors import FxoptError, PassError, SpecError, VerificationError


class PreconditionError(PassError):
    """A pass's ``requires`` does not hold for this graph."""


@dataclass(frozen=True)
class Decline:
    """A rule matched but its check said no; ``reason`` says why."""

    pass_name: str
    rule: str
    node: str
    reason: str


@dataclass
class PassContext:
    """What a pass may read besides the graph: inputs, target, verification mode, the report."""

    example_inputs: tuple[torch.Tensor, ...] = ()
    target: Any = None  # fxopt.targets.Target; passes read target.capabilities, never its name
    verify: str = "end"  # "each" | "end" | "off"
    reference: nn.Module | None = None  # what outputs are compared with (the eager original)
    report: Any = None  # fxopt.report.Report, rows are appended when present
    history: list[str] = field(default_factory=list)  # passes applied so far
    declines: list[Decline] = field(default_factory=list)
    iteration: int | None = None  # set by Fixpoint for the report
    _current: str = ""

    def __post_init__(self):
        if self.verify not in ("each", "end", "off"):
            raise SpecError(f"verify={self.verify!r} is not one of 'each', 'end', 'off'")

    def decline(self, rule: str, node: fx.Node, reason: str) -> None:
        self.declines.append(Decline(self._current, rule, node.name, reason))


@dataclass
class PassResult:
    name: str
    stats: Counter
    declines: list[Decline] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return any(count > 0 for count in self.stats.values())


class Pass:
    """Base of all passes. Subclasses are dataclasses; see ARCHITECTURE.md §3."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True  # False for explicit lossy plans
    composite: ClassVar[bool] = False  # Pipeline/Fixpoint: rows come from their children

    @classmethod
    def summary(cls) -> str:
        # the docstring's first paragraph, which may wrap over several lines
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Raise PreconditionError with a reason when the pass cannot run on this graph."""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str | dict:
        """This pass as a pipeline spec item; non-default options only."""
        changed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if getattr(self, f.name) != _field_default(f)} if dataclasses.is_dataclass(self) else {}
        return {"name": self.name, **changed} if changed else self.name

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        return apply(self, gm, ctx or PassContext())


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def apply(p: Pass, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Run one pass with precondition check, error wrapping, report row and optional verification."""
    before = _graph_figures(gm, ctx) if ctx.report is not None and not p.composite else None
    n_declines = len(ctx.declines)
    outer, ctx._current = ctx._current, p.name
    start = time.perf_counter()
    try:
        p.requires(gm, ctx)
        stats = p.run(gm, ctx)
        if not isinstance(stats, Counter):
            raise TypeError(f"run() returned {type(stats).__name__}, expected a collections.Counter of stats")
        if not p.composite:
            gm.graph.lint()
            gm.recompile()
    except PassError as exc:
        if getattr(exc, "pass_name", None) is None:
            exc = _wrap(p, ctx, exc, type(exc))
        raise exc
    except FxoptError as exc:
        if p.composite:
            raise  # a child pass already said which pass failed
        raise _wrap(p, ctx, exc, PassError) from exc
    except Exception as exc:
        wrapped = _wrap(p, ctx, exc, PassError)
        raise wrapped from exc
    finally:
        ctx._current = outer
    seconds = time.perf_counter() - start
    result = PassResult(p.name, stats, ctx.declines[n_declines:], seconds)
    if p.composite:
        return result
    if result.changed and ctx.example_inputs:
        _refresh_shapes(gm, ctx, p)  # every pass starts from fresh shapes in node.meta
    ctx.history.append(p.name)
    if before is not None:
        ctx.report.add_pass(p, result, before, _graph_figures(gm, ctx), ctx.iteration)
    _dump(gm, ctx)
    if not p.exact and ctx.reference is not None:
        # after a lossy plan the planned model is the new reference
        ctx.reference = copy.deepcopy(gm)
    if ctx.verify == "each" and result.changed:
        from fxopt import verify

        try:
            verify.check_ir(gm, ctx.example_inputs)
            if ctx.reference is not None and ctx.example_inputs:
                verify.check_equivalent(ctx.reference, gm, ctx.example_inputs)
        except VerificationError as exc:
            raise VerificationError(f"after pass '{p.name}' (passes run: {', '.join(ctx.history)}): {exc}") from exc
    return result


def _wrap(p: Pass, ctx: PassContext, exc: BaseException, cls: type[PassError]) -> PassError:
    ran = ", ".join(ctx.history) if ctx.history else "none"
    detail = str(exc) if isinstance(exc, FxoptError) else f"{type(exc).__name__}: {exc}"
    verb = "cannot run" if isinstance(exc, PreconditionError) else "failed"
    wrapped = cls(f"pass '{p.name}' {verb} (passes run before it: {ran}): {detail}")
    wrapped.pass_name = p.name
    return wrapped


def _refresh_shapes(gm: fx.GraphModule, ctx: PassContext, p: Pass) -> None:
    try:
        ir.propagate_shapes(gm, ctx.example_inputs)
    except Exception as exc:
        raise VerificationError(
            f"after pass '{p.name}' (passes run: {', '.join(ctx.history + [p.name])}): the graph no longer runs "
            f"on the example inputs: {type(exc).__name__}: {exc}"
        ) from exc


def _graph_figures(gm: fx.GraphModule, ctx: PassContext) -> dict[str, int | None]:
    """Node / parameter / MAC counts for the report (MACs from the shapes in node.meta)."""
    macs = ir.count_macs(gm) if ctx.example_inputs else None
    return {"nodes": len(gm.graph.nodes), "params": ir.count_params(gm), "macs": macs}


def _dump(gm: fx.GraphModule, ctx: PassContext) -> None:
    """FXOPT_DUMP=<dir>: the one debugging switch, the graph after each pass as text."""
    directory = os.environ.get("FXOPT_DUMP")
    if directory:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{len(ctx.history):03d}_{ctx.history[-1]}.txt").write_text(str(gm.graph))


# ---------------------------------------------------------------------------------------------
# Composition


class Pipeline(Pass):
    """Run passes in order."""

    name = "pipeline"
    composite = True

    def __init__(self, passes: Sequence[Pass | str | dict] = ()):
        from fxopt.spec import build_pass

        self.passes: list[Pass] = [build_pass(p) for p in passes]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        stats: Counter = Counter()
        for p in self.passes:
            result = apply(p, gm, ctx)
            stats.update({f"{p.name}.{k}": v for k, v in result.stats.items()})
        return stats

    def spec(self) -> list:
        return [p.spec() for p in self.passes]

    def __repr__(self) -> str:
        from fxopt.spec import to_text

        return f"Pipeline({to_text(self.spec())!r})"


class Fixpoint(Pipeline):
    """Repeat passes until none of them changes the graph (at most max_iters rounds)."""

    name = "fixpoint"

    def __init__(self, passes: Sequence[Pass | str | dict] = (), max_iters: int = 8):
        super().__init__(passes)
        if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
            raise SpecError(f"fixpoint option max_iters={max_iters!r} must be a positive integer")
        self.max_iters = max_iters

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        total: Counter = Counter()
        outer = ctx.iteration
        try:
            for iteration in range(1, self.max_iters + 1):
                ctx.iteration = iteration
                stats = super().run(gm, ctx)
                total.update(stats)
                if not any(v > 0 for v in stats.values()):
                    return total
        finally:
            ctx.iteration = outer
        raise PassError(
            f"fixpoint over [{', '.join(p.name for p in self.passes)}] still changed the graph after "
            f"max_iters={self.max_iters} rounds: raise max_iters, or two passes undo each other"
        )

    def spec(self) -> dict:
        return {"fixpoint": super().spec(), "max_iters": self.max_iters}


# ---------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a dataclass pass available by its ``name``. Duplicates are refused."""
    name = cls.name
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise PassError(f"pass class {cls.__qualname__} needs a snake_case `name`, got {name!r}")
    if name in ("pipeline", "fixpoint"):
        raise PassError(f"pass name {name!r} is reserved for pipeline composition")
    if not dataclasses.is_dataclass(cls):
        raise PassError(f"pass {name!r} ({cls.__qualname__}) must be a @dataclass: its options are its fields")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise PassError(
            f"pass name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
            f"{cls.__module__}.{cls.__qualname__} needs another name"
        )
    _REGISTRY[name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def _load_builtin_passes() -> None:
    import fxopt.passes  # noqa: F401  (registers the built-in passes)


def create_pass(name: str, **options: Any) -> Pass:
    """Instantiate a registered pass; unknown names and options are SpecErrors that list the valid ones."""
    passes = registered_passes()
    cls = passes.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, passes, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SpecError(f"unknown pass '{name}': {hint}known passes: {', '.join(passes)} (see `fxopt passes`)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise SpecError(f"pass '{name}' has no option '{key}' (its options: {valid})")
        _check_option_type(name, key, value, hints.get(key))
    return cls(**options)


def _check_option_type(pass_name: str, key: str, value: Any, hint: Any) -> None:
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    simple = tuple(t for t in allowed if t in (int, float, bool, str, type(None)))
    if not simple:
        return
    if isinstance(value, bool) and bool not in simple:
        ok = False
    elif isinstance(value, int) and not isinstance(value, bool) and float in simple:
        ok = True
    else:
        ok = isinstance(value, simple)
    if not ok:
        names = " or ".join(t.__name__ for t in simple)
        raise SpecError(f"pass '{pass_name}' option '{key}' must be {names}, got {value!r}")
