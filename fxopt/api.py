"""The public entry points: optimize (torch only) and compile (optimize → lower → build → package)."""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export import ExportedProgram

from fxopt import artifact, ir, spec
from fxopt import verify as verification
from fxopt.errors import ArtifactError, InputError, TargetError, VerificationError
from fxopt.pass_manager import Pass, PassContext, apply
from fxopt.report import Report
from fxopt.tuning import TuneConfig

__version__ = "0.1.0"


@dataclass
class Optimized:
    """The optimized graph (a normal nn.Module) and what each pass did."""

    module: fx.GraphModule
    report: Report
    example_inputs: tuple[torch.Tensor, ...]
    # what the module computes exactly: the eager model, or after a lossy plan the planned model
    reference: nn.Module | None = None


def optimize(
    model: nn.Module | ExportedProgram,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    pipeline: Pass | Sequence | str = "default",
    verify: str = "end",
    *,
    target: Any = None,
    leaf_modules: Sequence[type | str] = (),
    capture: str = "auto",
) -> Optimized:
    """Trace ``model`` and run ``pipeline`` on it; outputs are checked against the eager model.

    ``pipeline`` is a named pipeline ("default", "none"), a TOML file, a one-line text
    ("canonicalize,fold_bn"), a list, or a Pass. ``verify`` is "each" (after every pass that
    changed the graph), "end" or "off". ``capture`` is "auto" (torch.fx, then torch.export when fx
    cannot trace the model), "fx" or "export"; ``model`` may also be an ExportedProgram (e.g. from
    ``torch.export.load``), checked against its own ``.module()``. The model is never modified.
    """
    from fxopt.targets import get_target

    reference = reference_module(model)
    if not isinstance(model, ExportedProgram):
        ir.check_eval_mode(model)
    resolved_target = get_target(target) if target is not None else None
    pipe = spec.resolve(pipeline)
    inputs = ir.as_input_tuple(example_inputs)
    gm = ir.trace(model, inputs, leaf_modules, capture=capture)
    report = Report(model=model_name(model), capture=gm.meta["fxopt"]["capture"],
                    capture_note=gm.meta["fxopt"].get("capture_note", ""), pipeline=spec.to_text(pipe.spec()))
    ctx = PassContext(example_inputs=inputs, target=resolved_target, verify=verify, reference=reference, report=report)
    apply(pipe, gm, ctx)  # (shapes in node.meta stay fresh: apply re-propagates after every change)
    if verify != "off":
        verification.check_ir(gm, inputs)
        comparison = verification.check_equivalent(ctx.reference, gm, inputs)
        against = "eager" if ctx.reference is reference else "the planned model"
        report.verification = {"against": against, **comparison.to_json()}
    return Optimized(gm, report, inputs, ctx.reference)


def reference_module(model: nn.Module | ExportedProgram) -> nn.Module:
    """What outputs are checked against: the model itself, or a program's ``.module()``."""
    if isinstance(model, ExportedProgram):
        return model.module()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module or a torch.export.ExportedProgram, got {type(model).__name__}")
    return model


def model_name(model: nn.Module | ExportedProgram) -> str:
    return "ExportedProgram" if isinstance(model, ExportedProgram) else type(model).__name__


def _flat_outputs(outputs: Any) -> tuple[list[torch.Tensor], Any]:
    leaves, tree = pytree.tree_flatten(outputs)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise InputError(f"model output {i} is a {type(leaf).__name__}: compiled models must return tensors only")
    return leaves, tree


