"""Relax converters for fxopt's sparse ops: TIR kernels specialized on the constant sparsity pattern.

``torch.ops.fxopt.sparse_conv1x1`` and ``torch.ops.fxopt.sparse_linear`` (see
:mod:`fxopt.sparse_ops`) carry a block-sparse (BSR) weight as buffers. :func:`converters` returns
the ``custom_convert_map`` entries that ``lower()`` merges into the frontend's: each call becomes a
``call_tir`` of a PrimFunc generated for that layer, from the pattern read out of the
ExportedProgram at conversion time (a compile-time snapshot: a weight changed after the build is
not seen by it).

The kernel computes ``Y[n, m, p] = b[m] + sum_k W[m, k] X[n, k, p]`` on ``X`` viewed as
``[N, K, P]``: a 1x1 conv's NCHW input with ``P = H*W`` (the converter emits the conv in the layout
it receives, NCHW; fxopt's CPU pipeline puts its NHWC transposes around it), a linear's ``[..., K]``
input as ``[N, K, 1]``. The loop nest, for ``P > 1``:

    parallel over (image, pixel chunk, range of block rows)
      for each tile of W pixels (the last one moved back to end at the chunk's end: full vectors
                                 only, no predicated tail; recomputed pixels get the same values)
        for each block row (R rows)
          acc[r] = bias; acc[r] += W[row, col] * X[n, col, tile] for its stored blocks; store

with ``R x W = 64`` accumulators (4 AVX-512, 8 AVX2, 16 NEON / RVV-128 vector registers; the
kernel is generated before the target is known), so 1x1 and 1x4 blocks get 64-pixel tiles, 4x1
blocks 16 and 8x1 blocks 8, and an input vector is loaded once for the R rows of a block. Chunks
keep the input rows a task reads within ~128 KiB. Two forms, by size:

* **unrolled** (at most :data:`UNROLL_LIMIT` stored blocks): the loops over the blocks are
  unrolled, every column index and value offset is a constant in the code (zeros inside a stored
  block are skipped too); the ranges of block rows are dispatched with a binary tree of tests on
  the task index.
* **indexed** (larger layers): the same loop nest with the column indices and row pointers as
  constant arrays compiled into the library, and a loop over each block row's blocks. Unrolled
  code is read once per pixel tile, like data, and costs LLVM compile time per block; measured on
  MobileNetV2's 1x1 convs the indexed form was as fast or faster beyond a few hundred blocks.

For ``P == 1`` (a linear at batch size N, a 1x1 conv on a 1x1 map) the vector axis is the block's
rows (4x1 and 8x1 blocks: a vector of block values times a broadcast input) or nothing (scalar
code). The functions carry ``tirx.is_scheduled`` (fxopt's CPU schedule rules and dlight skip them),
``op_pattern`` opaque (FuseOps leaves them alone) and ``fxopt.sparse`` (what they are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from tvm import relax, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

__all__ = ["OPS", "UNROLL_LIMIT", "SparseLayer", "converters", "sparse_kernel", "SPARSE_ATTR"]

OPS = ("sparse_conv1x1.default", "sparse_linear.default")
# Stored blocks up to which the kernel is unrolled (see the module docstring); LLVM needs about
# 0.5 ms per unrolled block for x86, more for RISC-V.
UNROLL_LIMIT = 256
SPARSE_ATTR = "fxopt.sparse"
_OPAQUE = 8  # relax OpPatternKind.kOpaque
_ACC = 64  # accumulators per tile (rows x pixels)
_LEAF_TERMS = 1024  # unrolled multiply-adds per dispatch leaf (its code stays in the instruction cache)
_TASKS = 16  # parallel tasks to aim for (a kernel is generated before the target's cores are known)
_CHUNK_BYTES = 128 * 1024  # input rows of a pixel chunk: what one task reads over and over


@dataclass(frozen=True)
class SparseLayer:
    """What a kernel is specialized on: sizes, block shape, dtype and the pattern (numpy)."""

    n: int  # images (conv) or rows of the flattened input (linear)
    k: int  # input channels / features
    m: int  # output channels / features
    p: int  # pixels per image (1 for a linear)
    block: tuple[int, int]
    dtype: str
    col_indices: np.ndarray  # [nnzb] block columns
    row_ptr: np.ndarray  # [M/R + 1]
    nonzero: np.ndarray  # [nnzb, R, C] bool: which stored values are non-zero
    has_bias: bool

    @property
    def nnz_blocks(self) -> int:
        return int(self.col_indices.size)

    @property
    def unrolled(self) -> bool:
        return self.nnz_blocks <= UNROLL_LIMIT

    def describe(self) -> str:
        r, c = self.block
        return (f"{'unrolled' if self.unrolled else 'indexed'} {r}x{c} blocks={self.nnz_blocks} "
                f"N={self.n} K={self.k} M={self.m} P={self.p}")


# --------------------------------------------------------------------------------------------
# Converters


def converters(exported_program) -> dict[str, Callable]:
    """``custom_convert_map`` entries for fxopt's sparse ops; the pattern tensors are looked up
    in ``exported_program`` (the one the frontend converts, before its decompositions), where the
    op's buffers are lifted to inputs of the same names."""
    tensors = _input_tensors(exported_program)

    def convert(node, importer):
        return _convert(node, importer, tensors)

    return {op: convert for op in OPS}


