"""The pytorchcv corpus: image-classification models through ``fxopt.optimize`` (default pipeline)
and ``fxopt.compile`` for the host, compared with eager PyTorch.

The model list is data (``ENTRIES``); ``run_one`` runs one entry and returns a ``Row``.
``tests/corpus/test_corpus.py`` runs them under pytest (the whole list in the ``slow`` tier, a
few small ones by default) and ``python tests/corpus/make_table.py`` writes ``docs/corpus.md``.

Each entry is the smallest width variant of its family at the smallest square input the model
accepts: most ImageNet models of pytorchcv end in a fixed ``AvgPool2d(7)`` and need 224x224, the
CIFAR ones take 32x32. No pretrained weights: BatchNorm statistics are random and seeded
(``fxopt.testing.randomize_norm_stats``), so a dropped or misfolded BN shows in the outputs.

A model fxopt cannot handle must fail with an ``FxoptError`` that names the cause; such an entry
declares the error it expects (``expect``). A raw exception ("crash") or outputs that differ
from eager ("mismatch") are bugs, never expected rows.
"""

from __future__ import annotations

import importlib
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# rtol 1e-4, atol 1e-4 relative to the output scale (ARCHITECTURE.md §6; the build tolerance)
RTOL = 1e-4


@dataclass(frozen=True)
class Entry:
    family: str
    module: str  # under pytorchcv.models
    factory: str
    size: int  # square input, 1x3xSIZExSIZE
    expect: str = ""  # "" = must compile and match eager; else a substring of the FxoptError expected
    note: str = ""
    known_issue: str = ""  # a diagnosed failure not fixed yet: the test is an xfail citing it

    @property
    def name(self) -> str:
        return self.factory

    def build(self) -> torch.nn.Module:
        """The model in eval mode with seeded random BatchNorm statistics (no downloads)."""
        from fxopt.testing import randomize_norm_stats

        torch.manual_seed(0)  # the weights' init draws from the global generator: same model in any process
        model = getattr(importlib.import_module(f"pytorchcv.models.{self.module}"), self.factory)()
        return randomize_norm_stats(model, seed=3).eval()

    def inputs(self, seed: int = 7) -> tuple[torch.Tensor]:
        return (torch.randn(1, 3, self.size, self.size, generator=torch.Generator().manual_seed(seed)),)


def _e(family: str, module: str, factory: str, size: int = 224, expect: str = "", note: str = "",
       known_issue: str = "") -> Entry:
    return Entry(family, module, factory, size, expect, note, known_issue)


