import json
import subprocess
import sys

import pytest

from fxopt.cli import main

BUILD = ["build", "fxopt.examples:small_cnn", "--input-shape", "1x3x32x32"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_build_then_check(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    code, out, err = run_cli(capsys, *BUILD, "-o", str(out_dir))
    assert code == 0, err
    assert "fold_bn" in out and f"wrote {out_dir}" in out
    code, out, _ = run_cli(capsys, "check", str(out_dir))
    assert code == 0 and "match" in out and "MISMATCH" not in out


def test_check_fails_on_a_wrong_golden_output(tmp_path, capsys):
    import hashlib
    import json

    import numpy as np

    out_dir = tmp_path / "demo"
    assert run_cli(capsys, *BUILD, "-o", str(out_dir))[0] == 0
    golden = out_dir / "expected_output_0.npy"
    np.save(golden, np.load(golden) + 1.0)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    manifest["files"]["expected_output_0.npy"] = hashlib.sha256(golden.read_bytes()).hexdigest()
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = run_cli(capsys, "check", str(out_dir))
    assert code == 1 and "MISMATCH" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["build", "no.such.module:f", "--input-shape", "1x3x8x8", "-o", "{tmp}/o"], "cannot import no.such.module"),
        (["build", "fxopt.examples:nothing", "--input-shape", "1x3x8x8", "-o", "{tmp}/o"], "has no attribute 'nothing'"),
        (["build", "fxopt.examples:__doc__", "--input-shape", "1x3x8x8", "-o", "{tmp}/o"], "not a callable"),
        (["build", "fxopt.examples", "--input-shape", "1x3x8x8", "-o", "{tmp}/o"], "must be 'path/to/file.py:factory'"),
        (["build", "{tmp}/missing.py:f", "--input-shape", "1x3x8x8", "-o", "{tmp}/o"], "does not exist"),
        ([*BUILD[:2], "--input-shape", "1x3xQ", "-o", "{tmp}/o"], "is not a shape"),
        ([*BUILD, "--target", "vax", "-o", "{tmp}/o"], "unknown target 'vax'"),
        ([*BUILD, "--pipeline", "fold_bn,frobnicate", "-o", "{tmp}/o"], "unknown pass 'frobnicate'"),
        ([*BUILD, "--pipeline", "{tmp}/p.toml", "-o", "{tmp}/o"], "p.toml: malformed pipeline TOML"),
        ([*BUILD[:2], "--input-shape", "1x5x32x32", "-o", "{tmp}/o"], "fails on the example inputs"),
        ([*BUILD, "-o", "{tmp}/occupied"], "exists and is not an fxopt build"),
        (["check", "{tmp}"], "manifest.json is missing"),
    ],
    ids=["import", "attribute", "not-callable", "no-colon", "no-file", "shape", "target", "pass", "toml",
         "input", "occupied", "check-not-build"],
)
def test_errors_are_one_clear_line(tmp_path, capsys, argv, message):
    (tmp_path / "p.toml").write_text("passes = [\n")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "data.txt").write_text("x")
    code, out, err = run_cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert err.startswith("fxopt: error: ") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_user_file_factory(tmp_path, capsys):
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())\n"
    )
    code, out, err = run_cli(capsys, "build", f"{tmp_path}/mymodel.py:make", "--input-shape", "1x2x8x8",
                             "--pipeline", "canonicalize,fold_bn", "-o", str(tmp_path / "b"))
    assert code == 0, err and "conv_bn=1" in out


def test_passes_and_targets(capsys):
    code, out, _ = run_cli(capsys, "passes")
    assert code == 0 and "fold_bn" in out and "canonicalize" in out and "named pipelines: default, none" in out
    code, out, _ = run_cli(capsys, "passes", "-v")
    assert "Declines:" in out
    code, out, _ = run_cli(capsys, "targets")
    names = [line.split()[0] for line in out.splitlines()]
    assert code == 0 and {"host", "arm64", "riscv64-rvv", "cuda"} <= set(names)


def test_python_dash_m_and_debug_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fxopt", "--debug", "check", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" in result.stderr and "manifest.json is missing" in result.stderr


UNTRACEABLE = (
    "import torch\n"
    "class Mixed(torch.nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(2, 2, k, padding=k // 2) for k in (1, 3))\n"
    "        self.bn = torch.nn.BatchNorm2d(4)\n"
    "    def forward(self, x):\n"
    "        return self.bn(torch.cat([c(t) for t, c in zip(torch.split(x, 2, 1), self.convs)], 1))\n"
    "def make():\n"
    "    return Mixed()\n"
)


