"""Deployment directories: complete or absent, checked before anything runs.

A build directory holds the compiled library (for CPU targets also the ``fxopt-run`` runner with
the TVM runtime, and a README on running it), golden inputs and expected outputs (.npy), the
report (report.json) and manifest.json, which lists inputs/outputs (names, shapes, dtypes), the
target, tool versions, the pipeline spec and the sha256 of every other file. It is written to a
temporary sibling directory and renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fxopt.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT = "fxopt-build/1"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_build(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(path: Path, force: bool) -> None:
    """An existing path may be replaced only if it is an fxopt build, an empty directory, or forced."""
    if not path.exists():
        existing = next((p for p in path.parents if p.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):  # before any work
            raise ArtifactError(f"cannot write the build directory {path}: {existing} is not writable; "
                                "choose a writable output directory")
        return
    if not path.is_dir():
        raise ArtifactError(f"output path {path} exists and is a file: choose another output directory")
    if force or is_build(path) or not any(path.iterdir()):
        return
    raise ArtifactError(
        f"output directory {path} exists and is not an fxopt build: choose another output directory, "
        "or pass --force (force=True) to replace it"
    )


def tensor_entries(names: Sequence[str], tensors: Sequence[torch.Tensor], prefix: str) -> list[dict[str, Any]]:
    return [{"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
             "golden": f"{prefix}_{i}.npy"} for i, (name, t) in enumerate(zip(names, tensors))]


def write(
    path: str | Path,
    *,
    manifest: dict[str, Any],
    inputs: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    write_payload: Callable[[Path], list[str]],
    report: dict[str, Any],
    force: bool = False,
) -> Path:
    """Write a complete build directory at ``path`` (atomically replacing an earlier build)."""
    path = Path(path).resolve()
    check_destination(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path)
        # the writer's pid in the name: a later build can tell a killed build's leftovers
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent))
    except OSError as exc:
        raise ArtifactError(f"cannot write the build directory {path}: {exc.strerror or exc} "
                            f"({exc.filename or path.parent}); choose a writable output directory") from exc
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a build directory is an ordinary one
    try:
        files = list(write_payload(staging))  # the library and whatever ships with it
        for entry, tensor in zip(manifest["inputs"], inputs):
            np.save(staging / entry["golden"], tensor.detach().cpu().numpy())
            files.append(entry["golden"])
        for entry, tensor in zip(manifest["outputs"], outputs):
            np.save(staging / entry["golden"], tensor.detach().cpu().numpy())
            files.append(entry["golden"])
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        files.append("report.json")
        full = {"format": FORMAT, **manifest, "files": {name: sha256(staging / name) for name in sorted(files)}}
        (staging / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        _swap_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def remove_stale_staging(path: Path) -> list[Path]:
    """Remove what a killed build into ``path`` left beside it (``.NAME.partial-PID-*`` staging,
    ``.NAME.old-PID-*`` retired builds) when process PID is gone; a live build's are kept.
    SIGKILL runs no cleanup, so the next build into the same path does it. Returns the removed."""
    removed = []
    for kind in ("partial", "old"):
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.{kind}-*"):
            pid = leftover.name[len(f".{path.name}.{kind}-"):].split("-", 1)[0]
            if leftover.is_dir() and (not pid.isdigit() or not _alive(int(pid))):
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _swap_into_place(staging: Path, path: Path) -> None:
    if path.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
        path.rename(retired / "build")
        staging.rename(path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(path)


@dataclass(frozen=True)
class Manifest:
    path: Path
    data: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name

    def golden_inputs(self) -> list[torch.Tensor]:
        return [self._golden(e["golden"]) for e in self.data["inputs"]]

    def golden_outputs(self) -> list[torch.Tensor]:
        return [self._golden(e["golden"]) for e in self.data["outputs"]]

    def _golden(self, name: str) -> torch.Tensor:
        # never unpickle anything from a build directory: a .npy holding Python objects is refused
        try:
            return torch.from_numpy(np.load(self.file(name), allow_pickle=False))
        except (ValueError, OSError, TypeError) as exc:
            raise ArtifactError(f"{self.file(name)} is not a plain numeric .npy array ({exc}): fxopt never "
                                "unpickles files from a build directory; rebuild it") from exc


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of a build directory, after checking every file against its sha256."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not an fxopt build: {MANIFEST} is missing (build one with `fxopt build`)")
    try:
        data = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc}): the build is damaged, rebuild it") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: unknown build format {data.get('format') if isinstance(data, dict) else None!r}, expected {FORMAT!r}")
    for key in ("files", "inputs", "outputs", "target"):
        if key not in data:
            raise ArtifactError(f"{manifest_path} has no '{key}' entry: the build is damaged, rebuild it")
    for name, digest in data["files"].items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{file} is listed in the manifest but missing: the build is incomplete, rebuild it")
        if sha256(file) != digest:
            raise ArtifactError(f"{file} does not match its sha256 in {MANIFEST}: the file was modified or damaged, rebuild")
    for entry in data["inputs"] + data["outputs"]:
        if entry.get("golden") not in data["files"]:
            raise ArtifactError(f"{manifest_path}: golden file of '{entry.get('name')}' is not covered by the manifest's sha256 list")
    return Manifest(path, data)
