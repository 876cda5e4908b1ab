"""The bad-input catalogue: one test per way a user (or a crash) can hand fxopt something wrong.

Each test asserts a clear message (it names the thing and says what to do) and that nothing was
written: no build directory, no ``.NAME.partial-*`` staging or ``.NAME.old-*`` leftovers. The
builds are of a tiny conv-BN-ReLU model (1x3x8x8) for the host, to keep the file fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxopt
from fxopt import artifact
from fxopt.cli import main
from fxopt.errors import ArtifactError, BuildError, InputError, SpecError, TargetError, TraceError

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY = """
import torch
from torch import nn

def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()

class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x

def data_dependent():
    return DataDependent()

class Unsupported(nn.Module):
    def forward(self, x):
        return torch.cummax(x, 1)[0]

def unsupported():
    return Unsupported()
"""
X = torch.randn(1, 3, 8, 8)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.py"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def build(models, tmp_path_factory) -> Path:
    """One good build of the tiny model, copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("builds") / "tiny"
    assert main(["build", f"{models}:tiny", "--input-shape", "1x3x8x8", "-o", str(out)]) == 0
    return out


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    return code, err


def assert_clean_error(code: int, err: str, *phrases: str) -> None:
    assert code == 2, err
    assert err.startswith("fxopt: error: ") and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in {err!r}"


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    leftovers = [p.name for p in out.parent.glob(f".{out.name}.*")] if out.parent.exists() else []
    assert not leftovers, f"leftovers beside {out}: {leftovers}"


# ---------------------------------------------------------------------------------------------
# The model


def test_untraceable_control_flow_names_the_line(models, tmp_path, capsys):
    out = tmp_path / "o"
    code, err = cli(capsys, "build", f"{models}:data_dependent", "--input-shape", "1x3x8x8", "-o", out)
    assert_clean_error(code, err, "neither torch.fx nor torch.export can capture DataDependent",
                       "if x.sum() > 0:", "what to do", "torch.cond")
    assert_nothing_written(out)


def test_training_mode_is_refused():
    model = tiny().train()
    with pytest.raises(InputError, match=r"training mode .*'1'.*call model.eval\(\) first"):
        fxopt.compile(model, (X,))


def test_dynamic_shapes_are_refused(models, tmp_path, capsys):
    out = tmp_path / "o"
    for shape in ("Nx3x8x8", "-1x3x8x8", "0x3x8x8"):
        code, err = cli(capsys, "build", f"{models}:tiny", f"--input-shape={shape}", "-o", out)
        assert_clean_error(code, err, f"--input-shape {shape!r} is not a shape", "fixed shapes",
                           "build once per shape")
    assert_nothing_written(out)


def test_nan_and_inf_weights_warn_and_stay_exact():
    model = tiny()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
        model[1].running_var[1] = float("inf")
    with pytest.warns(UserWarning, match=r"'0.weight', '1.running_var' hold NaN or Inf.*checkpoint"):
        optimized = fxopt.optimize(model, (X,))
    assert optimized.report.verification["ok"]  # NaN/Inf in the same places, the rest equal
    expected, actual = model(X), optimized.module(X)
    torch.testing.assert_close(actual, expected, equal_nan=True)
    assert torch.isnan(expected).any()


def test_unsupported_op_is_named(models, tmp_path, capsys):
    out = tmp_path / "o"
    code, err = cli(capsys, "build", f"{models}:unsupported", "--input-shape", "1x3x8x8", "-o", out)
    assert_clean_error(code, err, "cannot convert op aten.cummax", "in Unsupported",
                       "Replace it in the model with supported ops")
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------
# Inputs: at compile time, and at run time in Python and with the runner


@pytest.mark.parametrize("inputs, message", [
    ((X, X), r"takes 1 input\(s\), but 2 example input\(s\) were given"),
    ((torch.randn(1, 5, 8, 8),), r"(?s)fails on the example inputs \[\(1, 5, 8, 8\) float32\].*3 channels.*what to do"),
    ((X.double(),), r"(?s)fails on the example inputs \[\(1, 3, 8, 8\) float64\].*what to do"),
], ids=["count", "shape", "dtype"])
def test_wrong_inputs_at_compile_time(inputs, message):
    with pytest.raises(InputError, match=message):
        fxopt.compile(tiny(), inputs)


