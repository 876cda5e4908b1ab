"""fxopt's default CPU schedules: ordered rules in the style of TVM's dlight, no tuning needed.

TVM 0.27's CPU pipeline legalizes convolutions into naive single-threaded loop nests and schedules
none of them (dlight has CPU rules for GEMV and softmax-like reductions only). These rules give
every fused PrimFunc a schedule from the target's capabilities alone:

* :class:`ConvLike` — one reduction block (conv2d dense/grouped/depthwise/pointwise, pooling,
  mean, matmul/dense) with an elementwise epilogue. The loop nest is tiled as

      parallel(outer spatial axes, W/rt, C/(lanes*cb)) · reduction axes · unroll(rt) · vector(lanes*cb)

  in the data layout :func:`layout_passes` chose (NHWC activations, HWIO weights, so the output
  channels are the contiguous innermost axis and the weights, packed once at compile time, are
  read as whole vectors). An ``rt x (lanes*cb)`` tile of the output stays in vector registers for
  the whole reduction; the epilogue (bias, BN, activation, residual add) is computed on that tile
  before it is stored, so the conv's output never exists in memory unfused. Zero padding stays a
  separate parallel copy (inlined it would put a bounds test on every input load); a pad that is
  a plain copy (1x1 convs) is inlined.
* :class:`Injective` — elementwise, broadcast, transpose, pad, concat functions: the blocks are
  inlined into the last one where TVM allows, and each remaining block is flattened, vectorized
  and parallelized.
* dlight's CPU ``Reduction`` and ``GEMV`` rules for what they cover (softmax-like chains).
* :class:`Fallback` — anything else: outer loops parallel, innermost loop vectorized when its
  extent is a multiple of the vector width.

The first rule that applies wins. Every rule declines (returns None) rather than fail: a PrimFunc
no rule can schedule keeps TVM's loop nest and is still correct. Parameters come from
:class:`CpuScheduleParams`, made from the target's capabilities (vector width, cores), never from
target names.
"""

from __future__ import annotations

import logging

import numpy as np
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight

logger = logging.getLogger(__name__)

_DATA_PAR = 0  # tirx.IterVar.DataPar
_COMM_REDUCE = 2  # tirx.IterVar.CommReduce


@dataclass(frozen=True)
class CpuScheduleParams:
    """What the default CPU rules need to know of a target.

    lanes: fp32 elements per vector register (AVX-512: 16, AVX2/NEON/RVV VLEN128: 8/4/4).
    vector_registers: architectural vector registers (AVX-512 and RVV: 32, AVX2: 16, NEON: 32),
        which bounds the register tile of accumulators.
    cores: worker threads the schedule is parallelized for (a hint for task granularity only).
    """

    lanes: int = 4
    vector_registers: int = 16
    cores: int = 1

    @property
    def accumulators(self) -> int:
        """Vector registers a tile of outputs may keep (room left for inputs and weights)."""
        return self.vector_registers - 4

    @classmethod
    def from_capabilities(cls, vector_bits: int, arch: str, cores: int | None) -> "CpuScheduleParams":
        lanes = max(1, (vector_bits or 128) // 32)
        registers = 32 if arch in ("aarch64", "riscv64") or vector_bits >= 512 else 16
        return cls(lanes=lanes, vector_registers=registers, cores=max(1, cores or 1))


def layout_passes() -> list:
    """Relax passes run before legalization: NHWC activations, HWIO weights for every conv2d.

    The weight transposes are folded into the constants (weights pre-packed at compile time);
    activation transposes remain only where a layout-sensitive op without an NHWC form
    (flatten, reshape) meets the NHWC region, normally once at the input and once before the
    classifier. ``clip`` (ReLU6, hard-swish) has no layout rule in TVM 0.27 and would sit between
    two transposes after every conv, so it is first rewritten as maximum/minimum, which have one.
    Negative axes of expand_dims/squeeze (1-D pools) are made non-negative, which ConvertLayout needs.
    conv3d is pinned to NCDHW: left free, ConvertLayout hands it the layout its input arrives in
    (``expand_dims(nhwc, 1)`` is "NCHWD"), and TVM 0.27 legalizes a conv3d with such a layout into
    wrong results (ChannelNet's channel-wise convs, Conv3d over unsqueezed channels: 99% wrong).
    """
    return [_clip_as_min_max(), _nonnegative_axes(),
            relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"], "relax.nn.conv3d": ["NCDHW", "OIDHW"]}),
            _transpose_constants(), _channel_moves_in_nhwc(), relax.transform.DeadCodeElimination()]


def _nonnegative_axes():
    @relax.expr_functor.mutator
    class NonnegativeAxes(relax.PyExprMutator):
        # expand_dims(x, -2)  =>  expand_dims(x, ndim_out - 2)   (squeeze: ndim_in - 2)
        # TVM 0.27's ConvertLayout dies with std::bad_alloc on a negative axis, and torch lowers
        # every 1-D pool as expand_dims(x, -2) -> pool2d -> squeeze(-2)
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", None)
            if name not in ("relax.expand_dims", "relax.squeeze") or call.attrs.axis is None:
                return call
            axes = [int(a) for a in call.attrs.axis]
            if min(axes) >= 0:
                return call
            ndim = call.args[0].ty.ndim
            if ndim < 0:  # unknown rank: leave it
                return call
            rank = ndim + len(axes) if name == "relax.expand_dims" else ndim
            fixed = [a + rank if a < 0 else a for a in axes]
            op = relax.op.expand_dims if name == "relax.expand_dims" else relax.op.squeeze
            return op(call.args[0], fixed)

    return _relax_function_pass(NonnegativeAxes, "fxopt.NonnegativeAxes")


_TO_NCHW, _TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]
# Ops that act on each element alone (a scalar constant second operand at most): any layout.
_ELEMENTWISE_UNARY = {"relax.nn.relu", "relax.sigmoid", "relax.tanh", "relax.nn.silu", "relax.nn.gelu", "relax.exp",
                      "relax.negative", "relax.maximum", "relax.minimum", "relax.multiply", "relax.add"}


