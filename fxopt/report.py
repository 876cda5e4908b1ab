"""What a run of fxopt did: one row per pass, plus verification and build figures.

The report records the pipeline spec that actually ran, as one line of text, so any build can
be replayed from it. It prints as a table, saves as JSON, and renders as one self-contained HTML
page (``save_html``, see ``fxopt.report_html``) with the graph before and after, per-layer
latency on the target, weight density per layer and, for depth plans, the latency-vs-damage
curve.

Optional sections (None when the run did not produce them):

``graph_before`` / ``graph_after``  ``snapshot_graph``: one entry per fx node (name, op, kind,
                                    inputs, shape, params, a signature of its weights)
``layers``                          per-layer cost on the target (``fxopt.layers``, or a depth
                                    plan's conv table): unit, backend, target, rows
``sparsity``                        per conv/linear layer: density and the dense/sparse choice
``depth``                           a depth plan's trade-off curve and its chosen point
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PassRow:
    name: str
    changed: bool
    stats: dict[str, int]
    declines: dict[str, int]  # "rule: reason" -> count
    before: dict[str, int | None]  # nodes, params, macs
    after: dict[str, int | None]
    seconds: float
    iteration: int | None = None
    exact: bool = True


@dataclass
class Report:
    model: str = ""
    capture: str = "fx"  # how the graph was captured: "fx" or "export"
    capture_note: str = ""  # why the auto capture fell back to torch.export
    pipeline: str = ""  # the spec that ran, as one-line text
    passes: list[PassRow] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    build: dict[str, Any] | None = None
    graph_before: dict[str, Any] | None = None
    graph_after: dict[str, Any] | None = None
    layers: dict[str, Any] | None = None
    sparsity: list[dict[str, Any]] | None = None
    depth: dict[str, Any] | None = None

    def add_pass(self, p, result, before: dict, after: dict, iteration: int | None) -> None:
        declines = Counter(f"{d.rule}: {d.reason}" for d in result.declines)
        self.passes.append(PassRow(
            name=p.name, changed=result.changed, stats=dict(result.stats), declines=dict(declines),
            before=before, after=after, seconds=result.seconds, iteration=iteration, exact=p.exact,
        ))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Report":
        rows = [PassRow(**row) for row in data.get("passes", [])]
        return cls(**{**data, "passes": rows})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def to_html(self, title: str | None = None) -> str:
        """The report as one self-contained HTML page (inline SVG and CSS, no scripts fetched)."""
        from fxopt import report_html

        return report_html.render(self, title=title)

    def save_html(self, path: str | Path, title: str | None = None) -> Path:
        path = Path(path)
        path.write_text(self.to_html(title), encoding="utf-8")
        return path

    def to_text(self) -> str:
        lines = [f"model: {self.model}   capture: {self.capture}" + (f" ({self.capture_note})" if self.capture_note else ""),
                 f"pipeline: {self.pipeline or '(none)'}"]
        header = ("pass", "changed", "stats", "nodes", "params", "MACs", "time")
        rows = [header]
        for row in self.passes:
            name = row.name + (f"#{row.iteration}" if row.iteration else "") + ("" if row.exact else " (lossy)")
            stats = ", ".join(f"{k}={v}" for k, v in row.stats.items()) or "-"
            rows.append((
                name, "yes" if row.changed else "no", stats,
                _arrow(row.before["nodes"], row.after["nodes"]),
                _arrow(row.before["params"], row.after["params"], _si),
                _arrow(row.before["macs"], row.after["macs"], _si),
                f"{row.seconds * 1000:.1f} ms",
            ))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        for index, r in enumerate(rows):
            lines.append("  ".join(str(cell).ljust(w) for cell, w in zip(r, widths)).rstrip())
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
        for row in self.passes:
            for decline, count in row.declines.items():
                lines.append(f"  {row.name} declined {count}x: {decline}")
        if self.verification:
            v = self.verification
            status = "ok" if v.get("ok") else "FAILED"
            lines.append(f"verification vs {v.get('against', 'eager')}: {status}, max abs error "
                         f"{v.get('max_abs_error', 0):.3g}, relative to output scale {v.get('max_rel_error', 0):.3g}")
        if self.build:
            build = dict(self.build)
            check = build.pop("check", None)
            tuning = build.pop("tuning", None)
            lines.append("build: " + ", ".join(f"{k}={_fmt(v)}" for k, v in build.items()))
            if tuning:
                lines.append(_tuning_line(tuning))
            if check is not None and check.get("ok") is None:
                lines.append(f"build check vs eager: not run ({check.get('skipped', 'skipped')})")
            elif check is not None:
                lines.append(f"build check vs eager, run {check.get('ran', 'natively')}: {'ok' if check['ok'] else 'FAILED'}, "
                             f"max abs error {check['max_abs_error']:.3g}, relative to output scale {check['max_rel_error']:.3g}")
        if self.sparsity and any(row.get("choice") == "sparse" for row in self.sparsity):
            sparse = [row for row in self.sparsity if row.get("choice") == "sparse"]
            lines.append(f"sparse kernels: {len(sparse)} of {len(self.sparsity)} layers ("
                         + ", ".join(f"{row['name']} {row.get('block', '')} density {row['density']:.2f}" for row in sparse[:4])
                         + (", ..." if len(sparse) > 4 else "") + ")")
        if self.layers and self.layers.get("rows"):
            rows = self.layers["rows"]
            slowest = max(rows, key=lambda row: row["value"])
            lines.append(f"per-layer cost on {self.layers.get('target')}: {len(rows)} layers, slowest {slowest['name']} "
                         f"{_cost(slowest['value'], self.layers.get('unit', 's'))}")
        return "\n".join(lines)


def snapshot_graph(gm) -> dict[str, Any]:
    """What the report draws of an fx graph: per node its name, op, canonical kind, input node
    names, output shape, parameter count and a signature of its weights (shape and sum, so that
    a fold that rewrites a conv's weights in place shows as a change). Cheap: no copy of the
    module is kept."""
    from torch import fx

    from fxopt import ir

    nodes = []
    for node in gm.graph.nodes:
        inputs: list[str] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: inputs.append(n.name))
        kind, params, signature = None, 0, ""
        if node.op in ("call_module", "call_function", "call_method"):
            try:
                kind = ir.op_key(node, gm)
            except Exception:  # a report never fails a run
                kind = None
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            kind = kind or type(module).__name__
            tensors = list(module.parameters()) + list(module.buffers())
            params = sum(t.numel() for t in tensors)
            signature = ";".join(f"{list(t.shape)}:{float(t.detach().double().sum()):.6g}"
                                 for t in tensors if t.is_floating_point())
        elif node.op == "call_function":
            kind = kind or getattr(node.target, "__name__", str(node.target))
        elif node.op == "call_method":
            kind = kind or str(node.target)
        elif node.op == "get_attr":
            kind = "constant"
        shape = ir.shape_of(node) if node.op != "output" else None
        nodes.append({"name": node.name, "op": node.op, "kind": kind or node.op, "target": node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target)),
                      "inputs": inputs, "shape": list(shape) if shape is not None else None, "params": params,
                      "signature": signature})
    return {"nodes": nodes}


def sparsity_table(gm, declines: Any = ()) -> list[dict[str, Any]]:
    """Per conv/linear layer of ``gm``: density of its weights and whether it runs a sparse kernel
    (with the block shape and measured figures) or stays dense (with ``lower_sparse_weights``'s
    reason where it gave one; ``declines`` are the run's ``pass_manager.Decline`` records)."""
    from fxopt import ir, sparse_ops

    reasons = {d.node: d.reason for d in declines if getattr(d, "pass_name", "") == "lower_sparse_weights"}
    rows = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, sparse_ops._SparseWeights):
                info = module.describe()
                measured = node.meta.get("fxopt", {}).get("sparse", {}).get("measured")
                rows.append({"name": node.name, "kind": info["kind"], "weight_shape": info["weight_shape"],
                             "density": float(info["density"]), "choice": "sparse", "block": info["block"],
                             "reason": _measured_note(measured)})
                continue
        key = ir.op_key(node, gm) if node.op in ("call_module", "call_function") else None
        if key not in ("conv1d", "conv2d", "conv3d", "linear"):
            continue
        weight = ir.node_weight(gm, node)
        if weight is None or not weight.is_floating_point():
            continue
        rows.append({"name": node.name, "kind": key, "weight_shape": list(weight.shape),
                     "density": float(sparse_ops.density(weight)), "choice": "dense", "block": "",
                     "reason": reasons.get(node.name, "")})
    return rows


def _measured_note(measured: dict[str, Any] | None) -> str:
    if not measured:
        return ""
    unit = measured.get("unit", "s")
    figures = {k: v for k, v in measured.items() if k not in ("unit", "layout_transposes") and isinstance(v, (int, float))}
    return "measured: " + ", ".join(f"{k} {_cost(v, unit)}" for k, v in figures.items())


def _cost(value: float, unit: str) -> str:
    return f"{value * 1e3:.4g} ms" if unit == "s" else f"{value:,.0f} insn"


def _tuning_line(t: dict[str, Any]) -> str:
    """``tuning: 64 trials measured for 2 of 3 tasks (1 from the database) in 41.2 s; 3 schedules
    applied from DIR``."""
    if "tasks" not in t:  # the build did not report what tuning did
        return f"tuning: budget {t.get('budget')} trials, database {t.get('database')}"
    text = (f"tuning: {t.get('measured', 0)} trials measured for {t.get('tuned', 0)} of {t['tasks']} tasks "
            f"({t.get('reused', 0)} from the database) in {_fmt(float(t.get('seconds', 0.0)))} s")
    if t.get("failed"):
        text += f", {t['failed']} failed"
    if t.get("applied") is not None:
        text += f"; {t['applied']} schedules applied"
    text += f" from {t.get('database')}" + (f" ({t['target_key']})" if t.get("target_key") else "")
    return text + (" (interrupted)" if t.get("interrupted") else "")


def _si(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _arrow(before: int | None, after: int | None, fmt=str) -> str:
    if before is None or after is None:
        return "?"
    return fmt(before) if before == after else f"{fmt(before)} -> {fmt(after)}"


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
