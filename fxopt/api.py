"""The public entry points: optimize (torch only) and compile (optimize → lower → build → package)."""

from __future__ import annotations

import logging
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
from fxopt.report import Report, snapshot_graph, sparsity_table
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

    def to_onnx(self, path: str | Path, *, opset: int = 17, dynamic_batch: bool = False, check: bool = True) -> Path:
        """Write the optimized graph as an ONNX file (for ONNX Runtime, TensorRT, OpenVINO) and
        return its path. Before writing, it passes onnx.checker and runs in ONNX Runtime (when
        installed) against the reference on the example inputs and fresh random ones; fxopt's
        sparse layers are written dense. See fxopt.onnx_export.export."""
        return _write_onnx(self.module, self.example_inputs, path, self.reference, opset=opset,
                           dynamic_batch=dynamic_batch, check=check)


def _write_onnx(module: fx.GraphModule, inputs, path, reference, **options) -> Path:
    from fxopt import onnx_export

    result = onnx_export.export(module, inputs, path, reference=reference, **options)
    for note in result.notes:  # (sparse layers written dense)
        logging.getLogger("fxopt").warning("%s", note)
    return result.path


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
    ``torch.export.load``), checked against its own ``.module()``, or an ONNX model (a ``*.onnx``
    path or ``onnx.ModelProto``, imported by fxopt.onnx_import for the example inputs' shapes and
    checked against that import). The model is never modified.
    """
    from fxopt.targets import get_target

    model = _onnx_model(model, example_inputs)
    reference = reference_module(model)
    if not isinstance(model, ExportedProgram):
        ir.check_eval_mode(model)
    _warn_non_finite(reference)
    resolved_target = get_target(target) if target is not None else None
    pipe = spec.resolve(pipeline)
    inputs = ir.as_input_tuple(example_inputs)
    gm = ir.trace(model, inputs, leaf_modules, capture=capture)
    report = Report(model=model_name(model), capture=gm.meta["fxopt"]["capture"],
                    capture_note=gm.meta["fxopt"].get("capture_note", ""), pipeline=spec.to_text(pipe.spec()))
    report.graph_before = snapshot_graph(gm)  # (node list only, for the HTML report's drawing)
    ctx = PassContext(example_inputs=inputs, target=resolved_target, verify=verify, reference=reference, report=report)
    apply(pipe, gm, ctx)  # (shapes in node.meta stay fresh: apply re-propagates after every change)
    report.graph_after = snapshot_graph(gm)
    report.sparsity = sparsity_table(gm, ctx.declines)
    if verify != "off":
        verification.check_ir(gm, inputs)
        comparison = verification.check_equivalent(ctx.reference, gm, inputs)
        against = "eager" if ctx.reference is reference else "the planned model"
        report.verification = {"against": against, **comparison.to_json()}
    return Optimized(gm, report, inputs, ctx.reference)


def _onnx_model(model: Any, example_inputs: Any) -> Any:
    """An ONNX model (a ``*.onnx`` path or an ``onnx.ModelProto``) as the GraphModule that
    fxopt.onnx_import builds for the example inputs' shapes; any other model as it is."""
    if not (isinstance(model, (str, Path)) or type(model).__name__ == "ModelProto"):
        return model
    from fxopt import onnx_import

    if not onnx_import.is_onnx(model):
        return model
    return onnx_import.import_onnx(model, [tuple(x.shape) for x in ir.as_input_tuple(example_inputs)]).module