def _input_tensors(ep) -> dict[str, object]:
    found = {}
    state = ep.state_dict
    constants = getattr(ep, "constants", {}) or {}
    for spec in ep.graph_signature.input_specs:
        target = spec.target
        if target is None:
            continue
        if target in state:
            found[spec.arg.name] = state[target]
        elif target in constants:
            found[spec.arg.name] = constants[target]
    return found


def _constant_array(arg, tensors: dict, what: str, node) -> np.ndarray:
    name = getattr(arg, "name", None)
    tensor = tensors.get(name)
    if tensor is None:
        raise ValueError(f"fxopt sparse op '{node.name}': its {what} ('{name}') is not a buffer or constant of the "
                         "model; the sparsity pattern must be constant to compile a kernel for it")
    return tensor.detach().cpu().numpy()


def _static(shape) -> list[int]:
    return [int(d) for d in shape]


def _convert(node, importer, tensors: dict):
    bb = importer.block_builder
    kind = node.target.__name__.split(".")[0]  # sparse_conv1x1 | sparse_linear
    x_arg, values_arg, cols_arg, rows_arg, block, weight_shape = node.args[:6]
    bias_arg = node.args[6] if len(node.args) > 6 else node.kwargs.get("bias")
    x = importer.env[x_arg]
    values = importer.env[values_arg]
    bias = importer.env[bias_arg] if bias_arg is not None else None
    values_np = _constant_array(values_arg, tensors, "values", node)
    cols = _constant_array(cols_arg, tensors, "column indices", node).astype(np.int64)
    row_ptr = _constant_array(rows_arg, tensors, "row pointers", node).astype(np.int64)
    r, c = (int(b) for b in block)
    m, k = (int(s) for s in weight_shape)
    shape = _static(x.ty.shape)
    dtype = str(x.ty.dtype)
    if kind == "sparse_conv1x1":
        n, p = shape[0], int(np.prod(shape[2:], dtype=np.int64))
        out_shape = [shape[0], m, *shape[2:]]
    else:
        n, p = int(np.prod(shape[:-1], dtype=np.int64)), 1
        out_shape = [*shape[:-1], m]
    if cols.size == 0:  # an all-zero weight: the bias (or zeros), broadcast
        zeros = relax.op.zeros(relax.ShapeExpr(out_shape), dtype)
        if bias is None:
            return bb.emit(zeros)
        axis_shape = [1] * len(out_shape)
        axis_shape[1 if kind == "sparse_conv1x1" else -1] = m
        return bb.emit(relax.op.add(zeros, relax.op.reshape(bias, axis_shape)))
    layer = SparseLayer(n=n, k=k, m=m, p=p, block=(r, c), dtype=dtype, col_indices=cols, row_ptr=row_ptr,
                        nonzero=values_np != 0, has_bias=bias is not None)
    func = sparse_kernel(layer)
    gvar = bb.add_func(func, f"fxopt_{kind}")
    x2 = bb.emit(relax.op.reshape(x, [n, k * p]))
    args = [x2, bb.emit(relax.op.reshape(values, [-1]))]
    if bias is not None:
        args.append(bias)
    if not layer.unrolled:
        args += [relax.const(cols.astype("int32")), relax.const(row_ptr.astype("int32"))]
    y2 = bb.emit(relax.call_tir(gvar, args, relax.TensorType([n, m * p], dtype)))
    return bb.emit(relax.op.reshape(y2, out_shape))


