"""Board files: a TOML file that derives a target from a registered one.

    base = "riscv64-rvv"              # the registered target it derives from
    name = "my-k1-board"
    description = "SpacemiT K1 dev board"
    cores = 8
    qemu_cpu = "rv64,v=true,vlen=256"
    run_command = ["ssh", "k1"]       # optional: run the runner on the device itself
    flash_bytes = 262144              # optional, microcontrollers: standalone builds that need more
    ram_bytes = 65536                 # flash or RAM (arena + static data + stack) fail
    [tvm]                             # keys merged into the base target's TVM dict
    mcpu = "spacemit-x60"
    [capabilities]
    vector_bits = 256
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

from fxopt.errors import TargetError

from . import Capabilities, Target, get_target

_ALLOWED = {"base", "name", "description", "tvm", "capabilities", "cores", "qemu_cpu", "run_command",
            "toolchain", "runner", "pipeline", "schedule", "offload", "runtime", "cflags", "flash_bytes", "ram_bytes"}


def load_board(path: str | Path) -> Target:
    """The target a board file describes; errors name the file and the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise TargetError(f"cannot read board file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"board file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - _ALLOWED)
    if unknown:
        raise TargetError(f"board file {path}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_ALLOWED))}")
    if "base" not in data:
        raise TargetError(f"board file {path}: needs `base = \"<target>\"` naming the target it derives from (see `fxopt targets`)")
    try:
        base = get_target(data.pop("base"))
    except TargetError as exc:
        raise TargetError(f"board file {path}: {exc}") from exc
    name = data.pop("name", path.stem.lower().replace(" ", "-"))
    description = data.pop("description", f"board file {path.name}, derived from {base.name}")
    tvm = data.pop("tvm", {})
    if not isinstance(tvm, dict):
        raise TargetError(f"board file {path}: [tvm] must be a table of TVM target keys, got {tvm!r}")
    changes = dict(data)
    if "capabilities" in changes:
        caps = changes.pop("capabilities")
        known = {f.name for f in fields(Capabilities)}
        if not isinstance(caps, dict) or set(caps) - known:
            raise TargetError(f"board file {path}: [capabilities] accepts {', '.join(sorted(known))}, got {caps!r}")
        changes["capabilities"] = Capabilities(**{**base.capabilities.__dict__, **caps})
    for key in ("run_command", "offload", "cflags"):
        if isinstance(changes.get(key), list):
            changes[key] = tuple(changes[key])
    try:
        return base.derive(name, description, tvm=tvm, **changes)
    except TargetError as exc:
        raise TargetError(f"board file {path}: {exc}") from exc
    except TypeError as exc:
        raise TargetError(f"board file {path}: {exc}") from exc
