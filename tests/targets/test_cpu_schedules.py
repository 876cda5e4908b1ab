"""fxopt's default CPU schedules (targets/tvm_backend/cpu_schedules.py): every kernel of the op zoo
gets a rule's schedule, parallel and vectorized, and the builds match eager PyTorch on the host
and, in the cross tier, on arm64 / riscv64 / riscv64-rvv under qemu."""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.errors import TargetError
from fxopt.targets import get_target
from fxopt.targets import tvm_backend as tb
from fxopt.targets.tvm_backend import cpu_schedules as cs
from fxopt.testing import randomize_norm_stats


class OpZoo(nn.Module):
    """Every op shape the rules must handle: dense convs (3x3, strided, dilated, 5x5 on an odd
    size, channel counts that are not multiples of the vector width), depthwise, grouped and
    pointwise convs, BN, ReLU/ReLU6/hard-swish, residual add, max/avg pooling, channel shuffle,
    concatenation, softmax, global pooling and linear heads, one conv without bias at the end."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, 1, 1, groups=24), nn.BatchNorm2d(24), nn.Hardswish())
        self.pw = nn.Conv2d(24, 40, 1, bias=False)
        self.grouped = nn.Conv2d(40, 40, 3, 1, 1, groups=2)
        self.dilated = nn.Conv2d(40, 40, 3, 1, 2, dilation=2)
        self.big = nn.Conv2d(40, 36, 5, 2, 2)
        self.side = nn.Conv2d(40, 12, 1)
        self.head = nn.Conv2d(48, 37, 1, bias=False)
        self.fc = nn.Linear(37, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.dw(self.down(x))
        x = self.pw(x)
        x = x + torch.relu(self.grouped(x))
        x = self.dilated(x)
        n, c, h, w = x.shape
        x = x.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        y = self.big(x)
        z = F.max_pool2d(self.side(x), 3, 2, 1)
        x = torch.cat([y, z], 1)
        x = F.avg_pool2d(x, 2, ceil_mode=True)
        x = self.head(x)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(pooled), torch.softmax(pooled, dim=1)


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    return randomize_norm_stats(OpZoo(), seed=3).eval()


def _scheduled(model, x, target_name):
    target = get_target(target_name)
    tvm_target = __import__("tvm").target.Target(tb.resolve_target(target))
    params = tb.schedule_params(target)
    with tvm_target:
        fused = cs.fused_module(tb.lower(model, (x,)), tvm_target, params)
        return params, cs.default_schedule_pass(params)(fused)


def _prim_funcs(mod):
    import tvm

    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("target_name", ["host", "arm64", "riscv64", "riscv64-rvv"])
def test_every_kernel_gets_a_rule_and_convs_are_parallel_and_vectorized(zoo, target_name):
    params, mod = _scheduled(zoo, torch.randn(1, 3, 33, 33), target_name)
    funcs = _prim_funcs(mod)
    rules = collections.Counter(str(f.attrs[cs.SCHEDULE_ATTR]) for f in funcs.values())
    assert sum(rules.values()) == len(funcs), f"unscheduled kernels: {rules}"
    convs = {name: f for name, f in funcs.items() if "conv2d" in name}
    assert len(convs) >= 8
    for name, func in convs.items():
        assert str(func.attrs[cs.SCHEDULE_ATTR]) == "ConvLike", name
        text = func.script()
        assert "T.parallel" in text and "T.vectorized" in text, name
    assert "Fallback" not in rules, rules
    # ConvLike declines a function with more than one reduction (softmax: max, then sum).
    softmax = [f for name, f in funcs.items() if "softmax" in name]
    assert softmax and all(str(f.attrs[cs.SCHEDULE_ATTR]) != "ConvLike" for f in softmax)
    # Parameters come from capabilities: AVX-512 or 128-bit NEON/RVV lanes, never target names.
    expected_lanes = {"arm64": 4, "riscv64-rvv": 4, "riscv64": 4}.get(target_name)
    if expected_lanes:
        assert params.lanes == expected_lanes


def test_dense_convs_read_prepacked_weights(zoo):
    """Dense convs get a packed [Cout/B, KH, KW, Cin, B] weight, computed at compile time: no
    packing kernel is left in the module, and depthwise/grouped convs keep TOPI's form."""
    _, mod = _scheduled(zoo, torch.randn(1, 3, 33, 33), "host")
    funcs = _prim_funcs(mod)
    assert not [name for name in funcs if "weight_pack" in name]
    packed = [name for name, f in funcs.items() if "conv2d_nhwc_packed" in f.script()]
    grouped = [name for name, f in funcs.items() if "group_conv2d_nhwc" in f.script()]
    assert len(packed) >= 6 and len(grouped) == 2


@pytest.mark.parametrize("size", [33, 40])
def test_host_build_matches_eager(zoo, size):
    x = torch.randn(1, 3, size, size)
    lib = tb.build(tb.lower(zoo, (x,)), "host")
    got = lib.run(x)
    with torch.no_grad():
        expected = zoo(x)
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


