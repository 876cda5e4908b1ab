"""What TVM's fusion made of a model: its kernels, the ops inside each, the intermediate tensors
between them, and any conv or matmul whose elementwise epilogue was left in a kernel of its own.

Read between FuseOps and FuseTIR, where each kernel of ``main`` is still a Relax function
listing the legalized ops it fuses (after FuseTIR only a fused PrimFunc is left)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import tvm
from tvm import tirx
from tvm import relax

# Legalized PrimFunc names (TVM names them after their op, adding a number to repeats).
_ANCHOR = re.compile(r"^(conv\d?d|conv\d?d_transpose|matmul|dense|packed_conv)")
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "relu", "clip", "minimum", "maximum", "sigmoid", "tanh",
                "exp", "negative", "hardswish", "silu", "gelu", "leakyrelu", "leaky_relu", "elu", "erf", "sqrt",
                "power", "where", "greater", "less", "cast", "mish", "log", "softplus"}


def _op_name(name: str) -> str:
    """``add3`` -> ``add``; ``conv2d1`` -> ``conv2d``."""
    return re.sub(r"\d+$", "", name) if not name.startswith("conv") else re.sub(r"(?<=d)\d+$", "", name)


@dataclass
class Kernel:
    name: str
    ops: list[str]
    inputs: list[int] = field(default_factory=list)  # indices of the kernels whose outputs it reads

    @property
    def anchored(self) -> bool:
        """Whether the kernel computes a conv or matmul (its epilogue belongs inside it)."""
        return any(_ANCHOR.match(op) for op in self.ops)

    @property
    def elementwise(self) -> bool:
        return bool(self.ops) and all(_op_name(op) in _ELEMENTWISE for op in self.ops)


@dataclass
class FusionSummary:
    kernels: list[Kernel]
    intermediate_tensors: int

    def unfused_epilogues(self) -> list[tuple[str, str]]:
        """(conv/matmul kernel, elementwise kernel reading it) pairs TVM left apart."""
        return [(self.kernels[i].name, k.name) for k in self.kernels if k.elementwise
                for i in k.inputs if self.kernels[i].anchored]

    def to_json(self) -> dict:
        return {"kernels": len(self.kernels), "intermediate_tensors": self.intermediate_tensors,
                "unfused_epilogues": [f"{a} -> {b}" for a, b in self.unfused_epilogues()]}


def summarize(mod: tvm.IRModule, entry: str = "main") -> FusionSummary:
    """Kernels of ``entry`` in a module after FuseOps (before FuseTIR)."""
    function = mod[entry]
    produced: dict[relax.Var, int] = {}
    kernels: list[Kernel] = []
    outputs: set[relax.Var] = set()
    for block in function.body.blocks:
        for binding in block.bindings:
            value = binding.value
            callee, args = _kernel_call(mod, value)
            if callee is None:
                if isinstance(value, relax.Tuple):
                    outputs.update(f for f in value.fields if isinstance(f, relax.Var))
                elif isinstance(value, relax.Var) and value in produced:
                    produced[binding.var] = produced[value]  # an alias: the same tensor
                continue
            inputs = sorted({produced[a] for a in args if isinstance(a, relax.Var) and a in produced})
            produced[binding.var] = len(kernels)
            kernels.append(Kernel(callee, _ops_inside(mod, callee), inputs))
    body = function.body.body
    if isinstance(body, relax.Var):
        outputs.add(body)
    returned = {produced[v] for v in outputs if v in produced}
    return FusionSummary(kernels, len(kernels) - len(returned))


def _kernel_call(mod: tvm.IRModule, value) -> tuple[str | None, list]:
    """(kernel name, arguments) when ``value`` runs a kernel: a call_tir, or a call of a fused
    Relax function (attribute Primitive)."""
    if not isinstance(value, relax.Call):
        return None, []
    if isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.call_tir":
        args = value.args[1]
        return value.args[0].name_hint, list(args.fields) if isinstance(args, relax.Tuple) else [args]
    if isinstance(value.op, relax.GlobalVar):
        callee = mod[value.op]
        if isinstance(callee, relax.Function) and callee.attrs is not None and "Primitive" in callee.attrs:
            return value.op.name_hint, list(value.args)
    return None, []


def _ops_inside(mod: tvm.IRModule, name: str) -> list[str]:
    """The legalized ops a kernel is made of (its own name for an unfused PrimFunc)."""
    function = mod[name]
    if isinstance(function, tirx.PrimFunc):
        return [name]
    ops = []
    for block in function.body.blocks:
        for binding in block.bindings:
            callee, _ = _kernel_call(mod, binding.value)
            if callee is not None:
                ops.append(callee)
    return ops


def inspect_pass(sink: dict):
    """A module pass that leaves the module unchanged and puts its summary in ``sink``."""

    @tvm.transform.module_pass(opt_level=0, name="fxopt.SummarizeFusion")
    def inspect(mod, _ctx):
        sink["summary"] = summarize(mod)
        return mod

    return inspect