ENTRIES: list[Entry] = [
    _e("mobilenet", "mobilenet", "mobilenet_wd4"),
    _e("mobilenet", "mobilenetb", "mobilenetb_wd4"),
    _e("mobilenet", "fdmobilenet", "fdmobilenet_wd4"),
    _e("mobilenetv2", "mobilenetv2", "mobilenetv2_wd4"),
    _e("mobilenetv2", "mobilenetv2", "mobilenetv2b_wd4"),
    _e("mobilenetv3", "mobilenetv3", "mobilenetv3_small_w7d20"),
    _e("mobilenetv3", "mobilenetv3", "mobilenetv3_large_w7d20"),
    _e("shufflenet", "shufflenet", "shufflenet_g1_wd4"),
    _e("shufflenet", "shufflenet", "shufflenet_g3_wd4"),
    _e("shufflenetv2", "shufflenetv2", "shufflenetv2_wd2"),
    _e("shufflenetv2", "shufflenetv2b", "shufflenetv2b_wd2"),
    _e("ghostnet", "ghostnet", "ghostnet"),
    _e("mnasnet", "mnasnet", "mnasnet_small"),
    _e("proxylessnas", "proxylessnas", "proxylessnas_mobile"),
    _e("fbnet", "fbnet", "fbnet_cb"),
    _e("mixnet", "mixnet", "mixnet_s"),
    _e("efficientnet", "efficientnet", "efficientnet_b0", 64),
    _e("efficientnet", "efficientnet", "efficientnet_b0b", 64),
    _e("efficientnet", "efficientnetedge", "efficientnet_edge_small_b", 64),
    _e("spnasnet", "spnasnet", "spnasnet"),
    _e("squeezenet", "squeezenet", "squeezenet_v1_1"),
    _e("squeezenet", "squeezenet", "squeezeresnet_v1_1"),
    _e("squeezenext", "squeezenext", "sqnxt23_w1"),
    _e("igcv3", "igcv3", "igcv3_wd4"),
    _e("hardnet", "hardnet", "hardnet39ds"),
    _e("peleenet", "peleenet", "peleenet"),
    _e("densenet", "densenet", "densenet121"),
    _e("resnet", "resnet", "resnet10"),
    _e("resnet", "resnet", "resnet18_wd4"),
    _e("resnet", "resnet", "resnetbc14b"),
    _e("preresnet", "preresnet", "preresnet18_wd4"),
    _e("preresnet", "preresnet", "preresnetbc14b"),
    _e("resnext", "resnext", "resnext14_16x4d"),
    _e("seresnet", "seresnet", "seresnet10"),
    _e("seresnet", "sepreresnet", "sepreresnet10"),
    _e("regnet", "regnet", "regnetx002", 64),
    _e("regnet", "regnet", "regnety002", 64),
    _e("dla", "dla", "dla46c"),
    _e("darknet", "darknet", "darknet_tiny"),
    _e("darknet", "darknet", "darknet_ref"),
    _e("vgg", "vgg", "bn_vgg11"),
    _e("alexnet", "alexnet", "alexnet"),
    # with random BN statistics MENet's activations grow unchecked: the folded weights' float32
    # rounding moves the logits 9x eager's own float32 error (verify arbitrates with both)
    _e("menet", "menet", "menet108_8x1_g3"),
    _e("vovnet", "vovnet", "vovnet27s"),
    _e("selecsls", "selecsls", "selecsls42"),
    _e("resnet-cifar", "resnet_cifar", "resnet20_cifar10", 32),
    _e("preresnet-cifar", "preresnet_cifar", "preresnet20_cifar10", 32),
    _e("seresnet-cifar", "seresnet_cifar", "seresnet20_cifar10", 32),
    _e("densenet-cifar", "densenet_cifar", "densenet40_k12_bc_cifar10", 32),
    _e("resnet", "resneta", "resneta10", 64),
    _e("resnest", "resnesta", "resnestabc14", 64),
    _e("diaresnet", "diaresnet", "diaresnet10"),
    _e("bamresnet", "bamresnet", "bam_resnet18"),
    _e("octresnet", "octresnet", "octresnet10_ad2"),
    _e("isqrtcovresnet", "isqrtcovresnet", "isqrtcovresnet18"),
    _e("diracnet", "diracnetv2", "diracnet18v2"),
    _e("channelnet", "channelnet", "channelnet"),
    _e("espnetv2", "espnetv2", "espnetv2_wd2"),
    _e("nin-cifar", "nin_cifar", "nin_cifar10", 32),
    _e("ror-cifar", "ror_cifar", "ror3_56_cifar10", 32),
    _e("resnext-cifar", "resnext_cifar", "resnext20_16x4d_cifar10", 32),
    _e("revnet", "revnet", "revnet38", expect="neither torch.fx nor torch.export can capture RevNet",
       note="RevNet's reversible blocks assert on the input's shape (fx) and run a custom autograd "
            "Function that torch.export cannot trace through (a fake tensor among the program's constants)."),
    _e("mnasnet", "mnasnet", "mnasnet_a1"),
]

# The default tier: a few small models of different shapes (depthwise + hard-swish + SE gates,
# grouped convs + channel shuffle, fire modules with concat, TF "same" padding captured by the
# torch.export fallback), well under 90 s together.
DEFAULT_TIER = ("mobilenetv3_small_w7d20", "shufflenet_g3_wd4", "squeezenet_v1_1", "efficientnet_edge_small_b")

BY_NAME = {entry.name: entry for entry in ENTRIES}


@dataclass
class Row:
    model: str
    family: str
    input: str
    status: str = "ok"  # ok | error (a clean FxoptError) | crash (a raw exception) | mismatch
    capture: str = ""  # fx | export | failed
    capture_note: str = ""
    passes: dict[str, dict[str, int]] = field(default_factory=dict)  # pass -> stats summed over iterations
    nodes_before: int | None = None
    nodes_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    optimized: bool = False  # optimize() verified against eager
    compiled: bool = False  # the host build ran and matched eager
    kernels: int | None = None
    note: str = ""  # e.g. why an error above 1e-4 is float32 rounding
    build_seconds: float | None = None  # TVM lower + build
    max_error: float | None = None  # max |compiled - eager| / max |eager| over two inputs
    seconds: float = 0.0
    stage: str = ""  # where it failed: capture | optimize | compile | compare
    error: str = ""  # "ErrorClass: first line of the message"
    detail: str = ""  # the full message (or traceback for a crash)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fired(report) -> dict[str, dict[str, int]]:
    fired: dict[str, Counter] = {}
    for row in report.passes:
        if row.stats:
            fired.setdefault(row.name, Counter()).update(row.stats)
    return {name: dict(stats) for name, stats in fired.items()}


