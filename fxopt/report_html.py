"""A Report as one self-contained HTML page: no network, no server, no script.

Sections (each a ``<section data-section=NAME>``): ``summary`` (model, target, nodes / params /
MACs before and after), ``pipeline`` (the spec that ran, and a command that replays it),
``passes`` (one row per pass: stats, declines, figures before -> after, time), ``graph`` (the fx
graph before and after as SVG, with removed, rewritten and new nodes highlighted), ``latency``
(per-layer cost on the target, from ``fxopt.measure``), ``depth`` (a depth plan's
latency-vs-damage curve and its chosen point), ``sparsity`` (weight density per layer and the
dense / sparse choice), ``numerics`` (the checks against eager PyTorch) and ``build``.

Plots are drawn with matplotlib's SVG backend (no pyplot, no global backend switch) and inlined.
The graphs are laid out by Graphviz ``dot`` where it is installed (Debian ``graphviz``), else
by a small layered layout of fxopt's own; the page says which.
"""

from __future__ import annotations

import html
import io
import logging
import math
import re
import shutil
import subprocess
from typing import Any

log = logging.getLogger("fxopt.report")

__all__ = ["render", "graph_svg", "SECTIONS"]

SECTIONS = ("summary", "pipeline", "passes", "graph", "latency", "depth", "sparsity", "numerics", "build")
LAYOUTS = ("auto", "dot", "simple")

_COLORS = {"removed": "#f4b4b4", "changed": "#ffd98a", "new": "#a8e0a8", "same": "#e8eef7", "io": "#d9d9d9"}
_STROKES = {"removed": "#c0392b", "changed": "#b9770e", "new": "#1e8449", "same": "#5d6d7e", "io": "#5d6d7e"}
_LEGEND = {"removed": "removed (folded away or dead)", "changed": "rewritten in place (weights folded in, sparse kernel)",
           "new": "created (merged or fused)"}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1c2833;background:#fbfcfc}
