"""The HTML report in a real browser: headless Chromium loads it from a file (network blocked),
and a probe injected into a copy of the page records script errors, console errors and failed
loads, and the size of every section and of every SVG in it. Screenshots are kept in the test's
tmp dir and copied to build/test-artifacts/.

Chromium comes from Debian (``apt-get install chromium``; ``make test`` installs it): without it
these tests skip, except under FXOPT_REQUIRE_CROSS=1 (as ``make test`` runs them), where they fail.
"""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fxopt.measure
from fxopt import depth
from fxopt.cli import main
from fxopt.measure import Measurement

ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"
BUILD_SECTIONS = {"summary", "pipeline", "passes", "graph", "latency", "sparsity", "numerics", "build"}
PLAN_SECTIONS = {"summary", "pipeline", "passes", "graph", "latency", "depth", "sparsity", "numerics"}

PROBE = """<script>
window.__fxoptErrors = [];
window.addEventListener("error", function (e) {
  window.__fxoptErrors.push(e.message ? "error: " + e.message : "failed to load: " + (e.target && (e.target.src || e.target.href)));
}, true);
window.addEventListener("unhandledrejection", function (e) { window.__fxoptErrors.push("rejection: " + e.reason); });
(function () {
  var original = console.error;
  console.error = function () { window.__fxoptErrors.push("console.error: " + Array.prototype.join.call(arguments, " ")); original.apply(console, arguments); };
})();
window.addEventListener("load", function () {
  var out = {errors: window.__fxoptErrors, sections: {}, nodes: {}};
  document.querySelectorAll("section[data-section]").forEach(function (s) {
    var r = s.getBoundingClientRect();
    out.sections[s.dataset.section] = {width: r.width, height: r.height, svgs: Array.prototype.map.call(
      s.querySelectorAll("svg"), function (v) { var b = v.getBoundingClientRect(); return [b.width, b.height]; })};
  });
  ["before", "after"].forEach(function (g) { out.nodes[g] = document.querySelectorAll("[data-graph=" + g + "] .fx-node").length; });
  var pre = document.createElement("pre");
  pre.id = "fxopt-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium_binary():
    return next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def chromium():
    binary = _chromium_binary()
    if binary is None:
        message = "headless Chromium is not installed: apt-get install chromium (make test does)"
        if os.environ.get("FXOPT_REQUIRE_CROSS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def _run(chromium, *args, timeout=90):
    # no network: every host name fails to resolve; a fresh profile per run
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _console_errors(stderr: str) -> list[str]:
    """Console messages of the page that are errors (Chromium logs them as CONSOLE lines)."""
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line and re.search(r"error|uncaught|failed", line, re.I)]


def probe(chromium, page: Path, tmp: Path) -> dict:
    """Load a copy of ``page`` with the probe injected; its findings, console errors included."""
    text = page.read_text(encoding="utf-8")
    assert "<head>" in text
    probed = tmp / f"probed-{page.name}"
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    done = _run(chromium, "--virtual-time-budget=5000", "--window-size=1280,2000", "--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="fxopt-probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the probe did not run: {done.stderr[-1500:]}"
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    result["errors"] += _console_errors(done.stderr)
    return result


def screenshot(chromium, page: Path, tmp: Path, name: str, height: int = 3800) -> Path:
    from PIL import Image

    path = tmp / name
    _run(chromium, f"--window-size=1280,{height}", f"--screenshot={path}", page.as_uri())
    with Image.open(path) as image:
        assert image.size == (1280, height)
        colors = image.convert("RGB").resize((320, height // 4)).getcolors(1 << 16)
    assert colors is None or len(colors) > 50, "the screenshot is (nearly) blank"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    return path


def check_page(result: dict, sections: set[str]) -> None:
    assert result["errors"] == []
    assert set(result["sections"]) == sections
    for name, figures in result["sections"].items():
        assert figures["width"] > 300 and figures["height"] > 40, name
        for width, height in figures["svgs"]:
            assert width > 50 and height > 30, (name, figures["svgs"])
    for name in ("graph", "latency", "sparsity"):
        assert result["sections"][name]["svgs"], f"section {name} draws nothing"
    assert result["nodes"]["before"] > result["nodes"]["after"] > 3


def _self_contained(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "the page loads something from the network"
    assert "<link" not in text and "<script" not in text and "@import" not in text


def test_the_probe_sees_errors(chromium, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head><title>t</title></head><body><section data-section=x>x</section>"
                    "<img src='https://example.invalid/x.png'><script>undefinedFunction()</script></body></html>")
    result = probe(chromium, page, tmp_path)
    assert any("undefinedFunction" in e for e in result["errors"]), result
    assert any("failed to load" in e for e in result["errors"]), result


@pytest.fixture(scope="module")
def build_report(tmp_path_factory):
    """``fxopt build --report --layer-latency`` of a RepVGG-style model (SmallCNN): the page, the build.
    (--layer-latency measures 5 layers, in fxopt's measurement cache as the CLI always does.)"""
    tmp = tmp_path_factory.mktemp("build-report")
    page, build = tmp / "report.html", tmp / "build"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture), contextlib.redirect_stderr(capture):
        code = main(["build", "fxopt.examples:small_cnn", "--input-shape", "1x3x32x32", "-o", str(build),
                     "--report", str(page), "--layer-latency", "--quiet"])
    return code, capture.getvalue(), page, build


