"""Sparse 1x1 convs: fxopt's sparse kernels against dense convs on MobileNetV2's pointwise layers.

For each 1x1 conv shape of mobilenetv2_w1 at 224x224 (pytorchcv, random weights) and each density
(random unstructured zeros, 1x1 blocks), the dense conv and fxopt's sparse kernel are compiled
alone and measured:

* host: milliseconds per run (medians of ``--rounds`` rounds taken in turns);
* riscv64 / riscv64-rvv: instructions per run under qemu (``fxopt.measure``, backend qemu-insn).

The dense conv runs in NHWC (fxopt's CPU layout), the sparse kernel in NCHW. Compiled alone (NCHW
in and out) the dense build holds two layout transposes besides the conv; the four transposes
(each tensor, each direction) are measured alone too. Two ratios are printed: kernel against
kernel (the dense build less its two transposes), and "inside an NHWC network", where the dense
conv has no transposes and the sparse kernel needs the other two (what ``lower_sparse_weights``
weighs when it measures).

Totals weight each shape by how often it occurs in the network; the crossover is the density at
which the sparse total equals the dense one (interpolated). End to end, mobilenetv2_w1 with every
pointwise conv pruned to ``--e2e-density`` (magnitude) is compiled dense, with every sparse layer
lowered (``decide="density"``) and with per-layer measured decisions (``decide="measured"``).
Structured: half of mobilenetv2_w1's removable channels pruned (``fxopt.prune.plan_prune``,
``--prune-ratio``) and removed, compiled against the unpruned model.
Figures on a shared machine are indicative. Measurements are cached in a fresh directory (or
``--cache-dir``).

    .venv/bin/python benchmarks/sparsity.py --quick
    .venv/bin/python benchmarks/sparsity.py --targets host,riscv64,riscv64-rvv --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import Counter

import torch
from torch import nn

DENSITIES = (0.5, 0.3, 0.2, 0.1, 0.05)
QUICK_SHAPES = ((16, 96, 112), (144, 24, 56), (576, 96, 14), (960, 320, 7))


def pointwise_shapes(model, size: int) -> Counter:
    """(in, out, spatial) of every 1x1 conv (groups 1) of ``model`` at ``size``, with counts."""
    shapes: Counter = Counter()
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.update([(mod.in_channels, mod.out_channels, inp[0].shape[-1])]))
             for m in model.modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1)]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return shapes


def random_sparse(cin: int, cout: int, density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(cout, cin, generator=generator) / cin**0.5
    weight[torch.rand(cout, cin, generator=generator) >= density] = 0
    return weight


def sparse_conv(cin, cout, density, seed):
    from fxopt import sparse_ops

    bias = torch.randn(cout, generator=torch.Generator().manual_seed(seed))
    return sparse_ops.SparseConv1x1(random_sparse(cin, cout, density, seed), bias, (1, 1)).eval()


def dense_conv(cin, cout, seed):
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 1).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(cout, cin, 1, 1, generator=generator) / cin**0.5)
    return conv


class ChannelsLast(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class ChannelsFirst(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


def workloads(cin, cout, hw, densities):
    """(name, module, input) of one shape: the dense conv, the four layout transposes (NCHW -> NHWC
    and back, of the input and of the output) and the sparse conv at each density."""
    x = torch.randn(1, cin, hw, hw, generator=torch.Generator().manual_seed(1))
    y = torch.randn(1, cout, hw, hw, generator=torch.Generator().manual_seed(2))
    last = lambda t: t.permute(0, 2, 3, 1).contiguous()  # noqa: E731
    items = [("dense", dense_conv(cin, cout, 0), x), ("last_x", ChannelsLast(), x), ("first_y", ChannelsFirst(), last(y)),
             ("first_x", ChannelsFirst(), last(x)), ("last_y", ChannelsLast(), y)]
    items += [(density, sparse_conv(cin, cout, density, seed=10 + i), x) for i, density in enumerate(densities)]
    return [(name, module.eval(), t) for name, module, t in items]


def summarize(costs: dict, densities, count: int) -> dict:
    """The dense kernel is the dense build less the transposes it carries alone (x to NHWC, y
    back to NCHW); inside an NHWC network the sparse kernel needs the other two."""
    return {"count": count, "dense": max(costs["dense"] - costs["last_x"] - costs["first_y"], 1e-12),
            "layout": costs["first_x"] + costs["last_y"], "sparse": {d: costs[d] for d in densities}}


# --------------------------------------------------------------------------------------------
# Host: times


def host_table(shapes: Counter, densities, rounds: int) -> dict:
    from fxopt.measure import measure_library
    from fxopt.targets import tvm_backend as tb

    results = {}
    for (cin, cout, hw), count in shapes.items():
        started = time.perf_counter()
        built = []
        for name, module, x in workloads(cin, cout, hw, densities):
            library = tb.build(tb.lower(module, (x,)), "host")
            if name in densities:  # a sparse build is checked before it is timed
                got, expected = torch.from_numpy(library.run(x)[0]), module(x)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
            built.append((name, library, x))
        samples = {name: [] for name, _, _ in built}
        for _ in range(rounds):  # in turns: a slow spell of the shared machine hits every build alike
            for name, library, x in built:
                samples[name].extend(measure_library(library, (x,), repeat=10, number=20, warmup=5).samples)
        results[(cin, cout, hw)] = summarize({k: statistics.median(v) * 1e3 for k, v in samples.items()}, densities, count)
        print(f"  host {cin}->{cout} @{hw}x{hw}: built and timed in {time.perf_counter() - started:.0f} s", flush=True)
    return results


# --------------------------------------------------------------------------------------------
# RISC-V: instruction counts


def qemu_table(shapes: Counter, densities, target: str, repeat: int) -> dict:
    from fxopt import measure

    results = {}
    for (cin, cout, hw), count in shapes.items():
        started = time.perf_counter()
        costs = {name: measure.measure(module, (x,), target, repeat=repeat, warmup=1).value
                 for name, module, x in workloads(cin, cout, hw, densities)}
        results[(cin, cout, hw)] = summarize(costs, densities, count)
        print(f"  {target} {cin}->{cout} @{hw}x{hw}: measured in {time.perf_counter() - started:.0f} s", flush=True)
    return results


# --------------------------------------------------------------------------------------------
# Tables


def crossover(densities, ratios) -> str:
    """The density where the ratio crosses 1 (linear between the measured densities)."""
    points = sorted(zip(densities, ratios))
    if all(r > 1 for _, r in points):
        return f"above {points[-1][0]:.0%} (sparse faster at every density measured)"
    if all(r <= 1 for _, r in points):
        return f"below {points[0][0]:.0%} (dense faster at every density measured)"
    for (d0, r0), (d1, r1) in zip(points, points[1:]):
        if (r0 > 1) != (r1 > 1):
            return f"{d0 + (1 - r0) * (d1 - d0) / (r1 - r0):.0%}"
    return "not monotonic"


def print_results(title: str, results: dict, densities, unit: str) -> None:
    from common import print_table

    fmt = (lambda v: f"{v:.3f}") if unit == "ms" else (lambda v: f"{v / 1e6:.2f}M")
    print(f"\n{title}")
    for label, with_layout in (("kernel vs kernel", False), ("inside an NHWC network (sparse + 2 layout transposes)", True)):
        print(f"\n  {label}: dense / sparse per density")
        header = ["layer (in->out @HxW) x count", f"dense {unit}", *(f"{d:.0%}" for d in densities)]
        rows = [header]
        totals = {"dense": 0.0, **{d: 0.0 for d in densities}}
        for (cin, cout, hw), r in results.items():
            extra = r["layout"] if with_layout else 0.0
            cells = [f"{cin}->{cout} @{hw} x{r['count']}", fmt(r["dense"])]
            for d in densities:
                cells.append(f"{r['dense'] / (r['sparse'][d] + extra):.2f}x")
                totals[d] += r["count"] * (r["sparse"][d] + extra)
            totals["dense"] += r["count"] * r["dense"]
            rows.append(cells)
        ratios = [totals["dense"] / totals[d] for d in densities]
        rows.append(["all these layers", fmt(totals["dense"]), *(f"{x:.2f}x" for x in ratios)])
        print_table(rows)
        print(f"  crossover density: {crossover(densities, ratios)}")


# --------------------------------------------------------------------------------------------
# End to end


def prune_pointwise(model, density: float):
    """Magnitude pruning of every 1x1 conv (groups 1) to ``density`` (per layer)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
                w = module.weight
                keep = max(1, round(w.numel() * density))
                threshold = w.abs().flatten().kthvalue(w.numel() - keep + 1).values
                w[w.abs() < threshold] = 0
    return model


