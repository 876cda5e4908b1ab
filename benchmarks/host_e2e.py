"""End-to-end figures for the ``host`` target: lower, build, accuracy and latency vs eager torch.

    .venv/bin/python benchmarks/host_e2e.py [--models mobilenetv2_w1,resnet18] [--runs 10]
                                            [--threads 2] [--json out.json]

For each pytorchcv model (randomly initialised, ``eval()``, input 1x3x224x224, seeded), runs
``fxopt.compile(model, (x,), "host")`` (default pipeline) and prints the time of the passes, of
lowering to Relax and of the TVM build, the median latency of the TVM
build (``CompiledLibrary.time``) and of eager torch over ``--runs`` runs each after a warm-up,
their ratios (TVM / eager and TVM / ONNX Runtime, lower is better for TVM), and the max abs error of the TVM output
relative to max |eager output|. When onnxruntime is importable, an ONNX Runtime column is added
(legacy TorchScript ONNX export, CPU provider, same thread count). Never imported by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, median_ms, ort_ms, print_table  # noqa: E402

DEFAULT_MODELS = "mobilenetv2_w1,shufflenetv2_w1,ghostnet,resnet18"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated pytorchcv names")
    p.add_argument("--runs", type=int, default=10, help="timed runs per engine (median reported)")
    p.add_argument("--threads", type=int, default=2, help="threads for torch, TVM and ORT")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime even if importable")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p.parse_args()


def main() -> int:
    args = _parse()
    # TVM reads its thread count when its runtime starts: set it before tvm is imported.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch

    import fxopt
    from fxopt.targets import get_target, tvm_backend

    torch.set_num_threads(args.threads)
    target = get_target("host")
    try:
        import onnxruntime  # noqa: F401

        have_ort = not args.no_ort
    except ImportError:
        have_ort = False

    vers = tvm_backend.versions()
    print(
        f"host target {tvm_backend.resolve_target(target)}; tvm {vers['tvm']}, llvm {vers['llvm']}, "
        f"torch {torch.__version__}; {args.threads} threads, median of {args.runs} runs, "
        f"input 1x3x{args.size}x{args.size}",
        flush=True,
    )
    # Pay the one-off costs (torch.export/dynamo imports, TVM's first compile) before timing.
    warm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    tvm_backend.build(tvm_backend.lower(warm, (torch.randn(1, 3, 8, 8),)), target)

    header = ["model", "optimize s", "lower s", "build s", "TVM ms", "eager ms", "TVM/eager", "max rel err"]
    if have_ort:
        header += ["ORT ms", "TVM/ORT"]
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        torch.manual_seed(0)
        model = build_model(name)
        x = torch.randn(1, 3, args.size, args.size)
        with torch.no_grad():
            ref = model(x)
            ref = (ref if isinstance(ref, torch.Tensor) else ref[0]).numpy()
        compiled = fxopt.compile(model, (x,), target="host")
        lib = compiled.library
        build = compiled.report.build
        out = lib.run(x)[0]
        err = float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
        tvm_ms = statistics.median(lib.time(x, repeat=args.runs, number=1)) * 1e3  # warms up once
        with torch.inference_mode():
            eager_ms = median_ms(lambda: model(x), args.runs)
        row = {
            "model": name,
            "optimize_s": sum(row.seconds for row in compiled.report.passes),
            "lower_s": build["lower_s"],
            "build_s": build["build_s"],
            "tvm_ms": tvm_ms,
            "eager_ms": eager_ms,
            "ratio": tvm_ms / eager_ms,
            "max_rel_err": err,
        }
        if have_ort:
            try:
                with torch.no_grad():
                    row["ort_ms"] = ort_ms(model, x, args.runs, args.threads)
            except Exception as exc:  # noqa: BLE001 - an optional column
                print(f"  {name}: ONNX Runtime failed: {exc}", file=sys.stderr)
                row["ort_ms"] = None
        rows.append(row)
        print(f"  {name}: done", file=sys.stderr, flush=True)

    cells = [header]
    for r in rows:
        line = [
            r["model"],
            f"{r['optimize_s']:.2f}",
            f"{r['lower_s']:.2f}",
            f"{r['build_s']:.2f}",
            f"{r['tvm_ms']:.2f}",
            f"{r['eager_ms']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['max_rel_err']:.1e}",
        ]
        if have_ort:
            ort = r.get("ort_ms")
            line += ["-", "-"] if ort is None else [f"{ort:.2f}", f"{r['tvm_ms'] / ort:.1f}"]
        cells.append(line)
    print_table(cells)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": vers, "threads": args.threads, "runs": args.runs, "rows": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