def test_tvm_strategy_still_available(zoo):
    """schedule="tvm" is TVM's own CPU pipeline (nothing scheduled): same results, as a baseline."""
    x = torch.randn(1, 3, 17, 17)
    target = get_target("host").derive("host-tvm-schedules", "host with TVM's own CPU pipeline", schedule="tvm")
    got = tb.build(tb.lower(zoo, (x,)), target).run(x)
    with torch.no_grad():
        expected = zoo(x)
    torch.testing.assert_close(torch.from_numpy(got[0]), expected[0], rtol=1e-4, atol=1e-4 * float(expected[0].abs().max()))


def test_unknown_strategy_is_refused():
    target = get_target("host").derive("host-bad", "unknown strategy", schedule="autotvm")
    with pytest.raises(TargetError, match="schedule strategy 'autotvm'.*default, tvm"):
        tb.build(tb.lower(nn.Conv2d(3, 4, 1).eval(), (torch.randn(1, 3, 4, 4),)), target)


@pytest.mark.parametrize(
    "extent, lanes, max_width, expected",
    [
        (64, 16, 32, (16, 2)),  # two whole AVX-512 vectors
        (24, 16, 32, (8, 3)),  # odd vector lengths are scalarized by LLVM: three of 8
        (1000, 16, 448, (8, 25)),  # a batch-1 matmul row: long runs of whole sub-vectors
        (116, 16, 32, (4, 1)),  # ShuffleNet's 116 channels: only 4 divides...
        (3, 4, 8, (1, 3)),
    ],
)
def test_vector_tile(extent, lanes, max_width, expected):
    assert cs._vector_tile(extent, lanes, max_width) == expected


@pytest.mark.parametrize(
    "extent, max_width, expected",
    [
        (116, 32, (16, 2)),  # ...so dense convs pad it to 128: whole registers
        (232, 32, (16, 1)),  # 240: the least padding
        (1000, 448, (16, 21)),  # a batch-1 classifier: 1008 channels in tiles of 336
        (24, 32, (8, 3)),  # padding to 32 would cost a third more work: vectors of 8 instead
        (64, 32, (16, 2)),
    ],
)
def test_partial_tiles_pad_little(extent, max_width, expected):
    assert cs._vector_tile(extent, 16, max_width, allow_partial=True) == expected


def test_padded_channels_are_sliced_off_and_exact():
    """A dense conv with 58 output channels computes 64 (zero weights past 58) and slices."""
    model = nn.Sequential(nn.Conv2d(58, 58, 1), nn.ReLU(), nn.Conv2d(58, 116, 3, padding=1)).eval()
    x = torch.randn(1, 58, 9, 9)
    _, mod = _scheduled(model, x, "host")
    scripts = "".join(f.script() for f in _prim_funcs(mod).values())
    if tb.schedule_params(get_target("host")).lanes > 2:
        assert "channel_slice" in scripts or "T.int64(64)" in scripts
    got = tb.build(tb.lower(model, (x,)), "host").run(x)[0]
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_params_from_capabilities_not_names():
    avx512 = cs.CpuScheduleParams.from_capabilities(512, "x86_64", 2)
    neon = cs.CpuScheduleParams.from_capabilities(128, "aarch64", 4)
    scalar = cs.CpuScheduleParams.from_capabilities(0, "riscv64", None)
    assert (avx512.lanes, avx512.vector_registers) == (16, 32)
    assert (neon.lanes, neon.vector_registers) == (4, 32)
    assert scalar.lanes == 4 and scalar.cores == 1  # no vectors: 4-wide unrolling


@pytest.mark.cross
@pytest.mark.parametrize("target_name", ["arm64", "riscv64", "riscv64-rvv"])
def test_cross_builds_match_eager_under_qemu(zoo, target_name):
    """fxopt.compile checks a cross build under qemu-user against eager and raises on mismatch."""
    compiled = fxopt.compile(zoo, (torch.randn(1, 3, 33, 33),), target=target_name)
    assert compiled.report.build["target"] == target_name
    check = compiled.report.build["check"]
    assert check["ok"] and "qemu" in check["ran"], check


def test_weight_layouts_are_computed_with_numpy_not_compiled_kernels(zoo):
    """ConvertLayout's weight transposes and the bias reshapes are folded in Python: no
    constant-only call is left for FoldConstant to compile (what cost GhostNet 14 s)."""
    import re

    import tvm

    x = torch.randn(1, 3, 17, 17)
    with tvm.target.Target(tb.resolve_target("host")):
        mod = tvm.transform.Sequential(cs.layout_passes())(tb.lower(zoo, (x,)))
    text = mod.script(show_meta=False)
    assert len(re.findall(r"\) = metadata\[", text)) >= 8  # the transposed weights, bound as constants
    assert not re.findall(r"= R\.(permute_dims|reshape)\(metadata", text)
    params = tb.schedule_params(get_target("host"))
    with tvm.target.Target(tb.resolve_target("host")):
        legalized = tvm.relax.transform.LegalizeOps(customize_legalize_map=cs.legalize_map(params))(mod)
    assert not [gv for gv, _ in legalized.functions_items() if "weight_pack" in gv.name_hint]  # packed by numpy


