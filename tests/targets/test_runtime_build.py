"""The runtime + runner build (targets/runtime_build.py) and the runner (runtime/fxopt_run.cc).

Runtime builds go to the ordinary cache (~/.cache/fxopt/runtime): the first build per
architecture takes about half a minute to a minute on two cores, later ones (and later runs) reuse
it. Cache mechanics are tested with a stand-in for the compile step, in a temporary cache.
Tests marked ``cross`` need g++-aarch64-linux-gnu, g++-riscv64-linux-gnu and qemu-user
(tests/conftest.py skips them where those are missing, unless FXOPT_REQUIRE_CROSS=1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fxopt.errors import BuildError, TargetError
from fxopt.targets import host_arch
from fxopt.targets import runtime_build as rb
from fxopt.targets import tvm_backend

HOST_TRIPLE = f"{host_arch()}-linux-gnu"

# arch -> (toolchain prefix, TVM target dict)
CROSS = {
    "aarch64": ("aarch64-linux-gnu-",
                {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}),
    "riscv64": ("riscv64-linux-gnu-",
                {"kind": "llvm", "mtriple": "riscv64-linux-gnu",
                 "mattr": ["+m", "+a", "+f", "+d", "+c"]}),
}
RVV = {"kind": "llvm", "mtriple": "riscv64-linux-gnu",
       "mattr": ["+m", "+a", "+f", "+d", "+c", "+v"]}
RVV_CPU = "rv64,v=true,vlen=128"


needs_host_cxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)

    def forward(self, x):
        return torch.relu(self.dw(torch.relu(self.bn(self.conv(x)))))


def _model() -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    model = ConvBnRelu().eval()
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(8, generator=g) * 0.5)
        model.bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
        model.bn.weight.copy_(torch.rand(8, generator=g) + 0.5)
    return model, torch.randn(1, 3, 16, 16, generator=g)


def _write_golden(directory: Path, inputs, outputs) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(inputs):
        np.save(directory / f"input_{i}.npy", np.asarray(x))
    for i, y in enumerate(outputs):
        np.save(directory / f"expected_output_{i}.npy", np.asarray(y))


def _export(module: nn.Module, inputs, tvm_target: dict, toolchain: str | None, path: Path) -> Path:
    """Compile with TVM for ``tvm_target`` and link the library with ``toolchain``'s g++."""
    import tvm
    from tvm import relax

    mod = tvm_backend.lower(module, inputs)
    target = tvm.target.Target(tvm_target)
    executable = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    if toolchain:
        executable.export_library(
            str(path), fcompile=tvm.support.cc.cross_compiler(f"{toolchain}g++"))
    else:
        executable.export_library(str(path))
    return path


