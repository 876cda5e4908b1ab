from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fxopt import ir
from fxopt.errors import PassError, SpecError, VerificationError
from fxopt.examples import small_cnn
from fxopt.pass_manager import (Fixpoint, Pass, PassContext, Pipeline, PreconditionError, apply, create_pass,
                                register, registered_passes)
from fxopt.report import Report


def traced():
    x = torch.randn(1, 3, 32, 32)
    model = small_cnn()
    return model, ir.trace(model, (x,)), (x,)


@dataclass
class Explodes(Pass):
    """Raises inside run."""

    name = "test_explodes"

    def run(self, gm, ctx):
        raise RuntimeError("kaboom")


@dataclass
class NeedsNothing(Pass):
    """Precondition never holds."""

    name = "test_needs"

    def requires(self, gm, ctx):
        raise PreconditionError("graph has no frobnicator")

    def run(self, gm, ctx):
        return Counter()


@dataclass
class CountDown(Pass):
    """Changes the graph `remaining` times (one no-op node added then removed), then stops."""

    name = "test_countdown"
    remaining: int = 2

    def run(self, gm, ctx):
        if self.remaining == 0:
            return Counter()
        self.remaining -= 1
        return Counter(tick=1)


@dataclass
class ZeroConvWeights(Pass):
    """A wrong 'exact' pass: verification must catch it."""

    name = "test_wrong"

    def run(self, gm, ctx):
        for node in gm.graph.nodes:
            if ir.op_key(node, gm) == "linear":
                linear = gm.get_submodule(node.target)
                replacement = nn.Linear(linear.in_features, linear.out_features)
                ir.set_module(gm, node.target, replacement)
                return Counter(broken=1)
        return Counter()


@dataclass
class ReturnsDict(Pass):
    """Breaks the run() contract."""

    name = "test_returns_dict"

    def run(self, gm, ctx):
        return {"x": 1}


def test_changed_is_derived_from_stats():
    _, gm, x = traced()
    assert not apply(CountDown(remaining=0), gm, PassContext(example_inputs=x)).changed
    assert apply(CountDown(remaining=1), gm, PassContext(example_inputs=x)).changed


def test_failure_names_pass_and_passes_before():
    _, gm, x = traced()
    pipeline = Pipeline(["canonicalize", Explodes()])
    with pytest.raises(PassError) as info:
        apply(pipeline, gm, PassContext(example_inputs=x))
    message = str(info.value)
    assert "pass 'test_explodes' failed" in message and "passes run before it: canonicalize" in message
    assert "RuntimeError: kaboom" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_precondition_error_names_pass():
    _, gm, x = traced()
    with pytest.raises(PreconditionError, match=r"pass 'test_needs' cannot run .*none.*frobnicator"):
        apply(NeedsNothing(), gm, PassContext(example_inputs=x))


def test_run_must_return_a_counter():
    _, gm, x = traced()
    with pytest.raises(PassError, match="expected a collections.Counter"):
        apply(ReturnsDict(), gm, PassContext(example_inputs=x))


def test_fixpoint_repeats_until_nothing_changes():
    _, gm, x = traced()
    report = Report()
    result = apply(Fixpoint([CountDown(remaining=3)], max_iters=5), gm, PassContext(example_inputs=x, report=report))
    assert result.stats == Counter({"test_countdown.tick": 3})
    assert [row.iteration for row in report.passes] == [1, 2, 3, 4]


def test_fixpoint_that_does_not_converge_is_an_error():
    _, gm, x = traced()
    with pytest.raises(PassError, match="still changed the graph after max_iters=2"):
        apply(Fixpoint([CountDown(remaining=10)], max_iters=2), gm, PassContext(example_inputs=x))


def test_fixpoint_rejects_bad_max_iters():
    with pytest.raises(SpecError, match="max_iters"):
        Fixpoint(["canonicalize"], max_iters=0)


def test_duplicate_registration_is_refused():
    with pytest.raises(PassError, match="already registered"):
        @register
        @dataclass
        class Imposter(Pass):
            """Claims a taken name."""

            name = "fold_bn"

            def run(self, gm, ctx):
                return Counter()
    assert registered_passes()["fold_bn"].__name__ == "FoldBatchNorm"


def test_registration_needs_dataclass_and_snake_case_name():
    class NotDataclass(Pass):
        name = "test_not_dataclass"

    with pytest.raises(PassError, match="must be a @dataclass"):
        register(NotDataclass)

    @dataclass
    class BadName(Pass):
        name = "BadName"

    with pytest.raises(PassError, match="snake_case"):
        register(BadName)


def test_unknown_pass_and_option_are_spec_errors():
    with pytest.raises(SpecError, match="unknown pass 'fold_bm': did you mean 'fold_bn'"):
        create_pass("fold_bm")
    with pytest.raises(SpecError, match="pass 'fold_bn' has no option 'max_kernel'"):
        create_pass("fold_bn", max_kernel=3)


def test_verify_each_names_the_wrong_pass():
    model, gm, x = traced()
    pipeline = Pipeline(["canonicalize", "fold_bn", ZeroConvWeights()])
    with pytest.raises(VerificationError, match=r"after pass 'test_wrong' \(passes run: canonicalize, fold_bn, test_wrong\)"):
        apply(pipeline, gm, PassContext(example_inputs=x, verify="each", reference=model))


def test_report_rows_have_figures():
    model, gm, x = traced()
    report = Report()
    apply(Pipeline(["canonicalize", "fold_bn"]), gm, PassContext(example_inputs=x, report=report))
    assert [row.name for row in report.passes] == ["canonicalize", "fold_bn"]
    fold = report.passes[1]
    assert fold.changed and fold.stats == {"conv_bn": 9}
    assert fold.after["nodes"] < fold.before["nodes"] and fold.after["params"] < fold.before["params"]
    assert fold.before["macs"] == fold.after["macs"] > 0


def test_bad_verify_mode():
    with pytest.raises(SpecError, match="verify='sometimes'"):
        PassContext(verify="sometimes")