class LayoutTranspose(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("target_name", ["host", "riscv64-rvv"])
def test_layout_transposes_are_tiled(target_name):
    """A transpose whose innermost dim moves is tiled over both innermost dims (up to lanes x
    lanes) and vectorized; an image's 3 channels are too few to tile: the injective rule's."""
    _, mod = _scheduled(LayoutTranspose().eval(), torch.randn(1, 32, 8, 16), target_name)
    funcs = _prim_funcs(mod)
    assert [str(f.attrs[cs.SCHEDULE_ATTR]) for f in funcs.values()] == ["Transpose"]
    assert "T.vectorized" in next(iter(funcs.values())).script()
    _, mod = _scheduled(LayoutTranspose().eval(), torch.randn(1, 3, 8, 8), target_name)
    assert [str(f.attrs[cs.SCHEDULE_ATTR]) for f in _prim_funcs(mod).values()] == ["Injective"]


def test_tiled_transpose_matches_eager():
    x = torch.randn(2, 48, 16, 32)
    compiled = fxopt.compile(LayoutTranspose().eval(), (x,), "host")
    torch.testing.assert_close(torch.as_tensor(compiled.run(x)), LayoutTranspose()(x))


def test_one_dimensional_pools_build_and_match_eager():
    """torch lowers a 1-D pool as expand_dims(x, -2) -> pool2d -> squeeze(-2); TVM's ConvertLayout
    died with std::bad_alloc on the negative axis until the axes were made non-negative first."""
    model = randomize_norm_stats(nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2), nn.AvgPool1d(2),
        nn.Conv1d(8, 8, 3, padding=1), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4)), seed=1).eval()
    x = torch.randn(1, 3, 32)
    compiled = fxopt.compile(model, (x,), target="host")
    other = torch.randn(1, 3, 32)
    torch.testing.assert_close(compiled.run(other), model(other), rtol=1e-4, atol=1e-5)


class SqueezeExcite(nn.Module):
    """An SE gate between NHWC convs: the gate's 1x1 conv fuses with the multiply that broadcasts
    its 1x1 output over the 14x14 map."""

    def __init__(self, c=672, r=28):
        super().__init__()
        self.conv, self.project = nn.Conv2d(8, c, 1), nn.Conv2d(c, 8, 1)
        self.reduce, self.expand = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        s = torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return self.project(x * torch.sigmoid(self.expand(s)))


def test_broadcast_epilogue_is_not_unrolled_and_matches_eager():
    """Found by the pytorchcv corpus (mnasnet_a1): ConvLike unrolled the fused epilogue's loops,
    which for a broadcasting one are the whole 14x14 map (14*14*21 bodies): LLVM took ~40 s per
    kernel (this model: 161 s to build, now a few)."""
    x = torch.randn(1, 8, 14, 14)
    _, mod = _scheduled(SqueezeExcite().eval(), x, "host")
    gates = {name: f for name, f in _prim_funcs(mod).items() if "sigmoid_multiply" in name}
    assert gates and all(str(f.attrs[cs.SCHEDULE_ATTR]) == "ConvLike" for f in gates.values())
    assert not any("T.unroll(T.int64(14))" in f.script() for f in gates.values())
    model = SqueezeExcite().eval()
    compiled = fxopt.compile(model, (x,), target="host")
    other = torch.randn(1, 8, 14, 14)
    reference = model(other)
    torch.testing.assert_close(compiled.run(other), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


class ChannelwiseConv(nn.Module):
    """ChannelNet's channel-wise conv: a Conv3d sliding over the channels of an unsqueezed NCHW
    map, here after an NHWC conv2d."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(16, 16, 1)
        self.conv3d = nn.Conv3d(1, 2, (8, 1, 1), stride=(2, 1, 1), padding=(3, 0, 0), bias=False)

    def forward(self, x):
        y = torch.relu(self.conv2d(x))
        return self.conv3d(y.unsqueeze(1)).reshape(x.shape)


def test_conv3d_after_an_nhwc_conv_keeps_its_layout_and_matches_eager():
    """Found by the pytorchcv corpus (channelnet): ConvertLayout gave the conv3d the layout of
    expand_dims(NHWC) ("NCHWD"), which TVM 0.27 legalizes into wrong results (99% of outputs)."""
    model, x = ChannelwiseConv().eval(), torch.randn(1, 16, 4, 4)
    compiled = fxopt.compile(model, (x,), target="host", pipeline="none")
    other = torch.randn(1, 16, 4, 4)
    reference = model(other)
    torch.testing.assert_close(compiled.run(other), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
