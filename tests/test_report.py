import io
import json
import logging
import re
from html.parser import HTMLParser

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
import fxopt.measure
from fxopt import depth, progress, report_html, spec
from fxopt.examples import small_cnn
from fxopt.layers import layer_module
from fxopt.measure import Measurement
from fxopt.report import Report


@pytest.fixture(scope="module")
def optimized():
    torch.manual_seed(0)
    return fxopt.optimize(small_cnn(), (torch.randn(1, 3, 32, 32),))


def test_report_table_and_json_round_trip(optimized, tmp_path):
    report = optimized.report
    text = report.to_text()
    assert f"pipeline: {spec.to_text(spec.resolve('default').spec())}" in text
    assert "fold_bn#1" in text and "conv_bn=9" in text and "branch_sum=4" in text
    assert "verification vs eager: ok" in text
    path = report.save(tmp_path / "report.json")
    loaded = Report.from_json(json.loads(path.read_text()))
    assert loaded == report
    assert loaded.graph_before and loaded.graph_after and loaded.sparsity


def test_graph_snapshots_and_what_changed(optimized):
    report = optimized.report
    before = {n["name"]: n for n in report.graph_before["nodes"]}
    after = {n["name"]: n for n in report.graph_after["nodes"]}
    assert len(before) == report.passes[0].before["nodes"] and len(after) == report.passes[-1].after["nodes"]
    conv = after["features_0_branches_reparam"]
    assert conv["kind"] == "conv2d" and conv["shape"] == [1, 16, 16, 16] and conv["params"] == 16 * 27 + 16
    assert conv["inputs"] == ["x"]
    status_before, status_after = report_html.node_status(report.graph_before, report.graph_after)
    assert {status_before[n] for n in before if before[n]["kind"] == "batch_norm"} == {"removed"}
    assert {status_before[n] for n in before if before[n]["kind"] == "add"} == {"removed"}
    assert status_after["features_0_branches_reparam"] == "new"  # the folded branches' conv
    # the ReLUs survive under new names: matched by kind and shape, not highlighted
    assert [status_after[n] for n in after if after[n]["kind"] == "relu"] == ["same"] * 4
    assert status_after["x"] == status_after["output"] == "io"


def _node(name, kind, inputs=(), params=0, signature="", op="call_function", shape=(1, 4)):
    return {"name": name, "op": op, "kind": kind, "target": name, "inputs": list(inputs), "shape": list(shape),
            "params": params, "signature": signature}


