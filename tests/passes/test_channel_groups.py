"""Channel dependency groups: which channels go together, which must stay and why."""

import copy

import pytest
import torch
import torch.nn.functional as F
from channel_models import Net, node_values, nets
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from fxopt import ir
from fxopt.passes.channel_groups import ChannelGroups
from fxopt.testing import randomize_norm_stats


def analyze(model, shape):
    gm = ir.trace(randomize_norm_stats(model).eval(), (torch.randn(shape),))
    return gm, ChannelGroups(gm)


def node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def channels(groups, gm, name, channel):
    """{node name: channels} of the unit holding ``channel`` of node ``name``."""
    unit = groups.unit(node(gm, name), channel)
    return {n.name: c for n, c in unit.channels.items()}


def test_residual_adds_couple_their_operands():
    model = Net(3, [("conv", 4, 3, 1, True, True, "relu"), ("res", 3, True, "relu"), ("res", 1, False, "none")], "pool")
    gm, groups = analyze(model, (1, 3, 8, 8))
    unit = channels(groups, gm, "blocks_0_conv", 2)
    # the stem's channel 2 and both residual branches' last convs are one unit, through the adds
    assert {"blocks_0_conv", "blocks_1_conv2", "blocks_2_conv2", "add", "add_1"} <= set(unit)
    assert all(c == [2] for c in unit.values())
    # the branches' hidden channels are a unit of their own
    assert set(channels(groups, gm, "blocks_1_conv1", 0)) == {"blocks_1_conv1", "blocks_1_bn", "blocks_1_act"}
    residual = next(g for g in groups.groups if node(gm, "add") in g.nodes)
    assert [n.name for n in residual.producers] == ["blocks_0_conv", "blocks_1_conv2", "blocks_2_conv2"]
    assert len(residual.units) == 4 and all(u.removable for u in residual.units)


def test_cat_offsets():
    model = Net(2, [("cat", 2, 3), ("conv", 4, 1, 1, True, False, "none")], "pool")
    gm, groups = analyze(model, (1, 2, 8, 8))
    assert channels(groups, gm, "cat", 1) == {"blocks_0_a": [1], "cat": [1]}
    assert channels(groups, gm, "cat", 4) == {"blocks_0_b": [2], "relu": [2], "cat": [4]}


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_input_is_its_output(multiplier):
    model = Net(3, [("conv", 4, 1, 1, True, True, "relu6"), ("dw", multiplier, 1, True, "relu6"),
                    ("conv", 5, 1, 1, True, False, "none")], "pool")
    gm, groups = analyze(model, (1, 3, 8, 8))
    unit = channels(groups, gm, "blocks_0_conv", 1)
    outputs = [multiplier * 1 + i for i in range(multiplier)]
    assert unit["blocks_0_conv"] == [1] and unit["blocks_1_conv"] == outputs and unit["blocks_1_act"] == outputs
    assert "blocks_2_conv" not in unit  # a dense conv consumes the channel; it couples nothing


def test_grouped_conv_couples_a_whole_group():
    model = Net(4, [("conv", 4, 1, 1, True, False, "relu"), ("group", 2, 3, "relu")], "pool")
    gm, groups = analyze(model, (1, 4, 8, 8))
    unit = channels(groups, gm, "blocks_1_conv", 4)
    assert unit["blocks_0_conv"] == [2, 3] and unit["blocks_1_conv"] == [3, 4, 5]
    assert len([u for u in groups.units if "blocks_1_conv" in {n.name for n in u.channels}]) == 2


def test_flatten_linear_feature_blocks():
    model = Net(2, [("conv", 3, 3, 1, True, True, "relu"), ("pool", "max")], "flatten")
    gm, groups = analyze(model, (1, 2, 8, 8))
    unit = channels(groups, gm, "blocks_0_conv", 1)
    assert unit["flatten"] == list(range(16, 32))  # channel 1 of a 4x4 map: features 16..31
    assert "head" not in unit  # the linear consumes them


def test_view_to_features_and_se_gate():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.gate = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4 * 9, 2)

        def forward(self, x):
            y = self.conv(x)
            y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
            return self.fc(y.view(y.size(0), -1))

    gm, groups = analyze(M(), (2, 3, 3, 3))
    unit = channels(groups, gm, "conv", 3)
    assert unit["gate"] == [3] and unit["mul"] == [3] and unit["view"] == list(range(27, 36))
    assert groups.unit(node(gm, "conv"), 3).removable


@fx.wrap
def reverse_channels(x):
    return x.flip(1)


