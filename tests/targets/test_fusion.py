"""What TVM's fusion makes of a model (kernels, intermediate tensors, unfused epilogues), and the
CUDA library offload's partitioning."""

import importlib
import shutil

import pytest
import torch
from torch import nn

import fxopt
from fxopt import examples
from fxopt.errors import TargetError
from fxopt.targets import Target, get_target, tvm_backend
from fxopt.targets.tvm_backend import fusion, offload
from fxopt.testing import randomize_norm_stats


class Block(nn.Module):
    """conv-BN-ReLU, depthwise conv-BN-ReLU6 with a residual add, linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.a(x)
        return self.head((self.b(y) + y).mean((2, 3)))


def _summary(model, x, pipeline="default"):
    optimized = fxopt.optimize(randomize_norm_stats(model).eval(), (x,), pipeline, verify="off")
    return tvm_backend.fusion_summary(tvm_backend.lower(optimized.module, (x,)))


def test_each_conv_kernel_carries_its_epilogue():
    summary = _summary(Block(), torch.randn(1, 8, 8, 8))
    ops = [k.ops for k in summary.kernels]
    convs = [k for k in summary.kernels if k.anchored]
    assert len(convs) == 3, ops  # two convs and the linear's matmul
    assert any({"add", "relu"} <= {fusion._op_name(op) for op in k.ops} for k in convs), ops
    residual = [k for k in convs if sum(fusion._op_name(op) == "add" for op in k.ops) >= 2]
    assert residual, f"the residual add did not fuse into the depthwise conv: {ops}"
    assert summary.unfused_epilogues() == []
    assert summary.intermediate_tensors == len(summary.kernels) - 1


class Siblings(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, c, 3, padding=1) for c in (4, 6, 8))

    def forward(self, x):
        return torch.cat([torch.relu(conv(x)) for conv in self.convs], 1)


def test_fxopt_fusions_remove_kernels_tvm_cannot():
    """Three sibling convs and their concat are four kernels for TVM; fuse_siblings makes one."""
    x = torch.randn(1, 8, 8, 8)
    before = _summary(Siblings(), x, ["canonicalize"])
    after = _summary(Siblings(), x)
    assert len([k for k in before.kernels if k.anchored]) == 3
    assert len([k for k in after.kernels if k.anchored]) == 1
    assert after.intermediate_tensors < before.intermediate_tensors


def test_unfused_epilogue_is_reported():
    """A summary where an add reads a conv kernel's output from another kernel says so."""
    summary = fusion.FusionSummary([fusion.Kernel("fused_conv2d_add", ["conv2d", "add"]),
                                    fusion.Kernel("add1", ["add1"], [0]),
                                    fusion.Kernel("transpose", ["transpose"], [1])], 2)
    assert summary.unfused_epilogues() == [("fused_conv2d_add", "add1")]
    assert summary.to_json()["unfused_epilogues"] == ["fused_conv2d_add -> add1"]


def test_compile_reports_kernels():
    compiled = fxopt.compile(examples.small_cnn(), (torch.randn(1, 3, 32, 32),))
    build = compiled.report.build
    assert build["kernels"] >= 3 and build["intermediate_tensors"] == build["kernels"] - 1
    assert "unfused_epilogues" not in build  # only shown when there are some
    assert f"kernels={build['kernels']}" in compiled.report.to_text()


def test_fusion_summary_is_for_cpu_targets():
    mod = tvm_backend.lower(Block().eval(), (torch.randn(1, 8, 8, 8),))
    with pytest.raises(TargetError, match="not a CPU target"):
        tvm_backend.fusion_summary(mod, "cuda")


ZOO = [("mobilenetv2", "mobilenetv2_w1"), ("shufflenetv2", "shufflenetv2_w1"), ("ghostnet", "ghostnet"),
       ("mobilenetv3", "mobilenetv3_large_w1"), ("mobilenetv3", "mobilenetv3_small_w1"),
       ("mnasnet", "mnasnet_b1"), ("proxylessnas", "proxylessnas_mobile"), ("squeezenet", "squeezenet_v1_1"),
       ("shufflenet", "shufflenet_g3_w1"), ("resnet", "resnet18")]


def _pytorchcv(module, name):
    return getattr(importlib.import_module(f"pytorchcv.models.{module}"), name)().eval()


@pytest.mark.parametrize("module,name", [pytest.param(m, n, marks=() if n in ("mobilenetv3_small_w1",)
                                                      else pytest.mark.slow) for m, n in ZOO])