header{background:#1c2833;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px} header p{margin:4px 0 0;color:#d5dbdb;font-size:13px}
nav{padding:6px 24px;background:#eaeded;font-size:13px} nav a{margin-right:14px;color:#1a5276}
main{padding:8px 24px 40px}
section{margin:18px 0;padding:12px 16px;background:#fff;border:1px solid #d5d8dc;border-radius:6px}
section h2{margin:0 0 10px;font-size:17px}
table{border-collapse:collapse;font-size:13px} th,td{padding:3px 8px;border-bottom:1px solid #eaeded;text-align:left;vertical-align:top}
th{background:#f4f6f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
pre{background:#f4f6f6;padding:8px;border-radius:4px;white-space:pre-wrap;word-break:break-all}
.ok{color:#1e8449;font-weight:600} .bad{color:#c0392b;font-weight:600} .muted{color:#7f8c8d}
.lossy{color:#b9770e;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:12px} .card{border:1px solid #d5d8dc;border-radius:6px;padding:8px 12px;min-width:150px}
.card b{display:block;font-size:18px}
.graphs{display:flex;gap:16px;flex-wrap:wrap} .graphs figure{margin:0;flex:1 1 420px;min-width:300px}
.graphbox{max-height:80vh;overflow:auto;border:1px solid #eaeded;border-radius:4px;background:#fff}
.graphbox{text-align:center} .graphbox svg{max-width:100%;height:auto}
figcaption{font-weight:600;margin:4px 0}
.legend span{display:inline-block;margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:4px;vertical-align:-2px;border:1px solid #888}
.plot svg{max-width:100%;height:auto}
details{font-size:12.5px}
"""


def render(report, title: str | None = None, layout: str = "auto") -> str:
    """The HTML page of ``report`` (a ``fxopt.report.Report``)."""
    if layout not in LAYOUTS:
        from fxopt.errors import InputError

        raise InputError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    title = title or f"fxopt report: {report.model or 'model'}"
    parts = {
        "summary": _summary(report),
        "pipeline": _pipeline(report),
        "passes": _passes(report),
        "graph": _graphs(report, layout),
        "latency": _latency(report),
        "depth": _depth(report) if report.depth else None,
        "sparsity": _sparsity(report),
        "numerics": _numerics(report),
        "build": _build(report) if report.build else None,
    }
    headings = {"summary": "Summary", "pipeline": "Pipeline", "passes": "Passes", "graph": "Graph before and after",
                "latency": "Per-layer latency on the target", "depth": "Depth plan: latency vs damage",
                "sparsity": "Weight density and sparse kernels", "numerics": "Numerics", "build": "Build"}
    nav = " ".join(f'<a href="#{name}">{headings[name]}</a>' for name in SECTIONS if parts[name] is not None)
    body = "\n".join(f'<section id="{name}" data-section="{name}"><h2>{headings[name]}</h2>\n{parts[name]}\n</section>'
                     for name in SECTIONS if parts[name] is not None)
    target = (report.build or {}).get("target") or (report.layers or {}).get("target") or ""
    subtitle = " · ".join(x for x in (f"capture: {report.capture}", f"target: {target}" if target else "") if x)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header>\n<nav>{nav}</nav>\n<main>\n{body}\n</main>\n"
        "</body></html>\n"
    )


# ---------------------------------------------------------------------------------------------
# Sections


def _summary(report) -> str:
    cards = []
    if report.passes:
        first, last = report.passes[0].before, report.passes[-1].after
        for key, label, fmt in (("nodes", "graph nodes", str), ("params", "parameters", _si), ("macs", "MACs", _si)):
            cards.append(f'<div class="card">{label}<b>{_arrow(first.get(key), last.get(key), fmt)}</b></div>')
    changed = sum(1 for row in report.passes if row.changed)
    cards.append(f'<div class="card">passes that changed the graph<b>{changed} of {len(report.passes)}</b></div>')
    if report.verification:
        ok = report.verification.get("ok")
        cards.append(f'<div class="card">numerics vs {_e(report.verification.get("against", "eager"))}'
                     f'<b class="{"ok" if ok else "bad"}">{"ok" if ok else "FAILED"}</b></div>')
    note = f'<p class="muted">{_e(report.capture_note)}</p>' if report.capture_note else ""
    return f'<p>model <b>{_e(report.model)}</b>, captured with {_e(report.capture)}</p>{note}<div class="cards">{"".join(cards)}</div>'


def _pipeline(report) -> str:
    spec = report.pipeline or ""
    if not spec:
        return '<p class="muted">no passes ran (pipeline "none")</p>'
    shown = spec.replace("'", "'\\''")
    return (f"<p>The spec that ran; any build replays from it (<code>fxopt build MODEL --pipeline SPEC</code>, "
            f"or <code>fxopt.compile(model, inputs, pipeline=SPEC)</code>):</p><pre id=\"pipeline-spec\">{_e(spec)}</pre>"
            f"<p class=\"muted\">replay: <code>fxopt build MODEL --input-shape ... --pipeline '{_e(shown)}' -o DIR</code></p>")


def _passes(report) -> str:
    if not report.passes:
        return '<p class="muted">no passes ran</p>'
    rows = []
    for row in report.passes:
        name = _e(row.name) + (f"<span class=\"muted\">#{row.iteration}</span>" if row.iteration else "")
        if not row.exact:
            name += ' <span class="lossy">(lossy)</span>'
        stats = ", ".join(f"{_e(k)}={v}" for k, v in row.stats.items()) or '<span class="muted">-</span>'
        declines = ""
        if row.declines:
            items = "".join(f"<li>{count}× {_e(text)}</li>" for text, count in row.declines.items())
            declines = f"<details><summary>{sum(row.declines.values())} declined</summary><ul>{items}</ul></details>"
        rows.append(
            f"<tr><td>{name}</td><td>{'yes' if row.changed else '<span class=muted>no</span>'}</td><td>{stats}{declines}</td>"
            f"<td class=num>{_arrow(row.before.get('nodes'), row.after.get('nodes'))}</td>"
            f"<td class=num>{_arrow(row.before.get('params'), row.after.get('params'), _si)}</td>"
            f"<td class=num>{_arrow(row.before.get('macs'), row.after.get('macs'), _si)}</td>"
            f"<td class=num>{row.seconds * 1000:.1f} ms</td></tr>")
    total = sum(row.seconds for row in report.passes)
    return ("<table><thead><tr><th>pass</th><th>changed</th><th>stats</th><th>nodes</th><th>params</th><th>MACs</th>"
            f"<th>time</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"<p class=\"muted\">{len(report.passes)} pass runs, {total * 1000:.0f} ms in all</p>")


def _graphs(report, layout: str) -> str:
    before, after = report.graph_before, report.graph_after
    if not before or not after:
        return '<p class="muted">this report carries no graph (made before fxopt recorded graphs)</p>'
    status_before, status_after = node_status(before, after)
    svg_before, used_before = graph_svg(before, status_before, layout, prefix="before")
    svg_after, used_after = graph_svg(after, status_after, layout, prefix="after")
    counts = {}
    for status in list(status_before.values()) + list(status_after.values()):
        counts[status] = counts.get(status, 0) + 1
    legend = "".join(f'<span><i style="background:{_COLORS[k]};border-color:{_STROKES[k]}"></i>{_e(v)}: {counts.get(k, 0)}</span>'
                     for k, v in _LEGEND.items())
    used = "Graphviz dot" if "dot" in (used_before, used_after) else "fxopt's layered layout (Graphviz dot not found)"
    return (f'<div class="legend">{legend}</div>'
            f'<div class="graphs"><figure><figcaption>before ({len(before["nodes"])} nodes)</figcaption>'
            f'<div class="graphbox" data-graph="before">{svg_before}</div></figure>'
            f'<figure><figcaption>after ({len(after["nodes"])} nodes)</figcaption>'
            f'<div class="graphbox" data-graph="after">{svg_after}</div></figure></div>'
            f'<p class="muted">layout: {_e(used)}; hover a node for its target, shape and parameter count</p>')


def _latency(report) -> str:
    layers = report.layers
    if not layers or not layers.get("rows"):
        return ('<p class="muted">not measured: build with <code>fxopt build ... --layer-latency</code> (or call '
                '<code>fxopt.layers.measure_layers</code>) to time each layer on the target</p>')
    rows = layers["rows"]
    unit = layers.get("unit", "s")
    scale, label = (1e3, "ms") if unit == "s" else (1.0, "instructions")
    names = [row["name"] for row in rows]
    values = [row["value"] * scale for row in rows]
    plot = _barh(names, values, f"{label} per run ({layers.get('backend', '')} on {layers.get('target', '')})",
                 colors=["#2e86c1"] * len(rows), salt="latency")
    table = "".join(f"<tr><td>{_e(r['name'])}</td><td>{_e(r.get('kind', ''))}</td><td class=num>{_si(r.get('macs', ''))}</td>"
                    f"<td class=num>{r['value'] * scale:.4g} {label}</td></tr>" for r in rows)
    skipped = f"; {layers['skipped']} smaller layers not measured" if layers.get("skipped") else ""
    return (f'<div class="plot" data-plot="latency">{plot}</div>'
            f'<p class="muted">{_e(layers.get("note", ""))}{_e(skipped)}</p>'
            f"<details><summary>table</summary><table><tr><th>layer</th><th>op</th><th>MACs</th><th>cost</th></tr>{table}</table></details>")


def _depth(report) -> str:
    d = report.depth
    unit = d.get("unit", "s")
    scale, label = (1e3, "predicted latency (ms)") if unit == "s" else (1.0, "predicted instructions per run")
    curve = sorted(d.get("curve", []), key=lambda p: p["latency"])
    chosen = d.get("chosen") or {}
    plot = _tradeoff(curve, chosen, d, scale, label)
    rows = "".join(f"<tr><td class=num>{p['latency'] * scale:.4g}</td><td class=num>{p['damage']:.4g}</td>"
                   f"<td class=num>{p.get('removed', '')}</td></tr>" for p in curve)
    goal = d.get("goal")
    text = (f"<p>baseline (measured) <b>{d['baseline'] * scale:.4g}</b>, goal <b>{goal * scale:.4g}</b>, "
            f"chosen <b>{chosen.get('latency', 0) * scale:.4g}</b> with damage <b>{chosen.get('damage', 0):.4g}</b> "
            f"({_e(label.split(' (')[0])}{' in ms' if unit == 's' else ''}); damage is "
            f"{_e(d.get('damage', 'the relative squared error of the output on the calibration batch'))}</p>")
    removed = ", ".join(f"{_e(r['op'])} after {_e(r['after'])}" for r in d.get("removed_activations", [])) or "none"
    merges = "".join(f"<li>{_e(' + '.join(m['convs']))} → one {_e('x'.join(map(str, m.get('kernel', []))))} conv"
                     f"{' (padding moved)' if m.get('padding') == 'moved' else ''}</li>" for m in d.get("merges", []))
    text += (f"<p>activations removed: {removed}</p>"
             + (f"<p>conv groups merged at build time:</p><ul>{merges}</ul>" if merges else ""))
    return (text + f'<div class="plot" data-plot="depth">{plot}</div>'
            "<details><summary>curve points</summary><table><tr><th>latency</th><th>damage</th>"
            f"<th>activations removed</th></tr>{rows}</table></details>")


def _sparsity(report) -> str:
    rows = report.sparsity
    if rows is None:
        return '<p class="muted">this report carries no per-layer density (made before fxopt recorded it)</p>'
    if not rows:
        return '<p class="muted">the optimized graph has no conv or linear layers</p>'
    sparse = sum(1 for r in rows if r["choice"] == "sparse")
    ran = any(p.name == "lower_sparse_weights" for p in report.passes)
    plot = _barh([r["name"] for r in rows], [r["density"] for r in rows], "density (fraction of non-zero weights)",
                 colors=["#27ae60" if r["choice"] == "sparse" else "#95a5a6" for r in rows], salt="sparsity",
                 xlim=(0, 1))
    head = (f"<p>{sparse} of {len(rows)} layers run a sparse kernel (green), the others stay dense (grey).</p>" if ran else
            f"<p>{len(rows)} layers, all dense: this pipeline has no <code>lower_sparse_weights</code> "
            "(add it to give layers below its <code>max_density</code> a sparse kernel).</p>")
    table = "".join(
        f"<tr><td>{_e(r['name'])}</td><td>{_e(r['kind'])}</td><td>{_e('x'.join(map(str, r['weight_shape'])))}</td>"
        f"<td class=num>{r['density']:.3f}</td><td>{_e(r['choice'])}{(' ' + _e(r['block'])) if r.get('block') else ''}</td>"
        f"<td class=muted>{_e(r.get('reason', ''))}</td></tr>" for r in rows)
    table = ("<table><tr><th>layer</th><th>op</th><th>weight</th><th>density</th><th>choice</th><th>why</th></tr>"
             f"{table}</table>")
    return head + f'<div class="plot" data-plot="sparsity">{plot}</div>' + (
        table if ran else f"<details><summary>table</summary>{table}</details>")


def _numerics(report) -> str:
    items = []
    v = report.verification
    if v:
        items.append(_check_row(f"optimized graph vs {v.get('against', 'eager')} (PyTorch)", v))
    check = (report.build or {}).get("check")
    if check is not None:
        if check.get("ok") is None:
            items.append(f"<tr><td>build vs eager</td><td class=muted>not run</td><td colspan=2>{_e(check.get('skipped', ''))}</td></tr>")
        else:
            items.append(_check_row(f"build vs eager, run {check.get('ran', 'natively')}", check))
    if report.depth and report.depth.get("calibration_error") is not None:
        items.append(f"<tr><td>planned model vs original on the calibration batch</td><td class=lossy>lossy</td>"
                     f"<td colspan=2>relative squared error {report.depth['calibration_error']:.4g}</td></tr>")
    if not items:
        return '<p class="muted">no numerical check ran (verify="off")</p>'
    return ("<table><tr><th>check</th><th>result</th><th>max abs error</th><th>relative to output scale</th></tr>"
            + "".join(items) + "</table>")


def _check_row(what: str, c: dict) -> str:
    ok = c.get("ok")
    detail = f"<div class=muted>{_e(c.get('detail', ''))}</div>" if c.get("detail") else ""
    return (f"<tr><td>{_e(what)}{detail}</td><td class=\"{'ok' if ok else 'bad'}\">{'ok' if ok else 'FAILED'}</td>"
            f"<td class=num>{c.get('max_abs_error', 0):.3g}</td><td class=num>{c.get('max_rel_error', 0):.3g}</td></tr>")


def _build(report) -> str:
    from fxopt.report import _tuning_line

    build = dict(report.build)
    build.pop("check", None)
    tuning = build.pop("tuning", None)
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in build.items())
    extra = f"<p>{_e(_tuning_line(tuning))}</p>" if tuning else ""
    return f"<table>{rows}</table>{extra}"


# ---------------------------------------------------------------------------------------------
# Graph drawing


def node_status(before: dict, after: dict) -> tuple[dict[str, str], dict[str, str]]:
    """Per node name: "removed" (before only), "new" (after only), "changed" (weights or op
    differ), "same"; inputs and the output are "io".

    Nodes match by name (and kind, unless both hold weights); then the parameterless ones (relu, add, pool...) that passes
    re-created under new names match by kind and shape, in graph order: a ReLU after a merged
    conv is the same ReLU."""
    io = ("placeholder", "output")
    old = {n["name"]: n for n in before["nodes"]}
    match: dict[str, str] = {}  # after name -> before name
    for n in after["nodes"]:  # same name: same op, or a layer rewritten (a sparse kernel for a conv)
        if n["name"] in old and (old[n["name"]]["kind"] == n["kind"] or (old[n["name"]]["params"] and n["params"])):
            match[n["name"]] = n["name"]
    matched = set(match.values())
    pending: dict[tuple, list[str]] = {}
    for n in before["nodes"]:
        if n["name"] not in matched and not n["params"] and n["op"] not in io:
            pending.setdefault((n["kind"], str(n["shape"])), []).append(n["name"])
    for n in after["nodes"]:
        if n["name"] not in match and not n["params"] and n["op"] not in io:
            queue = pending.get((n["kind"], str(n["shape"])))
            if queue:
                match[n["name"]] = queue.pop(0)
    new = {n["name"]: n for n in after["nodes"]}
    back = {b: a for a, b in match.items()}
    status_before = {name: "io" if n["op"] in io else "removed" if name not in back
                     else "changed" if _differs(n, new[back[name]]) else "same" for name, n in old.items()}
    status_after = {name: "io" if n["op"] in io else "new" if name not in match
                    else "changed" if _differs(old[match[name]], n) else "same" for name, n in new.items()}
    return status_before, status_after


def _differs(a: dict, b: dict) -> bool:
    return a.get("kind") != b.get("kind") or a.get("signature") != b.get("signature")


def graph_svg(graph: dict, status: dict[str, str], layout: str = "auto", prefix: str = "g") -> tuple[str, str]:
    """(inline SVG, "dot" or "simple") of a ``snapshot_graph``; its element ids start with
    ``prefix`` (several graphs share one page)."""
    if layout in ("auto", "dot") and shutil.which("dot"):
        svg = _dot_svg(graph, status)
        if svg is not None:
            return re.sub(r'\bid="', f'id="{prefix}-', svg), "dot"
    if layout == "dot":
        log.info("Graphviz dot is not available or failed: drawing the graph with fxopt's own layout")
    return _simple_svg(graph, status, prefix), "simple"


def _label(n: dict) -> tuple[str, str]:
    top = n["kind"] if n["op"] not in ("placeholder", "output") else n["op"]
    bottom = n["name"]
    if n.get("shape"):
        bottom += "  " + "x".join(map(str, n["shape"]))
    return top, bottom


def _tooltip(n: dict) -> str:
    parts = [f"{n['name']}: {n['op']} {n['target']}"]
    if n.get("shape"):
        parts.append("shape " + "x".join(map(str, n["shape"])))
    if n.get("params"):
        parts.append(f"{n['params']:,} parameters")
    return "\n".join(parts)


def _dot_svg(graph: dict, status: dict[str, str]) -> str | None:
    lines = ["digraph G {", 'graph [rankdir=TB, nodesep=0.25, ranksep=0.3, bgcolor="transparent"];',
             'node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, height=0.3, margin="0.08,0.03"];',
             'edge [color="#7f8c8d", arrowsize=0.5];']
    ids = {n["name"]: f"n{i}" for i, n in enumerate(graph["nodes"])}
    for n in graph["nodes"]:
        top, bottom = _label(n)
        s = status.get(n["name"], "same")
        label = f"<<b>{html.escape(top)}</b><br/><font point-size=\"8\">{html.escape(bottom)}</font>>"
        lines.append(f'{ids[n["name"]]} [label={label}, fillcolor="{_COLORS[s]}", color="{_STROKES[s]}", '
                     f'tooltip="{_dot_escape(_tooltip(n))}", id="{ids[n["name"]]}", class="fx-node fx-{s}"];')
    for n in graph["nodes"]:
        for source in dict.fromkeys(n["inputs"]):
            if source in ids:
                lines.append(f"{ids[source]} -> {ids[n['name']]};")
    lines.append("}")
    try:
        done = subprocess.run(["dot", "-Tsvg"], input="\n".join(lines), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("Graphviz dot failed (%s): drawing with fxopt's own layout", exc)
        return None
    if done.returncode != 0 or "<svg" not in done.stdout:
        log.info("Graphviz dot failed (%s): drawing with fxopt's own layout", done.stderr.strip()[:200])
        return None
    svg = done.stdout[done.stdout.index("<svg"):]
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    return svg.replace("<svg ", '<svg class="fx-graph" data-layout="dot" ', 1)


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_CHAR, _BOX_H, _ROW, _GAP, _PAD = 6.6, 32, 58, 18, 12


def layered_layout(graph: dict) -> tuple[dict[str, tuple[float, float, float]], float, float]:
    """Positions (x centre, y top, width) for each node: layer = longest path from an input;
    within a layer, nodes ordered by the mean position of their inputs (one sweep down), each
    layer centred on one axis (a chain is a straight column, branches spread either side)."""
    nodes = graph["nodes"]
    layer: dict[str, int] = {}
    for n in nodes:  # fx order is a topological order
        layer[n["name"]] = 1 + max((layer[i] for i in n["inputs"] if i in layer), default=-1)
    widths = {n["name"]: max(len(t) for t in _label(n)) * _CHAR + 2 * _PAD for n in nodes}
    by_layer: dict[int, list[dict]] = {}
    for n in nodes:
        by_layer.setdefault(layer[n["name"]], []).append(n)
    position: dict[str, float] = {}
    for index in sorted(by_layer):
        keyed = []
        for order, n in enumerate(by_layer[index]):
            parents = [position[i] for i in n["inputs"] if i in position]
            keyed.append((sum(parents) / len(parents) if parents else 0.0, order, n["name"]))
        keyed.sort()
        total = sum(widths[name] for _, _, name in keyed) + _GAP * (len(keyed) - 1)
        x = -total / 2
        for _, _, name in keyed:
            position[name] = x + widths[name] / 2
            x += widths[name] + _GAP
    left = min((position[n["name"]] - widths[n["name"]] / 2 for n in nodes), default=0.0)
    right = max((position[n["name"]] + widths[n["name"]] / 2 for n in nodes), default=0.0)
    placed = {name: (cx - left + 10, 10 + layer[name] * _ROW, widths[name]) for name, cx in position.items()}
    return placed, right - left + 20, (max(layer.values(), default=0) + 1) * _ROW + 10


def _simple_svg(graph: dict, status: dict[str, str], prefix: str) -> str:
    placed, width, height = layered_layout(graph)
    edges, boxes = [], []
    for n in graph["nodes"]:
        x, y, _ = placed[n["name"]]
        for source in dict.fromkeys(n["inputs"]):
            if source not in placed:
                continue
            sx, sy, _ = placed[source]
            y0, y1 = sy + _BOX_H, y
            mid = (y0 + y1) / 2
            edges.append(f'<path d="M{sx:.1f},{y0:.1f} C{sx:.1f},{mid:.1f} {x:.1f},{mid:.1f} {x:.1f},{y1 - 4:.1f}" '
                         'fill="none" stroke="#7f8c8d" stroke-width="1" marker-end="url(#{prefix}-arrow)"/>')
    for n in graph["nodes"]:
        x, y, w = placed[n["name"]]
        s = status.get(n["name"], "same")
        top, bottom = _label(n)
        boxes.append(
            f'<g class="fx-node fx-{s}"><title>{_e(_tooltip(n))}</title>'
            f'<rect x="{x - w / 2:.1f}" y="{y:.1f}" width="{w:.1f}" height="{_BOX_H}" rx="5" fill="{_COLORS[s]}" '
            f'stroke="{_STROKES[s]}"/>'
            f'<text x="{x:.1f}" y="{y + 13:.1f}" text-anchor="middle" font-size="11" font-weight="600">{_e(top)}</text>'
            f'<text x="{x:.1f}" y="{y + 26:.1f}" text-anchor="middle" font-size="9" fill="#34495e">{_e(bottom)}</text></g>')
    return (f'<svg class="fx-graph" data-layout="simple" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
            f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica,Arial,sans-serif">'
            f'<defs><marker id="{prefix}-arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="6" markerHeight="6" '
            'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#7f8c8d"/></marker></defs>'
            + "".join(edges) + "".join(boxes) + "</svg>")


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's SVG backend, inlined)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasSVG(figure)
    return figure


def _svg_of(figure, salt: str) -> str:
    import matplotlib

    buffer = io.StringIO()
    # text as <text> (no glyph definitions shared between figures); ids salted per figure, so that
    # several plots inlined in one page never share an id
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"fxopt-{salt}"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})  # reproducible
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _barh(names: list[str], values: list[float], xlabel: str, colors: list[str], salt: str, xlim=None) -> str:
    height = max(1.6, 0.28 * len(names) + 0.9)
    figure = _figure(8.0, height)
    axes = figure.add_subplot()
    positions = list(range(len(names)))
    axes.barh(positions, values, color=colors, height=0.7)
    axes.set_yticks(positions, [_short(n) for n in names], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(xlabel, fontsize=9)
    axes.tick_params(axis="x", labelsize=8)
    if xlim:
        axes.set_xlim(*xlim)
    axes.grid(axis="x", alpha=0.3)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    return _svg_of(figure, salt)


def _tradeoff(curve: list[dict], chosen: dict, d: dict, scale: float, label: str) -> str:
    figure = _figure(7.5, 4.2)
    axes = figure.add_subplot()
    xs = [p["latency"] * scale for p in curve]
    ys = [p["damage"] for p in curve]
    axes.step(xs, ys, where="post", color="#2e86c1", linewidth=1.4, label="best plan within each budget")
    axes.plot(xs, ys, "o", color="#2e86c1", markersize=3.5)
    if chosen:
        axes.plot([chosen["latency"] * scale], [chosen["damage"]], "*", color="#c0392b", markersize=15,
                  label=f"chosen ({chosen['latency'] * scale:.4g}, damage {chosen['damage']:.3g})", zorder=5)
    if d.get("goal") is not None:
        axes.axvline(d["goal"] * scale, color="#b9770e", linestyle="--", linewidth=1, label="goal")
    if d.get("baseline") is not None:
        axes.axvline(d["baseline"] * scale, color="#7f8c8d", linestyle=":", linewidth=1, label="measured baseline")
    positive = [y for y in ys + [chosen.get("damage", 0)] if y > 0]
    if positive and max(positive) / min(positive) > 100:
        axes.set_yscale("symlog", linthresh=min(positive))
    axes.set_xlabel(label, fontsize=9)
    axes.set_ylabel(d.get("damage_label", "damage (relative output error)"), fontsize=9)
    axes.tick_params(labelsize=8)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper right")
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    return _svg_of(figure, "depth")


# ---------------------------------------------------------------------------------------------
# Formatting


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _short(name: str, width: int = 36) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _si(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "?" if value is None else str(value)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _arrow(before: Any, after: Any, fmt=str) -> str:
    if before is None or after is None:
        return "?"
    return _e(fmt(before)) if before == after else f"{_e(fmt(before))} → {_e(fmt(after))}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)

