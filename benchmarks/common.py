"""Timing helpers shared by the benchmark scripts (never imported by tests)."""

from __future__ import annotations

import importlib
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import fxopt.measure

# pytorchcv model name -> module defining it (any other pytorchcv name goes through get_model)
PYTORCHCV_MODULES = {
    "mobilenetv2_wd4": "pytorchcv.models.mobilenetv2",
    "mobilenetv2_w1": "pytorchcv.models.mobilenetv2",
    "shufflenetv2_w1": "pytorchcv.models.shufflenetv2",
    "ghostnet": "pytorchcv.models.ghostnet",
    "mobilenetv3_large_w1": "pytorchcv.models.mobilenetv3",
    "resnet18": "pytorchcv.models.resnet",
}
# the repository's train-time reparameterizable networks (tests/reparam_models.py, not a test module)
REPARAM_MODELS = ("repvgg_a0", "mobileone_s0")


def reparam_models():
    """tests/reparam_models.py as a module (imported by path: benchmarks are not a package)."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module("reparam_models")


def build_model(name: str):
    """A randomly initialised model in eval mode: a pytorchcv name (pretrained=False) or one of
    REPARAM_MODELS (the train-time form, parallel conv/BN branches not folded)."""
    if name in REPARAM_MODELS:
        return getattr(reparam_models(), name)().eval()
    module = importlib.import_module(PYTORCHCV_MODULES.get(name, "pytorchcv.models.model_store"))
    if not hasattr(module, name):  # any other pytorchcv name
        from pytorchcv.model_provider import get_model

        return get_model(name, pretrained=False).eval()
    return getattr(module, name)(pretrained=False).eval()


def median_ms(fn, runs: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def ort_session(model, x, threads: int):
    """An ONNX Runtime session for ``model`` (legacy TorchScript ONNX export, opset 17, CPU
    provider, ORT_ENABLE_ALL, ``threads`` intra-op threads, input named "x"); raises ImportError
    when onnxruntime is not installed (it is an optional peer, not a dependency)."""
    import onnxruntime as ort
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def ort_ms(model, x, runs: int, threads: int) -> float | None:
    """ONNX Runtime (see ort_session) median latency of ``model(x)``, or None when onnxruntime
    is not installed."""
    try:
        session = ort_session(model, x, threads)
    except ImportError:
        return None
    feed = {"x": x.numpy()}
    return median_ms(lambda: session.run(None, feed), runs)


def gemm_gflops(n: int = 2048, runs: int = 5) -> float:
    """fp32 GEMM throughput of ``torch.mm`` on n x n matrices (torch's current thread count):
    GFLOP/s of the median of ``runs`` calls after a warm-up."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
    out = torch.empty(n, n)
    seconds = median_ms(lambda: torch.mm(a, b, out=out), runs, warmup=1) / 1e3
    return 2 * n**3 / seconds / 1e9


def print_table(rows: list[list[str]]) -> None:
    """Rows of cells (the first is the header), left column left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.rjust(w) if j else cell.ljust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def interleaved_ms(libraries: list, example, rounds: int) -> list[float]:
    """Median ms per run of each library, timed in turns (``rounds`` rounds of 10 samples of
    20 runs each), so that a slow spell of a shared machine hits every library alike."""
    samples: list[list[float]] = [[] for _ in libraries]
    for _ in range(rounds):
        for library, collected in zip(libraries, samples):
            collected.extend(fxopt.measure.measure_library(library, example, repeat=10, number=20, warmup=5).samples)
    return [statistics.median(s) * 1e3 for s in samples]
