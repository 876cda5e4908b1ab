"""Target data model and registry (targets/__init__.py, targets/host.py); no TVM needed."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fxopt.errors import TargetError
from fxopt.targets import (
    Capabilities,
    Target,
    _REGISTRY,
    get_target,
    host_arch,
    list_targets,
    register_target,
)
from fxopt.targets.host import capabilities_from_flags, cpu_flags

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def scratch_target():
    """A uniquely named target, removed from the registry afterwards."""
    target = Target(
        name="scratch-test",
        description="test target",
        tvm={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"},
        capabilities=Capabilities(vector_bits=128, fp16=True),
        toolchain="aarch64-linux-gnu-",
        runner="qemu",
    )
    yield target
    _REGISTRY.pop(target.name, None)


def test_host_is_registered():
    host = get_target("host")
    assert host in list_targets()
    assert host.tvm["kind"] == "llvm"
    assert host.tvm["mcpu"] == "native"
    assert "mtriple" not in host.tvm  # filled by the adapter from LLVM's host triple
    assert host.runner == "native" and host.toolchain is None
    assert host.library == "model.so"
    assert host.runs_here()
    assert host.arch == host_arch()


def test_host_capabilities_come_from_this_cpu():
    host = get_target("host")
    flags = cpu_flags()
    assert host.capabilities == capabilities_from_flags(host_arch(), flags)
    if "avx512f" in flags:
        assert host.capabilities.vector_bits == 512


@pytest.mark.parametrize(
    "arch, flags, bits, fp16",
    [
        ("x86_64", {"sse2", "avx", "avx2", "avx512f", "avx512_fp16"}, 512, True),
        ("x86_64", {"sse2", "avx", "avx2"}, 256, False),
        ("x86_64", {"sse2"}, 128, False),
        ("aarch64", {"fp", "asimd", "asimdhp"}, 128, True),
        ("riscv64", set(), 0, False),
    ],
)
def test_capabilities_from_flags(arch, flags, bits, fp16):
    caps = capabilities_from_flags(arch, frozenset(flags))
    assert (caps.vector_bits, caps.fp16) == (bits, fp16)


def test_cpu_flags_parses_x86_and_aarch64_cpuinfo():
    assert cpu_flags("processor\t: 0\nflags\t\t: fpu sse2 avx2\n") == {"fpu", "sse2", "avx2"}
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd\n") == {"fp", "asimd"}
    assert cpu_flags("nothing here\n") == frozenset()


def test_duplicate_name_is_refused(scratch_target):
    assert register_target(scratch_target) is scratch_target
    before = dict(_REGISTRY)
    other = Target(name="scratch-test", description="another", tvm={"kind": "llvm"})
    with pytest.raises(TargetError, match="'scratch-test' is already registered"):
        register_target(other)
    assert _REGISTRY == before
    assert get_target("scratch-test") is scratch_target
    with pytest.raises(TargetError, match="'host' is already registered"):
        register_target(Target(name="host", description="x", tvm={"kind": "llvm"}))
    assert get_target("host").description != "x"


def test_unknown_name_lists_known_targets(scratch_target):
    register_target(scratch_target)
    with pytest.raises(TargetError) as info:
        get_target("hots")
    msg = str(info.value)
    assert "unknown target 'hots'" in msg
    assert "known targets: arm64, " in msg and ", host, " in msg and ", scratch-test, " in msg
    assert "Did you mean 'host'?" in msg
    assert "`fxopt targets`" in msg


def test_list_targets_sorted_and_includes_registered(scratch_target):
    register_target(scratch_target)
    names = [t.name for t in list_targets()]
    assert names == sorted(names)
    assert {"host", "scratch-test"} <= set(names)


def test_get_target_passes_targets_through_and_rejects_other_types(scratch_target):
    assert get_target(scratch_target) is scratch_target  # unregistered Target objects are fine
    with pytest.raises(TargetError, match="a target is a name or a Target"):
        get_target(42)


def test_to_json_is_plain_json_and_round_trips(scratch_target):
    data = scratch_target.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data == {
        "name": "scratch-test",
        "description": "test target",
        "tvm": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"},
        "capabilities": {
            "vector_bits": 128,
            "fp16": True,
            "sparse_kernels": False,
            "preferred_layout": "NCHW",
        },
        "pipeline": "default",
        "schedule": "default",
        "toolchain": "aarch64-linux-gnu-",
        "runner": "qemu",
        "library": "model.so",
        "qemu_cpu": None,
        "cores": None,
        "run_command": [],
        "base": None,
        "offload": [],
        "runtime": "tvm",
        "cflags": [],
        "flash_bytes": None,
        "ram_bytes": None,
    }
    assert Target.from_json(data) == scratch_target
    assert Target.from_json(get_target("host").to_json()) == get_target("host")


def test_from_json_rejects_unknown_fields():
    data = get_target("host").to_json()
    with pytest.raises(TargetError, match="unknown field.*colour"):
        Target.from_json({**data, "colour": "red"})
    with pytest.raises(TargetError, match="unknown capabilities.*simd"):
        Target.from_json({**data, "capabilities": {"simd": 4}})


def test_target_is_frozen_data():
    source = {"kind": "llvm", "mattr": ["+avx2"]}
    target = Target(name="frozen-test", description="", tvm=source)
    source["kind"] = "cuda"
    source["mattr"].append("+fma")
    assert target.tvm == {"kind": "llvm", "mattr": ["+avx2"]}  # copied at construction
    with pytest.raises(TypeError):
        target.tvm["kind"] = "c"  # read-only mapping
    with pytest.raises(AttributeError):
        target.name = "other"
    exported = target.to_json()
    exported["tvm"]["mattr"].append("+fma")
    assert target.tvm["mattr"] == ["+avx2"]
    assert hash(target) == hash(Target(name="frozen-test", description="", tvm=source))


def test_runs_here_depends_on_runner_and_arch(scratch_target):
    assert not scratch_target.runs_here()  # runner qemu
    same_arch = Target(
        name="same-arch", description="", tvm={"kind": "llvm", "mtriple": f"{host_arch()}-linux-gnu"}
    )
    assert same_arch.runs_here()
    other_arch = "aarch64" if host_arch() != "aarch64" else "x86_64"
    assert not Target(
        name="other-arch", description="", tvm={"kind": "llvm", "mtriple": f"{other_arch}-linux-gnu"}
    ).runs_here()
    assert not Target(name="emulated", description="", tvm={"kind": "llvm"}, runner="qemu").runs_here()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "Bad Name"}, "target name 'Bad Name' is not valid"),
        ({"tvm": {"mcpu": "native"}}, "must be a TVM target dict with a 'kind'"),
        ({"runner": "ssh"}, "runner 'ssh' is unknown"),
        ({"library": "lib/model.so"}, "library must be a plain file name"),
        ({"capabilities": {"vector_bits": 128}}, "capabilities must be a Capabilities"),
    ],
)
def test_invalid_targets_are_refused(kwargs, message):
    base = {"name": "ok", "description": "", "tvm": {"kind": "llvm"}}
    with pytest.raises(TargetError, match=re.escape(message)):
        Target(**{**base, **kwargs})


def test_invalid_capabilities_are_refused():
    with pytest.raises(TargetError, match="preferred_layout"):
        Capabilities(preferred_layout="NHCW")
    with pytest.raises(TargetError, match="vector_bits"):
        Capabilities(vector_bits=-1)


def test_targets_package_does_not_import_tvm():
    code = "import sys, fxopt.targets; assert 'tvm' not in sys.modules, 'tvm imported'; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_only_the_adapter_imports_tvm():
    """The TVM adapter is the package targets/tvm_backend/; nothing else imports tvm."""
    adapter = REPO / "targets" / "tvm_backend"
    pattern = re.compile(r"^\s*(import tvm\b|from tvm\b|import tvm_ffi\b|from tvm_ffi\b)", re.M)
    importers = {
        path
        for folder in ("fxopt", "passes", "targets")
        for path in sorted((REPO / folder).rglob("*.py"))
        if pattern.search(path.read_text())
    }
    assert [str(p.relative_to(REPO)) for p in sorted(importers) if adapter not in p.parents] == []
    assert adapter / "cpu_schedules.py" in importers  # the check does see imports


def test_presets_keep_their_base_capabilities():
    """A preset changes what it names (vector width, fp16) and keeps the rest, the NHWC layout above all."""
    for name, base in (("spacemit-x60", "riscv64-rvv"), ("riscv64-rvv", "riscv64"), ("cortex-a76", "arm64")):
        preset, parent = get_target(name).capabilities, get_target(base).capabilities
        assert (preset.preferred_layout, preset.sparse_kernels) == (parent.preferred_layout, parent.sparse_kernels)
