"""fxopt.sparse_ops: the BSR format, the torch custom ops' reference implementation against the
dense layers, torch.export of modules that use them."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

from fxopt import sparse_ops as so
from fxopt.errors import InputError


def sparse_weight(out_features, in_features, density, seed=0, kernel=False):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=generator)
    w[torch.rand(out_features, in_features, generator=generator) >= density] = 0
    return w[:, :, None, None] if kernel else w


@pytest.mark.parametrize("block", so.BLOCK_SHAPES)
@pytest.mark.parametrize("shape", [(24, 32), (26, 30), (7, 5), (1, 9)])
def test_bsr_round_trips_exactly_for_every_block(block, shape):
    """Only blocks with a non-zero are stored, zero-padded at the edges; dense() gives W back."""
    w = sparse_weight(*shape, density=0.2)
    s = so.block_sparse(w, block)
    assert torch.equal(s.to_dense(), w)
    r, c = block
    assert s.values.shape == (s.nnz_blocks, r, c)
    assert s.row_ptr.shape == (-(-shape[0] // r) + 1,) and s.row_ptr.dtype == torch.int32
    assert s.stored_values == so.stored_values(w, block) >= int((w != 0).sum())
    assert bool((s.values != 0).flatten(1).any(1).all())  # no all-zero block stored


def test_stored_values_prefer_the_blocks_a_pattern_has():
    """A weight zero in whole 4x1 blocks stores no more with 4x1 blocks than with 1x1 ones."""
    mask = torch.rand(8, 16) < 0.3
    w = torch.randn(32, 16) * mask.repeat_interleave(4, dim=0)
    assert so.stored_values(w, (4, 1)) == so.stored_values(w, (1, 1)) == int((w != 0).sum())
    assert so.stored_values(w, (8, 1)) > so.stored_values(w, (4, 1))


@pytest.mark.parametrize("block", so.BLOCK_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv1x1_op_equals_the_dense_conv(block, bias):
    w = sparse_weight(24, 30, 0.1, kernel=True)
    b = torch.randn(24) if bias else None
    x = torch.randn(2, 30, 5, 7)
    module = so.SparseConv1x1(w, b, block).eval()
    assert torch.equal(module(x), F.conv2d(x, w, b))
    assert torch.equal(module.dense_weight(), w[:, :, 0, 0])


@pytest.mark.parametrize("block", so.BLOCK_SHAPES)
@pytest.mark.parametrize("shape", [(3, 30), (2, 4, 30), (30,)])
def test_linear_op_equals_the_dense_linear(block, shape):
    w = sparse_weight(26, 30, 0.3)
    b = torch.randn(26)
    x = torch.randn(*shape)
    assert torch.equal(so.SparseLinear(w, b, block)(x), F.linear(x, w, b))


def test_all_zero_weight_is_the_bias():
    module = so.SparseConv1x1(torch.zeros(6, 4, 1, 1), torch.arange(6.0))
    x = torch.randn(1, 4, 3, 3)
    assert module.values.shape == (0, 1, 1)
    assert torch.equal(module(x), torch.arange(6.0)[None, :, None, None].expand(1, 6, 3, 3))


@pytest.mark.parametrize("kind", ["conv1x1", "linear"])
def test_modules_export_with_the_op_and_fake_shapes(kind):
    """torch.export keeps the custom op (a fake kernel gives its shape) and the buffers."""
    if kind == "conv1x1":
        layer, x = so.SparseConv1x1(sparse_weight(12, 8, 0.3, kernel=True), torch.randn(12), (4, 1)), torch.randn(1, 8, 6, 6)
    else:
        layer, x = so.SparseLinear(sparse_weight(12, 8, 0.3), None, (1, 4)), torch.randn(2, 3, 8)
    model = nn.Sequential(layer, nn.ReLU()).eval()
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert f"fxopt.sparse_{kind}.default" in targets
    assert {"0.values", "0.col_indices", "0.row_ptr"} <= set(ep.state_dict)
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)
    fake = ep.graph_module.graph.find_nodes(op="call_function", target=getattr(torch.ops.fxopt, f"sparse_{kind}").default)
    assert tuple(fake[0].meta["val"].shape) == tuple(model[0](x).shape)


def test_opcheck_schema_and_fake_kernels():
    x = torch.randn(1, 8, 3, 3)
    s = so.block_sparse(sparse_weight(6, 8, 0.4), (1, 1))
    torch.library.opcheck(torch.ops.fxopt.sparse_conv1x1.default,
                          (x, s.values, s.col_indices, s.row_ptr, [1, 1], [6, 8], torch.randn(6)),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fxopt.sparse_linear.default,
                          (torch.randn(2, 8), s.values, s.col_indices, s.row_ptr, [1, 1], [6, 8], None),
                          test_utils=("test_schema", "test_faketensor"))


def test_modules_survive_deepcopy_and_state_dict():
    import copy

    layer = so.SparseConv1x1(sparse_weight(6, 8, 0.4, kernel=True), torch.randn(6), (8, 1))
    clone = copy.deepcopy(layer)
    x = torch.randn(1, 8, 2, 2)
    assert torch.equal(clone(x), layer(x))
    other = so.SparseConv1x1(sparse_weight(6, 8, 0.4, kernel=True), torch.randn(6), (8, 1))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))


def test_describe_and_sparse_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), so.SparseConv1x1(sparse_weight(6, 8, 0.25, kernel=True), None, (1, 1)))
    layers = so.sparse_layers(model)
    assert layers == [{"name": "1", "kind": "conv1x1", "weight_shape": [6, 8], "block": "1x1",
                       "density": pytest.approx(layers[0]["density"]), "stored_values": layers[0]["stored_values"]}]
    assert 0 < layers[0]["density"] < 0.5
    assert "snapshot" in so.SNAPSHOT_NOTE


@pytest.mark.parametrize("block", [(0, 1), (1,), "4x1", (1.5, 1), (True, 1)])
def test_bad_block_shape(block):
    with pytest.raises(InputError, match="block shape"):
        so.block_sparse(torch.randn(4, 4), block)


def test_bad_weight_and_mismatched_input():
    with pytest.raises(InputError, match=r"\[out, in, 1, 1\]"):
        so.block_sparse(torch.randn(4, 4, 3, 3))
    layer = so.SparseLinear(torch.randn(4, 6))
    with pytest.raises(InputError, match="input has 5 channels, the weight 6"):
        layer(torch.randn(2, 5))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 20), density=st.floats(0, 1), block=st.sampled_from(so.BLOCK_SHAPES),
       seed=st.integers(0, 1000))
def test_bsr_round_trip_property(rows, cols, density, block, seed):
    w = sparse_weight(rows, cols, density, seed=seed)
    s = so.block_sparse(w, block)
    assert torch.equal(s.to_dense(), w)
    x = torch.randn(2, cols)
    assert torch.equal(so.SparseLinear(w, None, block)(x), F.linear(x, w))
