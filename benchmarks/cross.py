"""Cross-target figures: runtime build, model build and qemu-user run times per target.

    .venv/bin/python benchmarks/cross.py [--model mobilenetv2_wd4] [--repeat 10] [--fresh-runtime]

For each CPU target (host, arm64, riscv64, riscv64-rvv) builds the model (pytorchcv, 1x3x224x224,
default pipeline), exports a build directory, and times the shipped runner on the golden input
(natively or under qemu-user: emulation speed, not device speed). --fresh-runtime builds the
runtime into an empty cache to time it. Never imported by tests.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTORCHCV_MODULES, build_model, print_table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenetv2_wd4", choices=sorted(PYTORCHCV_MODULES))
    parser.add_argument("--targets", default="host,arm64,riscv64,riscv64-rvv")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--fresh-runtime", action="store_true")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory(prefix="fxopt-cross-bench-")
    if args.fresh_runtime:
        os.environ["XDG_CACHE_HOME"] = scratch.name
    os.environ.setdefault("TVM_NUM_THREADS", "1")  # qemu-user runs threads on the host: keep runs comparable
    import torch

    import fxopt
    from fxopt.targets import get_target, runners

    torch.manual_seed(0)
    model = build_model(args.model)
    x = torch.randn(1, 3, 224, 224)
    rows = [["target", "runtime build s", "compile s", "export s", "runner", "first run ms", "median ms", "check"]]
    for name in args.targets.split(","):
        target = get_target(name)
        start = time.perf_counter()
        runners.runtime_for(target)
        runtime_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = fxopt.compile(model, (x,), target=target, verify="off")
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        path = compiled.export(Path(scratch.name) / name)
        export_s = time.perf_counter() - start
        prefix = runners.command_prefix(target)
        proc = subprocess.run([*prefix, str(path / "fxopt-run"), str(path / "model.so"), "--check", str(path),
                               "--repeat", str(args.repeat)], capture_output=True, text=True, timeout=1800)
        first = re.search(r"first run ([\d.]+) ms", proc.stdout)
        median = re.search(r"median ([\d.]+) ms", proc.stdout)
        rows.append([name, f"{runtime_s:.1f}", f"{compile_s:.1f}", f"{export_s:.1f}", prefix[0] if prefix else "native",
                     first.group(1) if first else "-", median.group(1) if median else "-",
                     "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"])
        print(f"  {name}: done", file=sys.stderr, flush=True)
    print(f"{args.model}, 1x3x224x224, runner --repeat {args.repeat}, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}"
          f"{', runtime built from scratch' if args.fresh_runtime else ', runtime from the cache'}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