def _describe(row: Row, report) -> None:
    row.capture, row.capture_note = report.capture, report.capture_note
    row.passes = _fired(report)
    if report.passes:
        row.nodes_before, row.params_before = report.passes[0].before["nodes"], report.passes[0].before["params"]
        row.nodes_after, row.params_after = report.passes[-1].after["nodes"], report.passes[-1].after["params"]
    row.optimized = bool(report.verification and report.verification.get("ok"))


def _optimize_only(row: Row, model, inputs) -> None:
    import fxopt

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _describe(row, fxopt.optimize(model, inputs, "default").report)
    except Exception:  # noqa: BLE001 - the failure itself is what the row reports
        try:  # the pipeline failed: at least how the model was captured, and its size
            report = fxopt.optimize(model, inputs, "none", verify="off").report
            row.capture, row.capture_note = report.capture, report.capture_note
        except Exception:  # noqa: BLE001
            pass


def _matches(model, inputs, expected, actual, row: Row) -> bool:
    """Within rtol 1e-4 / atol 1e-4 x output scale of eager; beyond that only where float64 shows
    float32 rounding (the build within 4x eager's own error of the float64 model: fxopt's rule,
    verify._arbitrate_in_float64), which the row notes with eager's own error."""
    from fxopt import verify

    comparison = verify.compare_outputs(expected, actual, RTOL, RTOL)
    if comparison.ok:
        return True
    comparison = verify._arbitrate_in_float64(model, inputs, expected, actual, RTOL, comparison)
    if comparison.ok:
        import copy

        with torch.no_grad():
            exact = copy.deepcopy(model).double()(*(t.double() for t in inputs))
        own = max_relative_error(exact, expected)
        row.note = f"float32 rounding: eager itself is {own:.2g} of the output scale off float64"
    return comparison.ok


def max_relative_error(expected: Any, actual: Any) -> float:
    """max |actual - expected| / max |expected| over the leaves of two output structures."""
    import torch.utils._pytree as pytree

    worst = 0.0
    for e, a in zip(pytree.tree_leaves(expected), pytree.tree_leaves(actual), strict=True):
        scale = max(e.abs().max().item(), 1e-12)
        worst = max(worst, (a.to(e.dtype) - e).abs().max().item() / scale)
    return worst


def run_one(entry: Entry, compile: bool = True) -> Row:
    """``fxopt.compile`` for the host (the default pipeline, verified against eager, then the TVM
    build, checked) and compare the build with eager PyTorch on the example input and a second one. Never raises: the row says what
    happened (a clean FxoptError, a crash with its traceback, or a mismatch)."""
    import fxopt
    from fxopt.errors import FxoptError, InputError, TraceError, VerificationError

    row = Row(entry.name, entry.family, f"1x3x{entry.size}x{entry.size}")
    start = time.perf_counter()
    model = inputs = None
    threads = torch.get_num_threads()
    # One torch thread: on a loaded 2-core machine torch's OpenMP pool oversubscribes and eager
    # convs (verification, shape propagation) run 10-30x slower (ghostnet forward 0.2 s -> 1.5-7 s).
    torch.set_num_threads(1)
    try:
        model = entry.build()
        inputs = entry.inputs()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if compile:
                compiled = fxopt.compile(model, inputs, target="host", pipeline="default")
            else:
                compiled = fxopt.optimize(model, inputs, "default")
        _describe(row, compiled.report)
        if compile:
            build = compiled.report.build or {}
            row.kernels = build.get("kernels")
            row.build_seconds = round(build.get("lower_s", 0) + build.get("build_s", 0), 1)
            errors, ok = [], True
            for x in (inputs, entry.inputs(seed=11)):
                with torch.no_grad():
                    expected = model(*x)
                actual = compiled.run(*x)
                errors.append(max_relative_error(expected, actual))
                ok = ok and _matches(model, x, expected, actual, row)
            row.max_error = max(errors)
            row.compiled = ok
            if not row.compiled:
                row.status, row.stage = "mismatch", "compare"
                row.error = f"compiled output differs from eager by {row.max_error:.3g} of the output scale"
    except Exception as exc:  # noqa: BLE001 - the corpus records every failure; crashes are bugs
        if compile and model is not None and inputs is not None and not isinstance(exc, (TraceError, InputError)):
            _optimize_only(row, model, inputs)  # did the failure come after optimize? (only on failure)
        if isinstance(exc, VerificationError):  # fxopt's own check caught a mismatch: a bug
            row.status = "mismatch"
        elif isinstance(exc, FxoptError):
            row.status = "error"
        else:
            row.status = "crash"
        row.stage = "capture" if isinstance(exc, (TraceError, InputError)) else ("compile" if row.optimized else "optimize")
        row.error = _one_line(exc)
        row.detail = str(exc) if isinstance(exc, FxoptError) else traceback.format_exc()
        if row.stage == "capture":
            row.capture = "failed"
    finally:
        torch.set_num_threads(threads)
    row.seconds = round(time.perf_counter() - start, 1)
    return row


