"""The ``fxopt`` command: build | plan | check | export-onnx | passes | targets."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Sequence

from fxopt import progress
from fxopt.errors import FxoptError, InputError

log = logging.getLogger("fxopt")

_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"--input-shape {text!r} is not a shape: write positive sizes joined by 'x', e.g. 1x3x224x224 "
                         "(a build is compiled for fixed shapes: dynamic dimensions such as N or -1 are not "
                         "supported, build once per shape)")
    return shape


def tune_config(args: argparse.Namespace, output: Path):
    """``--tune N`` / ``--tune-db PATH`` as a TuneConfig, or None. The database defaults to
    ``tuning-db`` beside the build directory (``-o build/m`` -> ``build/tuning-db``), shared by
    the builds written there; ``--tune-db`` alone applies that database without tuning."""
    from fxopt.tuning import TuneConfig

    if args.tune is None and args.tune_db is None:
        return None
    trials = args.tune if args.tune is not None else 0
    if trials < 0:
        raise InputError(f"--tune {trials}: give the number of tuning trials, a non-negative integer")
    database = Path(args.tune_db) if args.tune_db is not None else output.parent / "tuning-db"
    if database.exists() and not database.is_dir():
        raise InputError(f"--tune-db {database} is a file: give a directory (it is created if missing)")
    return TuneConfig(trials=trials, database=database)


def load_model_factory(spec: str):
    """``path/to/file.py:factory`` or ``package.module:factory`` → the factory callable."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise InputError(f"MODEL {spec!r} must be 'path/to/file.py:factory' or 'package.module:factory'")
    try:
        if module_part.endswith(".py") or "/" in module_part:
            path = Path(module_part)
            if not path.is_file():
                raise InputError(f"MODEL {spec!r}: file {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[path.stem] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_part)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"MODEL {spec!r}: cannot import {module_part}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise InputError(f"MODEL {spec!r}: {module_part} has no attribute {attr!r}")
    if not callable(factory):
        raise InputError(f"MODEL {spec!r}: {attr!r} is a {type(factory).__name__}, not a callable that returns a model")
    return factory


def build_model(spec: str):
    import torch

    factory = load_model_factory(spec)
    try:
        model = factory()
    except Exception as exc:
        raise InputError(f"MODEL {spec!r}: calling {spec.rpartition(':')[2]}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"MODEL {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _random_inputs(shapes: list[tuple[int, ...]], dtypes: list[str], seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for shape, dtype in zip(shapes, dtypes):
        torch_dtype = getattr(torch, dtype)
        if torch_dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(torch_dtype))
        else:
            inputs.append(torch.randint(0, 2 if torch_dtype == torch.bool else 10, shape, generator=generator).to(torch_dtype))
    return tuple(inputs)


def is_saved_program(spec: str) -> bool:
    """MODEL names a saved torch.export program (``model.pt2``)."""
    return spec.endswith(".pt2")


def is_onnx_model(spec: str) -> bool:
    """MODEL names an ONNX file (``model.onnx``)."""
    return spec.lower().endswith(".onnx")


def load_onnx(args: argparse.Namespace, shapes: list[tuple[int, ...]]):
    """MODEL.onnx imported as a GraphModule (fxopt.onnx_import), with seeded random inputs of the
    shapes it declares, or of --input-shape (required where its shapes are symbolic)."""
    from fxopt import onnx_import

    if args.input_dtype:
        raise InputError(f"MODEL {args.model!r} is an ONNX model, which declares its input dtypes: drop --input-dtype")
    imported = onnx_import.import_onnx(args.model, shapes or None, seed=args.seed)
    log.info("imported %s: inputs %s", args.model, ", ".join(
        f"{name} {'x'.join(map(str, x.shape))} {str(x.dtype).removeprefix('torch.')}"
        for name, x in zip(imported.input_names, imported.example_inputs)))
    return imported.module, imported.example_inputs


def model_and_inputs(args: argparse.Namespace, shapes: list[tuple[int, ...]]):
    """The model MODEL names (a factory, a saved .pt2 program or an .onnx file) and seeded example
    inputs, as ``fxopt build`` makes them."""
    import torch

    if is_onnx_model(args.model):
        return load_onnx(args, shapes)
    if not shapes and not is_saved_program(args.model):
        raise InputError("give the shape of each example input with --input-shape (e.g. --input-shape 1x3x224x224); "
                         "only a saved ExportedProgram (MODEL.pt2) or an ONNX model carries its own input shapes")
    if is_saved_program(args.model):
        from fxopt import capture

        model = capture.load_program(args.model)
        dtypes = None
        if args.input_dtype:
            count = len(capture.program_inputs(model))
            if len(args.input_dtype) not in (1, count):
                raise InputError(f"give one --input-dtype for all inputs or one per program input ({count}), "
                                 f"got {len(args.input_dtype)}")
            dtypes = [getattr(torch, d) for d in (args.input_dtype * count if len(args.input_dtype) == 1 else args.input_dtype)]
        log.info("loaded %s: inputs %s", args.model, ", ".join(p.describe() for p in capture.program_inputs(model)))
        return model, capture.program_example_inputs(model, shapes or None, dtypes, seed=args.seed)
    dtypes = args.input_dtype or ["float32"]
    if len(dtypes) not in (1, len(shapes)):
        raise InputError(f"give one --input-dtype for all inputs or one per --input-shape ({len(shapes)}), "
                         f"got {len(dtypes)}")
    model = build_model(args.model)
    if model.training:
        log.info("calling .eval() on the model: a deployment build is for inference")
        model.eval()
    return model, _random_inputs(shapes, dtypes * len(shapes) if len(dtypes) == 1 else dtypes, args.seed)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    import fxopt
    from fxopt import onnx_export
    from fxopt.targets import get_target

    target = get_target(args.target) if args.target else None  # unknown targets fail before any work
    shapes = [parse_shape(s) for s in args.input_shape]
    model, inputs = model_and_inputs(args, shapes)
    pipeline = args.pipeline or (target.pipeline if target is not None else "default")
    optimized = fxopt.optimize(model, inputs, pipeline, args.verify, target=target, leaf_modules=args.leaf,
                               capture=args.capture)
    if is_saved_program(args.model) or is_onnx_model(args.model):
        optimized.report.model = Path(args.model).name
    result = onnx_export.export(optimized.module, optimized.example_inputs, args.output, reference=optimized.reference,
                                opset=args.opset, dynamic_batch=args.dynamic_batch, check=args.verify != "off")
    print(optimized.report.to_text())
    for note in result.notes:
        print(f"note: {note}")
    print(result.describe())
    print(f"wrote {result.path}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    import fxopt
    from fxopt import artifact
    from fxopt.targets import get_target

    target = get_target(args.target)  # unknown targets fail before any work
    artifact.check_destination(Path(args.output).resolve(), args.force)
    tune = tune_config(args, Path(args.output).resolve())
    shapes = [parse_shape(s) for s in args.input_shape]
    model, inputs = model_and_inputs(args, shapes)
    pipeline = args.pipeline
    if args.depth_plan:
        from fxopt.depth import DepthPlan

        plan = DepthPlan.load(args.depth_plan)  # a missing or malformed plan fails before any work
        pipeline = plan.compile_pipeline(Path(args.depth_plan).resolve(), base=pipeline or target.pipeline, applied=False)
    compiled = fxopt.compile(model, inputs, target=target, pipeline=pipeline, verify=args.verify,
                             leaf_modules=args.leaf, capture=args.capture, tune=tune, runtime=args.runtime)
    if is_saved_program(args.model) or is_onnx_model(args.model):
        compiled.report.model = Path(args.model).name
    if args.layer_latency:
        from fxopt.layers import measure_layers

        compiled.report.layers = measure_layers(compiled.module, target)
    path = compiled.export(args.output, force=args.force)
    if args.report:  # the same page as the build directory's report.html
        compiled.report.save_html(args.report, title=f"fxopt build: {compiled.report.model} on {target.name}")
    print(compiled.report.to_text())
    sizes = (compiled.report.build or {}).get("standalone")
    if sizes:
        stack = f"{sizes['stack_bytes']} B" if sizes["stack_bytes"] is not None else "not measured"
        print(f"standalone ({sizes['scope']}): flash {sizes['flash_bytes']} B (code {sizes['code_bytes']} + constants "
              f"{sizes['constants_bytes']}), RAM {sizes['ram_bytes']} B (arena {sizes['arena_bytes']} + static "
              f"{sizes['static_ram_bytes']} + stack {stack})")
    print(f"wrote {path}" + (f" and {args.report}" if args.report else ""))
    return 0


def load_tensor(path: str, what: str):
    """A tensor from a .npy file or a torch.save'd .pt file."""
    import numpy as np
    import torch

    file = Path(path)
    if not file.is_file():
        raise InputError(f"{what} {path} does not exist: give a .npy or .pt file holding a batch of inputs")
    try:
        if file.suffix == ".npy":
            return torch.from_numpy(np.load(file, allow_pickle=False))
        value = torch.load(file, weights_only=True)
    except Exception as exc:
        raise InputError(f"{what} {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{what} {path} holds a {type(value).__name__}, not a tensor")
    return value


def cmd_plan_depth(args: argparse.Namespace) -> int:
    from fxopt.depth import plan_depth
    from fxopt.targets import get_target

    target = get_target(args.target)
    if (args.speedup is None) == (args.budget_ms is None):
        raise InputError("give one of --speedup (e.g. 1.5) or --budget-ms")
    shapes = [parse_shape(s) for s in args.input_shape]
    if not shapes:
        raise InputError("give the shape of the example input with --input-shape (e.g. --input-shape 1x3x224x224)")
    calibration = load_tensor(args.calib, "--calib") if args.calib else None
    model = build_model(args.model).eval()
    inputs = _random_inputs(shapes, ["float32"] * len(shapes), args.seed)
    plan = plan_depth(model, inputs, target, speedup=args.speedup,
                      budget=args.budget_ms / 1e3 if args.budget_ms is not None else None,
                      calibration=calibration, pipeline=args.pipeline or target.pipeline, max_kernel=args.max_kernel,
                      max_span=args.max_span, log=log.info)
    path = plan.save(args.output)
    if args.report:
        plan.report.save_html(args.report, title=f"fxopt depth plan: {plan.model} on {plan.target}")
    for note in plan.notes:
        print(f"note: {note}")
    print(f"{plan.model} on {plan.target}: remove {len(plan.removed_activations)} activation(s), merge "
          f"{len(plan.merges)} group(s) of {sum(len(m['convs']) for m in plan.merges)} convs; predicted "
          f"{plan.predicted_speedup:.2f}x (measured baseline {plan.baseline * 1e3 if plan.unit == 's' else plan.baseline:.4g}"
          f"{' ms' if plan.unit == 's' else ' instructions'}); calibration error {plan.calibration_error:.3g}")
    print(f"wrote {path}" + (f" and {args.report}" if args.report else ""))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import fxopt

    loaded = fxopt.load(args.directory)
    comparison = loaded.check()
    data = loaded.manifest.data
    status = "match" if comparison.ok else "MISMATCH"
    print(f"{args.directory}: {data['model']} on {data['target']['name']}, run {loaded.runs_with()}: {status} "
          f"(max abs error {comparison.max_abs_error:.3g}, relative to output scale {comparison.max_rel_error:.3g})")
    if not comparison.ok:
        print(comparison.detail)
    return 0 if comparison.ok else 1


def cmd_passes(args: argparse.Namespace) -> int:
    import dataclasses

    from fxopt.pass_manager import registered_passes
    from fxopt.spec import named_pipelines

    for name, cls in registered_passes().items():
        options = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)) or "no options"
        print(f"{name:<16} {cls.summary()}  [{options}]{'' if cls.exact else '  (lossy)'}")
        if args.verbose:
            print(textwrap.indent(textwrap.dedent((cls.__doc__ or "").split("\n", 1)[-1]).strip(), "    ") + "\n")
    print("\nnamed pipelines: " + ", ".join(named_pipelines()))
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from fxopt.targets import list_targets

    for target in list_targets():
        print(f"{target.name:<12} {target.description}  (runs: {target.runner}; tvm: {dict(target.tvm)})")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxopt", description="Optimize compact CNNs with torch.fx passes and build them with Apache TVM.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars and no warnings (results and errors still print)")
    chatter = argparse.ArgumentParser(add_help=False)  # the same two flags after the command
    chatter.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what each step does")
    chatter.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                         help="no progress bars and no warnings (results and errors still print)")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="optimize, compile and package a model into a build directory", parents=[chatter])
    build.add_argument("model", metavar="MODEL",
                       help="path/to/file.py:factory, package.module:factory, a saved ExportedProgram "
                            "(torch.export.save) path/to/model.pt2, or an ONNX model path/to/model.onnx (conv, gemm, "
                            "BN, activations, pooling, add/mul/concat, reshape/flatten/transpose, pad ...)")
    build.add_argument("--input-shape", action="append", default=[], metavar="1x3x224x224",
                       help="shape of an example input (repeat for several inputs); optional for a .pt2 MODEL, "
                            "whose own shapes are used")
    build.add_argument("--input-dtype", action="append", choices=_DTYPES, help="dtype of the inputs (default float32)")
    build.add_argument("--target", default="host", help="target name (see `fxopt targets`)")
    build.add_argument("--pipeline", default=None, help="named pipeline, TOML file, or text such as canonicalize,fold_bn")
    build.add_argument("--verify", default="end", choices=("each", "end", "off"))
    build.add_argument("--leaf", action="append", default=[], metavar="CLASS_OR_PATH",
                       help="keep this submodule (class name or qualified path) opaque when tracing with torch.fx")
    build.add_argument("--capture", default="auto", choices=("auto", "fx", "export"),
                       help="how the model becomes a graph: torch.fx symbolic tracing, torch.export, or auto "
                            "(fx, then export when fx cannot trace it; the default)")
    build.add_argument("--seed", type=int, default=0, help="seed of the random example inputs")
    build.add_argument("--tune", type=int, default=None, metavar="N",
                       help="tune the kernels with MetaSchedule, N trials in all (split over the kernels that the "
                            "tuning database does not have yet); Ctrl-C stops, keeping what was tuned")
    build.add_argument("--tune-db", default=None, metavar="DIR",
                       help="tuning database directory, reused across builds and models (default: tuning-db "
                            "beside the output directory); without --tune, its schedules are applied, nothing is tuned")
    build.add_argument("--depth-plan", default=None, metavar="PLAN.json",
                       help="apply a depth plan (`fxopt plan depth`): its activations removed, its conv groups merged")
    build.add_argument("--runtime", default=None, choices=("tvm", "standalone"),
                       help="tvm: the Relax VM with the TVM runtime (the default for targets with an OS); standalone: "
                            "plain C with a static arena and TVM's kernels, no TVM runtime (a C library, header, "
                            "example main.c and Makefile; the default for microcontroller targets)")
    build.add_argument("--report", default=None, metavar="REPORT.html",
                       help="also write the HTML report here (every build directory holds one: report.html)")
    build.add_argument("--layer-latency", action="store_true",
                       help="measure each conv / linear alone on the target for the report (cached on disk)")
    build.add_argument("-o", "--output", required=True, help="build directory to write")
    build.add_argument("--force", action="store_true", help="replace an existing directory that is not an fxopt build")
    build.set_defaults(func=cmd_build)

    plan = sub.add_parser("plan", help="make a lossy plan (depth compression) to read, edit and build with")
    plan_sub = plan.add_subparsers(dest="plan_kind", required=True)
    depth = plan_sub.add_parser("depth", help="which activations to remove so that convs merge, for a latency goal "
                                              "measured on the target", parents=[chatter])
    depth.add_argument("model", metavar="MODEL", help="path/to/file.py:factory or package.module:factory")
    depth.add_argument("--input-shape", action="append", default=[], metavar="1x3x224x224")
    depth.add_argument("--target", default="host", help="target to measure on (see `fxopt targets`)")
    goal = depth.add_mutually_exclusive_group()
    goal.add_argument("--speedup", type=float, default=None, help="speedup goal over the measured optimized model")
    goal.add_argument("--budget-ms", type=float, default=None, help="latency budget per run in milliseconds")
    depth.add_argument("--calib", default=None, metavar="DATA",
                       help="calibration batch (.npy or .pt) scoring what each removal costs (default: random inputs)")
    depth.add_argument("--pipeline", default=None, help="pipeline before planning (default: the target's)")
    depth.add_argument("--max-kernel", type=int, default=7, help="largest merged kernel (default 7)")
    depth.add_argument("--max-span", type=int, default=8, help="most convs between two kept activations (default 8)")
    depth.add_argument("--seed", type=int, default=0, help="seed of the random example input")
    depth.add_argument("--report", default=None, metavar="REPORT.html",
                       help="also write an HTML report: the latency-vs-damage curve, the conv latency table, the graph")
    depth.add_argument("-o", "--output", required=True, help="plan JSON to write")
    depth.set_defaults(func=cmd_plan_depth)

    export_onnx = sub.add_parser("export-onnx", parents=[chatter],
                                 help="optimize a model and write the optimized graph as ONNX, checked in ONNX Runtime")
    export_onnx.add_argument("model", metavar="MODEL",
                             help="as for build: file.py:factory, package.module:factory, model.pt2 or model.onnx")
    export_onnx.add_argument("--input-shape", action="append", default=[], metavar="1x3x224x224",
                             help="shape of an example input (repeat for several inputs); optional for .pt2 and .onnx")
    export_onnx.add_argument("--input-dtype", action="append", choices=_DTYPES, help="dtype of the inputs (default float32)")
    export_onnx.add_argument("--pipeline", default=None,
                             help="named pipeline, TOML file, or text such as canonicalize,fold_bn (default: the "
                                  "target's with --target, else 'default')")
    export_onnx.add_argument("--target", default=None,
                             help="target whose capabilities the passes read (and whose pipeline is the default)")
    export_onnx.add_argument("--verify", default="end", choices=("each", "end", "off"),
                             help="check the passes against eager and the ONNX model in ONNX Runtime (off: neither)")
    export_onnx.add_argument("--leaf", action="append", default=[], metavar="CLASS_OR_PATH",
                             help="keep this submodule opaque when tracing with torch.fx")
    export_onnx.add_argument("--capture", default="auto", choices=("auto", "fx", "export"))
    export_onnx.add_argument("--seed", type=int, default=0, help="seed of the random example inputs")
    export_onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    export_onnx.add_argument("--dynamic-batch", action="store_true",
                             help="make dimension 0 of every input and output symbolic (checked at batch 2)")
    export_onnx.add_argument("-o", "--output", required=True, help="ONNX file to write")
    export_onnx.set_defaults(func=cmd_export_onnx)

    check = sub.add_parser("check", help="run a build directory on its golden input and compare", parents=[chatter])
    check.add_argument("directory")
    check.set_defaults(func=cmd_check)

    passes = sub.add_parser("passes", help="list passes and named pipelines")
    passes.add_argument("-v", "--verbose", action="store_true", help="show each pass's algebra and declines")
    passes.set_defaults(func=cmd_passes)

    targets = sub.add_parser("targets", help="list targets")
    targets.set_defaults(func=cmd_targets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    level = logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="fxopt: %(message)s")
    # fxopt's loggers at the level asked for; progress bars (fxopt.progress) on a terminal unless
    # --quiet. Restored on return: main() may run more than once in a process (tests).
    loggers = {"fxopt": level, progress.LOGGER: logging.ERROR if args.quiet else logging.INFO}
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name, value in loggers.items():
        logging.getLogger(name).setLevel(value)
    try:
        with progress.redirect_logging() if progress.enabled() else contextlib.nullcontext():
            return args.func(args)
    except FxoptError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"fxopt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxopt: interrupted", file=sys.stderr)
        return 130
    finally:
        for name, value in saved.items():
            logging.getLogger(name).setLevel(value)