# --------------------------------------------------------------------------------------------
# Kernels


def sparse_kernel(layer: SparseLayer) -> tirx.PrimFunc:
    """The PrimFunc ``(X[N, K*P], values[nnzb*R*C], [bias[M]], [cols, row_ptr]) -> Y[N, M*P]``
    for ``layer`` (see the module docstring; index arrays only in the indexed form)."""
    r, c = layer.block
    with IRBuilder() as ib:
        with T.prim_func():
            # flat rows (only the last index of an access may be a vector): X[n, k*P + p]
            x = T.arg("x", T.buffer((layer.n, layer.k * layer.p), layer.dtype))
            values = T.arg("values", T.buffer((layer.nnz_blocks * r * c,), layer.dtype))
            bias = T.arg("bias", T.buffer((layer.m,), layer.dtype)) if layer.has_bias else None
            if not layer.unrolled:
                cols = T.arg("cols", T.buffer((layer.nnz_blocks,), "int32"))
                row_ptr = T.arg("row_ptr", T.buffer((layer.row_ptr.size,), "int32"))
            y = T.arg("y", T.buffer((layer.n, layer.m * layer.p), layer.dtype))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": _OPAQUE,
                         SPARSE_ATTR: layer.describe()})
            buffers = _Buffers(x, values, bias, y, layer.p, r, c)
            if layer.unrolled:
                _Unrolled(layer, buffers).emit()
            else:
                _Indexed(layer, buffers, cols, row_ptr).emit()
    func = ib.get()
    # no global symbol of its own: the module names it (one per layer)
    return func.without_attr("global_symbol") if "global_symbol" in (func.attrs or {}) else func


@dataclass
class _Buffers:
    x: object
    values: object
    bias: object
    y: object
    p: int
    r: int
    c: int

    def load_x(self, n, col, p0, lanes: int):
        return self.x[n, _ramp(col * self.p + p0, lanes)]

    def value(self, idx, i, j):
        return self.values[(idx * self.r + i) * self.c + j]

    def store_y(self, value, n, row, p0, lanes: int) -> None:
        T.buffer_store(self.y, value, [n, _ramp(row * self.p + p0, lanes)])


def _const(value: int):
    return tirx.const(int(value), "int32")


def _ramp(base, lanes: int):
    return base if lanes == 1 else tirx.Ramp(base, 1, lanes)


def _broadcast(value, lanes: int):
    return value if lanes == 1 else tirx.Broadcast(value, lanes)


def _zero(dtype: str, lanes: int):
    return _broadcast(tirx.const(0, dtype), lanes)