def test_build_writes_the_report(build_report):
    code, output, page, build = build_report
    assert code == 0, output
    assert output.rstrip().endswith(f"wrote {build} and {page}")  # --quiet: no bar, no warning, the results only
    assert "per-layer cost on host: 5 layers" in output
    assert (build / "report.html").read_text() == page.read_text()
    assert "report.html" in json.loads((build / "manifest.json").read_text())["files"]
    _self_contained(page)


def test_build_report_in_chromium(chromium, build_report, tmp_path):
    page = build_report[2]
    result = probe(chromium, page, tmp_path)
    check_page(result, BUILD_SECTIONS)
    screenshot(chromium, page, tmp_path, "report-build-small_cnn.png")


MODEL = """
import torch
from torch import nn


def chain():
    torch.manual_seed(0)
    layers = []
    for c_in, c_out in ((3, 8), (8, 8), (8, 8), (8, 8)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
"""


def _synthetic_group_cost(chain, group, target, removed=frozenset(), **options):
    """A merged group costs a fixed call plus its weights' size; a kept activation a little."""
    weight = group.merged.weight if group.ok else None
    kept = group.stop - 1 not in removed
    return 2e-6 + (weight.numel() * 1e-9 if weight is not None else 0.0) + (3e-7 if kept else 0.0)


def _synthetic_measure(module, inputs, target=None, **options):
    value = 2e-5 if isinstance(module, torch.fx.GraphModule) else 1e-6
    return Measurement(value=value, unit="s", samples=(value,), backend="synthetic", target="host", cached=False, key=None)


@pytest.fixture(scope="module")
def plan_report(tmp_path_factory):
    """``fxopt plan depth --report`` of a 4-conv chain, with synthetic costs (nothing built or timed)."""
    tmp = tmp_path_factory.mktemp("plan-report")
    (tmp / "chain_model.py").write_text(MODEL)
    page = tmp / "plan.html"
    capture = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(capture), contextlib.redirect_stderr(capture):
        patch.setattr(depth, "group_cost", _synthetic_group_cost)
        patch.setattr(fxopt.measure, "measure", _synthetic_measure)
        code = main(["plan", "depth", f"{tmp / 'chain_model.py'}:chain", "--input-shape", "1x3x16x16",
                     "--speedup", "1.1", "-o", str(tmp / "plan.json"), "--report", str(page)])
    return code, capture.getvalue(), page


def test_plan_depth_writes_the_report(plan_report):
    code, output, page = plan_report
    assert code == 0, output
    assert output.rstrip().endswith(f"and {page}")
    _self_contained(page)
    assert 'data-plot="depth"' in page.read_text()


def test_depth_plan_report_in_chromium(chromium, plan_report, tmp_path):
    page = plan_report[2]
    result = probe(chromium, page, tmp_path)
    check_page(result, PLAN_SECTIONS)
    assert result["sections"]["depth"]["svgs"]
    screenshot(chromium, page, tmp_path, "report-depth-plan.png")