def end_to_end(size: int, density: float, rounds: int, measured: bool) -> None:
    import fxopt
    from common import build_model, interleaved_ms, print_table
    from fxopt import spec

    model = prune_pointwise(build_model("mobilenetv2_w1"), density)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    default = spec.resolve("default").spec()
    variants = [("dense", None), ("sparse, every layer (decide=density)", {"decide": "density"})]
    if measured:
        variants.append(("sparse, measured per layer (decide=measured)", {"decide": "measured"}))
    builds = []
    for label, options in variants:
        started = time.perf_counter()
        pipeline = None if options is None else default + [{"name": "lower_sparse_weights", **options}]
        compiled = fxopt.compile(model, (x,), "host", pipeline=pipeline)
        seconds = time.perf_counter() - started
        stats = compiled.report.to_json()["passes"][-1]["stats"] if options else {}
        builds.append((label, compiled, seconds, sum(stats.values()) if stats else 0))
        print(f"  e2e {label}: built in {seconds:.0f} s", flush=True)
    times = interleaved_ms([b[1].library for b in builds], (x,), rounds)
    print(f"\nmobilenetv2_w1 at {size}x{size}, every pointwise conv at {density:.0%} density (magnitude), host:")
    rows = [["build", "sparse layers", "build s", "ms (median)", "speedup"]]
    for (label, _, seconds, layers), ms in zip(builds, times):
        rows.append([label, str(layers), f"{seconds:.0f}", f"{ms:.3f}", f"{times[0] / ms:.2f}x"])
    print_table(rows)


