"""fxopt's sparse kernels (targets/tvm_backend/sparse.py): compiled exact against eager PyTorch on
the host for every block shape, both kernel forms and awkward sizes; left alone by the CPU schedule
rules; a sparse model compiled through fxopt.compile and exported (its manifest says the pattern
is a snapshot); in the cross tier, the same under qemu for riscv64 and riscv64-rvv (and arm64)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import sparse_ops as so
from fxopt import spec
from fxopt.targets import get_target
from fxopt.targets import tvm_backend as tb
from fxopt.targets.tvm_backend import cpu_schedules as cs
from fxopt.targets.tvm_backend import sparse

SPARSE = {"name": "lower_sparse_weights", "decide": "density"}


def sparse_weight(out_features, in_features, density, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=generator)
    w[torch.rand(out_features, in_features, generator=generator) >= density] = 0
    return w


@pytest.fixture(params=["unrolled", "indexed"])
def form(request, monkeypatch):
    """Both kernel forms: everything unrolled, or nothing."""
    monkeypatch.setattr(sparse, "UNROLL_LIMIT", 10**6 if request.param == "unrolled" else 0)
    return request.param


def assert_built_exact(module, x, target="host"):
    lib = tb.build(tb.lower(module, (x,)), target)
    got = torch.from_numpy(lib.run(x)[0])
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    return lib


# Sizes: channels that are not multiples of the block (partial last block row / column), pixel
# counts above and below a tile (a moved-back last tile; narrower tiles), one pixel (a GEMV),
# two images.
CASES = {
    "conv-9x9-n2": (lambda blk: so.SparseConv1x1(sparse_weight(26, 30, 0.2), torch.randn(26), blk), (2, 30, 9, 9)),
    "conv-3x3-nobias": (lambda blk: so.SparseConv1x1(sparse_weight(37, 33, 0.3), None, blk), (1, 33, 3, 3)),
    "conv-1x1-pixel": (lambda blk: so.SparseConv1x1(sparse_weight(24, 32, 0.2), torch.randn(24), blk), (1, 32, 1, 1)),
    "linear-batch3": (lambda blk: so.SparseLinear(sparse_weight(26, 30, 0.2), torch.randn(26), blk), (3, 30)),
    "linear-3d": (lambda blk: so.SparseLinear(sparse_weight(16, 12, 0.3), None, blk), (2, 5, 12)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block", so.BLOCK_SHAPES, ids=lambda b: f"{b[0]}x{b[1]}")
def test_kernels_match_eager_on_the_host(case, block, form):
    make, shape = CASES[case]
    assert_built_exact(make(block).eval(), torch.randn(*shape))


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.3, 0.5])
def test_densities_on_a_larger_map(density):
    """48 -> 40 channels on 30x30 pixels: several pixel chunks and tasks."""
    layer = so.SparseConv1x1(sparse_weight(40, 48, density, seed=7), torch.randn(40), (1, 1)).eval()
    assert_built_exact(layer, torch.randn(1, 48, 30, 30))


@settings(max_examples=8, deadline=None)
@given(cin=st.integers(1, 40), cout=st.integers(1, 40), hw=st.integers(1, 12), n=st.integers(1, 2),
       density=st.floats(0.01, 0.6), block=st.sampled_from(so.BLOCK_SHAPES), bias=st.booleans(),
       unrolled=st.booleans(), seed=st.integers(0, 100))
def test_random_layers_match_eager(cin, cout, hw, n, density, block, bias, unrolled, seed):
    """Random sizes, densities, blocks and forms: the build equals eager PyTorch."""
    weight = sparse_weight(cout, cin, density, seed)
    layer = so.SparseConv1x1(weight, torch.randn(cout) if bias else None, block).eval()
    limit = sparse.UNROLL_LIMIT
    sparse.UNROLL_LIMIT = 10**6 if unrolled else 0
    try:
        assert_built_exact(layer, torch.randn(n, cin, hw, hw))
    finally:
        sparse.UNROLL_LIMIT = limit


def test_all_zero_weight_builds_the_bias():
    layer = so.SparseConv1x1(torch.zeros(6, 4), torch.arange(6.0)).eval()
    assert_built_exact(layer, torch.randn(1, 4, 5, 5))


def test_kernels_are_opaque_scheduled_and_left_alone_by_the_rules():
    """call_tir of a per-layer PrimFunc marked scheduled (the CPU rules skip it), opaque (FuseOps
    keeps it apart), with the pattern's form in fxopt.sparse; indices baked in when unrolled."""
    import tvm

    model = nn.Sequential(so.SparseConv1x1(sparse_weight(8, 8, 0.3), torch.randn(8), (1, 1)), nn.ReLU(),
                          so.SparseConv1x1(sparse_weight(8, 8, 0.3, seed=1), None, (4, 1))).eval()
    mod = tb.lower(model, (torch.randn(1, 8, 6, 6),))
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert len(funcs) == 2
    for func in funcs.values():
        assert bool(func.attrs[cs.SCHEDULED_ATTR]) and int(func.attrs["op_pattern"]) == 8
        assert str(func.attrs[sparse.SPARSE_ATTR]).startswith("unrolled")
        assert "cols" not in [p.name for p in func.params]  # no index arrays: constants in the code
    target = get_target("host")
    tvm_target = tvm.target.Target(tb.resolve_target(target))
    params = tb.schedule_params(target)
    with tvm_target:
        scheduled = cs.default_schedule_pass(params)(cs.fused_module(mod, tvm_target, params))
    kernels = {gv.name_hint: f for gv, f in scheduled.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and sparse.SPARSE_ATTR in (f.attrs or {})}
    assert len(kernels) == 2 and all(cs.SCHEDULE_ATTR not in f.attrs for f in kernels.values())


