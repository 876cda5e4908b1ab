"""The TVM adapter (targets/tvm_backend.py): lower, build for host, run, save/load, errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt.errors import ArtifactError, BuildError, InputError, TargetError
from fxopt.targets import Target, get_target, host_arch
from fxopt.targets import tvm_backend as tb


class SmallCNN(nn.Module):
    """conv -> BN -> ReLU -> max-pool -> conv(stride 2) -> BN -> ReLU -> global avg-pool -> linear"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def assert_matches(got: np.ndarray, ref: torch.Tensor) -> None:
    ref = ref.detach()
    scale = float(ref.abs().max())
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = _randomize_bn(SmallCNN())
    x = torch.randn(2, 3, 16, 16)
    lib = tb.build(tb.lower(model, (x,)), "host")
    return model, x, lib


def test_versions():
    v = tb.versions()
    assert set(v) == {"tvm", "tvm_ffi", "llvm"}
    assert v["tvm"].startswith("0.27")
    assert int(v["llvm"]) >= 10


def test_resolve_host_target():
    resolved = tb.resolve_target("host")
    assert resolved["kind"] == "llvm"
    assert resolved["mcpu"] not in ("native", "", None)  # LLVM's name for this CPU
    assert resolved["mtriple"].split("-")[0] == host_arch()
    assert get_target("host").tvm["mcpu"] == "native"  # the registered target is unchanged


def test_resolve_target_rejects_what_tvm_rejects():
    bad = Target(name="bad-kind", description="", tvm={"kind": "no-such-kind"})
    with pytest.raises(TargetError, match="TVM rejects the target dict"):
        tb.resolve_target(bad)
    cross_native = Target(
        name="cross-native", description="", tvm={"kind": "llvm", "mcpu": "native"},
        toolchain="aarch64-linux-gnu-", runner="qemu",
    )
    with pytest.raises(TargetError, match="give the target's triple and CPU explicitly"):
        tb.resolve_target(cross_native)


def test_lowered_module_has_inputs_only_as_parameters():
    model = _randomize_bn(SmallCNN())
    mod = tb.lower(model, (torch.randn(1, 3, 16, 16),))
    assert len(mod["main"].params) == 1  # weights and BN statistics are bound constants


def test_cnn_matches_eager(cnn):
    model, x, lib = cnn
    outputs = lib.run(x)
    assert len(outputs) == 1
    with torch.no_grad():
        ref = model(x)
    assert outputs[0].shape == tuple(ref.shape)
    assert_matches(outputs[0], ref)
    # the BN statistics matter: the model with default statistics gives something else
    with torch.no_grad():
        plain = SmallCNN().eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "bn" not in k},
                              strict=False)
        assert not torch.allclose(plain(x), ref, rtol=1e-2, atol=1e-2)


def test_run_accepts_numpy_and_new_values(cnn):
    model, x, lib = cnn
    y = torch.randn_like(x) * 3
    with torch.no_grad():
        ref = model(y)
    assert_matches(lib.run(y.numpy())[0], ref)


def test_signature(cnn):
    _, _, lib = cnn
    assert lib.signature == {
        "inputs": [{"name": "x", "shape": [2, 3, 16, 16], "dtype": "float32"}],
        "outputs": [{"name": "output0", "shape": [2, 10], "dtype": "float32"}],
    }


def test_save_load_round_trip(cnn, tmp_path, capfd):
    model, x, lib = cnn
    path = lib.save(tmp_path)
    assert path == tmp_path / "model.so" and path.is_file()
    named = lib.save(tmp_path / "sub" / "other.so")
    assert named.is_file()
    loaded = tb.load(path, "host")
    assert loaded.signature == lib.signature
    expected = lib.run(x)
    got = loaded.run(x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    # loading from the build directory finds target.library
    np.testing.assert_array_equal(tb.load(tmp_path, get_target("host")).run(x)[0], expected[0])
    # re-saving a loaded library copies its file
    copy = loaded.save(tmp_path / "copy.so")
    np.testing.assert_array_equal(tb.load(copy, "host").run(x)[0], expected[0])
    err = capfd.readouterr().err
    assert "Scope Saving" not in err and "Scope Loaded" not in err


def test_load_missing_library(tmp_path):
    with pytest.raises(ArtifactError, match="no compiled library"):
        tb.load(tmp_path / "nothing.so", "host")


def test_time(cnn):
    _, x, lib = cnn
    times = lib.time(x, repeat=3, number=2)
    assert len(times) == 3
    assert all(0 < t < 10 for t in times)


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(5, 4)

    def forward(self, image, features):
        pooled = self.conv(image).mean(dim=(2, 3))
        return pooled + self.fc(features), torch.sigmoid(features) * 2


def test_two_inputs_and_tuple_of_two_outputs(tmp_path):
    model = TwoInTwoOut().eval()
    image, features = torch.randn(1, 3, 8, 8), torch.randn(1, 5)
    lib = tb.build(tb.lower(model, (image, features)), "host")
    assert [s["name"] for s in lib.signature["inputs"]] == ["image", "features"]
    with torch.no_grad():
        ref = model(image, features)
    for runner in (lib, tb.load(lib.save(tmp_path), "host")):
        out = runner.run(image, features)
        assert len(out) == 2
        assert_matches(out[0], ref[0])
        assert_matches(out[1], ref[1])


class NestedOutputs(nn.Module):
    def forward(self, x):
        return (x + 1, (x * 2, x.sum())), x - 1


def test_nested_outputs_are_flattened_in_order():
    model = NestedOutputs()
    x = torch.randn(2, 3)
    out = tb.build(tb.lower(model, (x,)), "host").run(x)
    ref = [x + 1, x * 2, x.sum(), x - 1]
    assert len(out) == 4
    for got, want in zip(out, ref):
        assert got.shape == tuple(want.shape)
        assert_matches(got, want)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda x: (x[:, :, :8],), r"input 0 \('x'\): expected shape \(2, 3, 16, 16\), got \(2, 3, 8, 16\)"),
        (lambda x: (x[0],), r"input 0 \('x'\): expected shape \(2, 3, 16, 16\), got \(3, 16, 16\)"),
        (lambda x: (x.double(),), r"input 0 \('x'\): expected dtype float32, got float64"),
        (lambda x: (x.numpy().astype(np.float16),), r"input 0 \('x'\): expected dtype float32, got float16"),
        (lambda x: (), r"takes 1 input\(s\) \(x\(2, 3, 16, 16\) float32\), got 0"),
        (lambda x: (x, x), r"takes 1 input\(s\) \(x\(2, 3, 16, 16\) float32\), got 2"),
        (lambda x: (x.tolist(),), r"input 0 is a list; pass torch tensors or numpy arrays"),
    ],
    ids=["shape", "rank", "dtype", "numpy-dtype", "too-few", "too-many", "not-a-tensor"],
)
def test_wrong_inputs_raise_input_error(cnn, make_args, message):
    _, x, lib = cnn
    with pytest.raises(InputError, match=message):
        lib.run(*make_args(x))
    with pytest.raises(InputError, match=message):
        lib.time(*make_args(x), repeat=1)


