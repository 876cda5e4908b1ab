"""Reparameterization figures: train-time vs folded RepVGG-A0- and MobileOne-S0-shaped networks.

    .venv/bin/python benchmarks/reparam.py [--runs 10] [--threads 2] [--tvm-runs 5] [--no-tvm]

For each network (tests/reparam_models.py, random weights and BatchNorm statistics, batch 1,
3x224x224) prints: nodes and parameters train-time -> folded, the fold time (fxopt.optimize with
the default pipeline), eager latency train-time vs folded, the TVM host build's latency
train-time (pipeline "none") vs folded (default), and ONNX Runtime's when it is importable.
Medians; ratios are train-time / folded. Never imported by tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_ms, ort_ms, print_table, reparam_models  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tvm-runs", type=int, default=5, help="TVM builds are unscheduled and slow until the CPU issue lands")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-tvm", action="store_true")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    import fxopt
    from fxopt import ir
    from fxopt.testing import randomize_norm_stats
    zoo = reparam_models()

    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, factory in (("RepVGG-A0", zoo.repvgg_a0), ("MobileOne-S0", zoo.mobileone_s0)):
        torch.manual_seed(0)
        model = randomize_norm_stats(factory(), 0).eval()
        start = time.perf_counter()
        folded = fxopt.optimize(model, (x,))
        fold_s = time.perf_counter() - start
        train_gm = ir.trace(model, (x,))
        row = {
            "model": name,
            "nodes": (len(train_gm.graph.nodes), len(folded.module.graph.nodes)),
            "params": (ir.count_params(train_gm), ir.count_params(folded.module)),
            "fold_s": fold_s,
            "max_rel_err": folded.report.verification["max_rel_error"],
        }
        with torch.inference_mode():
            row["eager"] = (median_ms(lambda: model(x), args.runs), median_ms(lambda: folded.module(x), args.runs))
        row["ort"] = (ort_ms(model, x, args.runs, args.threads), ort_ms(folded.module, x, args.runs, args.threads))
        if not args.no_tvm:
            tvm_ms = []
            for pipeline in ("none", "default"):
                compiled = fxopt.compile(model, (x,), target="host", pipeline=pipeline)
                tvm_ms.append(statistics.median(compiled.library.time(x, repeat=args.tvm_runs)) * 1e3)
            row["tvm"] = tuple(tvm_ms)
        rows.append(row)
        print(f"  {name}: done", file=sys.stderr, flush=True)

    def pair(values, fmt="{:.1f}"):
        if values is None or values[0] is None:
            return "-", "-", "-"
        return fmt.format(values[0]), fmt.format(values[1]), f"{values[0] / values[1]:.2f}x"

    header = ["model", "nodes", "params", "fold s", "max rel err",
              "eager ms train", "folded", "ratio", "TVM ms train", "folded", "ratio", "ORT ms train", "folded", "ratio"]
    table = [header]
    for r in rows:
        table.append([r["model"], f"{r['nodes'][0]} -> {r['nodes'][1]}",
                      f"{r['params'][0] / 1e6:.2f}M -> {r['params'][1] / 1e6:.2f}M", f"{r['fold_s']:.2f}",
                      f"{r['max_rel_err']:.1e}", *pair(r["eager"]), *pair(r.get("tvm")), *pair(r["ort"])])
    print(f"batch 1, 3x224x224, {args.threads} threads; medians of {args.runs} runs ({args.tvm_runs} for TVM)")
    print_table(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