def test_capture_flag(tmp_path, capsys):
    (tmp_path / "mixed.py").write_text(UNTRACEABLE)
    spec = f"{tmp_path}/mixed.py:make"
    code, out, err = run_cli(capsys, "build", spec, "--input-shape", "1x4x8x8", "-o", str(tmp_path / "auto"))
    assert code == 0, err
    assert "capture: export (torch.fx failed: TraceError: Proxy object cannot be iterated at mixed.py:8)" in out
    code, out, err = run_cli(capsys, "build", spec, "--input-shape", "1x4x8x8", "--capture", "fx",
                             "-o", str(tmp_path / "fx"))
    assert code == 2 and "torch.fx cannot trace this model" in err and "mixed.py:8" in err
    assert not (tmp_path / "fx").exists()
    code, out, err = run_cli(capsys, *BUILD, "--capture", "export", "-o", str(tmp_path / "export"))
    assert code == 0, err
    assert "capture: export\n" in out and "fold_bn" in out
    assert json.loads((tmp_path / "export" / "manifest.json").read_text())["capture"] == "export"
    assert run_cli(capsys, "check", str(tmp_path / "export"))[0] == 0


def test_saved_exported_program_builds_and_checks(tmp_path, capsys):
    import torch

    from fxopt.examples import small_cnn

    program = torch.export.export(small_cnn(), (torch.randn(2, 3, 32, 32),))
    torch.export.save(program, tmp_path / "model.pt2")
    out_dir = tmp_path / "b"
    code, out, err = run_cli(capsys, "build", str(tmp_path / "model.pt2"), "-o", str(out_dir))
    assert code == 0, err
    assert "model: model.pt2   capture: export" in out and "conv_bn=" in out
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [2, 3, 32, 32] and manifest["model"] == "model.pt2"
    code, out, _ = run_cli(capsys, "check", str(out_dir))
    assert code == 0 and "match" in out and "MISMATCH" not in out
    # shapes given must be the program's; fx cannot re-trace a program; leaves do not apply
    for extra, message in ((["--input-shape", "1x3x32x32"], "does not match the program's input 'x' (2x3x32x32"),
                           (["--capture", "fx"], "already captured by torch.export"),
                           (["--leaf", "Conv2d"], "leaf_modules only apply to torch.fx"),
                           (["--input-dtype", "float16"], "--input-dtype float16 does not match")):
        code, _, err = run_cli(capsys, "build", str(tmp_path / "model.pt2"), *extra, "-o", str(tmp_path / "o"))
        assert code == 2 and message in err, err
        assert not (tmp_path / "o").exists()


def test_input_shape_is_required_for_a_factory(tmp_path, capsys):
    code, _, err = run_cli(capsys, "build", "fxopt.examples:small_cnn", "-o", str(tmp_path / "o"))
    assert code == 2 and "give the shape of each example input with --input-shape" in err


TINY = ["fxopt.examples:tiny_mobilenetv2", "--input-shape", "1x1x32x32"]


def _hand_written_plan(path, conv_shapes=None):
    """A plan as a user would edit one: the expand conv's ReLU6 of block 4 removed, that conv
    merged with the depthwise conv after it (inner padding moved onto the 1x1 conv's input)."""
    plan = {
        "format": "fxopt-depth-plan/1", "model": "TinyMobileNetV2", "target": "host", "input_shapes": [[1, 1, 32, 32]],
        "unit": "s", "baseline": 1e-3, "remainder": 0.0, "budget": 1e-3, "predicted": 1e-3,
        "removed_activations": [{"after": "features.4.body.0", "op": "relu6"}],
        "merges": [{"convs": ["features.4.body.0", "features.4.body.3"], "kernel": [3, 3], "stride": [2, 2],
                    "padding": "moved"}],
        "conv_shapes": conv_shapes or {"features.4.body.0": [64, 16, 1, 1], "features.4.body.3": [64, 1, 3, 3]},
    }
    path.write_text(json.dumps(plan))
    return path


def test_build_with_a_depth_plan_merges_its_group(tmp_path, capsys):
    plan = _hand_written_plan(tmp_path / "plan.json")
    code, out, err = run_cli(capsys, "build", *TINY, "--depth-plan", str(plan), "-o", str(tmp_path / "b"))
    assert code == 0, err
    assert "apply_depth_plan (lossy)" in out and "activations_removed=1" in out
    assert "merged_groups=1" in out and "merged_convs=2" in out
    assert "verification vs the planned model: ok" in out  # the plan made the planned model the reference


def test_depth_plan_that_does_not_fit_is_a_clear_error(tmp_path, capsys):
    plan = _hand_written_plan(tmp_path / "plan.json", {"features.4.body.0": [32, 16, 1, 1]})
    code, _, err = run_cli(capsys, "build", *TINY, "--depth-plan", str(plan), "-o", str(tmp_path / "b"))
    assert code == 2 and "does not fit" in err and "features.4.body.0" in err
    code, _, err = run_cli(capsys, "build", *TINY, "--depth-plan", str(tmp_path / "missing.json"), "-o", str(tmp_path / "b"))
    assert code == 2 and "does not exist" in err and not (tmp_path / "b").exists()


def test_plan_depth_needs_a_goal_and_readable_calibration(tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan", "depth", *TINY, "-o", str(tmp_path / "p.json"))
    assert code == 2 and "--speedup" in err
    code, _, err = run_cli(capsys, "plan", "depth", *TINY, "--speedup", "1.5", "--calib", str(tmp_path / "none.npy"),
                           "-o", str(tmp_path / "p.json"))
    assert code == 2 and "--calib" in err and "does not exist" in err
    assert not (tmp_path / "p.json").exists()
