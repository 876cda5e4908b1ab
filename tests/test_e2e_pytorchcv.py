"""End to end on real compact CNNs: optimize, compile for host with TVM, run, compare with eager."""

import importlib

import pytest
import torch

import fxopt
from fxopt.cli import main
from fxopt.testing import randomize_norm_stats

MODELS = [
    ("pytorchcv.models.shufflenetv2", "shufflenetv2_w1"),
    ("pytorchcv.models.ghostnet", "ghostnet"),
    ("pytorchcv.models.resnet", "resnet18"),
]


@pytest.mark.parametrize("module, factory", MODELS, ids=[m[1] for m in MODELS])
def test_compile_matches_eager(module, factory):
    model = randomize_norm_stats(getattr(importlib.import_module(module), factory)(), seed=3).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    compiled = fxopt.compile(model, (x,), target="host")
    assert sum(row.stats.get("conv_bn", 0) for row in compiled.report.passes if row.name == "fold_bn") > 10
    expected = model(x)
    other = torch.randn(1, 3, 224, 224)
    for inputs, reference in ((x, expected), (other, model(other))):
        torch.testing.assert_close(compiled.run(inputs), reference, rtol=1e-4,
                                   atol=1e-4 * reference.abs().max().item())


def test_cli_builds_and_checks_mobilenetv2(tmp_path, capsys):
    """The acceptance command: fxopt build pytorchcv...mobilenetv2_w1 ... && fxopt check."""
    out_dir = tmp_path / "x"
    assert main(["build", "pytorchcv.models.mobilenetv2:mobilenetv2_w1", "--input-shape", "1x3x224x224",
                 "-o", str(out_dir)]) == 0
    assert "conv_bn=53" in capsys.readouterr().out
    assert main(["check", str(out_dir)]) == 0


def test_mixnet_s_needs_torch_export_and_matches_eager():
    """torch.fx cannot trace MixNet's mixed-kernel convs (a list comprehension over torch.split of a
    Proxy): auto capture falls back to torch.export and the raised graph optimizes and compiles."""
    from pytorchcv.models.mixnet import mixnet_s

    model = randomize_norm_stats(mixnet_s(), seed=3).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    compiled = fxopt.compile(model, (x,), target="host")
    report = compiled.report
    assert report.capture == "export" and "Proxy object cannot be iterated at mixnet.py" in report.capture_note
    folded = sum(row.stats.get("conv_bn", 0) for row in report.passes if row.name == "fold_bn")
    assert folded >= 15  # every conv -> BN pair; BNs after a cat of mixed kernels need the other folds
    other = torch.randn(1, 3, 224, 224)
    for inputs, reference in ((x, model(x)), (other, model(other))):
        torch.testing.assert_close(compiled.run(inputs), reference, rtol=1e-4,
                                   atol=1e-4 * reference.abs().max().item())
