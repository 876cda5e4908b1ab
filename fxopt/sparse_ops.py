"""fxopt's sparse-weight ops: block-sparse 1x1 convs and linears as registered torch custom ops.

A weight ``W`` of shape ``[M, K]`` (a linear's ``[out, in]``, a 1x1 conv's ``[Cout, Cin, 1, 1]``
viewed as ``[Cout, Cin]``) is stored in block-sparse-row form (BSR) with blocks of ``R x C``
(rows are output channels, columns input channels; the matrix is zero-padded to whole blocks):

    values       [nnzb, R, C]  the stored blocks, in row-block order (zeros inside a stored block kept)
    col_indices  [nnzb] int32  the block column of each stored block
    row_ptr      [M/R + 1] int32  stored blocks of row block i are row_ptr[i] .. row_ptr[i+1]-1

Only blocks with a non-zero are stored, so every block shape is exact: ``to_dense`` gives ``W``
back bit for bit. The ops ``torch.ops.fxopt.sparse_conv1x1`` and ``torch.ops.fxopt.sparse_linear``
take the input, these three tensors, the block shape, the dense weight shape and the bias; their
reference implementation densifies and calls ``F.conv2d`` / ``F.linear``, so a graph using them
computes exactly what the dense layer did, runs in PyTorch and exports with ``torch.export`` (fake
kernels give the output shapes). Compilers lower them (fxopt's TVM adapter: a kernel specialized
at compile time on the constant sparsity pattern, see ``fxopt.targets.tvm_backend.sparse``).

:class:`SparseConv1x1` and :class:`SparseLinear` are the ``nn.Module`` forms that hold the data as
buffers (not parameters: the ops have no autograd formula; fine-tune the dense model, then
sparsify again). This module needs torch only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.errors import InputError

__all__ = ["BLOCK_SHAPES", "BlockSparse", "SparseConv1x1", "SparseLinear", "block_sparse", "to_dense",
           "stored_values", "density", "sparse_layers", "SNAPSHOT_NOTE"]

BLOCK_SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (1, 4), (4, 1), (8, 1))

SNAPSHOT_NOTE = ("the sparsity pattern and values of these layers are compiled into the kernels (a snapshot "
                 "taken at build time): editing the weights of the PyTorch model afterwards does not change this "
                 "build; rebuild after changing them")


# --------------------------------------------------------------------------------------------
# The format


class BlockSparse:
    """A weight matrix in BSR form (see the module docstring); plain tensors, no module."""

    def __init__(self, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                 block: Sequence[int], shape: Sequence[int]):
        self.values, self.col_indices, self.row_ptr = values, col_indices, row_ptr
        self.block = (int(block[0]), int(block[1]))
        self.shape = (int(shape[0]), int(shape[1]))

    @property
    def nnz_blocks(self) -> int:
        return int(self.col_indices.numel())

    @property
    def stored_values(self) -> int:
        return self.nnz_blocks * self.block[0] * self.block[1]

    def to_dense(self) -> torch.Tensor:
        return to_dense(self.values, self.col_indices, self.row_ptr, self.block, self.shape)


def _check_block(block: Sequence[int]) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise InputError(f"block shape must be two positive ints (rows, columns), e.g. (4, 1); got {block!r}")
    return int(block[0]), int(block[1])


def block_sparse(weight: torch.Tensor, block: Sequence[int] = (1, 1)) -> BlockSparse:
    """``weight`` (2-D ``[M, K]``, or a 1x1 conv's ``[M, K, 1, 1]``) in BSR form with ``block``
    shaped blocks; a block is stored when any of its elements is non-zero."""
    r, c = _check_block(block)
    matrix = _as_matrix(weight)
    m, k = matrix.shape
    mb, kb = -(-m // r), -(-k // c)
    padded = matrix.new_zeros((mb * r, kb * c))
    padded[:m, :k] = matrix
    blocks = padded.reshape(mb, r, kb, c).permute(0, 2, 1, 3)  # [mb, kb, r, c]
    nonzero = (blocks != 0).flatten(2).any(-1)  # [mb, kb]
    rows, cols = nonzero.nonzero(as_tuple=True)  # row-major: row blocks in order, columns ascending
    values = blocks[rows, cols].contiguous()
    counts = nonzero.sum(1)
    row_ptr = torch.zeros(mb + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return BlockSparse(values, cols.to(torch.int32), row_ptr, (r, c), (m, k))


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise InputError(f"weight must be a tensor, got {type(weight).__name__}")
    if weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
        return weight.detach().reshape(weight.shape[0], weight.shape[1])
    if weight.dim() != 2:
        raise InputError(f"a sparse weight is a linear's [out, in] or a 1x1 conv's [out, in, 1, 1], got shape "
                         f"{tuple(weight.shape)}")
    return weight.detach()


def to_dense(values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
             block: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The dense ``[M, K]`` matrix of a BSR weight (exactly the weight it was made from)."""
    r, c = int(block[0]), int(block[1])
    m, k = int(shape[0]), int(shape[1])
    mb, kb = row_ptr.numel() - 1, -(-k // c)
    counts = row_ptr[1:].long() - row_ptr[:-1].long()
    rows = torch.repeat_interleave(torch.arange(mb, device=values.device), counts)
    blocks = values.new_zeros((mb, kb, r, c))
    blocks[rows, col_indices.long()] = values
    return blocks.permute(0, 2, 1, 3).reshape(mb * r, kb * c)[:m, :k].contiguous()


def stored_values(weight: torch.Tensor, block: Sequence[int]) -> int:
    """How many values BSR with ``block`` stores for ``weight`` (zeros inside stored blocks count)."""
    r, c = _check_block(block)
    matrix = _as_matrix(weight)
    m, k = matrix.shape
    padded = matrix.new_zeros((-(-m // r) * r, -(-k // c) * c))
    padded[:m, :k] = matrix
    blocks = padded.reshape(padded.shape[0] // r, r, padded.shape[1] // c, c)
    return int((blocks != 0).any(3).any(1).sum()) * r * c


def density(weight: torch.Tensor) -> float:
    """Fraction of non-zero elements."""
    return float((weight != 0).sum()) / max(1, weight.numel())


# --------------------------------------------------------------------------------------------
# The custom ops


def _check_args(name: str, x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                row_ptr: torch.Tensor, block: Sequence[int], weight_shape: Sequence[int],
                bias: Optional[torch.Tensor]) -> None:
    r, c = int(block[0]), int(block[1])
    m, k = int(weight_shape[0]), int(weight_shape[1])
    if values.dim() != 3 or tuple(values.shape[1:]) != (r, c):
        raise InputError(f"fxopt::{name}: values must be [nnzb, {r}, {c}] for {r}x{c} blocks, got "
                         f"{tuple(values.shape)}")
    if row_ptr.numel() != -(-m // r) + 1 or col_indices.numel() != values.shape[0]:
        raise InputError(f"fxopt::{name}: row_ptr must have {-(-m // r) + 1} entries and col_indices one per "
                         f"block ({values.shape[0]}); got {row_ptr.numel()} and {col_indices.numel()}")
    if bias is not None and tuple(bias.shape) != (m,):
        raise InputError(f"fxopt::{name}: bias must be [{m}], got {tuple(bias.shape)}")
    channels = x.shape[1] if name == "sparse_conv1x1" else x.shape[-1]
    if channels != k:
        raise InputError(f"fxopt::{name}: the input has {channels} channels, the weight {k}")


@torch.library.custom_op("fxopt::sparse_conv1x1", mutates_args=())
def sparse_conv1x1(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                   block: list[int], weight_shape: list[int], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """1x1 conv (stride 1, no padding, groups 1) of NCHW ``x`` with a BSR weight."""
    _check_args("sparse_conv1x1", x, values, col_indices, row_ptr, block, weight_shape, bias)
    weight = to_dense(values, col_indices, row_ptr, block, weight_shape)
    return F.conv2d(x, weight.reshape(*weight.shape, 1, 1), bias)


@sparse_conv1x1.register_fake
def _(x, values, col_indices, row_ptr, block, weight_shape, bias):
    return x.new_empty((x.shape[0], int(weight_shape[0]), *x.shape[2:]))


@torch.library.custom_op("fxopt::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                  block: list[int], weight_shape: list[int], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with a BSR weight ``W``."""
    _check_args("sparse_linear", x, values, col_indices, row_ptr, block, weight_shape, bias)
    return F.linear(x, to_dense(values, col_indices, row_ptr, block, weight_shape), bias)


@sparse_linear.register_fake
def _(x, values, col_indices, row_ptr, block, weight_shape, bias):
    return x.new_empty((*x.shape[:-1], int(weight_shape[0])))


# --------------------------------------------------------------------------------------------
# Modules


class _SparseWeights(nn.Module):
    """Holds a BSR weight and bias as buffers and calls its op."""

    kind = ""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, block: Sequence[int] = (1, 1)):
        super().__init__()
        sparse = block_sparse(weight, block)
        self.block = sparse.block
        self.weight_shape = sparse.shape
        self.register_buffer("values", sparse.values.clone())
        self.register_buffer("col_indices", sparse.col_indices)
        self.register_buffer("row_ptr", sparse.row_ptr)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def sparse(self) -> BlockSparse:
        return BlockSparse(self.values, self.col_indices, self.row_ptr, self.block, self.weight_shape)

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[M, K]`` weight (exactly the one this module was made from)."""
        return self.sparse.to_dense()

    @property
    def density(self) -> float:
        return float((self.values != 0).sum()) / max(1, self.weight_shape[0] * self.weight_shape[1])

    def describe(self) -> dict:
        """What a manifest or report says of this layer."""
        return {"kind": self.kind, "weight_shape": list(self.weight_shape), "block": f"{self.block[0]}x{self.block[1]}",
                "density": round(self.density, 6), "stored_values": int(self.values.numel())}

    def extra_repr(self) -> str:
        m, k = self.weight_shape
        return (f"{k}, {m}, block={self.block[0]}x{self.block[1]}, density={self.density:.3f}, "
                f"bias={self.bias is not None}")


class SparseConv1x1(_SparseWeights):
    """A 1x1 conv (stride 1, no padding, groups 1; NCHW) with a block-sparse weight."""

    kind = "conv1x1"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxopt.sparse_conv1x1(x, self.values, self.col_indices, self.row_ptr, list(self.block),
                                              list(self.weight_shape), self.bias)


class SparseLinear(_SparseWeights):
    """A linear layer with a block-sparse weight."""

    kind = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxopt.sparse_linear(x, self.values, self.col_indices, self.row_ptr, list(self.block),
                                             list(self.weight_shape), self.bias)


def sparse_layers(module: nn.Module) -> list[dict]:
    """The sparse layers of ``module`` (qualified name and :meth:`describe`), for manifests."""
    return [{"name": name, **layer.describe()} for name, layer in module.named_modules()
            if isinstance(layer, _SparseWeights)]