def _is_scalar_constant(expr) -> bool:
    return isinstance(expr, tvm.ir.expr.Constant) and expr.value.numpy().size == 1


def _channel_moves_in_nhwc():
    """Channel concat, split, gather (take), shuffle (reshape-transpose-reshape) and elementwise
    ops between NHWC convs done in NHWC.

    ConvertLayout has no rule for the shuffle's reshapes, so a ShuffleNet unit leaves the NHWC
    region through a transpose before its concat and re-enters it through one transpose per
    split output: 18% of ShuffleNetV2's time on the host. Each such op whose inputs are
    NHWC→NCHW transposes gets an NHWC twin, a transpose back to NHWC of a value with a twin
    reads the twin, and dead-code elimination removes what no one reads any more."""

    @relax.expr_functor.mutator
    class ChannelMovesInNhwc(relax.PyExprMutator):
        def __init__(self):
            super().__init__()
            self.twin = {}  # NCHW var -> its NHWC value (a 5-D (N, H, W, A, B) for a split channel)
            self.pieces = {}  # NCHW var of a channel concat -> the NHWC twins of its pieces
            self.stacked = {}  # 5-D NCHW var (N, A, B, H, W) whose A pieces are those concatenated
            self.bound = {}  # var -> the value bound to it

        def visit_var_binding_(self, binding):
            value, var = binding.value, binding.var
            self.bound[var] = value
            if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.twin:
                super().visit_var_binding_(binding)
                self.twin[var] = self.builder_.emit(relax.TupleGetItem(self.twin[value.tuple_value], value.index))
                return
            name = getattr(getattr(value, "op", None), "name", None)
            axes = [int(a) for a in value.attrs.axes] if name == "relax.permute_dims" and value.attrs.axes else None
            if axes == _TO_NHWC and value.args[0] in self.twin:
                # permute_dims(nchw, to NHWC) with an NHWC twin  =>  the twin
                self.set_var_remap(var, self.twin[value.args[0]])
                return
            super().visit_var_binding_(binding)
            if not isinstance(value, relax.Call):
                return
            if axes == _TO_NCHW and len(_static_shape(value.args[0]) or ()) == 4:
                self.twin[var] = self.visit_expr(value.args[0])
                source = self.bound.get(value.args[0])
                if getattr(getattr(source, "op", None), "name", None) == "relax.concat" \
                        and int(source.attrs.axis) == 3 and isinstance(source.args[0], relax.Tuple):
                    self.pieces[var] = [self.visit_expr(f) for f in source.args[0].fields]
                return
            twin = self._twin(name, value, var)
            if twin is not None:
                self.twin[var] = self.builder_.emit(twin)

        def _twin(self, name, call, var):
            """The NHWC form of ``var = call`` when its tensor input has a twin, else None."""
            if name == "relax.concat":
                fields = call.args[0].fields if isinstance(call.args[0], relax.Tuple) else None
                if fields is None or int(call.attrs.axis) != 1 or any(f not in self.twin for f in fields):
                    return None
                self.pieces[var] = [self.twin[f] for f in fields]
                return relax.op.concat(self.pieces[var], axis=3)
            if not call.args or call.args[0] not in self.twin:
                return None
            x, twin = call.args[0], self.twin[call.args[0]]
            before, after = _static_shape(x), _static_shape(call) or []  # a split's result is a tuple: no shape
            if before is None:
                return None
            if name == "relax.split" and int(call.attrs.axis) == 1 and len(before) == 4:
                sections = call.attrs.indices_or_sections
                sections = int(sections) if isinstance(sections, (int, tvm.tirx.IntImm)) else [int(i) for i in sections]
                return relax.op.split(twin, sections, axis=3)
            if name in _ELEMENTWISE_UNARY and (len(call.args) == 1 or _is_scalar_constant(call.args[1])):
                return relax.Call(call.op, [twin, *call.args[1:]], call.attrs)
            if name == "relax.take" and int(call.attrs.axis) == 1 and len(before) == 4:
                return relax.op.take(twin, call.args[1], axis=3, mode=call.attrs.mode)
            if name == "relax.reshape" and len(before) == 4 and len(after) == 5 \
                    and (after[0], after[3], after[4]) == (before[0], before[2], before[3]):
                # (N, C, H, W) -> (N, A, B, H, W)  ~  (N, H, W, C) -> (N, H, W, A, B)
                pieces = self.pieces.get(x)
                if pieces is not None and len(pieces) == after[1] \
                        and all(_static_shape(p)[3] == after[2] for p in pieces):
                    self.stacked[var] = pieces
                return relax.op.reshape(twin, [after[0], after[3], after[4], after[1], after[2]])
            if name == "relax.permute_dims" and len(before) == 5 and \
                    [int(a) for a in call.attrs.axes] == [0, 2, 1, 3, 4]:
                pieces = self.stacked.get(x)
                if pieces is not None:
                    # shuffle of concat(p_1..p_A), A groups of B: stack(p, axis=-1), no index arithmetic
                    return relax.op.stack(pieces, axis=4)
                return relax.op.permute_dims(twin, [0, 1, 2, 4, 3])
            if name == "relax.reshape" and len(before) == 5 and len(after) == 4 \
                    and (after[0], after[2], after[3]) == (before[0], before[3], before[4]):
                return relax.op.reshape(twin, [after[0], after[2], after[3], after[1]])
            return None

    return _relax_function_pass(ChannelMovesInNhwc, "fxopt.ChannelMovesInNhwc")


