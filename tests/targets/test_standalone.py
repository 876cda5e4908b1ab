"""The standalone runtime (targets/standalone.py, targets/tvm_backend/standalone.py): models as
plain C with TVM's kernels and no TVM runtime, as static Linux executables (host here; riscv64
and arm64 under qemu-user) and bare-metal RISC-V microcontroller firmware (qemu-system-riscv32),
compared with eager PyTorch."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxopt
from fxopt import cli
from fxopt.errors import BuildError, InputError, TargetError, UnsupportedOpError
from fxopt.examples import sensor_cnn
from fxopt.targets import get_target, standalone
from fxopt.targets import tvm_backend as tb
from fxopt.targets.boards import load_board
from fxopt.testing import randomize_norm_stats

from cross_models import Residual, conv_bn_relu, depthwise_separable


class TwoInTwoOut(nn.Module):
    """Two inputs, three outputs: a tuple with a reshaped view and an input passed through."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(5, 2)

    def forward(self, x, z):
        y = torch.relu(self.bn(self.conv(x)))
        return y.flatten(1), (self.fc(z), z)


# the test zoo's small models (tests/targets/test_cross_builds.py), a few tens of KB of weights
ZOO = {"conv_bn_relu": (conv_bn_relu, 16), "depthwise_separable": (depthwise_separable, 16),
       "residual": (Residual, 12)}


def prepared(name):
    factory, size = ZOO[name]
    torch.manual_seed(0)
    return randomize_norm_stats(factory(), 0).eval(), torch.randn(1, 3, size, size)