def test_zoo_every_conv_epilogue_fuses(module, name):
    """Every conv/linear of the zoo has its bias, BN, activation and residual add in its own
    kernel after fxopt's default pipeline and TVM's fusion."""
    summary = _summary(_pytorchcv(module, name), torch.randn(1, 3, 224, 224))
    assert summary.unfused_epilogues() == []
    assert not [k.name for k in summary.kernels if k.elementwise and any(
        summary.kernels[i].anchored for i in k.inputs)]


# --------------------------------------------------------------------------------------------
# CUDA offload (compile-only here: this apache-tvm wheel has no cuBLAS/cuDNN code generators)


def test_offload_partitions_convs_and_matmuls():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    mod = tvm_backend.lower(net, (torch.randn(1, 3, 8, 8),))
    _, taken = offload.partition(mod, ("cublas", "cudnn"))
    assert taken == {"cublas": 1, "cudnn": 1}
    _, taken = offload.partition(mod, ("cudnn",))
    assert taken == {"cudnn": 1}


@pytest.mark.skipif(not offload.missing_codegens(("cublas", "cudnn")), reason="this TVM has the code generators")
def test_offload_build_without_the_code_generator_says_what_to_do():
    mod = tvm_backend.lower(nn.Linear(4, 4).eval(), (torch.randn(2, 4),))
    with pytest.raises(TargetError, match=r"offloads to cuBLAS, cuDNN.*USE_CUBLAS=ON USE_CUDNN=ON"):
        tvm_backend.build(mod, "cuda-offload")


@pytest.mark.device
@pytest.mark.skipif(shutil.which("nvidia-smi") is None or bool(offload.missing_codegens(("cublas",))),
                    reason="needs a GPU and a TVM built with cuBLAS")
def test_offloaded_build_matches_eager_on_a_gpu():
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 10)).eval()
    compiled = fxopt.compile(net, (torch.randn(2, 3, 4, 4),), target="cuda-offload")
    assert compiled.report.build["check"]["ok"]


def test_offload_is_target_data():
    cuda = get_target("cuda")
    assert get_target("cuda-offload").offload == ("cublas", "cudnn")
    assert Target.from_json(get_target("cuda-offload").to_json()).offload == ("cublas", "cudnn")
    with pytest.raises(TargetError, match="offload must list libraries among cublas, cudnn, cutlass"):
        cuda.derive("x", "x", offload=("mkl",))
    with pytest.raises(TargetError, match="is for CUDA targets; this one is llvm"):
        get_target("host").derive("y", "y", offload=("cublas",))


# --------------------------------------------------------------------------------------------
# Channel moves stay in NHWC between the CPU pipeline's NHWC convs


class ShuffleUnits(nn.Module):
    """Two ShuffleNetV2 units: concat -> channel shuffle -> split, the halves read by a conv
    and by the next unit's concat; and a gather (index_select) read by a conv."""

    def __init__(self, channels=24):
        super().__init__()
        half = channels // 2
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU(),
                                                    nn.Conv2d(half, half, 3, padding=1, groups=half))
                                      for _ in range(2))
        self.register_buffer("order", torch.randperm(channels))
        self.head = nn.Conv2d(channels, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.branches:
            keep, work = x.chunk(2, 1)
            x = torch.cat([keep, branch(work)], 1)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(torch.relu(x).index_select(1, self.order))


def _transpose_kernels(summary):
    return [k.name for k in summary.kernels if all(fusion._op_name(op) == "transpose" for op in k.ops)]


def test_shuffle_units_stay_in_nhwc_and_match_eager():
    model, x = randomize_norm_stats(ShuffleUnits()).eval(), torch.randn(1, 3, 10, 10)
    compiled = fxopt.compile(model, (x,), "host")  # checks the build against eager
    summary = _summary(ShuffleUnits(), x)
    # the model's input to NHWC and its output back: nothing in between
    assert len(_transpose_kernels(summary)) == 2, [k.ops for k in summary.kernels]
    assert any("stack" in op for k in summary.kernels for op in k.ops)  # shuffle of a concat: a stack
    assert compiled.report.build["check"]["ok"]


@pytest.mark.cross
@pytest.mark.parametrize("target_name", ["arm64", "riscv64-rvv"])
def test_shuffle_units_cross_builds_match_eager(target_name):
    model = randomize_norm_stats(ShuffleUnits()).eval()
    compiled = fxopt.compile(model, (torch.randn(1, 3, 10, 10),), target_name)
    assert compiled.report.build["check"]["ok"]