def test_wrong_inputs_at_run_time_in_python(build):
    loaded = fxopt.load(build)
    with pytest.raises(InputError, match=r"takes 1 input\(s\) \(input\(1, 3, 8, 8\) float32\), got 2"):
        loaded.run(X, X)
    with pytest.raises(InputError, match=r"input 0 \('input'\): expected shape \(1, 3, 8, 8\), got \(1, 3, 9, 9\).*compile again"):
        loaded.run(torch.randn(1, 3, 9, 9))
    with pytest.raises(InputError, match=r"expected dtype float32, got float64.*tensor.to\(torch.float32\)"):
        loaded.run(X.double())


def test_wrong_inputs_at_run_time_with_the_runner(build):
    from fxopt.targets import get_target, runners

    host, runner, library = get_target("host"), build / runners.RUNNER, build / "model.so"
    with pytest.raises(BuildError, match=r"is float32 \[1, 3, 9, 9\], the model expects float32 \[1, 3, 8, 8\]"):
        runners.run(host, runner, library, [np.zeros((1, 3, 9, 9), np.float32)])
    with pytest.raises(BuildError, match=r"is float64 \[1, 3, 8, 8\], the model expects float32"):
        runners.run(host, runner, library, [np.zeros((1, 3, 8, 8))])
    with pytest.raises(BuildError, match=r"no inputs: give --input FILE for each model input"):
        runners.run(host, runner, library, [])


# ---------------------------------------------------------------------------------------------
# Specs: pipelines, boards, names


@pytest.mark.parametrize("text, message", [
    ("passes = [\n", "malformed pipeline TOML"),
    ("passes = ['canonicalize']\nextra = 1\n", "unknown top-level key(s) ['extra']"),
    ("stages = ['canonicalize']\n", "needs a top-level `passes = [...]` list"),
    ("passes = [\n  'canonicalize',\n  'fold_bnn',\n]\n", "line 3: unknown pass 'fold_bnn': did you mean 'fold_bn'?"),
    ("passes = [{name = 'fold_bn', depth = 2}]\n", "pass 'fold_bn' has no option 'depth'"),
    ("passes = [{name = 'merge_convs', max_kernel = 'big'}]\n", "option 'max_kernel' must be int, got 'big'"),
], ids=["syntax", "top-level-key", "no-passes", "unknown-pass", "unknown-option", "option-type"])
def test_malformed_pipeline_toml(models, tmp_path, capsys, text, message):
    pipeline, out = tmp_path / "my.toml", tmp_path / "o"
    pipeline.write_text(text)
    code, err = cli(capsys, "build", f"{models}:tiny", "--input-shape", "1x3x8x8", "--pipeline", pipeline, "-o", out)
    assert_clean_error(code, err, str(pipeline), message)
    assert_nothing_written(out)


@pytest.mark.parametrize("text, message", [
    ("base = 'host'\n[tvm\n", "is not valid TOML"),
    ("name = 'b'\n", "needs `base = \"<target>\"`"),
    ("base = 'vax'\n", "unknown target 'vax'"),
    ("base = 'host'\ncolour = 'red'\n", "unknown field(s) colour; allowed:"),
    ("base = 'host'\n[capabilities]\nwings = 2\n", "[capabilities] accepts"),
], ids=["syntax", "no-base", "unknown-base", "unknown-field", "unknown-capability"])
def test_malformed_board_toml(models, tmp_path, capsys, text, message):
    board, out = tmp_path / "board.toml", tmp_path / "o"
    board.write_text(text)
    code, err = cli(capsys, "build", f"{models}:tiny", "--input-shape", "1x3x8x8", "--target", board, "-o", out)
    assert_clean_error(code, err, f"board file {board}", message)
    assert_nothing_written(out)


@pytest.mark.parametrize("option, value, message", [
    ("--pipeline", "canonicalize,fold_bm", "unknown pass 'fold_bm': did you mean 'fold_bn'? known passes:"),
    ("--pipeline", "fuse_siblings{mode=2}", "pass 'fuse_siblings' has no option 'mode' (its options: policy, min_gain)"),
    ("--target", "hots", "unknown target 'hots'; known targets:"),
], ids=["pass", "option", "target"])
def test_unknown_pass_option_target(models, tmp_path, capsys, option, value, message):
    out = tmp_path / "o"
    code, err = cli(capsys, "build", f"{models}:tiny", "--input-shape", "1x3x8x8", option, value, "-o", out)
    assert_clean_error(code, err, message)
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------
# Builds: interrupted, altered, concurrent, unwritable