class Blocked(nn.Module):
    """Channels that must stay: a graph output, a custom op, a channel slice, a shared module, a
    softmax over channels, one channel broadcast over all."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.e = (nn.Conv2d(3, 4, 1) for _ in range(4))
        self.f, self.g, self.shared = (nn.Conv2d(4, 4, 1) for _ in range(3))
        self.d, self.head = nn.Conv2d(4, 1, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = self.a(x)
        b = reverse_channels(self.b(x))
        c = self.c(x)[:, :2]
        s = self.shared(self.shared(self.f(a)))
        soft = F.softmax(self.e(x), 1)
        broadcast = self.g(a) * self.d(a)
        return a, self.head(b + s + soft + broadcast), c


@pytest.mark.parametrize("name, reason", [
    ("a", "graph output (through 'a')"),
    ("b", "'reverse_channels' (function reverse_channels) has no channel handler"),
    ("c", "'getitem' (function getitem) has no channel handler"),
    ("f", "module 'shared' is called from 2 places"),
    ("e", "'softmax' (function softmax) has no channel handler"),
    ("g", "'mul' (mul) broadcasts 'd' over the channels"),
    ("head", "graph output"),
], ids=["output", "custom-op", "slice", "shared-module", "softmax", "broadcast", "head"])
def test_blocked_channels_say_why(name, reason):
    gm, groups = analyze(Blocked(), (1, 3, 4, 4))
    unit = groups.unit(node(gm, name), 0)
    assert not unit.removable and reason in unit.reason, unit.reason
    assert "graph input 'x'" in groups.unit(node(gm, "x"), 0).reason


def test_shape_reads_and_direct_weight_reads():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4 * 16, 2)

        def forward(self, x):
            a = self.a(x)
            b = self.b(x)
            tied = F.conv2d(x, self.c.weight)  # reads c's weight beside calling c
            return self.fc(a.reshape(a.shape[0], -1)) + b.size(1) + self.c(x).mean() + tied.mean()

    gm, groups = analyze(M(), (1, 3, 4, 4))
    assert groups.unit(node(gm, "a"), 0).removable  # only the batch size is read
    assert "reads the channel count of 'b'" in groups.unit(node(gm, "b"), 0).reason
    assert "reads 'c.weight' of module 'c' directly" in groups.unit(node(gm, "c"), 0).reason


def test_graph_input_and_training_batch_norm_block():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False), nn.Conv2d(3, 2, 1),
                          nn.Flatten(), nn.Linear(2 * 16, 2))
    gm, groups = analyze(model, (1, 2, 4, 4))
    assert "graph input 'input_1'" in groups.unit(node(gm, "input_1"), 0).reason
    assert "batch statistics" in groups.unit(node(gm, "_0"), 0).reason
    assert groups.unit(node(gm, "_2"), 1).removable


def test_keep_some_leaves_a_channel_per_tensor():
    model = Net(2, [("conv", 2, 1, 1, True, False, "relu"), ("conv", 3, 1, 1, True, False, "none")], "pool")
    gm, groups = analyze(model, (1, 2, 4, 4))
    roots = {u.root for u in groups.units if u.removable}
    kept = groups.keep_some(roots)
    assert len(kept) == 2 and all("without channels" in r for r in kept.values())


@settings(max_examples=15, deadline=None)
@given(spec=nets(), seed=st.integers(0, 1000))
def test_property_a_unit_is_determined_by_its_producers(spec, seed: int):
    """Zero the weights of a unit's producers: every channel of the unit, in every tensor the
    analysis lists, becomes one value (the same for every sample and position) — so nothing
    outside the unit feeds it, which is what removing it together relies on."""
    model, shape = spec
    torch.manual_seed(seed)
    model = randomize_norm_stats(model, seed).eval()
    x = torch.randn(shape)
    gm = ir.trace(model, (x,))
    groups = ChannelGroups(gm)
    assert sum(len(c) for u in groups.units for c in u.channels.values()) == sum(len(r) for r in groups.roots.values())
    checked = [u for u in groups.units if groups.producers(u) and (not u.reason or "graph output" in u.reason)]
    for unit in checked[::max(1, len(checked) // 8)]:  # (at most ~8 per graph: one run of the model each)
        producers = groups.producers(unit)
        zeroed = copy.deepcopy(gm)
        with torch.no_grad():
            for layer, rows in producers:
                zeroed.get_submodule(layer.target).weight[rows] = 0
        values = node_values(zeroed, x)
        for tensor, indices in unit.channels.items():
            for index in indices:  # (a grouped conv's unit holds several channels of one tensor)
                value = values[tensor.name][:, index]
                reference = value.flatten()[0].expand_as(value)
                assert torch.allclose(value, reference, rtol=1e-5, atol=1e-6), (
                    f"{tensor.name}[:, {index}] is not constant after zeroing "
                    f"{[(p.name, r) for p, r in producers]}\n{gm.graph}")