def structured(size: int, ratio: float, rounds: int) -> None:
    """``ratio`` of mobilenetv2_w1's removable channels pruned (L1, fxopt.prune.plan_prune) and
    removed physically (lower_zero_channels): compiled host latency against the unpruned model."""
    import fxopt
    from common import build_model, interleaved_ms, print_table
    from fxopt import ir, prune
    from fxopt.testing import randomize_norm_stats

    model = randomize_norm_stats(build_model("mobilenetv2_w1"), 0).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    plan = prune.plan_prune(model, x, ratio=ratio)
    pruned = prune.apply_prune_plan(model, plan, x)
    builds = [fxopt.compile(m, (x,), "host") for m in (model, pruned)]
    times = interleaved_ms([b.library for b in builds], (x,), rounds)
    print(f"\nmobilenetv2_w1 at {size}x{size}, {ratio:.0%} of the removable channels pruned (L1) and removed, host:")
    rows = [["model", "params", "MMACs", "ms (median)", "speedup"]]
    for label, build, ms in zip(("dense", "pruned"), builds, times):
        rows.append([label, f"{ir.count_params(build.module) / 1e6:.2f} M", f"{ir.count_macs(build.module) / 1e6:.0f}",
                     f"{ms:.3f}", f"{times[0] / ms:.2f}x"])
    print_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"4 shapes ({', '.join(f'{a}->{b}@{c}' for a, b, c in QUICK_SHAPES)}), densities 30/10/5%%, "
                             "host only, end to end without the measured variant")
    parser.add_argument("--targets", default=None, help="comma-separated: host, riscv64, riscv64-rvv "
                        "(default: all three; --quick: host)")
    parser.add_argument("--densities", default=None, help="comma-separated fractions (default 0.5,0.3,0.2,0.1,0.05)")
    parser.add_argument("--rounds", type=int, default=5, help="host timing rounds, taken in turns")
    parser.add_argument("--repeat", type=int, default=3, help="qemu runs counted per measurement")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--e2e-density", type=float, default=0.1, help="end to end: density of the pointwise convs")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--no-layers", action="store_true")
    parser.add_argument("--prune-ratio", type=float, default=0.5, help="structured: share of removable channels pruned")
    parser.add_argument("--no-structured", action="store_true")
    parser.add_argument("--cache-dir", default=None, help="measurement cache (default: a fresh temporary one)")
    args = parser.parse_args()
    scratch = None
    if args.cache_dir:
        os.environ["XDG_CACHE_HOME"] = args.cache_dir
    else:
        scratch = tempfile.TemporaryDirectory(prefix="fxopt-sparsity-")
        os.environ["XDG_CACHE_HOME"] = scratch.name
    densities = (tuple(float(d) for d in args.densities.split(",")) if args.densities
                 else (0.3, 0.1, 0.05) if args.quick else DENSITIES)
    targets = args.targets.split(",") if args.targets else (["host"] if args.quick else ["host", "riscv64", "riscv64-rvv"])
    from common import build_model

    shapes = pointwise_shapes(build_model("mobilenetv2_w1"), args.size)
    if args.quick:
        shapes = Counter({s: shapes.get(s, 1) for s in QUICK_SHAPES})
    print(f"{len(shapes)} pointwise conv shapes ({sum(shapes.values())} layers), densities "
          f"{', '.join(f'{d:.0%}' for d in densities)}, targets {', '.join(targets)}", flush=True)
    if not args.no_layers:
        for target in targets:
            if target == "host":
                results = host_table(shapes, densities, args.rounds)
                print_results("host: kernel milliseconds (median)", results, densities, "ms")
            else:
                results = qemu_table(shapes, densities, target, args.repeat)
                print_results(f"{target}: instructions per run under qemu", results, densities, "insn")
    if not args.no_e2e:
        end_to_end(args.size, args.e2e_density, args.rounds, measured=not args.quick)
    if not args.no_structured:
        structured(args.size, args.prune_ratio, args.rounds)


if __name__ == "__main__":
    main()