def assert_matches(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(torch.as_tensor(actual), expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def interpreter(elf: Path) -> bool:
    """True when the ELF file asks for a dynamic loader (a PT_INTERP program header)."""
    readelf = shutil.which("readelf")
    assert readelf, "binutils' readelf is needed"
    return "INTERP" in subprocess.run([readelf, "-l", str(elf)], capture_output=True, text=True).stdout


# --------------------------------------------------------------------------------------------
# Default tier: the host's compiler, no emulator


@pytest.fixture(scope="module")
def host_build(tmp_path_factory):
    model, x = prepared("residual")
    compiled = fxopt.compile(model, (x,), target="host", runtime="standalone")
    return model, x, compiled, compiled.export(tmp_path_factory.mktemp("standalone") / "host")


def test_host_standalone_matches_eager_and_is_a_static_executable(host_build):
    model, x, compiled, path = host_build
    check = compiled.report.build["check"]
    assert check["ok"] and check["ran"] == "natively" and check["max_rel_error"] < 1e-4
    other = torch.randn(1, 3, 12, 12)
    assert_matches(compiled.run(other), model(other))
    files = set(json.loads((path / "manifest.json").read_text())["files"])
    assert {"libfxopt_model.a", "fxopt_model.h", "fxopt_model.c", "fxopt_runtime.c", "fxopt_kernels.o",
            "fxopt_model_constants.bin", "main.c", "Makefile", "model.elf", "README.txt"} <= files
    assert "fxopt-run" not in files and "model.so" not in files
    assert not interpreter(path / "model.elf")  # static: no dlopen, no loader
    symbols = subprocess.run(["nm", str(path / "model.elf")], capture_output=True, text=True).stdout
    assert "__tvm_ffi_" in symbols and "TVMFFIFunctionCall" not in symbols and "VirtualMachine" not in symbols
    loaded = fxopt.load(path)
    assert loaded.check().ok and loaded.runs_with() == "model.elf"
    assert_matches(loaded.run(other), model(other))


def test_figures_are_reported_and_consistent(host_build):
    _, x, compiled, path = host_build
    sizes = compiled.report.build["standalone"]
    assert sizes["constants_bytes"] >= sum(p.numel() * 4 for p in compiled.module.parameters()) > 0
    assert sizes["constants_bytes"] == (path / "fxopt_model_constants.bin").stat().st_size
    assert sizes["flash_bytes"] == sizes["code_bytes"] + sizes["constants_bytes"] and sizes["code_bytes"] > 0
    # the workspace of a call shares the arena with tensors that are not alive during it
    assert max(sizes["storage_bytes"], sizes["workspace_bytes"]) <= sizes["arena_bytes"]
    assert sizes["arena_bytes"] <= sizes["storage_bytes"] + sizes["workspace_bytes"]
    assert sizes["storage_bytes"] <= sizes["storage_bytes_unplanned"]
    assert 0 < sizes["stack_bytes"] < 16384  # measured by painting the stack, below the probe's size
    # the workspace the kernels took at run time stays within what the TIR said (the shim refuses more)
    assert 0 < compiled.library.last_run["workspace_bytes"] <= sizes["workspace_bytes"]
    assert sizes["ram_bytes"] == sizes["arena_bytes"] + sizes["static_ram_bytes"] + sizes["stack_bytes"]
    header = (path / "fxopt_model.h").read_text()
    assert f"#define FXOPT_MODEL_ARENA_BYTES {sizes['arena_bytes']}u" in header
    assert f"#define FXOPT_MODEL_INPUT0_BYTES {x.numel() * 4}u" in header


def test_several_inputs_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = randomize_norm_stats(TwoInTwoOut(), 0).eval()
    x, z = torch.randn(1, 3, 6, 6), torch.randn(3, 5)
    compiled = fxopt.compile(model, (x, z), target="host", runtime="standalone")
    assert compiled.report.build["check"]["ok"]
    x2, z2 = torch.randn(1, 3, 6, 6), torch.randn(3, 5)
    flat, (fc, passed) = compiled.run(x2, z2)
    expected_flat, (expected_fc, _) = model(x2, z2)
    assert_matches(flat, expected_flat)
    assert_matches(fc, expected_fc)
    assert torch.equal(passed, z2)  # an input returned as it is: copied through
    header = (compiled.export(tmp_path / "b") / "fxopt_model.h").read_text()
    assert "#define FXOPT_MODEL_NUM_INPUTS 2" in header and "#define FXOPT_MODEL_NUM_OUTPUTS 3" in header


def test_misaligned_input_is_refused_with_a_message(host_build, tmp_path):
    """The C entry point checks its inputs' alignment and says which one is wrong."""
    _, _, _, path = host_build
    work = tmp_path / "c"
    shutil.copytree(path, work)
    (work / "bad.c").write_text(
        '#include <stdio.h>\n#include <stdint.h>\n#include "fxopt_model.h"\n'
        "static uint8_t in[FXOPT_MODEL_INPUT0_BYTES + 64] __attribute__((aligned(64)));\n"
        "static uint8_t out[FXOPT_MODEL_OUTPUT0_BYTES];\n"
        "int main(void) { const void* i[] = {in + 4}; void* o[] = {out};\n"
        '  int s = fxopt_model_run(i, o); printf("%d %s\\n", s, fxopt_model_last_error()); return 0; }\n')
    subprocess.run(["gcc", "-O1", "-o", str(work / "bad"), str(work / "bad.c"), str(work / "libfxopt_model.a"), "-lm"],
                   check=True, capture_output=True)
    said = subprocess.run([str(work / "bad")], capture_output=True, text=True).stdout
    assert said.strip() == "-1 input 0 is not 64-byte aligned (the kernels assume it)"


def test_arena_planning_shares_bytes_of_storages_that_are_not_alive_together():
    from fxopt.targets.tvm_backend.standalone import _Emitter, _Storage

    em = _Emitter(None)
    em.storages = [_Storage(1000, 1, 3), _Storage(500, 2, 5), _Storage(1000, 4, 6), _Storage(64, 1, 6)]
    peak = em.plan()
    a, b, c, d = em.storages
    assert c.offset == a.offset  # a is dead when c is allocated
    assert peak == 1024 + 512 + 64 and peak < sum((s.nbytes + 63) // 64 * 64 for s in em.storages)
    for s in em.storages:  # no two storages alive together overlap
        for t in em.storages:
            if s is not t and s.first <= t.last and t.first <= s.last:
                assert s.offset + s.nbytes <= t.offset or t.offset + t.nbytes <= s.offset


def test_limits_exceeded_fail_with_the_figures(tmp_path):
    board = tmp_path / "tiny.toml"
    board.write_text('base = "riscv32-mcu"\nname = "tiny-mcu"\nflash_bytes = 16384\nram_bytes = 4096\n')
    target = load_board(board)
    sizes = {"flash_bytes": 62352, "code_bytes": 37712, "constants_bytes": 24640, "ram_bytes": 13284,
             "arena_bytes": 12544, "static_ram_bytes": 344, "stack_bytes": 396}
    with pytest.raises(BuildError) as info:
        standalone.check_limits(target, sizes, where=f"board file {board}")
    message = str(info.value)
    assert f"board file {board}" in message and "flash_bytes = 16384" in message and "ram_bytes = 4096" in message
    assert "62352" in message and "13284" in message and "use a board with more memory" in message
    standalone.check_limits(target.derive("big", "big", flash_bytes=65536, ram_bytes=16384), sizes)  # fits


def test_target_and_runtime_errors(tmp_path):
    model, x = prepared("conv_bn_relu")
    with pytest.raises(TargetError, match="no OS for the TVM runtime.*--runtime standalone"):
        fxopt.compile(model, (x,), target="riscv32-mcu", runtime="tvm")
    with pytest.raises(InputError, match="runtime 'vm' is unknown"):
        fxopt.compile(model, (x,), target="host", runtime="vm")
    missing = get_target("riscv32-mcu").derive("other-mcu", "an MCU whose toolchain is not installed",
                                               toolchain="riscv32-nonexistent-elf-")
    with pytest.raises(TargetError, match="riscv32-nonexistent-elf-gcc.*apt-get install gcc-riscv32-nonexistent-elf "
                                          "picolibc-riscv32-nonexistent-elf"):
        standalone.toolchain_for(missing)
    if shutil.which("aarch64-linux-gnu-gcc"):
        other_arch = get_target("riscv32-mcu").derive("mixed-mcu", "rv32 with an AArch64 compiler",
                                                      toolchain="aarch64-linux-gnu-")
        with pytest.raises(TargetError, match="aarch64-linux-gnu-gcc compiles for aarch64-linux-gnu, but target "
                                              "'mixed-mcu' is for riscv32"):
            standalone.toolchain_for(other_arch)
    wrong = get_target("riscv64").derive("rv64-no-cross", "riscv64 without its toolchain", toolchain=None)
    with pytest.raises(TargetError, match="names no cross toolchain"):
        standalone.toolchain_for(wrong)
    with pytest.raises(TargetError, match="runtime 'baremetal' is unknown"):
        get_target("host").derive("x", "x", runtime="baremetal")


def test_missing_emulator_is_named_with_its_package(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(standalone.shutil, "which", lambda name: None if name.startswith("qemu-system") else real_which(name))
    with pytest.raises(TargetError, match="qemu-system-riscv32 is not installed.*apt-get install qemu-system-misc"):
        standalone.command_prefix(get_target("riscv32-mcu"))


def test_dynamic_shapes_and_unknown_builtins_are_declined_by_name(tmp_path):
    import tvm
    from tvm import relax

    from fxopt.targets.tvm_backend.standalone import _Emitter, emit

    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, 4), "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(x)
    with pytest.raises(UnsupportedOpError, match=r"shape \[None, 4\].*static shapes.*--runtime tvm"):
        emit(bb.get(), "host", tmp_path)

    # a lowered main that calls an extern packed function (which needs the TVM runtime)
    ty = relax.TensorType((2, 4), "float32")
    y, v = relax.Var("y", ty), relax.Var("v", ty)
    call = relax.Call(relax.ExternFunc("my.runtime.sort"), [y])
    main = relax.Function([y], relax.SeqExpr([relax.BindingBlock([relax.VarBinding(v, call)])], v), ty)
    with pytest.raises(UnsupportedOpError, match="packed function 'my.runtime.sort' is not supported.*--runtime tvm"):
        _Emitter(main).run()


# --------------------------------------------------------------------------------------------
# Cross tier: riscv32 bare metal (qemu-system-riscv32), riscv64 and arm64 Linux (qemu-user)


@pytest.mark.cross
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_on_riscv32_microcontroller(name):
    model, x = prepared(name)
    compiled = fxopt.compile(model, (x,), target="riscv32-mcu")  # the target's runtime: standalone
    check = compiled.report.build["check"]
    assert check["ok"] and check["ran"] == "qemu-system-riscv32" and check["max_rel_error"] < 1e-4
    sizes = compiled.report.build["standalone"]
    assert sizes["scope"] == "firmware" and sizes["stack_bytes"] > 0 and sizes["flash_bytes"] > sizes["constants_bytes"]


@pytest.fixture(scope="module")
def relax_modules():
    """Each zoo model lowered once, for the Linux targets' builds."""
    modules = {}
    for name in ZOO:
        model, x = prepared(name)
        optimized = fxopt.optimize(model, (x,), target="riscv64")
        modules[name] = (model, x, tb.lower(optimized.module, (x,)))
    return modules


@pytest.mark.cross
@pytest.mark.parametrize("target", ["riscv64", "arm64"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_as_static_linux_executables_under_qemu_user(relax_modules, name, target):
    model, x, mod = relax_modules[name]
    library = standalone.build(mod, get_target(target), model=name, example_inputs=[x.numpy()])
    assert not interpreter(library.directory / standalone.EXAMPLE)
    (actual,) = library.run(x)
    assert_matches(actual, model(x))


@pytest.mark.cross
def test_cli_builds_a_firmware_library_and_checks_it_under_qemu(tmp_path, capsys):
    out = tmp_path / "har"
    code = cli.main(["build", "fxopt.examples:sensor_cnn", "--input-shape", "1x3x128", "--target", "riscv32-mcu-f",
                     "--runtime", "standalone", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "standalone (firmware): flash" in printed
    assert cli.main(["check", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "run qemu-system-riscv32" in printed and ": match" in printed
    # the shipped Makefile rebuilds the library and the example from the shipped sources
    subprocess.run(["make", "-C", str(out), "clean"], check=True, capture_output=True)
    subprocess.run(["make", "-C", str(out), "-j2"], check=True, capture_output=True)
    model = sensor_cnn()
    x = torch.from_numpy(np.load(out / "input_0.npy"))
    target = get_target("riscv32-mcu-f")
    (actual,), info = standalone.run_example(target, out / "model.elf", [x.numpy()], [{"shape": [1, 6], "dtype": "float32"}])
    assert_matches(actual, model(x))
    assert info["stack_bytes"] > 0


@pytest.mark.cross
def test_board_limits_fail_the_build(tmp_path):
    board = tmp_path / "small.toml"
    board.write_text('base = "riscv32-mcu"\nname = "small-mcu"\nflash_bytes = 32768\nram_bytes = 8192\n')
    with pytest.raises(BuildError, match=r"does not fit target small-mcu: flash: it needs \d+ bytes"):
        fxopt.compile(sensor_cnn(), (torch.randn(1, 3, 128),), target=str(board))
