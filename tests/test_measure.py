"""fxopt.measure: local timing with its disk cache, instruction counts under qemu (cross tier),
and the one-line errors for options that cannot work. The RPC backend against a real tracker and
servers is in tests/targets/test_rpc.py."""

import json
import os
import socket

import pytest
import torch
from torch import nn

from fxopt.errors import FxoptError, InputError, MeasureError
from fxopt.measure import Measurement, RPCConfig, default_backend, measure, measure_library


def conv_net(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU()).eval()


X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_local_measures_then_hits_the_cache(tmp_path):
    first = measure(conv_net(), (X,), "host", repeat=5, warmup=1, cache_dir=tmp_path)
    assert (first.backend, first.unit, first.target, first.cached) == ("local", "s", "host", False)
    assert len(first.samples) == 5 and 0 < first.value < 1.0
    assert first.settings["threads"] >= 1 and len(first.key) == 64
    assert (tmp_path / f"{first.key}.json").is_file()

    again = measure(conv_net(), (X,), "host", repeat=5, warmup=1, cache_dir=tmp_path)
    assert again.cached and again.value == first.value and again.samples == first.samples
    assert again.key == first.key

    fresh = measure(conv_net(), (X,), "host", repeat=5, warmup=1, cache_dir=tmp_path, cache=False)
    assert not fresh.cached and fresh.key == first.key and len(fresh.samples) == 5


def test_cache_key_follows_weights_shapes_and_settings(tmp_path):
    base = measure(conv_net(), (X,), repeat=2, warmup=0, cache_dir=tmp_path)
    other_weights = conv_net()
    with torch.no_grad():
        other_weights[0].weight[0, 0, 0, 0] += 1.0  # same shapes, one value differs
    keys = {
        base.key,
        measure(other_weights, (X,), repeat=2, warmup=0, cache_dir=tmp_path).key,
        measure(conv_net(), (torch.randn(1, 3, 12, 12),), repeat=2, warmup=0, cache_dir=tmp_path).key,
        measure(conv_net(), (X,), repeat=3, warmup=0, cache_dir=tmp_path).key,
        measure(conv_net(), (X,), repeat=2, warmup=0, threads=1, cache_dir=tmp_path).key,
    }
    assert len(keys) == 5 or (len(keys) == 4 and base.settings["threads"] == 1)


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path):
    first = measure(conv_net(), (X,), repeat=2, warmup=0, cache_dir=tmp_path)
    path = tmp_path / f"{first.key}.json"
    for damage in ("{ not json", json.dumps({"format": 1, "key": first.key, "samples": "x"})):
        path.write_text(damage)
        again = measure(conv_net(), (X,), repeat=2, warmup=0, cache_dir=tmp_path)
        assert not again.cached and again.key == first.key
        assert json.loads(path.read_text())["samples"] == list(again.samples)
    assert measure(conv_net(), (X,), repeat=2, warmup=0, cache_dir=tmp_path).cached


def test_measure_library_of_a_built_model():
    from fxopt.targets import tvm_backend

    lib = tvm_backend.build(tvm_backend.lower(conv_net(), (X,)), "host")
    result = measure_library(lib, (X,), repeat=3, warmup=0, threads=1)
    assert isinstance(result, Measurement) and result.key is None and not result.cached
    assert result.backend == "local" and len(result.samples) == 3 and result.settings["threads"] == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads with Linux's /proc")
def test_repeated_local_measurements_reuse_one_timing_thread():
    """TVM never frees the thread pool of a thread that ended: a fresh timing thread per
    measurement left its workers behind, and every later measurement ran slower."""
    from fxopt.targets import tvm_backend

    lib = tvm_backend.build(tvm_backend.lower(conv_net(), (X,)), "host")
    measure_library(lib, (X,), repeat=1, warmup=0, threads=2)
    threads = len(os.listdir("/proc/self/task"))
    for _ in range(3):
        measure_library(lib, (X,), repeat=1, warmup=0, threads=2)
    assert len(os.listdir("/proc/self/task")) == threads


