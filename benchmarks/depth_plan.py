"""Depth plan of a model zoo network on the host: the plan, predicted against measured latency.

Plans ``--model`` (a pytorchcv name; random weights, so the damage scores are output errors on
random calibration inputs, not accuracy) at each ``--speedup`` goal, applies the plan, compiles
the planned model (its groups merged) and the original with fxopt for the host, and prints one
row per goal: activations removed, groups merged, predicted and measured latency and speedup.

    .venv/bin/python benchmarks/depth_plan.py --model mobilenetv2_w1 --speedup 1.5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import fxopt
from common import build_model, interleaved_ms
from fxopt.depth import apply_depth_plan, plan_depth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenetv2_w1")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--speedup", type=float, nargs="+", default=[1.5])
    parser.add_argument("--calibration", type=int, default=4, help="calibration batch size")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds over all builds (10 samples of 20 runs)")
    parser.add_argument("--plans", default=None, help="keep the plans in this directory")
    args = parser.parse_args()
    model = build_model(args.model)
    example = (torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)),)
    calibration = torch.randn(args.calibration, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    libraries = [fxopt.compile(model, example, "host").library]
    directory = Path(args.plans or tempfile.mkdtemp(prefix="fxopt-plans-"))
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for goal in args.speedup:
        started = time.perf_counter()
        try:
            plan = plan_depth(model, example, "host", speedup=goal, calibration=calibration,
                              log=lambda line: print(f"  {line}", flush=True) if "table" not in line else None)
        except fxopt.InputError as exc:  # a goal beyond reach: the message says how far one gets
            print(f"  goal {goal}: {exc}", flush=True)
            continue
        path = plan.save(directory / f"{args.model}_{goal}.json")
        planned = apply_depth_plan(model, plan, example)
        libraries.append(fxopt.compile(planned, example, "host", pipeline=plan.compile_pipeline(path)).library)
        rows.append((goal, plan, len(libraries) - 1, time.perf_counter() - started, path))
    times = interleaved_ms(libraries, example, args.rounds)
    base_ms = times[0]
    print(f"\n{args.model} at {args.size}x{args.size} on the host; compiled original {base_ms:.3f} ms (median)")
    print(f"{'goal':>5} {'acts removed':>12} {'groups':>6} {'convs merged':>12} {'predicted ms':>12} {'measured ms':>11} "
          f"{'predicted':>9} {'measured':>8} {'calib err':>9} {'plan s':>6}")
    for goal, plan, index, seconds, path in rows:
        ms = times[index]
        print(f"{goal:>5.2f} {len(plan.removed_activations):>12} {len(plan.merges):>6} "
              f"{sum(len(m['convs']) for m in plan.merges):>12} {plan.predicted * 1e3:>12.3f} {ms:>11.3f} "
              f"{plan.predicted_speedup:>8.2f}x {base_ms / ms:>7.2f}x {plan.calibration_error:>9.3g} {seconds:>6.0f}")
        print(f"      plan: {path}")


if __name__ == "__main__":
    main()
