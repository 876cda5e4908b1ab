"""Operator fusion figures: TVM kernels, intermediate tensors and compiled host latency of each
model before and after fxopt's graph-level fusions.

    .venv/bin/python benchmarks/fusion.py [--models shufflenetv2_w1,ghostnet,...] [--rounds 3]
                                          [--threads 2] [--no-latency]

Three pipelines per model (batch 1, 3x224x224; the Inception-style block 1x192x28x28):
  none     nothing: TVM fuses what it can on the traced graph;
  folds    canonicalize + the folds of the default pipeline, without the fusion passes;
  default  the default pipeline: folds plus eliminate_noops, fold_constant_subgraphs, fold_pad,
           fold_channel_permutation and fuse_siblings.
For each: kernels (TVM PrimFuncs run by main), intermediate tensors, unfused conv epilogues, and
the compiled host latency (medians, timed in turns). Ratios are folds / default. Never imported
by tests.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, interleaved_ms, print_table  # noqa: E402

FUSIONS = {"eliminate_noops", "fold_constant_subgraphs", "fold_pad", "fold_channel_permutation", "fuse_siblings"}
MODELS = ("shufflenetv2_w1", "ghostnet", "mobilenetv3_large_w1", "inception_block")


def inception_block():
    """GoogLeNet's inception (3a) block: 1x1 / 1x1→3x3 / 1x1→3x3 (the 5x5 branch as in v2) /
    pool→1x1 branches, concatenated; conv-BN-ReLU everywhere."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def unit(c_in, c_out, k):
        return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            self.b1 = unit(192, 64, 1)
            self.b2 = nn.Sequential(unit(192, 96, 1), unit(96, 128, 3))
            self.b3 = nn.Sequential(unit(192, 16, 1), unit(16, 32, 3), unit(32, 32, 3))
            self.b4 = unit(192, 32, 1)

        def forward(self, x):
            pooled = F.max_pool2d(x, 3, 1, 1)
            return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(pooled)], 1)

    return Inception().eval(), (1, 192, 28, 28)


def folds_pipeline() -> list:
    from fxopt import spec

    return [item for item in spec.resolve("default").spec()
            if not (isinstance(item, str) and item in FUSIONS)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--measured", action="store_true", help="fuse_siblings with policy='measured' on host")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    import fxopt
    from fxopt import spec
    from fxopt.testing import randomize_norm_stats

    pipelines = {"none": "none", "folds": folds_pipeline(), "default": "default"}
    if args.measured:
        pipelines["default"] = [item if item != "fuse_siblings" else {"name": "fuse_siblings", "policy": "measured"}
                                for item in spec.resolve("default").spec()]
    rows = [["model", "pipeline", "kernels", "intermediates", "unfused epilogues", "fusion passes fired",
             "host ms"]]
    for name in args.models.split(","):
        if name == "inception_block":
            model, shape = inception_block()
        else:
            model, shape = build_model(name), (1, 3, 224, 224)
        model = randomize_norm_stats(model, 0).eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        figures, libraries = {}, []
        for label, pipeline in pipelines.items():
            compiled = fxopt.compile(model, (x,), "host", pipeline)
            summary = compiled.report.build
            fired = sorted({row.name + "(" + ",".join(f"{k}={v}" for k, v in sorted(row.stats.items())) + ")"
                            for row in compiled.report.passes if row.name in FUSIONS and row.changed})
            figures[label] = [summary.get("kernels"), summary.get("intermediate_tensors"),
                              len(summary.get("unfused_epilogues", [])), " ".join(fired) or "-"]
            libraries.append(compiled.library)
        times = [None] * len(libraries) if args.no_latency else interleaved_ms(libraries, (x,), args.rounds)
        for (label, cells), ms in zip(figures.items(), times):
            rows.append([name, label, *map(str, cells), f"{ms:.2f}" if ms is not None else "-"])
        k_folds, k_default = figures["folds"][0], figures["default"][0]
        ratio = f"{times[1] / times[2]:.2f}x" if times[1] else "-"
        rows.append([name, "folds/default", f"{k_folds / k_default:.2f}x", "", "", "", ratio])
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