def test_default_backends_come_from_the_runner():
    assert default_backend("host") == "local"
    assert default_backend("riscv64") == "qemu-insn"
    assert default_backend("arm64") == "qemu-insn"


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kwargs, target, error, pattern", [
    ({"backend": "locale"}, "host", MeasureError, r"unknown measurement backend 'locale' \(did you mean 'local'\?\)"),
    ({"backend": "qemu-insn"}, "host", MeasureError, r"'qemu-insn'.*runs natively.*backend='local'"),
    ({"backend": "rpc"}, "host", MeasureError, r"backend='rpc' needs.*RPCConfig"),
    ({"backend": "local", "rpc": RPCConfig()}, "host", MeasureError, r"rpc=RPCConfig\(\.\.\.\) is for backend='rpc'"),
    ({"backend": "local"}, "riscv64", MeasureError, r"does not run here.*qemu-insn.*rpc"),
    ({"backend": "qemu-insn", "threads": 2}, "riscv64", MeasureError, r"one thread"),
    ({"repeat": 0}, "host", MeasureError, r"repeat must be an int >= 1, got 0"),
    ({"threads": 0}, "host", MeasureError, r"threads must be an int >= 1"),
    ({"rpc": "127.0.0.1:9190"}, "host", MeasureError, r"rpc must be an RPCConfig"),
    ({}, "cuda", MeasureError, r"GPU.*backend='rpc'"),
    ({}, "no-such-target", FxoptError, r"unknown target 'no-such-target'"),
])
def test_bad_options_are_one_line_errors(kwargs, target, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        measure(conv_net(), (X,), target, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_module_and_inputs():
    with pytest.raises(InputError, match=r"training mode.*eval\(\)"):
        measure(conv_net().train(), (X,))
    with pytest.raises(InputError, match=r"nn.Module"):
        measure(lambda x: x, (X,))
    with pytest.raises(InputError, match=r"tuple of tensors"):
        measure(conv_net(), [])
    with pytest.raises(InputError, match=r"CompiledLibrary"):
        measure_library(conv_net(), (X,))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"tracker_port": 0}, r"tracker_port must be a port number"),
    ({"key": "a:b"}, r"key must be a device key"),
    ({"session_timeout_s": 0}, r"session_timeout_s must be a positive number"),
    ({"retries": -1}, r"retries must be a non-negative int"),
])
def test_bad_rpc_config(kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        RPCConfig(**kwargs)


def test_unreachable_tracker_fails_fast_naming_the_fix(tmp_path):
    port = _closed_port()
    with pytest.raises(MeasureError, match=rf"tracker at 127.0.0.1:{port} does not answer.*rpc_tracker --host 127.0.0.1 --port {port}"):
        measure(conv_net(), (X,), rpc=RPCConfig(tracker_port=port, key="board"), cache_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# qemu-insn: instruction counts of riscv64 builds under qemu-user


@pytest.mark.cross
def test_qemu_insn_counts_repeat_exactly_and_grow_with_the_model(tmp_path):
    # The first runs after loading still do one-time work (the second run of a process counts
    # ~0.6 % more than the third); after one warm-up run every run counts the same.
    small = measure(conv_net(4), (X,), "riscv64", repeat=3, warmup=1, cache=False)
    again = measure(conv_net(4), (X,), "riscv64", repeat=3, warmup=1, cache=False)
    assert (small.backend, small.unit, small.target) == ("qemu-insn", "insn", "riscv64")
    assert isinstance(small.value, int) and small.value > 10_000
    assert len(set(small.samples)) == 1, small.samples  # every run counts the same
    assert again.samples == small.samples  # and so does another process

    bigger = measure(conv_net(16), (X,), "riscv64", repeat=2, warmup=0, cache_dir=tmp_path)
    assert bigger.value > 2 * small.value
    assert bigger.comparable(small) and "riscv64" in bigger.isa
    assert measure(conv_net(16), (X,), "riscv64", repeat=2, warmup=0, cache_dir=tmp_path).cached


@pytest.mark.cross
def test_counts_of_other_isas_are_not_comparable():
    scalar = Measurement(1, "insn", (1,), "qemu-insn", "riscv64", False, None, isa="riscv64 mattr=+m qemu-cpu=default")
    vector = Measurement(1, "insn", (1,), "qemu-insn", "riscv64-rvv", False, None,
                         isa="riscv64 mattr=+m,+v qemu-cpu=rv64,v=true")
    timed = Measurement(1e-3, "s", (1e-3,), "local", "host", False, None)
    assert not scalar.comparable(vector) and not scalar.comparable(timed) and timed.comparable(timed)


def test_plugin_counts_file_is_checked():
    from fxopt.errors import BuildError
    from fxopt.targets.runners import _parse_counts

    assert _parse_counts("fxopt-insn-count 1\ntotal 90\nintervals 2\n30\n31\n", 2) == ([30, 31], 90)
    with pytest.raises(BuildError, match=r"saw 1 marked runs, expected 2"):
        _parse_counts("fxopt-insn-count 1\ntotal 90\nintervals 1\n30\n", 2)
    with pytest.raises(BuildError, match=r"not readable"):
        _parse_counts("something else\n", 1)