def test_wrong_inputs_after_load(cnn, tmp_path):
    _, x, lib = cnn
    loaded = tb.load(lib.save(tmp_path), "host")
    with pytest.raises(InputError, match=r"input 0 \('x'\): expected shape"):
        loaded.run(torch.randn(1, 3, 16, 16))


def test_lower_rejects_non_tensor_inputs():
    with pytest.raises(InputError, match="example input 1 is a int"):
        tb.lower(TwoInTwoOut(), (torch.randn(1, 3, 8, 8), 3))


class UsesErfinv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x).clamp(-0.5, 0.5)
        return torch.erfinv(y) + 1  # not in the Relax frontend's convert map (tvm 0.27)


def test_unsupported_op_names_the_op_and_source_line():
    with pytest.raises(BuildError) as info:
        tb.lower(UsesErfinv().eval(), (torch.randn(1, 3, 4, 4),))
    msg = str(info.value)
    assert "cannot convert op aten.erfinv.default" in msg
    assert "node 'erfinv'" in msg
    assert "test_tvm_backend.py" in msg and "torch.erfinv(y)" in msg
    assert "custom_convert_map" in msg


def test_converter_failure_names_the_node():
    def broken(node, importer):
        raise ValueError("converter exploded")

    with pytest.raises(BuildError) as info:
        tb.lower(
            UsesErfinv().eval(), (torch.randn(1, 3, 4, 4),),
            custom_convert_map={"erfinv.default": broken},
        )
    msg = str(info.value)
    assert "while converting node 'erfinv' (aten.erfinv.default)" in msg
    assert "converter exploded" in msg


def test_export_failure_is_a_build_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x + 1
            return x - 1

    with pytest.raises(BuildError, match="torch.export could not capture DataDependent"):
        tb.lower(DataDependent(), (torch.randn(2, 2),))


def test_build_rejects_non_module():
    with pytest.raises(BuildError, match="expects a Relax IRModule"):
        tb.build("not a module", "host")


def test_build_refuses_unknown_schedule():
    target = Target(name="sched-test", description="", tvm={"kind": "llvm", "mcpu": "native"},
                    schedule="tuned")
    mod = tb.lower(nn.ReLU(), (torch.randn(2),))
    with pytest.raises(TargetError, match="schedule strategy 'tuned'"):
        tb.build(mod, target)


def test_foreign_target_builds_but_does_not_run_here(tmp_path):
    other = "aarch64" if host_arch() != "aarch64" else "x86_64"
    cpu = "cortex-a72" if other == "aarch64" else "x86-64"
    target = Target(
        name="foreign-test", description="", runner="qemu",
        tvm={"kind": "llvm", "mtriple": f"{other}-linux-gnu", "mcpu": cpu},
    )
    x = torch.randn(1, 4)
    lib = tb.build(tb.lower(nn.Linear(4, 2).eval(), (x,)), target)
    with pytest.raises(TargetError, match="does not run on this machine"):
        lib.run(x)
    (tmp_path / "model.so").write_bytes(b"not really")
    with pytest.raises(TargetError, match="cannot be loaded on this machine"):
        tb.load(tmp_path, target)


def test_kernel_times_breakdown(cnn):
    model, x, lib = cnn
    rows = lib.kernel_times(x, runs=2)
    names = [row["kernel"] for row in rows]
    assert any("conv2d" in name for name in names) and any(name.startswith("vm.builtin") for name in names)
    assert all(row["calls"] >= 1 and row["ms"] >= 0 for row in rows)
    assert [row["ms"] for row in rows] == sorted((row["ms"] for row in rows), reverse=True)
    with pytest.raises(InputError, match="runs must be"):
        lib.kernel_times(x, runs=0)
    assert_matches(lib.run(x)[0], model(x))  # the instrumentation hook is removed afterwards