def _run(cmd, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Builds shared by the tests of one run (and cached on disk across runs)


@pytest.fixture(scope="session")
def host_runtime() -> rb.RuntimeBuild:
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    return rb.build_runtime(None, HOST_TRIPLE)


@pytest.fixture(scope="session")
def cross_runtime():
    built: dict[str, rb.RuntimeBuild] = {}

    def get(arch: str) -> rb.RuntimeBuild:
        if arch not in built:
            toolchain, target = CROSS[arch]
            built[arch] = rb.build_runtime(toolchain, target["mtriple"])
        return built[arch]

    return get


@pytest.fixture(scope="module")
def host_build(tmp_path_factory):
    """A build directory for the host: model.so (with fxopt's signature), golden files."""
    model, x = _model()
    directory = tmp_path_factory.mktemp("host_build")
    lib = tvm_backend.build(tvm_backend.lower(model, (x,)), "host")
    lib.save(directory / "model.so")
    with torch.no_grad():
        _write_golden(directory, [x.numpy()], [model(x).numpy()])
    return directory


# --------------------------------------------------------------------------------------------
# Host runtime and runner


@needs_host_cxx
def test_host_runner_checks_golden(host_runtime, host_build, tmp_path):
    assert host_runtime.libraries == ()
    assert host_runtime.runner.name == rb.RUNNER_NAME and os.access(host_runtime.runner, os.X_OK)
    res = _run([host_runtime.runner, host_build / "model.so", "--check", host_build,
                "--repeat", "5", "--output-dir", tmp_path])
    assert res.returncode == 0, res.stderr
    assert "check: ok" in res.stdout and "max abs error" in res.stdout
    assert "median" in res.stdout and "over 5 runs" in res.stdout
    got = np.load(tmp_path / "output_0.npy")
    expected = np.load(host_build / "expected_output_0.npy")
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@needs_host_cxx
def test_host_runner_inputs_and_output_dir(host_runtime, host_build, tmp_path):
    out = tmp_path / "nested" / "out"
    res = _run([host_runtime.runner, host_build / "model.so",
                "--input", host_build / "input_0.npy", "--output-dir", out])
    assert res.returncode == 0, res.stderr
    np.testing.assert_allclose(np.load(out / "output_0.npy"),
                               np.load(host_build / "expected_output_0.npy"), rtol=1e-4, atol=1e-5)


@needs_host_cxx
def test_host_runner_mismatch_exits_1(host_runtime, host_build, tmp_path):
    shutil.copy(host_build / "input_0.npy", tmp_path / "input_0.npy")
    expected = np.load(host_build / "expected_output_0.npy")
    expected.flat[7] += 0.1 * np.abs(expected).max()
    np.save(tmp_path / "expected_output_0.npy", expected)
    res = _run([host_runtime.runner, host_build / "model.so", "--check", tmp_path])
    assert res.returncode == 1, res.stdout + res.stderr
    assert "MISMATCH" in res.stdout and "flat index 7" in res.stdout
    # a tolerance wide enough accepts it
    res = _run([host_runtime.runner, host_build / "model.so", "--check", tmp_path,
                "--atol", "0.2"])
    assert res.returncode == 0, res.stdout + res.stderr


@needs_host_cxx
def test_host_runner_wrong_shape_and_count_are_clear(host_runtime, host_build, tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((1, 3, 8, 8), np.float32))
    res = _run([host_runtime.runner, host_build / "model.so", "--input", tmp_path / "small.npy"])
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "fxopt-run: error:" in res.stderr
    assert "[1, 3, 8, 8]" in res.stderr and "[1, 3, 16, 16]" in res.stderr
    x = host_build / "input_0.npy"
    res = _run([host_runtime.runner, host_build / "model.so", "--input", x, "--input", x])
    assert res.returncode == 2 and "takes 1 input" in res.stderr


@needs_host_cxx
@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no inputs"),
        (["--input", "missing.npy"], "cannot open missing.npy"),
        (["--check", "no_such_dir"], "no such build directory"),
        (["--input", "x.npy", "--bogus"], "unknown option --bogus"),
        (["--input", "x.npy", "--repeat", "two"], "--repeat"),
        (["--check", ".", "--input", "x.npy"], "do not also give --input"),
    ],
)
def test_host_runner_usage_errors(host_runtime, host_build, args, message):
    res = subprocess.run([str(host_runtime.runner), str(host_build / "model.so"), *args],
                         capture_output=True, text=True, cwd=host_build, timeout=60)
    assert res.returncode == 2
    assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr


@needs_host_cxx
def test_host_runner_refuses_foreign_and_non_elf_files(host_runtime, host_build, tmp_path):
    # A library for another machine: the same file with e_machine set to AArch64 / RISC-V.
    data = bytearray((host_build / "model.so").read_bytes())
    foreign = 243 if host_arch() != "riscv64" else 183
    data[18:20] = foreign.to_bytes(2, "little")
    (tmp_path / "model.so").write_bytes(bytes(data))
    res = _run([host_runtime.runner, tmp_path / "model.so", "--check", host_build])
    want = "riscv64" if foreign == 243 else "aarch64"
    assert res.returncode == 2
    assert f"model.so is built for {want}, this runner is {host_arch()}" in res.stderr
    (tmp_path / "notes.txt").write_text("not a library")
    res = _run([host_runtime.runner, tmp_path / "notes.txt", "--check", host_build])
    assert res.returncode == 2 and "is not an ELF shared library" in res.stderr