def _warn_non_finite(model: nn.Module) -> None:
    """Warn about NaN/Inf parameters or buffers: the model still optimizes and verifies (its NaN
    and Inf outputs must come out in the same places), but it is usually a broken checkpoint."""
    import warnings

    bad = [name for name, t in (*model.named_parameters(), *model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(f"'{n}'" for n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        warnings.warn(f"the model's {shown} hold NaN or Inf values: its outputs will too (fxopt checks that they "
                      "come out in the same places); check the checkpoint it was loaded from", stacklevel=3)


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
    runtime: str = "tvm"  # "standalone": library is a targets.standalone.StandaloneLibrary (plain C, no TVM runtime)
    _scratch: Any = field(default=None, repr=False)  # the saved library, for runs through the target's runner

    def run(self, *tensors: torch.Tensor) -> Any:
        """Outputs for ``tensors``, with the eager model's output structure: in this process
        where the target runs here, else with the target's runner (qemu-user for emulated CPUs)."""
        return pytree.tree_unflatten(self._outputs(tensors), self.output_tree)

    def _outputs(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        from fxopt.targets import runners

        if self.runtime == "standalone":  # the example program, here or under qemu
            arrays = self.library.run(*tensors)
        elif self.target.runs_here():
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

    def to_onnx(self, path: str | Path, *, opset: int = 17, dynamic_batch: bool = False, check: bool = True) -> Path:
        """The optimized graph this build was compiled from, as an ONNX file (see Optimized.to_onnx);
        checked in ONNX Runtime against that graph, which optimize verified against eager."""
        return _write_onnx(self.module, self.example_inputs, path, None, opset=opset, dynamic_batch=dynamic_batch,
                           check=check)

    def export(self, path: str | Path, force: bool = False) -> Path:
        """Write a deployment directory (complete or absent) and return its path."""
        input_names = [n.name for n in self.module.graph.nodes if n.op == "placeholder"]
        output_names = [f"output_{i}" for i in range(len(self.expected_outputs))]
        manifest = {
            "model": self.report.model,
            "target": self.target.to_json(),
            "tvm_target": self.tvm_target,
            "library": self.library.library_name if self.runtime == "standalone" else self.target.library,
            "runtime": self.runtime,
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
            write_payload=lambda directory: self._write_payload(directory) + self._write_html_report(directory),
            report=self.report.to_json(), force=force,
        )

    def _write_html_report(self, directory: Path) -> list[str]:
        """report.html beside report.json; a report that cannot be drawn costs a warning, not the build."""
        try:
            self.report.save_html(directory / "report.html", title=f"fxopt build: {self.report.model} on {self.target.name}")
        except Exception as exc:  # noqa: BLE001 - the report is a view of the build, never its cause of failure
            logging.getLogger("fxopt.report").warning("report.html not written: %s: %s", type(exc).__name__, exc)
            return []
        return ["report.html"]

    def _write_payload(self, directory: Path) -> list[str]:
        """The compiled library and, for CPU targets, the runner and a README on running it."""
        from fxopt.targets import runners

        if self.runtime == "standalone":  # C library, sources, example program, Makefile, README
            return self.library.write(directory)
        names = [self.library.save(directory / self.target.library).name]
        if runners.ships_runner(self.target):
            names += runners.copy_runtime(runners.runtime_for(self.target), directory)
        (directory / "README.txt").write_text(runners.readme(self.target, self.target.library, len(self.example_inputs)))
        return names + ["README.txt"]


def _versions() -> dict[str, str]:
    from fxopt.targets import tvm_backend

    return {"fxopt": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), **tvm_backend.versions()}


def _runtime_for(target, runtime: str | None, tune) -> str:
    """The runtime a build of ``target`` uses: ``runtime``, or the target's default."""
    from fxopt.targets import RUNTIMES

    chosen = runtime or target.runtime
    if chosen not in RUNTIMES:
        raise InputError(f"runtime {chosen!r} is unknown; use one of {', '.join(RUNTIMES)}")
    if chosen == "tvm" and target.runtime == "standalone":
        raise TargetError(f"target {target.name!r} has no OS for the TVM runtime: build it with runtime='standalone' "
                          "(CLI: --runtime standalone)")
    if chosen == "standalone" and target.tvm.get("kind") != "llvm":
        raise TargetError(f"the standalone runtime is for CPU targets; target {target.name!r} is {target.tvm.get('kind')}")
    if chosen == "standalone" and tune is not None:
        raise InputError("tuning is not supported with the standalone runtime yet; build without --tune")
    return chosen


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
    runtime: str | None = None,
) -> Compiled:
    """optimize → lower to Relax → build for ``target``; on a target that runs here, check the build
    against the eager model before returning it. ``pipeline`` defaults to the target's;
    ``capture`` and ``leaf_modules`` are optimize's. ``tune=TuneConfig(trials=..., database=...)``
    tunes the kernels with MetaSchedule (those the database lacks) and builds with the database's
    schedules; the report and manifest record it under ``build.tuning``. ``runtime`` is the target's
    default (``target.runtime``), "tvm" (the Relax VM) or "standalone" (plain C with a static arena
    and TVM's kernels, no TVM runtime: :mod:`fxopt.targets.standalone`)."""
    from fxopt.targets import get_target, tvm_backend

    if tune is not None and not isinstance(tune, TuneConfig):
        raise InputError(f"tune must be a fxopt.TuneConfig (e.g. TuneConfig(trials=64)), got {type(tune).__name__}")
    resolved = get_target(target)
    runtime = _runtime_for(resolved, runtime, tune)
    optimized = optimize(model, example_inputs, resolved.pipeline if pipeline is None else pipeline, verify,
                         target=resolved, leaf_modules=leaf_modules, capture=capture)
    inputs = optimized.example_inputs
    # after a lossy plan the build computes the planned model, not the eager one
    expected, tree = _flat_outputs(verification.run_reference(optimized.reference or reference_module(model), inputs))
    start = time.perf_counter()
    relax_module = tvm_backend.lower(optimized.module, inputs)
    lowered = time.perf_counter()
    if runtime == "standalone":
        from fxopt.targets import standalone

        library = standalone.build(relax_module, resolved, model=optimized.report.model,
                                   example_inputs=[t.detach().cpu().numpy() for t in inputs] if verify != "off" else ())
    else:
        library = tvm_backend.build(relax_module, resolved, **({"tune": tune} if tune is not None else {}))
    built = time.perf_counter()
    report = optimized.report
    report.build = {"target": resolved.name, "lower_s": round(lowered - start, 3), "build_s": round(built - lowered, 3)}
    if runtime == "standalone":
        report.build["standalone"] = library.sizes
    fusion = getattr(library, "fusion", None)
    if fusion:  # CPU builds: what TVM's fusion made of the graph
        report.build.update({k: v for k, v in fusion.items() if v or k != "unfused_epilogues"})
    if tune is not None:
        # build() leaves what tuning did (tuning.TuneSummary.to_json()) on the library; "database" is
        # the directory the user gave (the target's records are in its subdirectory "target_key").
        report.build["tuning"] = {"budget": tune.trials, **(getattr(library, "tuning", None) or {}),
                                  "database": str(tune.database_path)}
    compiled = Compiled(optimized.module, report, resolved, library, inputs, expected, tree,
                        tvm_backend.resolve_target(resolved), runtime)
    if verify != "off":
        _check_build(compiled, expected, optimized.reference or reference_module(model))
    return compiled


def _compare_build(expected: list[torch.Tensor], actual: Any, reference: nn.Module | None,
                   inputs: Sequence[torch.Tensor]) -> verification.Comparison:
    """The build's outputs vs eager at BUILD_TOLERANCE. A miss is forgiven only where float64 shows
    it is float32 rounding (the build within ROUNDING_FACTOR x eager's own error of the float64
    model), as check_equivalent does for passes: otherwise an ill-conditioned model fails a build
    as accurate as eager (pytorchcv igcv3_wd4 with random BN statistics: eager float32 is 8.7e-5 of
    the output scale off float64, the build 6e-5, build vs eager 1.2e-4)."""
    comparison = verification.compare_outputs(expected, actual, *verification.BUILD_TOLERANCE)
    if not comparison.ok and reference is not None:
        comparison = verification._arbitrate_in_float64(reference, inputs, expected, actual,
                                                        verification.BUILD_TOLERANCE[1], comparison)
    return comparison


def _check_build(compiled: Compiled, expected: list[torch.Tensor], reference: nn.Module | None = None) -> None:
    """Run the build (here, or with its runner under emulation) and compare with eager PyTorch
    (``reference``, run in float64, arbitrates float32 rounding; see _compare_build).
    A GPU build is only checked where its GPU is; a CPU build must run, or say why it cannot."""
    from fxopt.targets import runners

    target, report = compiled.target, compiled.report
    if compiled.runtime == "standalone":
        from fxopt.targets import standalone

        actual = compiled._outputs(compiled.example_inputs)
        comparison = _compare_build(expected, actual, reference, compiled.example_inputs)
        report.build["check"] = {**comparison.to_json(), "ran": " ".join(standalone.command_prefix(target)[:1]) or "natively"}
        if not comparison.ok:
            raise VerificationError(f"the standalone {target.name} build of {report.model} does not match eager "
                                    f"PyTorch: {comparison.detail}")
        return
    if target.tvm.get("kind") != "llvm" and not target.runs_here():
        report.build["check"] = {"ok": None, "skipped": f"no {target.tvm.get('kind')} device on this machine"}
        return
    try:
        actual = compiled._outputs(compiled.example_inputs)
    except TargetError as exc:
        raise TargetError(f"{exc}; or build with verify='off' (CLI: --verify off) to skip running the build") from exc
    comparison = _compare_build(expected, actual, reference, compiled.example_inputs)
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

        if self.manifest.data.get("runtime") == "standalone":
            from fxopt.targets import standalone

            outputs = [{"shape": e["shape"], "dtype": e["dtype"]} for e in self.manifest.data["outputs"]]
            arrays, _ = standalone.run_example(self.target, self.manifest.file(standalone.EXAMPLE),
                                               [t.detach().cpu().numpy() for t in tensors], outputs)
        elif self.library is not None:
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
        if self.manifest.data.get("runtime") == "standalone":  # the example program, here or under qemu
            from fxopt.targets import standalone

            actual = [torch.from_numpy(a) for a in standalone.check(self.manifest, self.target)]
            return verification.compare_outputs(self.manifest.golden_outputs(), actual, tolerance["rtol"], tolerance["atol"])
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

        if self.manifest.data.get("runtime") == "standalone":
            from fxopt.targets import standalone

            return " ".join([*standalone.command_prefix(self.target), standalone.EXAMPLE])
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
    if target.runs_here():  # (a standalone build's example program is native code for that CPU too)
        built_for = data.get("tvm_target", {}).get("mcpu")
        here = tvm_backend.resolve_target(target).get("mcpu")
        if built_for and here != built_for:
            raise ArtifactError(
                f"{manifest.path} was built for CPU '{built_for}', this machine is '{here}': its code may use "
                "instructions this CPU lacks; rebuild it here (fxopt build ...)"
            )
        if data.get("runtime", "tvm") == "tvm":
            library = tvm_backend.load(manifest.file(data["library"]), target)
    return Loaded(manifest, target, library, pytree.treespec_loads(data["output_tree"]))
