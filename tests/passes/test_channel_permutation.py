"""fold_channel_permutation: channel shuffles and static gathers folded into convs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt.passes  # noqa: F401
from fxopt.testing import check_pass, op_counts


def shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def shuffle_permute(x, groups):
    n, c, h, w = x.shape
    return x.reshape(n, groups, -1, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)


def _movement_ops(gm):
    return sum(n.op == "call_method" and n.target in ("view", "reshape", "transpose", "permute", "flatten",
                                                      "index_select") for n in gm.graph.nodes)


class IntoProducer(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.a, self.b = nn.Conv2d(8, 12, 1), nn.Conv2d(12, 6, 3, padding=1)

    def forward(self, x):
        return self.b(self.spelling(F.relu(self.a(x)), 3))


@pytest.mark.parametrize("spelling", [shuffle, shuffle_permute])
def test_shuffle_after_a_conv_folds_into_its_output_channels(spelling):
    gm, _ = check_pass("fold_channel_permutation", IntoProducer(spelling), [torch.randn(2, 8, 5, 5)],
                       stats={"into_producer": 1}, ops_after={"conv2d": 2, "relu": 1})
    assert _movement_ops(gm) == 0


class IntoConsumers(nn.Module):
    """The shuffled tensor's producer is read elsewhere too, so the convs reading it absorb it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 12, 1)
        self.b, self.c = nn.Conv2d(12, 6, 3, padding=1), nn.Conv2d(12, 6, 1, bias=False)

    def forward(self, x):
        y = F.relu(self.a(x))
        z = shuffle(y, 4)
        return self.b(z) + self.c(z) + y[:, :6]


def test_shuffle_read_by_convs_folds_into_their_input_channels():
    gm, _ = check_pass("fold_channel_permutation", IntoConsumers(), [torch.randn(1, 8, 5, 5)],
                       stats={"into_consumers": 1})
    assert _movement_ops(gm) == 0


class Gathers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 5, 1)
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)
        self.register_buffer("index", torch.tensor([5, 3, 1, 0, 2, 4]))
        self.register_buffer("features", torch.tensor([4, 4, 0, 1, 2]))

    def forward(self, x):
        y = self.b(self.a(x).index_select(1, self.index))       # permutation after a conv
        v = self.fc1(y.mean((2, 3)).repeat(1, 2)[:, :6])
        return self.fc2(v[:, self.features])                     # a repeat and a drop after a linear


def test_static_index_gathers_fold():
    gm, result = check_pass("fold_channel_permutation", Gathers(), [torch.randn(2, 4, 3, 3)])
    assert result.stats["into_producer"] == 2
    assert not any(n.target == "index_select" for n in gm.graph.nodes)
    fc1 = next(m for name, m in gm.named_modules() if name.startswith("fc1"))
    assert fc1.out_features == 5  # the linear now computes the gathered features directly


class Declines(nn.Module):
    """A grouped consumer, a gather that drops channels into a conv, a producer read twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.middle = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        s = shuffle(y, 2)
        return self.grouped(s) + self.middle(s[:, 2:6]).repeat(1, 2, 1, 1) + y


def test_declines_where_folding_is_wrong_or_costly():
    gm, result = check_pass("fold_channel_permutation", Declines(), [torch.randn(1, 8, 4, 4)], stats={},
                            declines=["keeps 4 of 8 channels"])
    assert op_counts(gm)["conv2d"] == 3
    assert _movement_ops(gm) >= 3


def test_linear_on_a_sequence_is_not_a_channel_producer():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)[:, [2, 0, 1]]   # gathers tokens (dim 1), not features
    check_pass("fold_channel_permutation", Seq(), [torch.randn(2, 3, 4)], stats={})
