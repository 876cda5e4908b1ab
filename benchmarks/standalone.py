"""Standalone C builds (no TVM runtime): flash and RAM on the riscv32 microcontroller target, and
riscv64 instruction counts per inference, standalone vs the TVM runtime (Relax VM) build.

    .venv/bin/python benchmarks/standalone.py [--repeat 5] [--models residual,sensor_cnn]

Models: the test zoo's small models (tests/targets/test_cross_builds.py, at the input sizes of
tests/targets/test_standalone.py) and the HAR-shaped 1D-conv example (fxopt.examples.sensor_cnn,
1x3x128). Instruction counts are qemu-riscv64 with fxopt's counting plugin, one thread, the
median of ``--repeat`` marked runs after a first uncounted one: deterministic, so one run of this
script is enough.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import fxopt
from fxopt.examples import sensor_cnn
from fxopt.targets import get_target, runners, standalone
from fxopt.targets import tvm_backend as tb
from fxopt.testing import randomize_norm_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "targets"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # (cross_models, which it imports)


def models() -> dict:
    from test_standalone import ZOO  # noqa: E402 - the zoo's small models and their input sizes

    out = {}
    for name, (factory, size) in ZOO.items():
        torch.manual_seed(0)
        out[name] = (randomize_norm_stats(factory(), 0).eval(), torch.randn(1, 3, size, size))
    out["sensor_cnn (HAR)"] = (sensor_cnn(), torch.randn(1, 3, 128, generator=torch.Generator().manual_seed(0)))
    return out


def mcu_figures(name: str, model, x, target: str) -> dict:
    compiled = fxopt.compile(model, (x,), target=target)
    assert compiled.report.build["check"]["ok"], name
    return compiled.report.build["standalone"] | {"weights": sum(p.numel() for p in model.parameters())}


def riscv64_counts(model, x, repeat: int) -> tuple[int, int]:
    target = get_target("riscv64")
    optimized = fxopt.optimize(model, (x,), target=target)
    mod = tb.lower(optimized.module, (x,))
    library = standalone.build(mod, target, example_inputs=[x.numpy()])
    alone, _ = standalone.count_instructions(target, library.directory / standalone.EXAMPLE, [x.numpy()],
                                             library.sources["outputs"], repeat=repeat)
    vm_library = tb.build(mod, target)
    with tempfile.TemporaryDirectory() as scratch:
        saved = vm_library.save(Path(scratch) / target.library)
        runtime = runners.runtime_for(target)
        with_vm, _ = runners.count_instructions(target, runtime.runner, saved, [x.numpy()], repeat=repeat)
    return int(statistics.median(alone)), int(statistics.median(with_vm))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--models", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--mcu", default="riscv32-mcu", help="microcontroller target for the flash/RAM figures")
    args = parser.parse_args()
    chosen = models()
    if args.models:
        chosen = {k: v for k, v in chosen.items() if k.split(" ")[0] in args.models.split(",")}
    rows = []
    for name, (model, x) in chosen.items():
        figures = mcu_figures(name, model, x, args.mcu)
        alone, with_vm = riscv64_counts(model, x, args.repeat)
        rows.append((name, tuple(x.shape), figures, alone, with_vm))
        print(f"done {name}", file=sys.stderr)
    print(f"\n{args.mcu}: flash = least firmware running the model (code incl. libgcc/libm + constants); "
          "RAM = arena (tensors + kernel workspace) + static data + measured stack")
    print(f"{'model':<22} {'input':<14} {'weights':>8} {'flash B':>8} {'code':>7} {'consts':>7} {'RAM B':>7} "
          f"{'arena':>7} {'wkspace':>7} {'stack':>6}")
    for name, shape, f, _, _ in rows:
        print(f"{name:<22} {'x'.join(map(str, shape)):<14} {f['weights']:>8} {f['flash_bytes']:>8} {f['code_bytes']:>7} "
              f"{f['constants_bytes']:>7} {f['ram_bytes']:>7} {f['arena_bytes']:>7} {f['workspace_bytes']:>7} "
              f"{f['stack_bytes']:>6}")
    print("\nriscv64 (qemu-riscv64, instructions per inference): standalone C vs TVM runtime (Relax VM, fxopt-run)")
    print(f"{'model':<22} {'standalone':>12} {'TVM runtime':>12} {'saved':>10} {'saved %':>8}")
    for name, _, _, alone, with_vm in rows:
        print(f"{name:<22} {alone:>12,} {with_vm:>12,} {with_vm - alone:>10,} {100 * (with_vm - alone) / with_vm:>7.1f}%")


if __name__ == "__main__":
    main()