def test_indexed_form_reads_constant_index_arrays(monkeypatch):
    monkeypatch.setattr(sparse, "UNROLL_LIMIT", 0)
    layer = so.SparseConv1x1(sparse_weight(8, 8, 0.3), torch.randn(8)).eval()
    mod = tb.lower(layer, (torch.randn(1, 8, 4, 4),))
    (func,) = [f for _, f in mod.functions_items() if sparse.SPARSE_ATTR in (getattr(f, "attrs", None) or {})]
    assert str(func.attrs[sparse.SPARSE_ATTR]).startswith("indexed")
    assert [p.name for p in func.params][-3:-1] == ["cols", "row_ptr"]


class Net(nn.Module):
    """NHWC neighbours around the sparse ops: stem 3x3 -> sparse 1x1 -> depthwise -> sparse 1x1
    (residual add) -> pool -> sparse linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pw1 = nn.Conv2d(16, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw2 = nn.Conv2d(32, 16, 1, bias=False)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            for i, layer in enumerate((self.pw1, self.pw2, self.fc)):
                layer.weight.copy_(sparse_weight(layer.weight.shape[0], layer.weight.shape[1], 0.15, seed=i)
                                   .reshape(layer.weight.shape))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = F.relu6(self.dw(torch.relu(self.pw1(x))))
        x = x + self.pw2(y)
        return self.fc(x.mean((2, 3)))


def sparse_pipeline():
    return spec.resolve("default").spec() + [SPARSE]


def test_compile_and_export_a_sparse_model(tmp_path):
    """Layout conversion (NHWC convs around NCHW sparse kernels) stays exact; the manifest lists
    the sparse layers and says their pattern is a compile-time snapshot."""
    model = Net().eval()
    x = torch.randn(1, 3, 12, 12)
    compiled = fxopt.compile(model, (x,), "host", pipeline=sparse_pipeline())
    assert compiled.report.build["check"]["ok"]
    assert sum(isinstance(m, so._SparseWeights) for m in compiled.module.modules()) == 3
    path = compiled.export(tmp_path / "build")
    manifest = json.loads((path / "manifest.json").read_text())
    layers = manifest["sparse_layers"]["layers"]
    assert [(layer["name"], layer["kind"]) for layer in layers] == [("pw1", "conv1x1"), ("pw2", "conv1x1"), ("fc", "linear")]
    assert "snapshot" in manifest["sparse_layers"]["note"]
    assert fxopt.load(path).check().ok


@pytest.mark.cross
@pytest.mark.parametrize("target_name", ["riscv64", "riscv64-rvv", "arm64"])
def test_cross_builds_match_eager_under_qemu(target_name, form):
    """fxopt.compile runs the cross build under qemu-user and compares it with eager PyTorch."""
    compiled = fxopt.compile(Net().eval(), (torch.randn(1, 3, 10, 10),), target_name, pipeline=sparse_pipeline())
    check = compiled.report.build["check"]
    assert check["ok"] and "qemu" in check["ran"], check
    assert sum(isinstance(m, so._SparseWeights) for m in compiled.module.modules()) == 3


@pytest.mark.cross
@pytest.mark.parametrize("target_name", ["riscv64", "riscv64-rvv"])
@pytest.mark.parametrize("block", so.BLOCK_SHAPES, ids=lambda b: f"{b[0]}x{b[1]}")
def test_cross_block_shapes_under_qemu(target_name, block):
    model = nn.Sequential(so.SparseConv1x1(sparse_weight(20, 24, 0.2), torch.randn(20), block), nn.ReLU(),
                          so.SparseConv1x1(sparse_weight(12, 20, 0.1, seed=3), None, block)).eval()
    compiled = fxopt.compile(model, (torch.randn(2, 24, 7, 7),), target_name, pipeline="none")
    assert compiled.report.build["check"]["ok"]