# `fxopt build` with checksumming slowed down, so that a signal lands while the staging directory
# exists (the window between "compiled" and "renamed into place")
SLOW_STAGING = textwrap.dedent("""
    import sys, time
    import fxopt.artifact as a
    original = a.sha256
    def slow(path):
        time.sleep(60)
        return original(path)
    a.sha256 = slow
    from fxopt.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _start_build(models: Path, out: Path, script: str | None = None) -> subprocess.Popen:
    argv = ["build", f"{models}:tiny", "--input-shape", "1x3x8x8", "-o", str(out)]
    command = [PYTHON, "-c", script, *argv] if script else [PYTHON, "-m", "fxopt", *argv]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_staging(proc: subprocess.Popen, out: Path, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(out.parent.glob(f".{out.name}.partial-*"))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the build ended before staging: {proc.communicate()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("no staging directory appeared")


def test_interrupted_build_sigint_leaves_nothing(models, tmp_path):
    out = tmp_path / "o"
    proc = _start_build(models, out, SLOW_STAGING)
    _wait_for_staging(proc, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "fxopt: interrupted" in err and "Traceback" not in err
    assert_nothing_written(out)  # the staging directory was removed on the way out


def test_interrupted_build_sigkill_leftover_is_cleaned_by_the_next_build(models, tmp_path):
    """SIGKILL runs no cleanup: the hidden staging directory stays, the output does not appear,
    and the next build into the same path removes it (its writer's pid is in its name and gone)."""
    out = tmp_path / "o"
    proc = _start_build(models, out, SLOW_STAGING)
    staging = _wait_for_staging(proc, out)
    proc.kill()
    proc.wait(timeout=60)
    assert not out.exists() and staging.is_dir() and staging.name.startswith(f".o.partial-{proc.pid}-")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        fxopt.load(out)
    # the next build: artifact.write, with a stand-in payload (the compile is not what is tested)
    artifact.write(out, manifest={"inputs": [], "outputs": [], "target": {}}, inputs=[], outputs=[],
                   write_payload=lambda d: [], report={})
    assert (out / "manifest.json").is_file() and not staging.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_staging_of_a_live_build_is_kept(tmp_path):
    live = tmp_path / f".o.partial-{os.getpid()}-abc"
    dead = tmp_path / ".o.partial-999999999-abc"
    other = tmp_path / ".other.partial-999999999-abc"
    for d in (live, dead, other):
        d.mkdir()
    assert artifact.remove_stale_staging(tmp_path / "o") == [dead]
    assert live.is_dir() and other.is_dir()


def _copy(build: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(build, copy)
    return copy


@pytest.mark.parametrize("name", ["model.so", "fxopt-run"])
def test_altered_library_is_refused_before_loading(build, tmp_path, capsys, monkeypatch, name):
    from fxopt.targets import tvm_backend

    copy = _copy(build, tmp_path)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (copy / name).write_bytes(bytes(data))
    loads = []
    monkeypatch.setattr(tvm_backend, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(ArtifactError, match=f"{name} does not match its sha256 in manifest.json.*rebuild"):
        fxopt.load(copy)
    code, err = cli(capsys, "check", copy)
    assert_clean_error(code, err, f"{name} does not match its sha256")
    assert loads == []  # nothing was loaded


def test_pickled_golden_file_is_refused(build, tmp_path, capsys):
    """A build directory is never unpickled from: a .npy holding Python objects (which np.load
    would unpickle with allow_pickle=True) is refused even when its checksum matches."""
    copy = _copy(build, tmp_path)
    golden = copy / "input_0.npy"
    np.save(golden, np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["input_0.npy"] = hashlib.sha256(golden.read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="input_0.npy is not a plain numeric .npy array.*never unpickles"):
        fxopt.load(copy).check()
    code, err = cli(capsys, "check", copy)
    assert_clean_error(code, err, "never unpickles")


def test_two_concurrent_builds_into_different_directories(models, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [_start_build(models, a), _start_build(models, b)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    for out in (a, b):
        assert fxopt.load(out).check().ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_read_only_output_directory(models, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    out = parent / "o"
    if os.geteuid() == 0:  # root writes anywhere: stand in for the permission check
        monkeypatch.setattr(artifact.os, "access", lambda path, mode: Path(path) != parent)
    else:
        parent.chmod(0o555)
    try:
        start = time.perf_counter()
        code, err = cli(capsys, "build", f"{models}:tiny", "--input-shape", "1x3x8x8", "-o", out)
        assert_clean_error(code, err, f"cannot write the build directory {out}", "not writable",
                           "choose a writable output directory")
        assert time.perf_counter() - start < 10  # refused before compiling
    finally:
        parent.chmod(0o755)
    assert_nothing_written(out)


def test_unwritable_staging_is_a_clear_error(tmp_path, monkeypatch):
    """A write that fails after the early check (a disk that turned read-only, a full quota)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(artifact.tempfile, "mkdtemp", refuse)
    with pytest.raises(ArtifactError, match="cannot write the build directory .*Permission denied.*writable"):
        artifact.write(tmp_path / "o", manifest={"inputs": [], "outputs": []}, inputs=[], outputs=[],
                       write_payload=lambda d: [], report={})
    assert_nothing_written(tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# Caches


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-fields"])
def test_corrupted_measurement_cache_is_rebuilt_not_trusted(tmp_path, damage):
    from fxopt.measure import measure

    model = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    first = measure(model, (X,), repeat=2, warmup=0, cache_dir=tmp_path)
    path = tmp_path / f"{first.key}.json"
    text = path.read_text()
    path.write_text({"truncated": text[: len(text) // 2], "garbage": "\x00\xff not json",
                     "wrong-fields": json.dumps({**json.loads(text), "samples": ["fast"]})}[damage])
    with pytest.warns(UserWarning, match=f"cache entry {path} is damaged.*not used: measuring again"):
        again = measure(model, (X,), repeat=2, warmup=0, cache_dir=tmp_path)
    assert not again.cached and again.key == first.key
    assert json.loads(path.read_text())["samples"] == list(again.samples)  # rewritten whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert measure(model, (X,), repeat=2, warmup=0, cache_dir=tmp_path).cached


def test_corrupted_tuning_database_is_moved_aside_not_trusted(tmp_path, caplog):
    from fxopt.targets import get_target, tvm_backend
    from fxopt.targets.tvm_backend import tuning

    database = tmp_path / "db"
    directory = tuning.database_dir(database, tuning.tuning_target(tvm_backend.resolve_target(get_target("host")),
                                                                    get_target("host")))
    directory.mkdir(parents=True)
    (directory / "database_workload.json").write_text('["truncated')
    (directory / "database_tuning_record.json").write_text("")
    with caplog.at_level("WARNING", logger="fxopt.tuning"):
        compiled = fxopt.compile(tiny(), (X,), tune=fxopt.TuneConfig(trials=0, database=database))
    assert compiled.report.build["check"]["ok"]
    assert "cannot be read" in caplog.text and "moved aside" in caplog.text
    assert not (directory / "database_workload.json").exists()
    assert len(list(directory.glob("database_workload.json.damaged-*"))) == 1


# ---------------------------------------------------------------------------------------------
# Loading safety: nothing from a build directory (or any file fxopt reads) is unpickled


def test_no_loader_in_the_source_can_unpickle():
    """Every np.load passes allow_pickle=False, every torch.load weights_only=True, and nothing
    calls pickle/cloudpickle/marshal loads (cloudpickle *dumps* worker functions for tuning)."""
    import re

    problems = []
    for folder in ("fxopt", "passes", "targets"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                code = line.split("#", 1)[0]
                where = f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                if re.search(r"\bnp\.load\(|\bnumpy\.load\(", code) and "allow_pickle=False" not in code:
                    problems.append(where)
                if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                    problems.append(where)
                if re.search(r"\b(pickle|cloudpickle|marshal|dill)\.(load|loads|Unpickler)\b", code):
                    problems.append(where)
    assert not problems, "loaders that could unpickle:\n" + "\n".join(problems)


def test_checksums_are_verified_before_the_library_is_loaded(build, monkeypatch):
    """fxopt.load (and so `fxopt check`) reads and verifies the manifest, then loads the library."""
    from fxopt.targets import tvm_backend

    order = []
    verify, load = artifact.read_manifest, tvm_backend.load
    monkeypatch.setattr(artifact, "read_manifest", lambda *a: (order.append("verify"), verify(*a))[1])
    monkeypatch.setattr(tvm_backend, "load", lambda *a: (order.append("load"), load(*a))[1])
    assert fxopt.load(build).check().ok
    assert order == ["verify", "load"]


def test_saved_program_with_pickled_objects_is_refused(tmp_path, capsys):
    """torch.export.load falls back to full unpickling when weights_only fails: a crafted .pt2
    would run code. fxopt loads programs with every torch.load weights-only."""
    import io
    import zipfile

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    good, evil = tmp_path / "good.pt2", tmp_path / "evil.pt2"
    torch.export.save(torch.export.export(tiny(), (X,)), str(good))
    blob = io.BytesIO()
    torch.save(Payload(), blob)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, blob.getvalue() if info.filename.endswith("sample_inputs/model.pt") else data)
    out = tmp_path / "o"
    code, err = cli(capsys, "build", evil, "-o", out)
    assert_clean_error(code, err, f"MODEL '{evil}' holds pickled Python objects", "does not unpickle them",
                       "weights_only=True")
    assert not marker.exists()  # the payload never ran
    assert_nothing_written(out)
