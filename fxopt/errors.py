"""The one exception family of fxopt.

Every message names what failed (node with its source line, pass, option, file) and says what
to do about it; the CLI prints it without a traceback unless ``--debug``.
"""


class FxoptError(Exception):
    """Base of every error fxopt raises on purpose."""


class TraceError(FxoptError):
    """The model could not be captured as a graph."""


class InputError(FxoptError):
    """Example inputs or a model spec that do not fit the model."""


class UnsupportedOpError(FxoptError):
    """An operation that a stage cannot handle."""


class PassError(FxoptError):
    """A pass failed, was misconfigured, or its precondition does not hold."""


class SpecError(FxoptError):
    """A pipeline spec (Python list, TOML file or text) that cannot be read."""


class TargetError(FxoptError):
    """An unknown or misconfigured target."""


class BuildError(FxoptError):
    """Lowering, compiling or packaging a model for a target failed."""


class ArtifactError(FxoptError):
    """A build directory that is incomplete, tampered with, or not an fxopt build."""


class VerificationError(FxoptError):
    """A transformed or compiled model does not match its reference."""


class MeasureError(FxoptError):
    """A latency or instruction-count measurement that could not be made (a device farm that
    does not answer, a device lost for every retry, a backend the target cannot use)."""
