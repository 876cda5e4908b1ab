"""fxopt: a compiler-style transformation pipeline for compact CNNs.

    optimized = fxopt.optimize(model.eval(), (x,))           # torch.fx passes, verified
    compiled = fxopt.compile(model.eval(), (x,), "host")      # + Apache TVM (Relax) build
    compiled.export("build/model"); fxopt.load("build/model").check()
"""

from fxopt.api import Compiled, Loaded, Optimized, __version__, compile, load, optimize
from fxopt.errors import (
    ArtifactError,
    BuildError,
    FxoptError,
    InputError,
    PassError,
    SpecError,
    TargetError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from fxopt.ir import trace
from fxopt.pass_manager import Fixpoint, Pass, PassContext, PassResult, Pipeline, register
from fxopt.report import Report
from fxopt.tuning import TuneConfig

__all__ = [
    "ArtifactError", "BuildError", "Compiled", "Fixpoint", "FxoptError", "InputError", "Loaded", "Optimized",
    "Pass", "PassContext", "PassError", "PassResult", "Pipeline", "Report", "SpecError", "TargetError",
    "TraceError", "TuneConfig", "UnsupportedOpError", "VerificationError", "__version__", "compile", "load", "optimize",
    "register", "trace",
]