def _width(p: int, rows: int) -> int:
    """Pixels per tile: ``_ACC / rows``, or the largest power of two not above ``p``."""
    width = max(1, _ACC // rows)
    while width > p:
        width //= 2
    return width


def _tasks(loop_extent: int, emit_body: Callable) -> None:
    """One loop over the tasks: parallel when there are several."""
    if loop_extent == 1:
        emit_body(_const(0))
        return
    with T.parallel(0, loop_extent) as task:
        emit_body(task)


def _dispatch(index, parts: int, emit_part: Callable, lo: int = 0, hi: int | None = None) -> None:
    """``emit_part(j)`` under ``index == j``, as a binary tree of tests."""
    hi = parts if hi is None else hi
    if hi - lo == 1:
        emit_part(lo)
        return
    mid = (lo + hi) // 2
    with T.If(index < mid):
        with T.Then():
            _dispatch(index, parts, emit_part, lo, mid)
        with T.Else():
            _dispatch(index, parts, emit_part, mid, hi)


class _Layout:
    """Pixel tiling and task split shared by both forms."""

    def __init__(self, layer: SparseLayer, rows: int):
        self.layer = layer
        self.rows = rows  # rows computed together
        self.groups = -(-layer.m // rows)
        self.width = _width(layer.p, rows)
        p, width = layer.p, self.width
        chunk = max(width, (_CHUNK_BYTES // (4 * layer.k)) // width * width)
        self.chunks = max(1, p // chunk) if p > width else 1
        self.chunk = chunk if self.chunks > 1 else p

    def bounds(self, chunk):
        """(start, end) pixels of a chunk (the last one takes the remainder)."""
        if self.chunks == 1:
            return _const(0), _const(self.layer.p)
        start = chunk * self.chunk
        end = tirx.Select(chunk == self.chunks - 1, _const(self.layer.p), start + self.chunk)
        return start, end

    def tiles(self, start, end, emit_tile: Callable) -> None:
        """``emit_tile(p0)`` for each tile of ``width`` pixels of [start, end); the last tile is
        moved back to end at ``end`` (the chunk holds at least one tile)."""
        width = self.width
        count = tirx.floordiv(end - start + (width - 1), width)
        with T.serial(0, count) as t:
            p0 = T.bind(tirx.min(start + t * width, end - width))
            emit_tile(p0)


class _Unrolled:
    """Every non-zero a constant in the code."""

    def __init__(self, layer: SparseLayer, buffers: _Buffers):
        self.layer, self.b = layer, buffers
        r, c = layer.block
        self.rows = r  # one block row at a time: an input vector is loaded once for its R rows
        self.layout = _Layout(layer, self.rows)
        # terms[row] = [(block index, r, c, column)] of the non-zero values of that row
        terms: list[list[tuple[int, int, int, int]]] = [[] for _ in range(layer.m)]
        for block_row in range(layer.row_ptr.size - 1):
            for idx in range(int(layer.row_ptr[block_row]), int(layer.row_ptr[block_row + 1])):
                col0 = int(layer.col_indices[idx]) * c
                for i in range(r):
                    row = block_row * r + i
                    if row >= layer.m:
                        continue
                    for j in range(c):
                        if col0 + j < layer.k and layer.nonzero[idx, i, j]:
                            terms[row].append((idx, i, j, col0 + j))
        self.terms = terms

    def emit(self) -> None:
        layer, layout = self.layer, self.layout
        if layer.p == 1 and layer.block[1] == 1 and layer.block[0] >= 4:
            self._emit_row_vectors()
            return
        group_terms = [sum(len(self.terms[row]) for row in self._group_rows(g)) for g in range(layout.groups)]
        parts = _split_count(sum(group_terms), layout.groups, layer.n * layout.chunks, _LEAF_TERMS)
        ranges = _balanced_ranges(group_terms, parts)

        def body(task):
            n, rest = _divmod(task, len(ranges) * layout.chunks, layer.n)
            chunk, part = _divmod(rest, len(ranges), layout.chunks)
            start, end = layout.bounds(chunk)

            def leaf(j):
                g0, g1 = ranges[j]
                layout.tiles(start, end, lambda p0: self._tile(n, p0, g0, g1))

            _dispatch(part, len(ranges), leaf)

        _tasks(layer.n * layout.chunks * len(ranges), body)

    def _group_rows(self, g: int) -> range:
        return range(g * self.rows, min((g + 1) * self.rows, self.layer.m))

    def _tile(self, n, p0, g0: int, g1: int) -> None:
        b, width, dtype = self.b, self.layout.width, self.layer.dtype
        for g in range(g0, g1):
            loads: dict[int, object] = {}  # one load of an input row per group
            for row in self._group_rows(g):
                acc = _broadcast(b.bias[row], width) if b.bias is not None else None
                for idx, i, j, col in self.terms[row]:
                    if col not in loads:
                        loads[col] = b.load_x(n, col, p0, width)
                    term = _broadcast(b.value(idx, i, j), width) * loads[col]
                    acc = term if acc is None else acc + term
                b.store_y(acc if acc is not None else _zero(dtype, width), n, row, p0, width)

    def _emit_row_vectors(self) -> None:
        """P == 1, Rx1 blocks: a vector of a block's R values times one input element."""
        layer, b = self.layer, self.b
        r = layer.block[0]
        full = layer.m // r
        costs = [int(layer.row_ptr[g + 1] - layer.row_ptr[g]) for g in range(layer.row_ptr.size - 1)]
        parts = _split_count(sum(costs), len(costs), layer.n, _LEAF_TERMS)
        ranges = _balanced_ranges(costs, parts)

        def body(task):
            n, part = _divmod(task, len(ranges), layer.n)

            def leaf(j):
                for g in range(*ranges[j]):
                    if g < full:
                        acc = b.bias[_ramp(_const(g * r), r)] if b.bias is not None else None
                        for idx in range(int(layer.row_ptr[g]), int(layer.row_ptr[g + 1])):
                            col = int(layer.col_indices[idx])
                            if col >= layer.k:
                                continue
                            term = b.values[_ramp(_const(idx * r), r)] * _broadcast(b.load_x(n, col, 0, 1), r)
                            acc = term if acc is None else acc + term
                        b.store_y(acc if acc is not None else _zero(layer.dtype, r), n, _const(g * r), 0, r)
                    else:  # the last, partial block row: scalar
                        for row in range(g * r, layer.m):
                            acc = b.bias[row] if b.bias is not None else None
                            for idx, i, j, col in self.terms[row]:
                                term = b.value(idx, i, j) * b.load_x(n, col, 0, 1)
                                acc = term if acc is None else acc + term
                            b.store_y(acc if acc is not None else _zero(layer.dtype, 1), n, row, 0, 1)

            _dispatch(part, len(ranges), leaf)

        _tasks(layer.n * len(ranges), body)


class _Indexed:
    """Loops over each row's stored blocks, indices read from constant arrays."""

    def __init__(self, layer: SparseLayer, buffers: _Buffers, cols, row_ptr):
        self.layer, self.b, self.cols, self.row_ptr = layer, buffers, cols, row_ptr
        r, c = layer.block
        self.row_vectors = layer.p == 1 and c == 1 and r >= 4
        self.layout = _Layout(layer, r)
        self.width = 1 if self.row_vectors else self.layout.width

    def emit(self) -> None:
        layer, layout = self.layer, self.layout
        r = layer.block[0]
        block_rows = layer.row_ptr.size - 1
        split = layer.n * layout.chunks
        parts = max(1, min(block_rows, -(-_TASKS // split)))

        def body(task):
            n, rest = _divmod(task, parts * layout.chunks, layer.n)
            chunk, part = _divmod(rest, parts, layout.chunks)
            start, end = layout.bounds(chunk)
            g0 = tirx.floordiv(part * block_rows, parts)
            g1 = tirx.floordiv((part + 1) * block_rows, parts)
            with T.serial(0, g1 - g0) as step:
                g = T.bind(g0 + step)
                if self.row_vectors:
                    self._row_vector(n, g, r)
                else:
                    layout.tiles(start, end, lambda p0: self._tile(n, g, p0))

        _tasks(split * parts, body)

    def _tile(self, n, g, p0) -> None:
        layer, b = self.layer, self.b
        r, c = layer.block
        width, dtype = self.width, layer.dtype
        acc = T.alloc_buffer((r * width,), dtype, scope="local")
        for i in range(r):
            row = tirx.min(g * r + i, layer.m - 1)
            init = _broadcast(b.bias[row], width) if b.bias is not None else _zero(dtype, width)
            T.buffer_store(acc, init, [_ramp(_const(i * width), width)])
        with T.serial(0, self.row_ptr[g + 1] - self.row_ptr[g]) as step:
            idx = T.bind(self.row_ptr[g] + step)  # (a loop starting at a loaded value miscompiles in TVM 0.27)
            for j in range(c):
                col = self.cols[idx] * c + j
                if c > 1:
                    col = tirx.min(col, layer.k - 1)  # a zero-padded column past K: any input row
                xv = b.load_x(n, col, p0, width)
                for i in range(r):
                    lanes = _ramp(_const(i * width), width)
                    T.buffer_store(acc, acc[lanes] + _broadcast(b.value(idx, i, j), width) * xv, [lanes])
        for i in range(r):
            row = g * r + i
            store = lambda row=row, i=i: b.store_y(acc[_ramp(_const(i * width), width)], n, row, p0, width)
            if layer.m % r == 0:
                store()
            else:
                with T.If(row < layer.m):
                    with T.Then():
                        store()

    def _row_vector(self, n, g, r: int) -> None:
        layer, b = self.layer, self.b
        acc = T.alloc_buffer((r,), layer.dtype, scope="local")
        lanes = _ramp(_const(0), r)
        if b.bias is not None and layer.m % r == 0:
            T.buffer_store(acc, b.bias[tirx.Ramp(g * r, 1, r)], [lanes])
        else:
            T.buffer_store(acc, _zero(layer.dtype, r), [lanes])
        with T.serial(0, self.row_ptr[g + 1] - self.row_ptr[g]) as step:
            idx = T.bind(self.row_ptr[g] + step)
            T.buffer_store(acc, acc[lanes] + b.values[tirx.Ramp(idx * r, 1, r)] * tirx.Broadcast(b.load_x(n, self.cols[idx], 0, 1), r),
                           [lanes])
        if layer.m % r == 0:
            b.store_y(acc[lanes], n, g * r, 0, r)
            return
        for i in range(r):  # a partial last block row: element by element
            row = g * r + i
            value = acc[_const(i)] + (b.bias[tirx.min(row, layer.m - 1)] if b.bias is not None else tirx.const(0, layer.dtype))
            with T.If(row < layer.m):
                with T.Then():
                    b.store_y(value, n, row, 0, 1)


def _divmod(value, divisor: int, quotients: int):
    """(value // divisor, value % divisor) for a value below ``quotients * divisor``."""
    quotient = _const(0) if quotients == 1 else tirx.floordiv(value, divisor)
    if divisor == 1:
        return quotient, _const(0)
    return quotient, (value if quotients == 1 else tirx.floormod(value, divisor))


def _split_count(total_terms: int, groups: int, other_tasks: int, leaf_terms: int) -> int:
    """How many row ranges: enough tasks for the cores, leaves small enough for the i-cache."""
    wanted = max(-(-_TASKS // max(1, other_tasks)), -(-total_terms // leaf_terms))
    return max(1, min(groups, wanted))


def _balanced_ranges(costs: list[int], parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, non-empty ranges of ``costs`` with about equal sums."""
    total = sum(costs)
    ranges, start, acc = [], 0, 0
    for i, cost in enumerate(costs):
        acc += cost
        remaining_parts = parts - len(ranges) - 1
        remaining_items = len(costs) - i - 1
        if remaining_parts > 0 and (acc * parts >= total * (len(ranges) + 1) or remaining_items == remaining_parts):
            ranges.append((start, i + 1))
            start = i + 1
    ranges.append((start, len(costs)))
    return [rng for rng in ranges if rng[1] > rng[0]]
