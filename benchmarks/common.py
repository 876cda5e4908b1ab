"""Timing helpers shared by the benchmark scripts (never imported by tests)."""

from __future__ import annotations

import io
import statistics
import time
import warnings


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


def ort_ms(model, x, runs: int, threads: int) -> float | None:
    """ONNX Runtime (CPU provider, ``threads`` intra-op threads) median latency of ``model(x)``,
    or None when onnxruntime is not installed (it is an optional peer, not a dependency)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return median_ms(lambda: session.run(None, feed), runs)


def print_table(rows: list[list[str]]) -> None:
    """Rows of cells (the first is the header), left column left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.rjust(w) if j else cell.ljust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