def test_node_status_by_name_then_kind_and_shape():
    before = {"nodes": [_node("x", "placeholder", op="placeholder"), _node("conv", "conv2d", ["x"], 8, "[4]:1", "call_module"),
                        _node("bn", "batch_norm", ["conv"], 8, "[4]:2", "call_module"), _node("act", "relu", ["bn"]),
                        _node("output", "output", ["act"], op="output")]}
    after = {"nodes": [_node("x", "placeholder", op="placeholder"), _node("conv", "conv2d", ["x"], 8, "[4]:3", "call_module"),
                       _node("relu_1", "relu", ["conv"]), _node("output", "output", ["relu_1"], op="output")]}
    status_before, status_after = report_html.node_status(before, after)
    assert status_before == {"x": "io", "conv": "changed", "bn": "removed", "act": "same", "output": "io"}
    assert status_after == {"x": "io", "conv": "changed", "relu_1": "same", "output": "io"}
    after["nodes"][2]["shape"] = [1, 8]  # another ReLU after all
    assert report_html.node_status(before, after)[1]["relu_1"] == "new"


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.open, self.svgs = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.sections.append(dict(attrs)["data-section"])
        if tag == "svg":
            self.svgs += 1
        if tag not in ("meta", "br", "path", "rect", "circle", "use", "stop", "line", "polygon", "ellipse", "polyline"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in ("meta", "br"):
            return
        if self.open and self.open[-1] == tag:
            self.open.pop()


def _parse(page: str) -> _Tags:
    tags = _Tags()
    tags.feed(page)
    return tags


@pytest.mark.parametrize("layout", ["auto", "simple"])
def test_html_has_every_section_and_no_network(optimized, layout):
    page = report_html.render(optimized.report, layout=layout)
    tags = _parse(page)
    assert tags.sections == ["summary", "pipeline", "passes", "graph", "latency", "sparsity", "numerics"]
    assert tags.svgs >= 3  # two graphs, the density plot
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "<script" not in page
    assert spec.to_text(spec.resolve("default").spec()) in page
    assert "not measured" in page  # no per-layer latency in an optimize() report
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "element ids repeat across the page's SVGs"
    assert report_html.render(optimized.report, layout=layout) == page  # reproducible: no dates, no random ids


def test_html_without_graphviz_uses_its_own_layout(optimized, monkeypatch):
    monkeypatch.setattr(report_html.shutil, "which", lambda name: None)
    page = report_html.render(optimized.report)
    assert page.count('data-layout="simple"') == 2 and "Graphviz dot not found" in page
    assert 'class="fx-node fx-removed"' in page and 'class="fx-node fx-new"' in page


def test_layered_layout_keeps_rows_apart(optimized):
    placed, width, height = report_html.layered_layout(optimized.report.graph_before)
    assert set(placed) == {n["name"] for n in optimized.report.graph_before["nodes"]}
    rows = {}
    for name, (x, y, w) in placed.items():
        assert 0 <= x - w / 2 and x + w / 2 <= width and 0 <= y <= height
        rows.setdefault(y, []).append((x - w / 2, x + w / 2))
    for spans in rows.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    edges = [(i, n["name"]) for n in optimized.report.graph_before["nodes"] for i in n["inputs"]]
    assert all(placed[a][1] < placed[b][1] for a, b in edges)  # every edge points down


def test_old_report_json_renders():
    data = {"model": "M", "pipeline": "canonicalize", "passes": [], "verification": None, "build": None}
    page = Report.from_json(data).to_html()
    assert _parse(page).sections == ["summary", "pipeline", "passes", "graph", "latency", "sparsity", "numerics"]


class PointwiseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pw = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            self.pw.weight.mul_((torch.rand(32, 16, 1, 1, generator=torch.Generator().manual_seed(0)) < 0.2).float())

    def forward(self, x):
        return self.fc(F.relu(self.pw(F.relu(self.stem(x)))).mean((2, 3)))


def test_sparsity_table_and_section():
    pipeline = ["canonicalize", {"name": "lower_sparse_weights", "decide": "density", "max_density": 0.6}]
    report = fxopt.optimize(PointwiseNet().eval(), torch.randn(1, 3, 8, 8), pipeline).report
    rows = {row["name"]: row for row in report.sparsity}
    assert [row["choice"] for row in report.sparsity] == ["dense", "sparse", "dense"]
    sparse = next(row for row in report.sparsity if row["choice"] == "sparse")
    assert sparse["density"] < 0.3 and sparse["block"] and sparse["weight_shape"] == [32, 16]
    assert "max_density" in rows["fc"]["reason"]  # the linear was a candidate, declined as dense
    assert "sparse kernels: 1 of 3 layers" in report.to_text()
    page = report.to_html()
    assert "1 of 3 layers run a sparse kernel" in page and 'data-plot="sparsity"' in page
    status_before, status_after = report_html.node_status(report.graph_before, report.graph_after)
    assert status_before["pw"] == status_after["pw"] == "changed"  # the conv became a sparse kernel


def test_layer_module_computes_the_node(optimized):
    gm = optimized.module
    node = next(n for n in gm.graph.nodes if n.name == "features_1_branches_reparam")
    module, inputs = layer_module(gm, node)
    assert [tuple(t.shape) for t in inputs] == [(1, 16, 16, 16)]
    x = torch.randn(1, 16, 16, 16)
    torch.testing.assert_close(module(x), gm.get_submodule(node.target)(x))


def _group_cost(chain, group, target, removed=frozenset(), **options):
    weight = group.merged.weight if group.ok else None
    return 2e-6 + (weight.numel() * 1e-9 if weight is not None else 0.0) + (3e-7 if group.stop - 1 not in removed else 0.0)


def _measure(module, inputs, target=None, **options):
    value = 2e-5 if isinstance(module, torch.fx.GraphModule) else 1e-6
    return Measurement(value=value, unit="s", samples=(value,), backend="synthetic", target="host", cached=False, key=None)


def test_depth_plan_report(monkeypatch, tmp_path):
    layers = []
    for c_in in (3, 8, 8, 8):
        layers += [nn.Conv2d(c_in, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    monkeypatch.setattr(depth, "group_cost", _group_cost)
    monkeypatch.setattr(fxopt.measure, "measure", _measure)
    plan = depth.plan_depth(model, torch.randn(1, 3, 16, 16), "host", speedup=1.1)
    d = plan.report.depth
    assert d["chosen"]["latency"] == pytest.approx(plan.predicted) and d["goal"] == plan.budget
    curve = d["curve"]
    assert len(curve) >= 2 and curve[-1]["damage"] == 0.0  # up to the cheapest plan that removes nothing
    assert all(a["latency"] < b["latency"] and a["damage"] >= b["damage"] for a, b in zip(curve, curve[1:]))
    assert any(p["latency"] == pytest.approx(d["chosen"]["latency"]) for p in curve)
    rows = plan.report.layers["rows"]
    assert [row["name"] for row in rows] == ["0", "3", "6", "9"] and all(row["value"] > 0 for row in rows)
    saved = json.loads(plan.save(tmp_path / "plan.json").read_text())
    assert "report" not in saved and depth.DepthPlan.load(tmp_path / "plan.json").report is None
    tags = _parse(plan.report.to_html())
    assert tags.sections == ["summary", "pipeline", "passes", "graph", "latency", "depth", "sparsity", "numerics"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal_and_not_when_quiet():
    logger = logging.getLogger(progress.LOGGER)
    saved = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        assert progress.enabled(_Terminal()) and not progress.enabled(io.StringIO())
        screen = _Terminal()
        with progress.bar(4, "latency table", unit="conv", stream=screen, leave=True) as bar:
            bar.update(2)
        assert "latency table" in screen.getvalue() and "2/4" in screen.getvalue()
        quiet = io.StringIO()
        assert list(progress.iterate(range(3), "x", stream=quiet)) == [0, 1, 2] and quiet.getvalue() == ""
        logger.setLevel(logging.ERROR)  # fxopt --quiet
        assert not progress.enabled(_Terminal())
        logger.setLevel(logging.NOTSET)
        logging.getLogger("fxopt").setLevel(logging.WARNING)  # fewer logs, bars still
        assert progress.enabled(_Terminal())
        logging.getLogger("fxopt").setLevel(logging.ERROR)
        assert not progress.enabled(_Terminal())  # inherited from fxopt
    finally:
        logger.setLevel(saved)
        logging.getLogger("fxopt").setLevel(logging.NOTSET)


def test_cli_quiet_and_verbose_leave_logging_as_they_found_it(capsys):
    from fxopt.cli import main

    levels = {name: logging.getLogger(name).level for name in ("fxopt", progress.LOGGER)}
    assert main(["-q", "targets"]) == 0 and main(["--verbose", "targets"]) == 0
    assert {name: logging.getLogger(name).level for name in levels} == levels
    capsys.readouterr()


def test_measure_layers_measures_each_conv_and_linear(optimized, monkeypatch):
    from fxopt import layers

    seen = []

    def fake(module, inputs, target=None, **options):
        seen.append((type(module).__name__, tuple(inputs[0].shape), options))
        return Measurement(value=1e-5 * len(seen), unit="s", samples=(1e-5,), backend="local", target="host",
                           cached=False, key=None)

    monkeypatch.setattr(fxopt.measure, "measure", fake)
    table = layers.measure_layers(optimized.module, "host", repeat=2)
    assert [row["name"] for row in table["rows"]] == ["features_0_branches_reparam", "features_1_branches_reparam",
                                                     "features_2_branches_reparam", "features_3_branches_reparam", "head_3"]
    assert [row["kind"] for row in table["rows"]] == ["conv2d"] * 4 + ["linear"]
    assert seen[0][1] == (1, 3, 32, 32) and seen[0][2] == {"repeat": 2}
    assert table["unit"] == "s" and table["target"] == "host" and table["skipped"] == 0
    assert layers.measure_layers(optimized.module, "host", limit=2)["skipped"] == 3