def _transpose_constants():
    """``permute_dims`` and ``reshape`` of constants (ConvertLayout's weight transposes, the
    frontend's bias reshapes) computed with numpy.

    FoldConstant would do it after legalization by compiling and running one LLVM kernel per
    shape: 14 of GhostNet's 44 s of build time."""

    @relax.expr_functor.mutator
    class TransposeConstants(relax.PyExprMutator):
        # permute_dims(const W, axes)  =>  const transpose(W, axes)
        # reshape(const b, shape)       =>  const b.reshape(shape)
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", None)
            if name not in ("relax.permute_dims", "relax.reshape") or not isinstance(call.args[0], tvm.ir.expr.Constant):
                return call
            array = call.args[0].value.numpy()
            if name == "relax.reshape":
                shape = _static_shape(call)
                return call if shape is None else relax.const(array.reshape(shape))
            axes = call.attrs.axes
            axes = None if axes is None else [int(a) for a in axes]
            return relax.const(np.ascontiguousarray(np.transpose(array, axes)))

    return _relax_function_pass(TransposeConstants, "fxopt.TransposeConstants")


def _relax_function_pass(mutator, name: str):
    """A module pass running a fresh ``mutator`` (a relax.PyExprMutator class) over every Relax
    function of the module."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def run(mod, _ctx):
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gvar] = mutator().visit_expr(func)
        return mod

    return run


def legalize_map(params: "CpuScheduleParams") -> dict:
    """Custom legalizations for LegalizeOps: dense NHWC conv2d reads blocked, pre-packed weights.

    TOPI's NHWC conv reads HWIO weights, where the output-channel slice a tile needs is strided
    by the full output-channel count (2 KiB apart for 512 channels): every step of the reduction
    touches new cache lines and the slice thrashes a few cache sets. Packed as
    ``[Cout/B, KH, KW, Cin, B]`` with ``B`` the schedule's tile width (:func:`conv_tile`), the slice
    is one contiguous run. A constant weight is packed here, with numpy (a weight that is not a
    constant gets a TE packing function); grouped and depthwise convs keep TOPI's form (their
    weight slice is already contiguous).
    """
    from tvm import te, topi
    from tvm.relax.transform.legalize_ops import nn as legalize_nn

    def packed_conv2d(bb, call):
        attrs = call.attrs
        data, weight = call.args
        shapes = [_static_shape(data), _static_shape(weight)]
        if (attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO" or attrs.out_layout != "NHWC"
                or int(attrs.groups) != 1 or None in shapes or not str(data.ty.dtype).startswith("float")):
            return legalize_nn._nn_conv2d(bb, call)
        (n, height, width, cin), (kh, kw, _, cout) = shapes
        sh, sw = (int(v) for v in attrs.strides)
        dh, dw = (int(v) for v in attrs.dilation)
        pt, pl, pb, pr = (int(v) for v in attrs.padding)
        out_w = (width + pl + pr - (kw - 1) * dw - 1) // sw + 1
        vector, count = conv_tile(cout, out_w, params, allow_partial=True)
        block = vector * count
        out_dtype = str(attrs.out_dtype) or str(data.ty.dtype)

        blocks = -(-cout // block)

        def pack(w):
            # HWIO [KH, KW, Cin, Cout] -> [ceil(Cout/B), KH, KW, Cin, B], zeros past Cout
            return te.compute(
                (blocks, kh, kw, cin, block),
                lambda o, y, x, i, b: te.if_then_else(
                    o * block + b < cout, w[y, x, i, tvm.te.min(o * block + b, cout - 1)], tvm.tirx.const(0, w.dtype)),
                name="weight_pack")

        def conv(x, wp):
            padded = topi.nn.pad(x, [0, pt, pl, 0], [0, pb, pr, 0], name="pad_temp") if (pt or pl or pb or pr) else x
            out_h = (height + pt + pb - (kh - 1) * dh - 1) // sh + 1
            ry = te.reduce_axis((0, kh), name="ry")
            rx = te.reduce_axis((0, kw), name="rx")
            rc = te.reduce_axis((0, cin), name="rc")
            # Channels padded to whole tiles (zero weights), sliced back by an injective
            # block that fuses into the epilogue: full-vector tiles, no predicates.
            conv = te.compute(
                (n, out_h, out_w, blocks * block),
                lambda b, y, x_, c: te.sum(
                    padded[b, y * sh + ry * dh, x_ * sw + rx * dw, rc].astype(out_dtype)
                    * wp[c // block, ry, rx, rc, c % block].astype(out_dtype),
                    axis=[ry, rx, rc]),
                name="conv2d_nhwc_packed")
            if blocks * block == cout:
                return conv
            return te.compute((n, out_h, out_w, cout), lambda b, y, x_, c: conv[b, y, x_, c], name="channel_slice")

        constant = _bound_constant(bb, weight)
        if constant is not None:  # packed here with numpy: no kernel to compile and fold
            array = constant.value.numpy()
            padded = np.zeros((kh, kw, cin, blocks * block), dtype=array.dtype)
            padded[..., :cout] = array
            packed = relax.const(np.ascontiguousarray(
                padded.reshape(kh, kw, cin, blocks, block).transpose(3, 0, 1, 2, 4)))
        else:
            packed = bb.emit_te(pack, weight, primfunc_name_hint="weight_pack")
        return bb.call_te(conv, data, packed, primfunc_name_hint="conv2d")

    return {"relax.nn.conv2d": packed_conv2d}


def _bound_constant(bb, expr):
    """The constant ``expr`` is, or is bound to in ``bb``; None otherwise."""
    seen = 0
    while isinstance(expr, relax.Var) and seen < 8:
        try:
            expr = bb.lookup_binding(expr)
        except Exception:  # noqa: BLE001 - not bound in this builder
            return None
        seen += 1
    return expr if isinstance(expr, tvm.ir.expr.Constant) else None


def _static_shape(expr) -> list[int] | None:
    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", shape)
    try:
        return [int(d) for d in values]
    except (TypeError, ValueError):
        return None


def conv_tile(channels: int, rows_extent: int, params: "CpuScheduleParams", allow_partial: bool = False) -> tuple[int, int]:
    """(vector, count) of the output-channel tile for an op with ``channels`` outputs per pixel
    and ``rows_extent`` pixels along the register-tiled axis; shared by the schedule and the
    weight packing so that both agree."""
    max_width = params.lanes * (params.accumulators if rows_extent == 1 else 2)
    return _vector_tile(channels, params.lanes, max_width, allow_partial)


def _clip_as_min_max():
    @relax.expr_functor.mutator
    class ClipAsMinMax(relax.PyExprMutator):
        # clip(x, lo, hi)  =>  minimum(maximum(x, lo), hi)  (same values, layout-agnostic ops)
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.clip":
                return call
            x, lo, hi = call.args
            dtype = str(x.ty.dtype)
            if not dtype.startswith("float"):
                return call
            return relax.op.minimum(
                relax.op.maximum(x, relax.const(_scalar(lo), dtype)), relax.const(_scalar(hi), dtype)
            )

    def _scalar(value) -> float:
        while hasattr(value, "value"):  # PrimValue -> FloatImm -> float
            value = value.value
        return float(value)

    return _relax_function_pass(ClipAsMinMax, "fxopt.ClipAsMinMax")


# --------------------------------------------------------------------------------------------
# helpers


def _root(sch: s_tir.Schedule):
    return sch.get_sblock("root")


def _blocks(sch: s_tir.Schedule) -> list:
    return list(sch.get_child_blocks(_root(sch)))


def _iter_types(sch: s_tir.Schedule, block) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(t == _COMM_REDUCE for t in _iter_types(sch, block))


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def _writes_function_output(sch: s_tir.Schedule, block) -> bool:
    """True when ``block`` writes a buffer the function does not allocate (a parameter)."""
    allocated = list(sch.get(_root(sch)).alloc_buffers)

    def is_allocated(region) -> bool:
        source = getattr(region, "buffer", None) or region.source  # TVM 0.27: a TensorRegion
        return any(source.same_as(a) or source.same_as(getattr(a, "data", None)) for a in allocated)

    return not all(is_allocated(region) for region in sch.get(block).writes)


def _is_padding(sch: s_tir.Schedule, block) -> bool:
    """True for a zero-padding block: its value is an if_then_else on the indices."""
    return "if_then_else" in str(sch.get(block).body)


def _vectorize_tail(sch: s_tir.Schedule, block, lanes: int, cores: int, parallel_min: int = 4096) -> None:
    """Vectorize the innermost loop of ``block`` (split by ``lanes`` when it divides) and run the
    loops outside it in parallel when there is enough work."""
    loops = sch.get_loops(block)
    extents = [_extent(sch, lp) for lp in loops]
    if not loops or any(e is None for e in extents):
        return
    total = 1
    for e in extents:
        total *= e
    inner = loops[-1]
    outer = list(loops[:-1])
    if extents[-1] % lanes == 0 and extents[-1] > lanes:
        split_outer, inner = sch.split(inner, [None, lanes])
        outer.append(split_outer)
    if extents[-1] % lanes == 0 or extents[-1] < lanes:
        sch.vectorize(inner)
    if outer and total >= parallel_min and cores > 1:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _vector_tile(extent: int, lanes: int, max_width: int, allow_partial: bool = False) -> tuple[int, int]:
    """(vector, count): the output-channel tile is ``count`` vectors of ``vector`` elements.

    ``vector`` is the largest power of two up to the register width that divides the extent
    (24 channels: vectors of 8), because LLVM scalarizes odd vector lengths; ``count`` is the
    most such vectors that divide the extent within ``max_width`` elements (many when the tile
    has one row, as in a matmul at batch 1, so each weight row is read in long runs). With
    ``allow_partial``, where that vector would be under a register (ShuffleNet's 116 = 4 x 29
    channels) the tile is whole registers and need not divide the extent: the caller pads the
    channels (see :func:`legalize_map`)."""
    vector = min(lanes, extent & -extent)
    if allow_partial and vector < lanes and extent > lanes:
        # Whole registers over a few padded channels: the count that pads least (then the
        # largest), if the padding costs at most 1/8 more work.
        padded, count = min((-(-extent // (lanes * k)) * lanes * k, -k) for k in range(1, max(1, max_width // lanes) + 1))
        if padded * 8 <= extent * 9:
            return lanes, -count
    count = 1
    for k in range(max(1, max_width // vector), 0, -1):
        if extent % (vector * k) == 0:
            count = k
            break
    return vector, count


def _uses_var(sch: s_tir.Schedule, block, var) -> list[bool]:
    """For each read region of ``block``: whether its indices use ``var``."""
    return [
        any(any(v.same_as(var) for v in tirx.analysis.undefined_vars(r.min)) for r in region.region)
        for region in sch.get(block).reads
    ]


# --------------------------------------------------------------------------------------------
# rules


class _CpuRule(dlight.ScheduleRule):
    """A rule reading the target's CpuScheduleParams; ``_apply`` returns the schedule, or None
    when it does not apply. Any error inside it is a decline too: the next rule tries."""

    def __init__(self, params: CpuScheduleParams) -> None:
        self.params = params

    def apply(self, func, target, tunable):  # noqa: ARG002 - dlight's signature
        if not isinstance(func, tirx.PrimFunc):
            return None
        try:
            return self._apply(s_tir.Schedule(func))
        except Exception as exc:  # noqa: BLE001 - a rule declines, the next one tries
            logger.debug("%s declined: %s", type(self).__name__, exc)
            return None

    def _apply(self, sch: s_tir.Schedule):
        raise NotImplementedError


class ConvLike(_CpuRule):
    """One reduction block with elementwise producers/epilogue: register-tiled, vectorized,
    parallel. See the module docstring for the loop nest."""

    def _apply(self, sch: s_tir.Schedule):
        blocks = _blocks(sch)
        reductions = [b for b in blocks if _is_reduction(sch, b)]
        if len(reductions) != 1:
            return None
        anchor = reductions[0]
        anchor_name = sch.get(anchor).name_hint
        types = _iter_types(sch, anchor)
        n_spatial = 0
        while n_spatial < len(types) and types[n_spatial] == _DATA_PAR:
            n_spatial += 1
        if n_spatial < 2 or any(t != _COMM_REDUCE for t in types[n_spatial:]):
            return None  # needs spatial axes first, then reductions (TVM's legalized form)
        loops = sch.get_loops(anchor)
        if len(loops) != len(types) or any(_extent(sch, lp) is None for lp in loops):
            return None

        # Producers: a plain copy (a 1x1 conv's "pad") is inlined. Zero padding is never inlined
        # (a bounds test on every load of the reduction; TVM 0.27 cannot even build that for
        # RVV): where every read follows the channel axis (depthwise conv, pooling: little work
        # per input element) each task pads its own window (below); before a dense conv it is
        # one parallel copy, small next to the conv.
        vector_var = sch.get(anchor).iter_vars[n_spatial - 1].var
        reads_follow_channels = all(_uses_var(sch, anchor, vector_var))
        index = [sch.get(b).name_hint for b in blocks].index(anchor_name)
        for block in blocks[:index]:
            if not _is_padding(sch, block):
                try:
                    sch.compute_inline(block)
                except Exception:  # noqa: BLE001 - leave it as its own loop nest
                    pass
        # Epilogue: inline every elementwise block after the anchor into the last one.
        epilogue = _blocks(sch)
        names = [sch.get(b).name_hint for b in epilogue]
        after = epilogue[names.index(anchor_name) + 1:]
        for block in after[:-1]:
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001
                pass
        anchor = sch.get_sblock(anchor_name)
        if _writes_function_output(sch, anchor):
            sch.cache_write(anchor, 0, "global")
            anchor = sch.get_sblock(anchor_name)
        names = [sch.get(b).name_hint for b in _blocks(sch)]
        position = names.index(anchor_name)
        consumers = _blocks(sch)[position + 1:]
        before = _blocks(sch)[:position]

        loops = sch.get_loops(anchor)
        spatial, reduce = loops[:n_spatial], loops[n_spatial:]
        extents = [_extent(sch, lp) for lp in spatial]
        lanes = self.params.lanes
        vec_extent = extents[-1]
        # Vector axis: the innermost spatial axis (NHWC: output channels) in blocks of one or
        # two vector registers; rows: the next axis, as many as the accumulators allow.
        rows_extent = extents[-2]
        vector, count = conv_tile(vec_extent, rows_extent, self.params)
        width = vector * count
        rows = _largest_divisor(rows_extent, min(max(1, self.params.accumulators // count), 8))

        c_outer, c_inner = sch.split(spatial[-1], [None, width])
        c_count, c_vector = sch.split(c_inner, [count, vector])
        r_outer, r_inner = sch.split(spatial[-2], [None, rows])
        # Consecutive tasks of a thread share what is read most: the weight slice of a dense
        # conv or matmul (channel blocks outermost), the input rows of a depthwise conv or a
        # pooling, whose every read follows the channel axis (rows outermost).
        if reads_follow_channels:
            outer = list(spatial[:-2]) + [r_outer, c_outer]
        else:
            outer = [c_outer] + list(spatial[:-2]) + [r_outer]
        sch.reorder(*outer, *reduce, r_inner, c_count, c_vector)
        fused = sch.fuse(*outer)
        sch.parallel(fused)
        sch.unroll(r_inner)
        sch.unroll(c_count)
        sch.vectorize(c_vector)
        if reduce:
            # The accumulators start at zero in a loop nest of their own, before the reduction.
            init = sch.decompose_reduction(anchor, reduce[0])
            init_loops = sch.get_loops(init)
            if len(init_loops) >= 4:
                sch.unroll(init_loops[-3])
                sch.unroll(init_loops[-2])
                sch.vectorize(init_loops[-1])

        for block in before:
            if not _is_padding(sch, block):
                continue
            if reads_follow_channels:
                # Each task pads just the input window its tile reads, into a small buffer
                # that stays in L1 (no full padded copy, no bounds test in the reduction).
                sch.compute_at(block, fused)
            else:
                _vectorize_tail(sch, block, lanes, self.params.cores, parallel_min=1)
        if len(consumers) == 1:
            epilogue_block = consumers[0]
            try:
                sch.reverse_compute_at(epilogue_block, fused)
                e_loops = sch.get_loops(epilogue_block)[1:]
                if e_loops and _extent(sch, e_loops[-1]) == width:
                    e_count, e_vector = sch.split(e_loops[-1], [count, vector])
                    # Unroll a tile-sized epilogue only. One that broadcasts the tile over a larger
                    # map (a squeeze-excite gate: a 1x1 conv's output times a 14x14 feature map)
                    # would unroll rows x cols x count bodies (mnasnet_a1: 14*14*21, ~40 s of LLVM
                    # per kernel); its outer loops stay plain loops.
                    outer_extents = [_extent(sch, loop) for loop in e_loops[:-1]]
                    if all(e is not None for e in outer_extents) and int(np.prod(outer_extents)) <= rows:
                        for loop in e_loops[:-1]:
                            sch.unroll(loop)
                    sch.unroll(e_count)
                    sch.vectorize(e_vector)
            except Exception as exc:  # noqa: BLE001 - keep the epilogue as its own loop nest
                logger.debug("epilogue of %s not fused: %s", anchor_name, exc)
                _vectorize_tail(sch, epilogue_block, lanes, self.params.cores)
        else:
            for block in consumers:
                _vectorize_tail(sch, block, lanes, self.params.cores)
        return sch


class Transpose(_CpuRule):
    """A layout transpose (the output's innermost dim is not the one its input varies fastest
    along), as at an NCHW/NHWC boundary, with any elementwise ops or reshapes fused into it:
    after inlining, the loops are tiled over both of those dims (up to lanes x lanes), so that reads
    and writes both stay in a tile that fits the cache, and vectorized along the output's
    innermost dim. Any tiling computes the same values; this rule only picks which."""

    def _apply(self, sch: s_tir.Schedule):
        blocks = _blocks(sch)
        if not blocks or any(_is_reduction(sch, b) for b in blocks):
            return None
        for block in blocks[:-1]:
            sch.compute_inline(block)  # raises (the rule declines) when a block cannot inline
        block = _blocks(sch)[0]
        stmt = sch.get(block)
        variables = [iv.var for iv in stmt.iter_vars]
        written = [r.min for r in stmt.writes[0].region] if len(stmt.writes) == 1 else []
        if len(written) != len(variables) or any(not w.same_as(v) for w, v in zip(written, variables)):
            return None
        source = max(stmt.reads, key=lambda r: len(r.region), default=None)
        fastest = _unit_stride_var(source.region[-1].min) if source is not None else None
        across = next((i for i, v in enumerate(variables) if fastest is not None and v.same_as(fastest)), None)
        if across is None or across == len(variables) - 1:
            return None
        loops = sch.get_loops(block)
        extents = [_extent(sch, lp) for lp in loops]
        along = len(loops) - 1
        if None in extents:
            return None
        # the widest tiles that divide both dims (a 14x14 or 7x7 map still tiles by 7)
        tiles = [_largest_divisor(extents[i], self.params.lanes) for i in (across, along)]
        if min(tiles) < 4:
            return None
        across_outer, across_inner = sch.split(loops[across], [None, tiles[0]])
        along_outer, along_inner = sch.split(loops[along], [None, tiles[1]])
        outer = [lp for i, lp in enumerate(loops) if i not in (across, along)] + [across_outer, along_outer]
        sch.reorder(*outer, across_inner, along_inner)
        sch.vectorize(along_inner)
        if self.params.cores > 1:
            sch.parallel(sch.fuse(*outer))
        return sch


def _unit_stride_var(index):
    """The variable an index moves with at stride 1: ``w`` in ``w``, ``h * 56 + w`` or, from an
    inlined reshape, ``(c * 1024 + h * 32 + w) % 65536``."""
    if isinstance(index, tirx.Var):
        return index
    if isinstance(index, (tirx.Add, tirx.FloorMod)):
        return _unit_stride_var(index.b if isinstance(index, tirx.Add) else index.a)
    return None


class Injective(_CpuRule):
    """Functions of elementwise/injective blocks only: inline into the last, then vectorize and
    parallelize each block left."""

    def _apply(self, sch: s_tir.Schedule):
        blocks = _blocks(sch)
        if not blocks or any(_is_reduction(sch, b) for b in blocks):
            return None
        for block in blocks[:-1]:
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - a block that cannot inline stays a block
                pass
        for block in _blocks(sch):
            _vectorize_tail(sch, block, self.params.lanes, self.params.cores)
        return sch


class Fallback(_CpuRule):
    """Any function: the outermost loop of each block parallel, when it is data-parallel and
    every loop of the block is a block iteration (nothing vectorized: LLVM may do that)."""

    def _apply(self, sch: s_tir.Schedule):
        for block in _blocks(sch):
            loops = sch.get_loops(block)
            if not loops:
                continue
            types = _iter_types(sch, block)
            if types and types[0] == _DATA_PAR and len(loops) == len(types) and self.params.cores > 1:
                sch.parallel(loops[0])
        return sch


def rules(params: CpuScheduleParams) -> list:
    """The ordered rule list: first that applies wins, fallback last."""
    return [
        ConvLike(params),
        Transpose(params),
        Injective(params),
        dlight.cpu.Reduction(),
        dlight.cpu.GEMV(),
        Fallback(params),
    ]


SCHEDULE_ATTR = "fxopt.schedule_rule"
SCHEDULED_ATTR = "tirx.is_scheduled"  # TVM 0.27's name ("tir.is_scheduled" before the tirx rename)


def default_schedule_pass(params: CpuScheduleParams):
    """A module pass giving every PrimFunc not yet scheduled (e.g. by a tuning database) the
    schedule of the first rule of :func:`rules` that applies; the rule's name is kept in the
    function's ``fxopt.schedule_rule`` attribute (what the tests and reports read)."""
    ordered = rules(params)

    @tvm.transform.module_pass(opt_level=0, name="fxopt.DefaultCpuSchedules")
    def apply(mod, _ctx):
        updated = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            target = func.attrs.get("target") if func.attrs else None
            target = target or tvm.target.Target.current(allow_none=False)
            rule, sch = schedule_function(func, target, ordered)
            if sch is not None:
                updated[gvar] = sch.mod["main"].with_attrs({SCHEDULED_ATTR: True, SCHEDULE_ATTR: rule})
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod

    return apply


