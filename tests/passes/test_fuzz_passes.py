"""Graph fuzzer: random CNNs (tests/fuzz_graphs.py) through every exact pass and the default
pipeline. Property: equal outputs (rtol 1e-4 relative to the output scale; IR valid; a second run
changes nothing) or a clean decline (PreconditionError, or a PassError caused by an FxoptError),
never another exception and never a mismatch.

Default tier: ``DEFAULT_EXAMPLES`` recipes per pass, derandomized (the same recipes every run).
``slow`` tier: ``SLOW_EXAMPLES`` per pass from a random seed. Replaying a failure (docs/reliability.md):
- the assertion message holds the recipe as JSON and a command that replays it
  (``.venv/bin/python tests/fuzz_graphs.py PASS_JSON RECIPE_JSON``), and every failing call is
  appended to ``$FXOPT_FUZZ_LOG`` (default ``.hypothesis/fxopt-fuzz-failures.jsonl``);
- hypothesis prints ``@reproduce_failure(...)`` (print_blob) and, for the slow tier, the seed
  (``pytest --hypothesis-seed=N``) that replays the whole run.
``FXOPT_FUZZ_STATS=FILE`` writes the per-pass counts (graphs tried, changed, unchanged, declined,
failed) as JSON when the module finishes.
"""

from __future__ import annotations

import json
import os
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from fuzz_graphs import build, describe, recipes, run_pass
from fxopt import spec as fxspec

DEFAULT_PIPELINE = fxspec.load_file(fxspec.named_pipelines()["default"])
PASS_SPECS = [
    "canonicalize", "eliminate_noops", "fold_constant_subgraphs", "fold_pad", "fold_bn", "fold_branches",
    "fold_affine", "fold_bn_before_conv", "fold_channel_permutation", "lower_zero_channels", "fuse_siblings",
    {"name": "fuse_siblings", "policy": "always"}, {"name": "merge_convs", "policy": "all"},
    {"name": "lower_sparse_weights", "decide": "density"},
    "default",
    # the default pipeline followed by the passes that need a target or a policy to run
    [*DEFAULT_PIPELINE, {"name": "merge_convs", "policy": "all"}, {"name": "lower_sparse_weights", "decide": "density"}],
]
DEFAULT_EXAMPLES = 50
SLOW_EXAMPLES = 400
COUNTS: dict[str, Counter] = defaultdict(Counter)


def _id(pass_spec) -> str:
    if isinstance(pass_spec, list):
        return "default+merge+sparse"
    return pass_spec if isinstance(pass_spec, str) else fxspec.to_text([pass_spec])


def _write_counts() -> None:
    path = os.environ.get("FXOPT_FUZZ_STATS")
    if path:
        Path(path).write_text(json.dumps({k: dict(v) for k, v in COUNTS.items()}, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: thread start-up costs more than the work (3x faster on 2 cores)
    yield
    torch.set_num_threads(threads)


def check(pass_spec, recipe) -> None:
    name = _id(pass_spec)
    COUNTS[name]["tried"] += 1
    try:
        outcome = run_pass(pass_spec, recipe)
    except BaseException as exc:
        COUNTS[name]["failed"] += 1
        _write_counts()
        log = Path(os.environ.get("FXOPT_FUZZ_LOG", ".hypothesis/fxopt-fuzz-failures.jsonl"))
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(json.dumps({"pass": pass_spec, "recipe": recipe, "error": f"{type(exc).__name__}: {exc}"[:2000]}) + "\n")
        raise AssertionError(f"{name} on a random CNN: {type(exc).__name__}: {exc}\n"
                             f"{traceback.format_exc(limit=-6)}\nreplay: {describe(pass_spec, recipe)}") from exc
    COUNTS[name][outcome] += 1
    _write_counts()


_FUZZ = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                    HealthCheck.filter_too_much])


@pytest.mark.parametrize("pass_spec", PASS_SPECS, ids=_id)
@settings(max_examples=DEFAULT_EXAMPLES, derandomize=True, database=None, **_FUZZ)
@given(recipe=recipes())
def test_pass_on_random_cnns(pass_spec, recipe):
    check(pass_spec, recipe)


@pytest.mark.slow
@pytest.mark.parametrize("pass_spec", PASS_SPECS, ids=_id)
@settings(max_examples=SLOW_EXAMPLES, **_FUZZ)
@given(recipe=recipes(max_items=10))
def test_pass_on_random_cnns_slow(pass_spec, recipe):
    check(pass_spec, recipe)


def test_recipes_build_valid_models():
    """The generator itself: a fixed recipe with every op builds and runs (a broken generator
    would make the fuzzer test nothing)."""
    recipe = {"input": [2, 4, 9, 9], "seed": 3, "head": {"hidden": 4, "bn": True, "act": "relu", "classes": 3},
              "body": [
                  {"op": "conv", "out": 4, "k": [3, 3], "stride": 1, "dilation": 1, "groups": 2, "padding": [1, 1],
                   "bias": True, "mode": "zeros", "zero_out": [1], "density": None},
                  {"op": "bn", "affine": True, "track": True}, {"op": "act", "kind": "relu6"},
                  {"op": "pad", "pad": [1, 0, 1, 0], "value": 0.0}, {"op": "shuffle", "groups": 2},
                  {"op": "pool", "kind": "avg", "k": 2, "stride": 2, "padding": 0}, {"op": "scale", "mul": 2.0, "add": 0.25},
                  {"op": "branches", "mode": "add", "identity": True, "branches": [
                      [{"op": "conv", "out": 4, "k": [3, 3], "stride": 1, "dilation": 1, "groups": 1, "padding": [1, 1],
                        "bias": False, "mode": "zeros", "zero_out": [], "density": 0.3}, {"op": "bn", "affine": True, "track": True}],
                      [{"op": "bn", "affine": True, "track": True}]]},
                  {"op": "skip", "from": 6}, {"op": "output"},
              ]}
    model, (x,) = build(recipe)
    out, tap = model(x)
    assert out.shape == (2, 3) and tap.shape == (2, 4, 5, 5)
    assert run_pass("default", recipe) == "changed"