@dataclass
class Compiled:
    """A model compiled for a target: run it (on a target that runs here) or export a build directory."""

    module: fx.GraphModule
    report: Report
    target: Any
    library: Any  # fxopt.targets.tvm_backend.CompiledLibrary
    example_inputs: tuple[torch.Tensor, ...]
    expected_outputs: list[torch.Tensor]
    output_tree: Any
    tvm_target: dict = field(default_factory=dict)
    _scratch: Any = field(default=None, repr=False)  # the saved library, for runs through the target's runner

    def run(self, *tensors: torch.Tensor) -> Any:
        """Outputs for ``tensors``, with the eager model's output structure: in this process
        where the target runs here, else with the target's runner (qemu-user for emulated CPUs)."""
        return pytree.tree_unflatten(self._outputs(tensors), self.output_tree)

    def _outputs(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        from fxopt.targets import runners

        if self.target.runs_here():
            arrays = self.library.run(*tensors)
        else:
            runners.command_prefix(self.target)  # says why, before any work, when it cannot run here
            if self._scratch is None:
                self._scratch = tempfile.TemporaryDirectory(prefix="fxopt-compiled-")
                self.library.save(Path(self._scratch.name) / self.target.library)
            runtime = runners.runtime_for(self.target)
            arrays = runners.run(self.target, runtime.runner, Path(self._scratch.name) / self.target.library,
                                 [t.detach().cpu().numpy() for t in tensors])
        return [torch.from_numpy(np.asarray(a)) for a in arrays]

    def export(self, path: str | Path, force: bool = False) -> Path:
        """Write a deployment directory (complete or absent) and return its path."""
        input_names = [n.name for n in self.module.graph.nodes if n.op == "placeholder"]
        output_names = [f"output_{i}" for i in range(len(self.expected_outputs))]
        manifest = {
            "model": self.report.model,
            "target": self.target.to_json(),
            "tvm_target": self.tvm_target,
            "library": self.target.library,
            "pipeline": self.report.pipeline,
            "capture": self.report.capture,
            "inputs": artifact.tensor_entries(input_names, self.example_inputs, "input"),
            "outputs": artifact.tensor_entries(output_names, self.expected_outputs, "expected_output"),
            "output_tree": pytree.treespec_dumps(self.output_tree),
            "tolerance": {"rtol": verification.BUILD_TOLERANCE[0], "atol": verification.BUILD_TOLERANCE[1],
                          "atol_is_relative_to": "max |expected output|"},
            "versions": _versions(),
        }
        if self.report.build and self.report.build.get("tuning"):
            manifest["tuning"] = self.report.build["tuning"]
        from fxopt import sparse_ops

        sparse_layers = sparse_ops.sparse_layers(self.module)
        if sparse_layers:  # their pattern and values are compiled in: a build is a snapshot
            manifest["sparse_layers"] = {"note": sparse_ops.SNAPSHOT_NOTE, "layers": sparse_layers}
        return artifact.write(
            path, manifest=manifest, inputs=self.example_inputs, outputs=self.expected_outputs,
            write_payload=self._write_payload, report=self.report.to_json(), force=force,
        )

    def _write_payload(self, directory: Path) -> list[str]:
        """The compiled library and, for CPU targets, the runner and a README on running it."""
        from fxopt.targets import runners

        names = [self.library.save(directory / self.target.library).name]
        if runners.ships_runner(self.target):
            names += runners.copy_runtime(runners.runtime_for(self.target), directory)
        (directory / "README.txt").write_text(runners.readme(self.target, self.target.library, len(self.example_inputs)))
        return names + ["README.txt"]


def _versions() -> dict[str, str]:
    from fxopt.targets import tvm_backend

    return {"fxopt": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), **tvm_backend.versions()}


def compile(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    target: Any = "host",
    pipeline: Pass | Sequence | str | None = None,
    verify: str = "end",
    *,
    leaf_modules: Sequence[type | str] = (),
    capture: str = "auto",
    tune: TuneConfig | None = None,
) -> Compiled:
    """optimize → lower to Relax → build for ``target``; on a target that runs here, check the build
    against the eager model before returning it. ``pipeline`` defaults to the target's;
    ``capture`` and ``leaf_modules`` are optimize's. ``tune=TuneConfig(trials=..., database=...)``
    tunes the kernels with MetaSchedule (those the database lacks) and builds with the database's
    schedules; the report and manifest record it under ``build.tuning``."""
    from fxopt.targets import get_target, tvm_backend

    if tune is not None and not isinstance(tune, TuneConfig):
        raise InputError(f"tune must be a fxopt.TuneConfig (e.g. TuneConfig(trials=64)), got {type(tune).__name__}")
    resolved = get_target(target)
    optimized = optimize(model, example_inputs, resolved.pipeline if pipeline is None else pipeline, verify,
                         target=resolved, leaf_modules=leaf_modules, capture=capture)
    inputs = optimized.example_inputs
    # after a lossy plan the build computes the planned model, not the eager one
    expected, tree = _flat_outputs(verification.run_reference(optimized.reference or reference_module(model), inputs))
    start = time.perf_counter()
    relax_module = tvm_backend.lower(optimized.module, inputs)
    lowered = time.perf_counter()
    library = tvm_backend.build(relax_module, resolved, **({"tune": tune} if tune is not None else {}))
    built = time.perf_counter()
    report = optimized.report
    report.build = {"target": resolved.name, "lower_s": round(lowered - start, 3), "build_s": round(built - lowered, 3)}
    fusion = library.fusion
    if fusion:  # CPU builds: what TVM's fusion made of the graph
        report.build.update({k: v for k, v in fusion.items() if v or k != "unfused_epilogues"})
    if tune is not None:
        # build() leaves what tuning did (tuning.TuneSummary.to_json()) on the library; "database" is
        # the directory the user gave (the target's records are in its subdirectory "target_key").
        report.build["tuning"] = {"budget": tune.trials, **(getattr(library, "tuning", None) or {}),
                                  "database": str(tune.database_path)}
    compiled = Compiled(optimized.module, report, resolved, library, inputs, expected, tree,
                        tvm_backend.resolve_target(resolved))
    if verify != "off":
        _check_build(compiled, expected)
    return compiled