def schedule_function(func, target, ordered: list) -> tuple[str | None, "s_tir.Schedule | None"]:
    """(rule name, schedule) of the first rule of ``ordered`` that schedules ``func``; the
    schedule's trace replays it (tuning seeds its database with it)."""
    for rule in ordered:
        sch = rule.apply(func, target, False)
        if isinstance(sch, list):
            sch = sch[0] if sch else None
        if sch is not None:
            return type(rule).__name__, sch
    return None, None


def is_scheduled(func) -> bool:
    """Whether a PrimFunc already has its schedule (from the rules or a tuning database)."""
    attrs = getattr(func, "attrs", None)
    return bool(attrs is not None and SCHEDULED_ATTR in attrs and bool(attrs[SCHEDULED_ATTR]))


def _fusion_passes(target, params: CpuScheduleParams, inspect=None) -> list:
    """Everything before scheduling: dispatch -> layout (NHWC/HWIO, clip as min/max, constant
    transposes) -> legalize (packed dense convs) -> fold constants -> fuse. ``inspect`` (a
    pass that reads the module) runs between FuseOps and FuseTIR."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return (
        cpu.library_dispatch_passes(target)
        + layout_passes()
        + [
            relax.transform.LegalizeOps(customize_legalize_map=legalize_map(params)),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            *([inspect] if inspect is not None else []),
            relax.transform.FuseTIR(),
        ]
    )


def relax_pipeline(target, params: CpuScheduleParams, tuned=None, inspect=None):
    """TVM's CPU pipeline with fxopt's layout, legalization and default schedules:
    :func:`_fusion_passes` -> ``tuned`` (a pass applying tuned schedules, optional) -> default
    rules for every PrimFunc still unscheduled -> VM lowering. ``inspect``: see _fusion_passes."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="fxopt.CpuPipeline")
    def _pipeline(mod, _ctx):
        with target:
            passes = (
                _fusion_passes(target, params, inspect)
                + ([tuned] if tuned is not None else [])
                + [default_schedule_pass(params)]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def fused_module(mod, target, params: CpuScheduleParams):
    """The module as the schedules see it (fused PrimFuncs, none scheduled): for tuning and for
    inspecting what the rules get."""
    with target:
        return tvm.transform.Sequential(_fusion_passes(target, params))(mod)
