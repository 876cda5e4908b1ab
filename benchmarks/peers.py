"""fxopt against the runtimes a user would pick instead, interleaved in one run on this CPU.

    .venv/bin/python benchmarks/peers.py [--models mobilenetv2_w1,resnet18] [--rounds 10] [--warmup-rounds 1] [--calls 3]
        [--threads 2] [--input-size 224] [--skip-compile] [--no-freezing] [--tune-trials N --tune-db PATH]
        [--json out.json]

Models: pytorchcv mobilenetv2_w1, shufflenetv2_w1, ghostnet, mobilenetv3_large_w1, resnet18
(pretrained=False) and the repository's train-time RepVGG-A0- and MobileOne-S0-shaped networks
(``repvgg_a0``, ``mobileone_s0`` from tests/reparam_models.py: parallel conv/BN branches, not
folded). Random weights, random BatchNorm statistics (fxopt.testing.randomize_norm_stats), eval
mode, batch 1, fp32.

Runtimes (columns): PyTorch eager; torch.compile (default inductor backend, with
``torch._inductor.config.freezing = True`` as a deployment user sets it unless --no-freezing);
ONNX Runtime (legacy ONNX export, CPU provider, ORT_ENABLE_ALL; skipped with a note when
onnxruntime is not installed); fxopt untuned (``fxopt.compile(model, (x,), target="host")``);
fxopt tuned (``tune=fxopt.TuneConfig(trials=N, database=PATH)``, only with --tune-trials N > 0).
All run in this process with the same thread count: ``torch.set_num_threads``, ORT intra-op
threads, and TVM_NUM_THREADS (and OMP_NUM_THREADS), set before torch and tvm load.

Everything is built first (compile times: torch.compile's first call, ORT's export + session,
fxopt.compile's whole call including its own check against eager; one-off process costs are paid
by a tiny warm-up build first). Then, after --warmup-rounds unrecorded rounds, for R rounds,
each model's runtimes are timed in a shuffled order, ``--calls`` back-to-back calls each, the
round's median kept, so machine noise hits every column alike; an fp32 GEMM (torch.mm, n x n, same threads) is timed in every round too, and its
median over rounds is the peak the achieved GFLOP/s (2 * MACs / latency, MACs of the model as
given, fxopt.ir.count_macs) are compared with. Every call is wall time around a Python call that
takes the input and returns the output (``model(x)``, ``session.run``, ``CompiledLibrary.run``).

Correctness: the runtimes run on an input other than the one they were compiled with; the first
output and the last timed output of every runtime are compared with eager PyTorch's output
(fxopt.verify.compare_outputs: rtol and atol relative to max |eager output|, --tol, default
fxopt's build tolerance). A mismatch shows as WRONG with its error, and that runtime does not
count as the best peer. A runtime that fails on a model shows its error in that cell; the rest go
on. Never imported by tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, gemm_gflops, ort_session, print_table  # noqa: E402

DEFAULT_MODELS = "mobilenetv2_w1,shufflenetv2_w1,ghostnet,mobilenetv3_large_w1,resnet18,repvgg_a0,mobileone_s0"
EAGER, COMPILE, ORT, FXOPT, TUNED = "eager", "torch.compile", "ORT", "fxopt", "fxopt tuned"
PEERS = (EAGER, COMPILE, ORT)
FXOPT_COLUMNS = (FXOPT, TUNED)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated names (pytorchcv, repvgg_a0, mobileone_s0)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (median, min, max over rounds)")
    p.add_argument("--warmup-rounds", type=int, default=1, help="interleaved rounds run first and not recorded")
    p.add_argument("--calls", type=int, default=3, help="back-to-back calls per runtime per round (median kept)")
    p.add_argument("--threads", type=int, default=2, help="threads for torch, ORT and TVM")
    p.add_argument("--input-size", type=int, default=224, help="input height and width (batch 1, 3 channels)")
    p.add_argument("--skip-compile", action="store_true", help="no torch.compile column (slow to compile)")
    p.add_argument("--no-freezing", action="store_true", help="torch.compile without inductor freezing")
    p.add_argument("--no-ort", action="store_true", help="no ONNX Runtime column even if importable")
    p.add_argument("--tune-trials", type=int, default=0, help="fxopt tuned column with this trial budget (0: skip)")
    p.add_argument("--tune-db", help="tuning database for the tuned column (reused across models and runs)")
    p.add_argument("--tol", type=float, default=None, help="rtol = atol/max|eager| (default: fxopt's build tolerance)")
    p.add_argument("--gemm-size", type=int, default=2048, help="n of the n x n fp32 GEMM that measures the peak")
    p.add_argument("--breakdown", type=int, default=0, metavar="K",
                   help="also print the K slowest kernels of each fxopt build (per-kernel time breakdown)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args()


def _short(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[-1] if lines and lines[0].startswith('Traceback') else (lines[0] if lines else '')}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Runtime:
    """One runtime for one model: how to call it, what building it cost, what it measured."""

    name: str
    call: Callable[[], Any] | None = None
    compile_s: float | None = None
    error: str | None = None
    round_ms: list[float] = field(default_factory=list)
    checks: list[Any] = field(default_factory=list)  # fxopt.verify.Comparison of the first and last outputs
    last_output: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.call is not None and self.error is None

    @property
    def ok(self) -> bool:
        return self.alive and bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def max_rel_error(self) -> float | None:
        return max(c.max_rel_error for c in self.checks) if self.checks else None

    def median(self) -> float | None:
        return statistics.median(self.round_ms) if self.round_ms and self.error is None else None


def _flat(outputs: Any) -> list:
    """Outputs of any runtime as a flat list of torch tensors (ORT and TVM give numpy arrays)."""
    import numpy as np
    import torch
    import torch.utils._pytree as pytree

    leaves = outputs if isinstance(outputs, list) else pytree.tree_leaves(outputs)
    return [torch.from_numpy(np.asarray(leaf)) if not isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]


def main() -> int:
    args = _parse()
    load_start = os.getloadavg()[0]
    # Thread counts are read when the runtimes start: set them before torch and tvm are imported.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    import fxopt
    from fxopt import ir
    from fxopt.targets import tvm_backend
    from fxopt.testing import randomize_norm_stats
    from fxopt.verify import BUILD_TOLERANCE, compare_outputs

    torch.set_num_threads(args.threads)
    tol = (args.tol, args.tol) if args.tol is not None else BUILD_TOLERANCE
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    size = args.input_size
    freezing = not args.no_freezing

    notes = []
    columns = [EAGER]
    if not args.skip_compile:
        columns.append(COMPILE)
    else:
        notes.append("torch.compile skipped (--skip-compile)")
    ort_version = None
    if not args.no_ort:
        try:
            import onnxruntime

            ort_version = onnxruntime.__version__
            columns.append(ORT)
        except ImportError:
            notes.append("ONNX Runtime skipped: onnxruntime is not installed")
    else:
        notes.append("ONNX Runtime skipped (--no-ort)")
    columns.append(FXOPT)
    tune_config = None
    if args.tune_trials > 0:
        columns.append(TUNED)
        TuneConfig = getattr(fxopt, "TuneConfig", None)  # lazily: the tuning API may not exist yet
        if TuneConfig is None:
            tune_config = ImportError("fxopt.TuneConfig does not exist in this fxopt")
        else:
            kwargs = {"trials": args.tune_trials}
            if args.tune_db:
                kwargs["database"] = args.tune_db
            try:
                tune_config = TuneConfig(**kwargs)
            except Exception as exc:  # noqa: BLE001 - shown in the tuned cells
                tune_config = exc
    else:
        notes.append("fxopt tuned skipped (--tune-trials 0)")

    vers = tvm_backend.versions()
    print(f"torch {torch.__version__}, onnxruntime {ort_version or '-'}, tvm {vers['tvm']} (llvm {vers['llvm']}, "
          f"target {tvm_backend.resolve_target('host').get('mcpu', '?')}); {args.threads} threads; "
          f"batch 1, 3x{size}x{size}, fp32", flush=True)

    # One-off process costs (dynamo/inductor imports, TVM's first build) before any compile is timed.
    warm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    warm_x = torch.randn(1, 3, 8, 8)
    fxopt.compile(warm, (warm_x,), target="host")
    if COMPILE in columns:
        torch._inductor.config.freezing = freezing
        with torch.no_grad():
            torch.compile(copy.deepcopy(warm))(warm_x)
    gemm_gflops(args.gemm_size, runs=1)

    # ---- build everything ----------------------------------------------------------------------
    models: dict[str, dict] = {}
    for name in names:
        entry = models[name] = {"runtimes": {}, "macs": None, "error": None}
        print(f"  {name}: building", file=sys.stderr, flush=True)
        try:
            torch.manual_seed(args.seed)
            model = randomize_norm_stats(build_model(name), args.seed).eval()
            generator = torch.Generator().manual_seed(args.seed)
            x_compile = torch.randn(1, 3, size, size, generator=generator)  # what the runtimes are built with
            x = torch.randn(1, 3, size, size, generator=generator)  # what they run on
            with torch.no_grad():
                reference = _flat(model(x))
            entry["macs"] = ir.count_macs(ir.trace(model, (x,)))
        except Exception as exc:  # noqa: BLE001 - the model itself: a row of errors
            entry["error"] = _short(exc)
            print(f"  {name}: {entry['error']}", file=sys.stderr, flush=True)
            continue
        entry["reference"] = reference
        for column in columns:
            runtime = entry["runtimes"][column] = Runtime(column)
            start = time.perf_counter()
            try:
                runtime.call = _build(column, model, x_compile, x, args, fxopt, tune_config, runtime)
                runtime.compile_s = time.perf_counter() - start
                with torch.no_grad():
                    first = runtime.call()
                runtime.checks.append(compare_outputs(reference, _flat(first), *tol))
            except Exception as exc:  # noqa: BLE001 - one cell, the rest goes on
                runtime.error = _short(exc)
                print(f"  {name} / {column}: {runtime.error}", file=sys.stderr, flush=True)
                if os.environ.get("PEERS_DEBUG"):
                    traceback.print_exc()
        done = ", ".join(f"{c} {r.compile_s:.1f} s" for c, r in entry["runtimes"].items() if r.compile_s is not None)
        print(f"  {name}: built ({done})", file=sys.stderr, flush=True)

    # ---- interleaved rounds --------------------------------------------------------------------
    rng = random.Random(args.seed)
    gemm_rounds = []
    with torch.no_grad():
        for round_index in range(-args.warmup_rounds, args.rounds):  # negative: warm-up, not recorded
            start = time.perf_counter()
            gemm = gemm_gflops(args.gemm_size, runs=3)
            if round_index >= 0:
                gemm_rounds.append(gemm)
            for name, entry in models.items():
                order = [r for r in entry["runtimes"].values() if r.alive]
                rng.shuffle(order)
                for runtime in order:
                    times = []
                    try:
                        for _ in range(args.calls):
                            t0 = time.perf_counter()
                            out = runtime.call()
                            times.append(time.perf_counter() - t0)
                    except Exception as exc:  # noqa: BLE001
                        where = f"round {round_index + 1}" if round_index >= 0 else "warm-up round"
                        runtime.error = f"{where}: {_short(exc)}"
                        print(f"  {name} / {runtime.name}: {runtime.error}", file=sys.stderr, flush=True)
                        continue
                    if round_index >= 0:
                        runtime.round_ms.append(statistics.median(times) * 1e3)
                    runtime.last_output = out
                    time.sleep(0.005)  # let the previous runtime's spinning worker threads go idle
            label = f"round {round_index + 1}/{args.rounds}" if round_index >= 0 else "warm-up round"
            print(f"  {label}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    for entry in models.values():
        for runtime in entry["runtimes"].values():
            if runtime.alive and runtime.last_output is not None:
                runtime.checks.append(compare_outputs(entry["reference"], _flat(runtime.last_output), *tol))
            runtime.last_output = None
    peak = statistics.median(gemm_rounds) if gemm_rounds else gemm_gflops(args.gemm_size)

    # ---- figures -------------------------------------------------------------------------------
    results = []
    for name, entry in models.items():
        row = {"model": name, "macs": entry["macs"], "error": entry["error"], "runtimes": {}}
        peers = [entry["runtimes"][c] for c in PEERS if c in entry["runtimes"]]
        timed_peers = [(r.median(), r.name) for r in peers if r.ok and r.median() is not None]
        best = min(timed_peers) if timed_peers else None
        row["best_peer"] = best[1] if best else None
        row["best_peer_ms"] = best[0] if best else None
        for column, runtime in entry["runtimes"].items():
            median = runtime.median()
            figures = {
                "median_ms": median,
                "min_ms": min(runtime.round_ms) if median is not None else None,
                "max_ms": max(runtime.round_ms) if median is not None else None,
                "rounds": len(runtime.round_ms),
                "round_ms": runtime.round_ms,
                "compile_s": runtime.compile_s,
                "ok": runtime.ok if runtime.error is None else None,
                "max_rel_error": runtime.max_rel_error,
                "check": "; ".join(c.detail for c in runtime.checks if not c.ok) or None,
                "error": runtime.error,
                **runtime.extra,
            }
            if median is not None:
                figures["ratio_to_best_peer"] = median / best[0] if best else None
                if entry["macs"]:
                    figures["gflops"] = 2 * entry["macs"] / (median / 1e3) / 1e9
                    figures["fraction_of_peak"] = figures["gflops"] / peak
            row["runtimes"][column] = figures
        results.append(row)

    geomeans = {}
    for column in FXOPT_COLUMNS:
        if column not in columns:
            continue
        ratios = [r["runtimes"][column]["ratio_to_best_peer"] for r in results
                  if column in r["runtimes"] and r["runtimes"][column]["ok"]
                  and r["runtimes"][column].get("ratio_to_best_peer") is not None]
        geomeans[column] = {
            "geomean_ratio": math.exp(statistics.fmean(math.log(v) for v in ratios)) if ratios else None,
            "models": len(ratios),
            "of": len(results),
        }

    # ---- tables --------------------------------------------------------------------------------
    def ms(value):
        return "-" if value is None else (f"{value:.2f}" if value < 100 else f"{value:.0f}")

    def check_cell(figures):
        if figures["error"]:
            return f"error: {figures['error'][:100]}"
        if figures["max_rel_error"] is None:
            return "-"
        return (f"ok {figures['max_rel_error']:.0e}" if figures["ok"]
                else f"WRONG: max rel err {figures['max_rel_error']:.2e}")

    compile_label = f"torch.compile{' +freezing' if freezing else ''}"
    print(f"\nmedian of {len(gemm_rounds)} interleaved rounds (after {args.warmup_rounds} warm-up) x {args.calls} calls (each round's median); "
          f"fp32 GEMM peak {peak:.0f} GFLOP/s (torch.mm {args.gemm_size}^2, median over rounds); "
          f"{compile_label if COMPILE in columns else 'torch.compile: -'}; fxopt tuned: "
          f"{f'{args.tune_trials} trials' + (f', database {args.tune_db}' if args.tune_db else '') if TUNED in columns else '-'}; "
          f"check vs eager at rtol={tol[0]:g}, atol={tol[1]:g} x max|output|")
    load_end = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    print(f"load average (1 min) {load_start:.1f} before the run, {load_end:.1f} at its end, {cores} cores"
          + (": other work was running, expect noisy figures (PyTorch's OpenMP threads suffer most)"
             if load_start > 1.0 else ""))
    for note in notes:
        print(f"note: {note}")
    detail = [["model", "runtime", "median ms", "min ms", "max ms", "x best peer", "compile s", "GFLOP/s",
               "% peak", "check"]]
    for row in results:
        if row["error"]:
            detail.append([row["model"], "-", "-", "-", "-", "-", "-", "-", "-", f"error: {row['error'][:100]}"])
            continue
        for column, f in row["runtimes"].items():
            ratio = f.get("ratio_to_best_peer")
            detail.append([
                row["model"], compile_label if column == COMPILE else column, ms(f["median_ms"]), ms(f["min_ms"]),
                ms(f["max_ms"]), "-" if ratio is None else f"{ratio:.2f}",
                "-" if column == EAGER or f["compile_s"] is None else f"{f['compile_s']:.1f}",
                f"{f['gflops']:.1f}" if "gflops" in f else "-",
                f"{100 * f['fraction_of_peak']:.1f}" if "fraction_of_peak" in f else "-",
                check_cell(f),
            ])
    print()
    print_table(detail)

    summary_header = ["model", "MMACs", *[compile_label if c == COMPILE else c for c in columns], "best peer"]
    summary_header += [f"{c} / best" for c in FXOPT_COLUMNS if c in columns]
    summary = [summary_header]
    for row in results:
        cells = [row["model"], f"{row['macs'] / 1e6:.0f}" if row["macs"] else "-"]
        for column in columns:
            f = row["runtimes"].get(column)
            if f is None or f["error"]:
                cells.append("error")
            else:
                cells.append(ms(f["median_ms"]) + ("" if f["ok"] else " WRONG"))
        cells.append(row["best_peer"] or "-")
        for column in FXOPT_COLUMNS:
            if column in columns:
                f = row["runtimes"].get(column)
                ratio = f.get("ratio_to_best_peer") if f else None
                cells.append("-" if ratio is None else f"{ratio:.2f}" + ("" if f["ok"] else " WRONG"))
        summary.append(cells)
    geo = ["geomean", "", *[""] * len(columns), ""]
    for column in FXOPT_COLUMNS:
        if column in columns:
            g = geomeans[column]
            geo.append(("-" if g["geomean_ratio"] is None else f"{g['geomean_ratio']:.2f}")
                       + (f" ({g['models']}/{g['of']})" if g["models"] != g["of"] else ""))
    summary.append(geo)
    print()
    print_table(summary)
    print("(ms, medians; x / best: latency over the fastest correct peer of eager, torch.compile, ORT; "
          "geomean over models where it ran correctly, (k/n) when not all)")

    if args.breakdown:
        for row in results:
            for column in FXOPT_COLUMNS:
                kernels = row["runtimes"].get(column, {}).get("kernels")
                if kernels:
                    print(f"\n{row['model']} / {column}: the {len(kernels)} slowest kernels (ms per run, calls)")
                    print_table([["kernel", "ms", "calls"]] + [[k["kernel"], f"{k['ms']:.3f}", str(k["calls"])] for k in kernels])

    if args.json:
        payload = {
            "config": {"models": names, "rounds": args.rounds, "calls": args.calls, "threads": args.threads,
                       "input": [1, 3, size, size], "dtype": "float32", "torch_compile_freezing": freezing,
                       "tune_trials": args.tune_trials, "tune_db": args.tune_db, "tolerance": list(tol),
                       "columns": columns, "notes": notes},
            "load_average_1min": {"before": load_start, "end": load_end, "cores": cores},
            "versions": {"torch": torch.__version__, "onnxruntime": ort_version, **vers},
            "gemm_peak_gflops": peak, "gemm_rounds_gflops": gemm_rounds, "gemm_size": args.gemm_size,
            "models": results, "geomean_ratio_to_best_peer": geomeans,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


def _build(column, model, x_compile, x, args, fxopt, tune_config, runtime: Runtime):
    """Build ``column`` for ``model`` (with ``x_compile``); returns a call running it on ``x``."""
    import torch

    if column == EAGER:
        return lambda: model(x)
    if column == COMPILE:
        compiled = torch.compile(copy.deepcopy(model))  # default inductor backend; freezing set in main
        with torch.no_grad():
            compiled(x_compile)  # the compile happens here
        return lambda: compiled(x)
    if column == ORT:
        session = ort_session(model, x_compile, args.threads)
        feed = {"x": x.numpy()}
        return lambda: session.run(None, feed)
    if column in (FXOPT, TUNED):
        kwargs = {}
        if column == TUNED:
            if isinstance(tune_config, BaseException):
                raise tune_config
            kwargs["tune"] = tune_config
        compiled = fxopt.compile(model, (x_compile,), target="host", **kwargs)
        runtime.extra["fxopt_build"] = dict(compiled.report.build)
        runtime.extra["fxopt_passes_s"] = round(sum(p.seconds for p in compiled.report.passes), 3)
        from fxopt import ir

        runtime.extra["fxopt_macs"] = ir.count_macs(compiled.module)
        library = compiled.library
        if args.breakdown:
            runtime.extra["kernels"] = library.kernel_times(x)[: args.breakdown]
        return lambda: library.run(x)
    raise ValueError(column)


if __name__ == "__main__":
    sys.exit(main())
