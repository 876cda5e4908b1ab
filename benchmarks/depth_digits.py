"""Depth compression end to end on a real (small) task: accuracy against measured compiled speed.

A MobileNetV2-style network (fxopt.examples.TinyMobileNetV2) is trained briefly on scikit-learn's
handwritten digits (8x8, upsampled to 32x32), then for each speedup goal: planned on the host
(fxopt.depth.plan_depth, latency measured with fxopt.measure, damage scored on a training
batch), applied, distilled from the original for a few epochs, merged and compiled. One table:
accuracy before/after, predicted and measured compiled speedup (the builds timed in turns).

    .venv/bin/pip install scikit-learn
    .venv/bin/python benchmarks/depth_digits.py [--goals 1.3 1.5 2.0] [--epochs 15] [--distill-epochs 8]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import fxopt
from fxopt.depth import apply_depth_plan, plan_depth
from fxopt.examples import TinyMobileNetV2
from fxopt.finetune import distill

from common import interleaved_ms


def digits(seed: int = 0):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this benchmark needs scikit-learn: .venv/bin/pip install scikit-learn")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return (x[train], y[train]), (x[test], y[test])


def loader(x, y, batch, seed):
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) * 100


def train(model, x, y, epochs, seed) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * ((len(x) + 63) // 64))
    for _ in range(epochs):
        model.train()
        for xb, yb in loader(x, y, 64, seed):
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


@contextlib.contextmanager
def _keep(directory: str):
    Path(directory).mkdir(parents=True, exist_ok=True)
    yield directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--goals", type=float, nargs="+", default=[1.3, 1.5, 2.0])
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of the original")
    parser.add_argument("--distill-epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds over all builds (10 samples of 20 runs each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plans", default=None, help="directory to keep the plans in (default: a temporary one)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = digits(args.seed)
    example = (x_test[:1],)
    model = TinyMobileNetV2(num_classes=10, in_channels=1)
    started = time.perf_counter()
    train(model, x_train, y_train, args.epochs, args.seed)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - started:.0f} s; "
          f"test accuracy {accuracy(model, x_test, y_test):.2f} %", flush=True)
    base_acc = accuracy(model, x_test, y_test)
    libraries = [fxopt.compile(model, example, "host").library]
    rows = []
    with tempfile.TemporaryDirectory() if args.plans is None else _keep(args.plans) as scratch:
        for goal in args.goals:
            started = time.perf_counter()
            try:
                plan = plan_depth(model, example, "host", speedup=goal, calibration=x_train[:64])
            except fxopt.InputError as exc:  # a goal beyond reach: the message says how far one gets
                rows.append((goal, str(exc)))
                print(f"goal {goal}: {exc}", flush=True)
                continue
            path = plan.save(Path(scratch) / f"plan_{goal}.json")
            planned = apply_depth_plan(model, plan, example)
            planned_acc = accuracy(planned, x_test, y_test)
            student = copy.deepcopy(planned)
            distill(student, model, loader(x_train, y_train, 64, args.seed), args.distill_epochs, lr=1e-3,
                    label_weight=1.0, progress=False)
            tuned_acc = accuracy(student, x_test, y_test)
            libraries.append(fxopt.compile(student, example, "host", pipeline=plan.compile_pipeline(path)).library)
            rows.append([goal, len(plan.removed_activations), len(plan.merges), plan.predicted_speedup,
                         len(libraries) - 1, planned_acc, tuned_acc, None, time.perf_counter() - started])
            print(f"goal {goal}: done in {rows[-1][-1]:.0f} s", flush=True)
    times = interleaved_ms(libraries, example, args.rounds)
    base_ms = times[0]
    for row in rows:
        if len(row) > 2:
            row[7] = times[row[4]]
            row[4] = base_ms / row[7]
    print(f"\nTinyMobileNetV2 on digits (32x32), host; original: {base_acc:.2f} % test accuracy, "
          f"{base_ms:.4f} ms compiled (median)")
    print(f"{'goal':>5} {'acts removed':>12} {'merges':>6} {'predicted':>9} {'measured':>8} "
          f"{'acc planned':>11} {'acc distilled':>13} {'Δacc':>6} {'ms':>8}")
    for row in rows:
        if len(row) == 2:
            print(f"{row[0]:>5.2f}  not reachable: {row[1].split(': ', 1)[-1]}")
            continue
        goal, removed, merges, predicted, measured, planned_acc, tuned_acc, ms, _ = row
        print(f"{goal:>5.2f} {removed:>12} {merges:>6} {predicted:>8.2f}x {measured:>7.2f}x "
              f"{planned_acc:>10.2f}% {tuned_acc:>12.2f}% {tuned_acc - base_acc:>+6.2f} {ms:>8.4f}")


if __name__ == "__main__":
    main()
