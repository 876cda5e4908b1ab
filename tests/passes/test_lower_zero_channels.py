"""lower_zero_channels: zero channels removed physically, exactly; the ones that must stay say why."""

import pytest
import torch
import torch.nn.functional as F
from channel_models import Net, nets
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxopt
from fxopt import ir
from fxopt.pass_manager import PassContext, PreconditionError, apply
from fxopt.passes.channel_groups import ChannelGroups
from fxopt.passes.lower_zero_channels import LowerZeroChannels
from fxopt.testing import check_pass, randomize_norm_stats


def zero_rows(model, layer, rows, bias=None):
    """Zero output channels ``rows`` of ``model.<layer>`` (and set their bias when given)."""
    module = model.get_submodule(layer)
    with torch.no_grad():
        module.weight[rows] = 0
        if bias is not None and module.bias is not None:
            module.bias[rows] = bias
    return model


def prepared(model, seed=0):
    torch.manual_seed(seed)
    return randomize_norm_stats(model, seed).eval()


def test_inverted_residual_hidden_channels_with_bias_and_random_bn():
    """expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1: hidden channel 2
    zero in the expand and depthwise convs, each with a non-zero bias: the constant it leaves
    goes through two BNs and activations into the project conv's bias."""
    model = prepared(Net(3, [("conv", 4, 1, 1, True, True, "relu6"), ("dw", 1, 1, True, "relu6"),
                             ("conv", 5, 1, 1, True, True, "none")], "pool"))
    zero_rows(model, "blocks.0.conv", [2], bias=0.7)
    zero_rows(model, "blocks.1.conv", [2], bias=-0.3)
    gm, result = check_pass("lower_zero_channels", model, (torch.randn(2, 3, 8, 8),),
                            stats={"channels_removed": 1, "layers_shrunk": 5, "constants_folded": 1})
    assert gm.get_submodule("blocks.0.conv").weight.shape == (3, 3, 1, 1)
    assert gm.get_submodule("blocks.0.bn").running_mean.shape == (3,)
    assert gm.get_submodule("blocks.1.conv").weight.shape == (3, 1, 3, 3)
    assert gm.get_submodule("blocks.1.conv").groups == 3
    assert gm.get_submodule("blocks.2.conv").weight.shape == (5, 3, 1, 1)
    assert result.declines == []


def test_residual_channel_needs_every_producer_zero():
    model = prepared(Net(2, [("conv", 4, 3, 1, True, True, "relu"), ("res", 1, True, "relu")], "pool"))
    zero_rows(model, "blocks.0.conv", [1], bias=2.0)
    check_pass("lower_zero_channels", model, (torch.randn(2, 2, 8, 8),), stats={},
               declines=["'blocks_1_conv2' computes them with non-zero weights"])
    zero_rows(model, "blocks.1.conv2", [1], bias=0.25)
    gm, _ = check_pass("lower_zero_channels", model, (torch.randn(2, 2, 8, 8),),
                       stats={"channels_removed": 1, "layers_shrunk": 5, "constants_folded": 2})
    assert gm.get_submodule("blocks.0.conv").weight.shape == (3, 2, 3, 3)
    assert gm.get_submodule("blocks.1.conv1").weight.shape == (4, 3, 1, 1)  # a consumer: the constant went to its bias
    assert gm.get_submodule("blocks.1.conv2").weight.shape == (3, 4, 1, 1)
    assert gm.get_submodule("head").weight.shape == (3, 3)


def test_flatten_linear_and_cat_fold_their_constants():
    model = prepared(Net(2, [("cat", 2, 3), ("pool", "max")], "flatten"))
    zero_rows(model, "blocks.0.a", [1], bias=1.5)
    zero_rows(model, "blocks.0.b", [0], bias=-2.0)  # relu(-2) = 0: nothing to fold from it
    gm, _ = check_pass("lower_zero_channels", model, (torch.randn(2, 2, 8, 8),),
                       stats={"channels_removed": 2, "layers_shrunk": 3, "constants_folded": 1})
    assert gm.get_submodule("head").weight.shape == (3, 3 * 16)