def _one_line(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"


def check_row(entry: Entry, row: Row) -> None:
    """What a test asserts: the entry compiles and matches, or fails with the FxoptError it declares."""
    if entry.expect:
        assert row.status == "error", f"{entry.name}: expected a clean FxoptError ({entry.expect}), got {row.status}: " \
                                      f"{row.error}\n{row.detail}"
        assert entry.expect in row.detail, f"{entry.name}: error does not mention {entry.expect!r}:\n{row.detail}"
        return
    assert row.status == "ok", f"{entry.name} [{row.stage}] {row.status}: {row.error}\n{row.detail}"
    assert row.compiled and row.max_error is not None, row
    assert row.max_error <= RTOL or row.note.startswith("float32 rounding"), row


# (model, what was wrong, regression test): bugs this corpus found in fxopt and that are fixed;
# docs/corpus.md lists them.
FIXED: list[tuple[str, str, str]] = [
    ("channelnet",
     "host build 99% wrong: TVM's ConvertLayout gave a conv3d after an NHWC conv the layout of "
     "expand_dims(NHWC) (\"NCHWD\"), which TVM 0.27 legalizes into wrong results; fxopt's CPU layout "
     "passes now pin conv3d to NCDHW (targets/tvm_backend/cpu_schedules.py)",
     "tests/targets/test_cpu_schedules.py::test_conv3d_after_an_nhwc_conv_keeps_its_layout_and_matches_eager"),
    ("isqrtcovresnet18",
     "fold_constant_subgraphs crashed (KeyError, reported as a PassError) when a folded constant fed "
     "another folded constant (passes/fold_constants.py)",
     "tests/passes/test_fold_constants.py::test_a_folded_result_read_by_another_folded_result"),
    ("isqrtcovresnet18",
     "then 100% wrong outputs: fold_constant_subgraphs folded torch.zeros(...) filled through views "
     "(select -> aten.copy_ after the torch.export capture); ir.writes_in_place now reads ATen schemas "
     "and the pass follows views (fxopt/ir.py, passes/fold_constants.py)",
     "tests/passes/test_fold_constants.py::test_a_constant_written_through_a_view_is_not_folded"),
    ("igcv3_wd4",
     "build check failed a build as accurate as eager (1.2e-4 from eager; eager itself 8.7e-5 off "
     "float64): compile() now arbitrates float32 rounding in float64 like verify does for passes "
     "(fxopt/api.py)",
     "tests/test_api.py::test_build_check_forgives_float32_rounding_of_an_ill_conditioned_model"),
    ("mnasnet_a1",
     "317 s to build (seresnet10 61 s, ghostnet 48 s): the ConvLike schedule unrolled squeeze-excite "
     "epilogues over the whole feature map (14*14*21 bodies, ~40 s of LLVM per kernel); now only "
     "tile-sized epilogues are unrolled (targets/tvm_backend/cpu_schedules.py)",
     "tests/targets/test_cpu_schedules.py::test_broadcast_epilogue_is_not_unrolled_and_matches_eager"),
]
