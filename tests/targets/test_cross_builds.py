"""The cross tier: models built for arm64, riscv64 and riscv64-rvv, run under qemu-user with the
shipped runner, compared with eager PyTorch."""

import json
import subprocess

import pytest
import torch

import fxopt
from fxopt.errors import ArtifactError, TargetError
from fxopt.targets import runners
from fxopt.testing import randomize_norm_stats

from cross_models import Residual, conv_bn_relu, depthwise_separable

pytestmark = pytest.mark.cross


def mobilenetv2_wd4():
    from pytorchcv.models.mobilenetv2 import mobilenetv2_wd4 as factory

    return factory()


ZOO = {"conv_bn_relu": (conv_bn_relu, 32), "depthwise_separable": (depthwise_separable, 32),
       "residual": (Residual, 24), "mobilenetv2_wd4": (mobilenetv2_wd4, 224)}
TARGETS = ["arm64", "riscv64", "riscv64-rvv"]


def prepared(name):
    factory, size = ZOO[name]
    torch.manual_seed(0)
    return randomize_norm_stats(factory(), 0).eval(), torch.randn(1, 3, size, size)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_builds_run_under_qemu_and_match_eager(tmp_path, name, target):
    model, x = prepared(name)
    compiled = fxopt.compile(model, (x,), target=target)
    check = compiled.report.build["check"]
    assert check["ok"] and check["ran"].startswith("qemu-") and check["max_rel_error"] < 1e-4
    path = compiled.export(tmp_path / f"{name}-{target}")
    assert {"model.so", "fxopt-run", "README.txt"} <= set(json.loads((path / "manifest.json").read_text())["files"])
    loaded = fxopt.load(path)
    comparison = loaded.check()
    assert comparison.ok, comparison.detail
    assert loaded.runs_with().startswith("qemu-")


def test_compiled_run_goes_through_qemu():
    model, x = prepared("residual")
    compiled = fxopt.compile(model, (x,), target="arm64", verify="off")
    other = torch.randn(1, 3, 24, 24)
    expected = model(other)
    torch.testing.assert_close(compiled.run(other), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.fixture(scope="module")
def rvv_build(tmp_path_factory):
    model, x = prepared("depthwise_separable")
    return fxopt.compile(model, (x,), target="riscv64-rvv").export(tmp_path_factory.mktemp("rvv") / "build")


def test_rvv_build_needs_the_vector_extension(rvv_build):
    """Without v=true qemu's CPU lacks RVV: the build must fail, which proves vector code is in it."""
    command = [*runners.command_prefix(fxopt.load(rvv_build).target)[:3], str(rvv_build / "fxopt-run"),
               str(rvv_build / "model.so"), "--check", str(rvv_build)]
    assert "-cpu" not in command
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0


def test_build_copied_to_the_wrong_architecture(rvv_build, tmp_path):
    """The host runner refuses a riscv64 model with a plain message."""
    host = fxopt.compile(prepared("conv_bn_relu")[0], (torch.randn(1, 3, 32, 32),), target="host",
                         verify="off").export(tmp_path / "host")
    result = subprocess.run([str(host / "fxopt-run"), str(rvv_build / "model.so"), "--check", str(rvv_build)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "riscv64" in result.stderr and "x86_64" in result.stderr


def test_host_runner_checks_a_host_build(tmp_path):
    model, x = prepared("residual")
    path = fxopt.compile(model, (x,), target="host").export(tmp_path / "host")
    result = subprocess.run([str(path / "fxopt-run"), str(path / "model.so"), "--check", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check: ok" in result.stdout


def test_missing_cross_toolchain_names_the_package(tmp_path):
    board = tmp_path / "board.toml"
    board.write_text('base = "arm64"\nname = "odd-board"\ntoolchain = "nonexistent-linux-gnu-"\n')
    model, x = prepared("conv_bn_relu")
    with pytest.raises(TargetError, match="apt-get install g\\+\\+-nonexistent-linux-gnu"):
        fxopt.compile(model, (x,), target=str(board)).export(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupted_library_is_refused_before_running(tmp_path):
    model, x = prepared("conv_bn_relu")
    path = fxopt.compile(model, (x,), target="riscv64", verify="off").export(tmp_path / "rv")
    with open(path / "model.so", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        fxopt.load(path)


def test_board_build_is_checked_with_its_own_target(tmp_path):
    board = tmp_path / "k1.toml"
    board.write_text('base = "spacemit-x60"\nname = "my-k1"\ncores = 4\n')
    model, x = prepared("conv_bn_relu")
    path = fxopt.compile(model, (x,), target=str(board)).export(tmp_path / "k1")
    loaded = fxopt.load(path)
    assert loaded.target.name == "my-k1" and loaded.target.base == "spacemit-x60" and "vlen=256" in loaded.runs_with()
    assert loaded.check().ok


def test_cli_builds_and_checks_a_riscv_vector_build(tmp_path, capsys):
    from fxopt.cli import main

    out = tmp_path / "rvv"
    assert main(["build", "fxopt.examples:small_cnn", "--input-shape", "1x3x32x32", "--target", "riscv64-rvv",
                 "-o", str(out)]) == 0
    assert "build check vs eager, run qemu-riscv64 -L /usr/riscv64-linux-gnu -cpu rv64,v=true" in capsys.readouterr().out
    assert main(["check", str(out)]) == 0
    assert "run qemu-riscv64" in capsys.readouterr().out
    assert "./fxopt-run model.so --check ." in (out / "README.txt").read_text()