class MultiIO(nn.Module):
    """float32 + bool in; (float32, int64) out: .npy dtypes other than float32, tuples."""

    def forward(self, x, mask):
        y = torch.relu(x) * mask.to(x.dtype)
        return y, torch.argmax(y, dim=1)


class Half(nn.Module):
    def forward(self, x):
        return x * 2 + 1


@needs_host_cxx
def test_host_runner_npy_dtypes(host_runtime, tmp_path):
    x = torch.randn(2, 5)
    mask = torch.rand(2, 5) > 0.3
    _export(MultiIO(), (x, mask), {"kind": "llvm"}, None, tmp_path / "multi.so")
    y, idx = MultiIO()(x, mask)
    _write_golden(tmp_path / "multi", [x.numpy(), mask.numpy()], [y.numpy(), idx.numpy()])
    res = _run([host_runtime.runner, tmp_path / "multi.so", "--check", tmp_path / "multi",
                "--output-dir", tmp_path / "out"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert np.load(tmp_path / "out" / "output_1.npy").dtype == np.int64
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "output_1.npy"), idx.numpy())

    h = torch.randn(3, 4).half()
    _export(Half(), (h,), {"kind": "llvm"}, None, tmp_path / "half.so")
    _write_golden(tmp_path / "half", [h.numpy()], [Half()(h).numpy()])
    res = _run([host_runtime.runner, tmp_path / "half.so", "--check", tmp_path / "half",
                "--output-dir", tmp_path / "hout", "--rtol", "1e-3", "--atol", "1e-3"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert np.load(tmp_path / "hout" / "output_0.npy").dtype == np.float16


@needs_host_cxx
def test_cached_build_is_reused(host_runtime):
    start = time.monotonic()
    again = rb.build_runtime(None, HOST_TRIPLE)
    assert time.monotonic() - start < 2.0
    assert again == host_runtime
    record = json.loads((host_runtime.runner.parent / "build.json").read_text())
    assert record["inputs"]["arch"] == host_arch() and record["runner"] == rb.RUNNER_NAME
    assert sorted(p.name for p in host_runtime.runner.parent.iterdir()) == ["build.json",
                                                                           rb.RUNNER_NAME]


_SUPPORT_CHECK = r"""
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>
#include <tvm/support/io.h>
#include <tvm/support/serializer.h>
#include "support/base64.h"
#include "support/bytes_io.h"
using namespace tvm::support;
int main() {
  std::string line;
  while (std::getline(std::cin, line)) {  // one hex-encoded byte string per line
    std::string raw, text, back, padded;
    for (size_t i = 0; i + 1 < line.size(); i += 2) {
      raw.push_back(static_cast<char>(std::stoi(line.substr(i, 2), nullptr, 16)));
    }
    BytesOutStream out(&text);
    Base64OutStream enc(&out);
    enc.Write(raw.data(), raw.size());
    enc.Finish();
    padded = " \n" + text;
    BytesInStream in(padded);
    Base64InStream dec(&in);
    dec.InitPosition();
    char c;
    while (dec.Read(&c, 1) == 1) back.push_back(c);
    std::printf("%s %d\n", text.c_str(), back == raw);
  }
  std::string blob;
  BytesOutStream out(&blob);
  out.Write(std::vector<std::string>{"a", "", "xyz"});
  out.Write(std::vector<int64_t>{1, -2, 3});
  out.Write(DLDataType{2, 32, 1});
  out.Write(tvm::ffi::String("hi"));
  BytesInStream in(blob);
  std::vector<std::string> v;
  std::vector<int64_t> w;
  DLDataType t;
  tvm::ffi::String s;
  bool ok = in.Read(&v) && in.Read(&w) && in.Read(&t) && in.Read(&s) && v[2] == "xyz" &&
            w[1] == -2 && t.bits == 32 && s == "hi";
  std::printf("serializer %d %zu\n", ok, blob.size());
}
"""


@needs_host_cxx
def test_support_headers_base64_and_serializer(tmp_path):
    """fxopt's replacements of TVM's support headers: base64 as RFC 4648, TVM's byte layout."""
    import base64

    sources = rb.runtime_sources()
    (tmp_path / "check.cc").write_text(_SUPPORT_CHECK)
    lib = sources.tvm_ffi / "lib"
    res = _run(["g++", "-std=c++17", "-O1", f"-I{rb._HERE / 'include'}", f"-I{rb._HERE / 'src'}",
                f"-I{sources.tvm_ffi / 'include'}", tmp_path / "check.cc", "-o", tmp_path / "check",
                f"-L{lib}", "-ltvm_ffi", f"-Wl,-rpath,{lib}"])
    assert res.returncode == 0, res.stderr
    cases = [b"", b"a", b"ab", b"abc", b"abcd", bytes(range(256)) * 3]
    res = subprocess.run([tmp_path / "check"], input="".join(c.hex() + "\n" for c in cases),
                         capture_output=True, text=True, timeout=60)
    lines = res.stdout.splitlines()
    assert [ln.rsplit(" ", 1) for ln in lines[:-1]] == [
        [base64.b64encode(c).decode(), "1"] for c in cases]
    # counts are uint64: (8+1)+(8)+(8+3)+8 for the strings, 8+3*8, 4 for DLDataType, 8+2
    assert lines[-1] == "serializer 1 82"


# --------------------------------------------------------------------------------------------
# Cache mechanics, with a stand-in for the compiler work


@pytest.fixture
def fake_build(monkeypatch):
    calls = []

    def build(tmp, compiler, sources, arch, extra_flags, root, key):
        calls.append(list(extra_flags))
        runner = tmp / rb.RUNNER_NAME
        runner.write_text("#!/bin/sh\n")
        runner.chmod(0o755)
        return {"runner": rb.RUNNER_NAME, "libraries": [], "arch": arch}

    monkeypatch.setattr(rb, "_build", build)
    return calls


@needs_host_cxx
def test_cache_key_and_reuse(fake_build, tmp_path):
    a = rb.build_runtime(None, HOST_TRIPLE, cache_dir=tmp_path)
    b = rb.build_runtime(None, HOST_TRIPLE, cache_dir=tmp_path)
    c = rb.build_runtime(None, HOST_TRIPLE, cache_dir=tmp_path, extra_flags=["-O3"])
    assert a == b and a.runner != c.runner
    assert fake_build == [[], ["-O3"]]
    assert a.runner.parent.name.startswith(host_arch() + "-")
    assert not list(tmp_path.glob(".tmp-*"))


@needs_host_cxx
def test_incomplete_cache_entry_is_rebuilt(fake_build, tmp_path):
    a = rb.build_runtime(None, HOST_TRIPLE, cache_dir=tmp_path)
    a.runner.unlink()
    b = rb.build_runtime(None, HOST_TRIPLE, cache_dir=tmp_path)
    assert b == a and b.runner.is_file() and len(fake_build) == 2


@needs_host_cxx
def test_interrupted_build_leaves_nothing(monkeypatch, tmp_path):
    def interrupted(tmp, *args):
        (tmp / "half-written.o").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(rb, "_build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rb.build_runtime(None, HOST_TRIPLE, cache_dir=tmp_path)
    assert [p for p in tmp_path.iterdir() if p.suffix != ".lock"] == []


@needs_host_cxx
def test_dead_temporary_directories_are_removed(fake_build, tmp_path):
    stale = tmp_path / ".tmp-x86_64-0123-pid999999999-abc"  # no such process
    stale.mkdir()
    rb.build_runtime(None, HOST_TRIPLE, cache_dir=tmp_path)
    assert not stale.exists()


@needs_host_cxx
def test_compile_error_is_a_build_error(tmp_path):
    with pytest.raises(BuildError, match=r"unrecognized command-line option.*-fno-such-flag"):
        rb.build_runtime(None, HOST_TRIPLE, cache_dir=tmp_path, extra_flags=["-fno-such-flag"])
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock")
    assert len(leftovers) == 1 and leftovers[0].endswith(".failed.log")


def test_missing_toolchain_names_the_package(tmp_path):
    with pytest.raises(TargetError, match=r"g\+\+-nosucharch-linux-gnu"):
        rb.build_runtime("nosucharch-linux-gnu-", "nosucharch-linux-gnu", cache_dir=tmp_path)


@needs_host_cxx
def test_toolchain_for_another_arch_is_refused(tmp_path):
    other = "riscv64" if host_arch() != "riscv64" else "aarch64"
    with pytest.raises(TargetError, match=rf"toolchain='{other}-linux-gnu-'"):
        rb.build_runtime(None, f"{other}-linux-gnu", cache_dir=tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(TargetError, match="triple"):
        rb.build_runtime(None, "not a triple", cache_dir=tmp_path)
    with pytest.raises(TargetError, match="prefix"):
        rb.build_runtime("", HOST_TRIPLE, cache_dir=tmp_path)


def test_runtime_sources_are_found_without_importing_tvm():
    code = ("import sys; from fxopt.targets import runtime_build as rb; s = rb.runtime_sources();"
            "assert all(p.is_file() for p in s.files); assert 'tvm' not in sys.modules, 'tvm';"
            "print(s.tvm_version, s.tvm_ffi_version)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "unknown" not in res.stdout


def test_qemu_missing_names_the_package(monkeypatch):
    monkeypatch.setattr(rb.shutil, "which", lambda name: None)
    with pytest.raises(TargetError, match="qemu-user"):
        rb.qemu_command("riscv64")
    with pytest.raises(TargetError, match="no qemu-user setup"):
        rb.qemu_command("sparc64")


# --------------------------------------------------------------------------------------------
# Cross: aarch64 and riscv64 under qemu-user


def _cross_build_dir(tmp_path: Path, arch: str, tvm_target: dict) -> Path:
    model, x = _model()
    directory = tmp_path / arch
    directory.mkdir()
    _export(model, (x,), tvm_target, CROSS[arch][0], directory / "model.so")
    with torch.no_grad():
        _write_golden(directory, [x.numpy()], [model(x).numpy()])
    return directory


@pytest.mark.cross
@pytest.mark.parametrize("arch", list(CROSS))
def test_cross_runner_under_qemu(arch, cross_runtime, tmp_path):
    built = cross_runtime(arch)
    assert built.libraries == ()
    out = _run(["file", built.runner]).stdout if shutil.which("file") else ""
    assert not out or {"aarch64": "aarch64", "riscv64": "RISC-V"}[arch] in out
    directory = _cross_build_dir(tmp_path, arch, CROSS[arch][1])
    qemu = rb.qemu_command(arch)
    assert qemu[:3] == [f"qemu-{arch}", "-L", f"/usr/{arch}-linux-gnu"]
    res = _run([*qemu, built.runner, directory / "model.so", "--check", directory, "--repeat", "5"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "check: ok" in res.stdout

    # a wrong golden output: exit 1
    expected = np.load(directory / "expected_output_0.npy")
    np.save(directory / "expected_output_0.npy", expected + 0.01 * np.abs(expected).max())
    res = _run([*qemu, built.runner, directory / "model.so", "--check", directory])
    assert res.returncode == 1 and "MISMATCH" in res.stdout


@pytest.mark.cross
def test_cross_wrong_machine_is_named(cross_runtime, tmp_path):
    directory = _cross_build_dir(tmp_path, "aarch64", CROSS["aarch64"][1])
    runner = cross_runtime("riscv64").runner
    res = _run([*rb.qemu_command("riscv64"), runner, directory / "model.so", "--check", directory])
    assert res.returncode == 2
    assert "model.so is built for aarch64, this runner is riscv64" in res.stderr


@pytest.mark.cross
def test_cross_rvv_needs_the_vector_cpu(cross_runtime, tmp_path):
    directory = _cross_build_dir(tmp_path, "riscv64", RVV)
    runner = cross_runtime("riscv64").runner
    qemu = rb.qemu_command("riscv64", cpu=RVV_CPU)
    assert qemu == ["qemu-riscv64", "-L", "/usr/riscv64-linux-gnu", "-cpu", RVV_CPU]
    res = _run([*qemu, runner, directory / "model.so", "--check", directory])
    assert res.returncode == 0, res.stdout + res.stderr
    res = _run([*rb.qemu_command("riscv64"), runner, directory / "model.so", "--check", directory])
    assert res.returncode == 2
    assert "illegal instruction" in res.stderr and "rv64imafdcv" in res.stderr