def test_grouped_conv_loses_a_whole_group():
    model = prepared(Net(4, [("conv", 4, 1, 1, True, False, "relu"), ("group", 2, 3, "silu")], "pool"))
    zero_rows(model, "blocks.0.conv", [2, 3], bias=0.5)
    zero_rows(model, "blocks.1.conv", [3, 4, 5], bias=0.1)
    gm, _ = check_pass("lower_zero_channels", model, (torch.randn(2, 4, 6, 6),), stats={
        "channels_removed": 1, "layers_shrunk": 3, "constants_folded": 1})
    conv = gm.get_submodule("blocks.1.conv")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (1, 2, 3)


def test_depthwise_multiplier_and_se_gate():
    model = prepared(Net(2, [("conv", 3, 1, 1, True, True, "hardswish"), ("dw", 2, 2, True, "relu"), ("se", 2)],
                         "pool"))
    zero_rows(model, "blocks.0.conv", [0], bias=0.4)
    zero_rows(model, "blocks.1.conv", [0, 1], bias=0.2)
    zero_rows(model, "blocks.2.expand", [0, 1], bias=-0.1)
    gm, result = check_pass("lower_zero_channels", model, (torch.randn(2, 2, 8, 8),))
    assert result.stats == {"channels_removed": 1, "layers_shrunk": 7, "constants_folded": 2}  # reduce and head
    assert gm.get_submodule("blocks.1.conv").weight.shape == (4, 1, 3, 3)
    assert gm.get_submodule("blocks.2.expand").weight.shape == (4, 2, 1, 1)


def test_zero_padded_consumer_keeps_a_non_zero_constant():
    """A 3x3 zero-padded conv reading a channel that is 0.5 everywhere sees 0.5 inside and 0 at
    the border: not a bias. The channel stays; with a zero constant (relu of a negative bias) it goes."""
    model = prepared(Net(2, [("conv", 3, 1, 1, True, False, "relu"), ("conv", 4, 3, 1, True, False, "none")], "pool"))
    zero_rows(model, "blocks.0.conv", [1], bias=0.5)
    check_pass("lower_zero_channels", model, (torch.randn(2, 2, 6, 6),), stats={},
               declines=["its constant value 0.5 reaches the zero-padded conv 'blocks_1_conv'"])
    zero_rows(model, "blocks.0.conv", [1], bias=-0.5)
    check_pass("lower_zero_channels", model, (torch.randn(2, 2, 6, 6),),
               stats={"channels_removed": 1, "layers_shrunk": 2})


def test_avg_pool_counting_padding_keeps_a_non_zero_constant():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 3, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.fc(F.avg_pool2d(self.conv(x), 3, 1, 1))

    model = zero_rows(prepared(M()), "conv", [0], bias=1.0)
    check_pass("lower_zero_channels", model, (torch.randn(1, 2, 5, 5),), stats={},
               declines=["average pool 'avg_pool2d' counts zero padding"])


def test_view_with_literal_shape_and_per_channel_constant():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
            self.fc = nn.Linear(4 * 4, 2)

        def forward(self, x):
            y = torch.tanh(self.conv(x) * self.scale + 0.1)
            return self.fc(y.view(2, 16))

    model = zero_rows(prepared(M()), "conv", [1], bias=0.3)
    gm, _ = check_pass("lower_zero_channels", model, (torch.randn(2, 3, 4, 4),),
                       stats={"channels_removed": 1, "layers_shrunk": 2, "constants_folded": 1})
    view = next(n for n in gm.graph.nodes if n.target == "view")
    assert view.args[1:] == (2, 12)
    scale = next(n for n in gm.graph.nodes if n.op == "get_attr")
    assert ir.get_attr_value(gm, scale.target).shape == (1, 3, 1, 1) and not hasattr(gm, "scale")


def test_linear_chain_with_batch_norm1d():
    model = prepared(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.GELU(), nn.Linear(5, 3), nn.Tanh(),
                                   nn.Linear(3, 2)))
    zero_rows(model, "0", [1, 4], bias=0.6)
    zero_rows(model, "3", [2], bias=-0.2)
    gm, _ = check_pass("lower_zero_channels", model, (torch.randn(4, 6),),
                       stats={"channels_removed": 3, "layers_shrunk": 4, "constants_folded": 2})
    assert [gm.get_submodule(n).weight.shape for n in ("0", "3", "5")] == [(3, 6), (2, 3), (2, 2)]