def _check_build(compiled: Compiled, expected: list[torch.Tensor]) -> None:
    """Run the build (here, or with its runner under emulation) and compare with eager PyTorch.
    A GPU build is only checked where its GPU is; a CPU build must run, or say why it cannot."""
    from fxopt.targets import runners

    target, report = compiled.target, compiled.report
    if target.tvm.get("kind") != "llvm" and not target.runs_here():
        report.build["check"] = {"ok": None, "skipped": f"no {target.tvm.get('kind')} device on this machine"}
        return
    try:
        actual = compiled._outputs(compiled.example_inputs)
    except TargetError as exc:
        raise TargetError(f"{exc}; or build with verify='off' (CLI: --verify off) to skip running the build") from exc
    comparison = verification.compare_outputs(expected, actual, *verification.BUILD_TOLERANCE)
    prefix = [] if target.runs_here() else runners.command_prefix(target)
    report.build["check"] = {**comparison.to_json(), "ran": " ".join(prefix) if prefix else "natively"}
    if not comparison.ok:
        raise VerificationError(
            f"the {target.name} build of {report.model} does not match eager PyTorch: {comparison.detail}"
        )


@dataclass
class Loaded:
    """A build directory whose files matched their manifest."""

    manifest: artifact.Manifest
    target: Any
    library: Any  # the library loaded in this process, or None when it runs with the target's runner
    output_tree: Any

    def run(self, *tensors: torch.Tensor) -> Any:
        from fxopt.targets import runners

        if self.library is not None:
            arrays = self.library.run(*tensors)
        else:
            arrays = runners.run(self.target, self.manifest.file(runners.RUNNER), self.manifest.file(self.target.library),
                                 [t.detach().cpu().numpy() for t in tensors])
        return pytree.tree_unflatten([torch.from_numpy(np.asarray(a)) for a in arrays], self.output_tree)

    def check(self) -> verification.Comparison:
        """Run the golden input and compare with the expected output, at the build's tolerance:
        in this process where the target runs here, else with the shipped runner (qemu-user)."""
        from fxopt.targets import runners

        tolerance = self.manifest.data["tolerance"]
        if self.library is not None:
            actual = [torch.from_numpy(np.asarray(o)) for o in self.library.run(*self.manifest.golden_inputs())]
            return verification.compare_outputs(self.manifest.golden_outputs(), actual, tolerance["rtol"], tolerance["atol"])
        if runners.RUNNER not in self.manifest.data["files"]:
            raise TargetError(f"a {self.target.name} build cannot run on this machine: "
                              f"{_why_not_here(self.target)}; run it on the device (see README.txt)")
        ok, max_abs, max_rel, detail = runners.check(self.target, self.manifest.path, self.target.library,
                                                     tolerance["rtol"], tolerance["atol"])
        return verification.Comparison(ok, max_abs, max_rel, "" if ok else detail)

    def runs_with(self) -> str:
        """How ``check`` runs this build on this machine."""
        from fxopt.targets import runners

        if self.library is not None:
            return "in this process (TVM runtime)"
        return " ".join([*runners.command_prefix(self.target), runners.RUNNER]) or runners.RUNNER


def _why_not_here(target) -> str:
    from fxopt.targets import runners

    try:
        runners.command_prefix(target)
    except TargetError as exc:
        return str(exc)
    return "it ships no runner"


def load(path: str | Path) -> Loaded:
    """Open a build directory: every file is checked against the manifest before anything runs."""
    from fxopt.targets import Target, tvm_backend

    manifest = artifact.read_manifest(path)
    data = manifest.data
    target = Target.from_json(data["target"])  # the manifest carries it whole (boards are not registered)
    library = None
    if target.runs_here():
        built_for = data.get("tvm_target", {}).get("mcpu")
        here = tvm_backend.resolve_target(target).get("mcpu")
        if built_for and here != built_for:
            raise ArtifactError(
                f"{manifest.path} was built for CPU '{built_for}', this machine is '{here}': its code may use "
                "instructions this CPU lacks; rebuild it here (fxopt build ...)"
            )
        library = tvm_backend.load(manifest.file(data["library"]), target)
    return Loaded(manifest, target, library, pytree.treespec_loads(data["output_tree"]))
