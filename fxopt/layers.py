"""Per-layer cost on the target: each conv / linear of an optimized graph measured alone.

Each layer becomes a one-node GraphModule (its weights shared, its tensor inputs placeholders of
the shapes recorded in ``node.meta``) and goes through ``fxopt.measure.measure``: time on the
host, instructions under qemu for emulated targets, time on an RPC device; cached on disk, so a
second report of the same build measures nothing. A layer measured alone also pays one call of
the compiled module, which it does not pay inside the model: the figures rank layers, their sum
is not the model's latency.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from fxopt import ir, progress

log = logging.getLogger("fxopt.layers")

__all__ = ["layer_module", "measure_layers"]


def _is_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op not in ("call_module", "call_function"):
        return False
    if node.op == "call_module" and hasattr(gm.get_submodule(node.target), "describe"):
        return True  # fxopt's sparse kernels
    return ir.op_key(node, gm) in ir.PARAMETRIC_KEYS - {"batch_norm"}


def layer_module(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]] | None:
    """``node`` alone as a GraphModule sharing ``gm``'s modules, with zero inputs of its shapes
    (None when an input's shape is unknown)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[torch.Tensor] = []
    missing = False

    def placeholder(arg: fx.Node) -> fx.Node:
        nonlocal missing
        if arg in env:
            return env[arg]
        if arg.op == "get_attr":
            env[arg] = graph.get_attr(arg.target)
            return env[arg]
        meta = ir.tensor_meta(arg)
        if meta is None:
            missing = True
            return arg
        env[arg] = graph.placeholder(f"in_{len(inputs)}")
        inputs.append(torch.zeros(meta.shape, dtype=meta.dtype))
        return env[arg]

    fx.node.map_arg((node.args, node.kwargs), placeholder)
    if missing or not inputs:
        return None
    graph.output(graph.node_copy(node, lambda arg: env[arg]))
    return fx.GraphModule(gm, graph), tuple(inputs)


def measure_layers(gm: fx.GraphModule, target: Any = "host", *, limit: int = 64, **measure_options: Any) -> dict[str, Any]:
    """Cost of each conv / linear of ``gm`` (shapes in node.meta, as after ``optimize``) on
    ``target``, for the report's ``layers`` section. The ``limit`` layers with the most
    multiply-adds are measured (the rest are counted in ``skipped``); ``measure_options`` go to
    ``fxopt.measure.measure``."""
    from fxopt import measure as measuring
    from fxopt.targets import get_target

    target = get_target(target)
    candidates = []
    for node in gm.graph.nodes:
        if not _is_layer(gm, node):
            continue
        built = layer_module(gm, node)
        if built is None:
            continue
        shape = ir.shape_of(node)
        weight = ir.node_weight(gm, node) if node.op != "call_module" or hasattr(gm.get_submodule(node.target), "weight") else None
        macs = shape.numel() * weight[0].numel() if shape is not None and isinstance(weight, torch.Tensor) else 0
        candidates.append((node, built, macs))
    chosen = sorted(candidates, key=lambda c: -c[2])[:limit]
    keep = {id(c[0]) for c in chosen}
    rows, unit, backend = [], "s", ""
    with progress.bar(len(chosen), f"per-layer cost on {target.name}", unit="layer") as bar:
        for node, (module, inputs), macs in candidates:
            if id(node) not in keep:
                continue
            result = measuring.measure(module.eval(), inputs, target, **measure_options)
            unit, backend = result.unit, result.backend
            rows.append({"name": node.name, "kind": ir.op_key(node, gm) or type(module).__name__, "macs": int(macs),
                         "value": float(result.value), "cached": bool(result.cached)})
            log.info("layer %s: %s", node.name, result)
            bar.update()
    return {"unit": unit, "backend": backend, "target": target.name, "rows": rows,
            "skipped": len(candidates) - len(chosen),
            "note": "each layer measured alone (it also pays one call of a compiled module): the figures rank "
                    "layers, their sum is not the model's latency"}