def test_channel_coupled_to_graph_output_stays():
    model = prepared(Net(2, [("conv", 3, 1, 1, True, True, "relu"), ("res", 1, False, "none")], "none"))
    zero_rows(model, "blocks.0.conv", [0])
    zero_rows(model, "blocks.1.conv2", [0])
    _, result = check_pass("lower_zero_channels", model, (torch.randn(1, 2, 4, 4),), stats={},
                           declines=["it reaches the graph output"])
    assert [d.node for d in result.declines] == ["blocks_0_conv"]


@fx.wrap
def reverse_channels(x):
    return x.flip(1)


def test_custom_op_keeps_channels_and_names_itself():
    """A channel flip treated as per-channel would remove the wrong channel: it has no handler."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 3, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.fc(reverse_channels(torch.relu(self.conv(x))))

    model = zero_rows(prepared(M()), "conv", [0], bias=0.2)
    check_pass("lower_zero_channels", model, (torch.randn(1, 2, 4, 4),), stats={},
               declines=["'reverse_channels' (function reverse_channels) has no channel handler"])


def test_every_channel_zero_keeps_one():
    model = prepared(Net(2, [("conv", 3, 1, 1, True, False, "relu"), ("conv", 2, 1, 1, True, False, "none")], "pool"))
    zero_rows(model, "blocks.0.conv", [0, 1, 2], bias=0.3)
    gm, _ = check_pass("lower_zero_channels", model, (torch.randn(1, 2, 4, 4),),
                       stats={"channels_removed": 2, "layers_shrunk": 2, "constants_folded": 1},
                       declines=["would leave 'blocks_0_conv' without channels"])
    assert gm.get_submodule("blocks.0.conv").out_channels == 1


def test_in_the_default_pipeline():
    model = prepared(Net(3, [("conv", 6, 3, 2, False, True, "relu6"), ("dw", 1, 1, True, "relu6"),
                             ("conv", 4, 1, 1, False, True, "none")], "pool"))
    zero_rows(model, "blocks.0.conv", [0, 5])
    zero_rows(model, "blocks.1.conv", [0, 5])
    optimized = fxopt.optimize(model, (torch.randn(1, 3, 16, 16),))
    row = next(r for r in optimized.report.passes if r.name == "lower_zero_channels")
    assert row.stats["channels_removed"] == 2
    assert optimized.module.get_submodule("blocks.1.conv").out_channels == 4


def test_needs_shapes():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 1)))
    with pytest.raises(PreconditionError, match="needs shapes in node.meta"):
        apply(LowerZeroChannels(), gm, PassContext())


@settings(max_examples=20, deadline=None)
@given(spec=nets(), seed=st.integers(0, 1000), data=st.data())
def test_property_random_zero_units_lower_exactly(spec, seed, data):
    """Random CNNs, random units zeroed in all their producers (biases random, sometimes zero):
    outputs equal to the zeroed model, idempotent, and every zeroed unit removed or declined."""
    model, shape = spec
    model = prepared(model, seed)
    x = torch.randn(shape)
    groups = ChannelGroups(ir.trace(model, (x,)))
    units = [u for u in groups.units if groups.producers(u)]
    chosen = data.draw(st.lists(st.sampled_from(units), max_size=4, unique_by=lambda u: u.root)) if units else []
    zero_bias = data.draw(st.booleans())
    for unit in chosen:
        for layer, rows in groups.producers(unit):
            zero_rows(model, layer.target, rows, bias=0.0 if zero_bias else None)
    gm, result = check_pass("lower_zero_channels", model, (x,))
    removed = result.stats.get("channels_removed", 0)
    assert removed <= len(chosen)
    if not result.declines:
        assert removed == len(chosen), (removed, [u.channels for u in chosen], gm.graph)


def test_channels_that_only_read_removed_channels_go_in_the_same_run():
    """Fuzzer regression (tests/passes/test_fuzz_passes.py): removing conv a's zero channel 0
    left conv b's row 0 all zero (it read only that channel), which a second run removed (not
    idempotent). The pass now repeats until a round removes nothing."""
    model = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 3, 1, bias=False), nn.Conv2d(3, 2, 3))
    with torch.no_grad():
        model[0].weight[0] = 0
        model[1].weight[0, 1:] = 0  # row 0 reads channel 0 only
    gm, result = check_pass("lower_zero_channels", model.eval(), (torch.randn(2, 4, 6, 6),))
    assert result.stats["channels_removed"] == 2
    assert [m.out_channels for m in gm.modules() if isinstance(m, nn.Conv2d)] == [3, 2, 2]
