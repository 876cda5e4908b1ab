"""eliminate_noops: identities of values removed, reshape/permute chains collapsed."""

import torch
from torch import nn

import fxopt.passes  # noqa: F401 - registers the passes
from fxopt.testing import check_pass, op_counts


class Noops(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("ones", torch.ones(1, 8, 1, 1))
        self.register_buffer("zeros", torch.zeros(8, 1, 1))

    def forward(self, x):
        y = self.conv(x).contiguous()
        y = y.view(2, 8, -1).view(2, 8, 6, 6)             # reshape_chain, then reshape_noop
        y = y.permute(0, 2, 3, 1).permute(0, 3, 1, 2)      # permute_cancel
        y = y.transpose(2, 3).transpose(3, 2)              # permute_cancel
        y = y * self.ones + self.zeros                     # mul_one, add_zero (broadcast constants)
        y = 1 * y - 0
        y = sum([y])                                       # 0 + y
        y = torch.cat([y], 1)
        y = torch.stack([y], 0).sum(0)
        return torch.relu(y)


def test_every_noop_goes_and_outputs_match():
    gm, result = check_pass("eliminate_noops", Noops(), [torch.randn(2, 3, 6, 6)])
    assert result.stats == {"contiguous": 1, "reshape_chain": 1, "reshape_noop": 1, "permute_cancel": 2,
                            "mul_one": 2, "add_zero": 3, "cat_single": 1, "stack_reduce": 1}
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert len(targets) == 1  # only the relu is left
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]


class Chains(nn.Module):
    def forward(self, x):
        y = x.permute(0, 2, 3, 1).permute(0, 2, 1, 3)   # one permute
        z = x.reshape(2, 12, 9).reshape(2, 3, 36)        # one reshape
        return y.sum() + z.sum()


def test_chains_collapse_to_one_op():
    gm, result = check_pass("eliminate_noops", Chains(), [torch.randn(2, 3, 4, 9)],
                            stats={"permute_chain": 1, "reshape_chain": 1})
    assert sum(n.target in (torch.permute, "permute") for n in gm.graph.nodes) == 1
    assert sum(n.target in (torch.reshape, "reshape") for n in gm.graph.nodes) == 1


class Declines(nn.Module):
    """Ops that look like no-ops but are not: broadcasting constants, non-identity values,
    shared intermediates, dtype changes and in-place writes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("wide", torch.ones(4, 3, 1, 1))  # broadcasting grows the batch
        self.register_buffer("twos", torch.full((3, 1, 1), 2.0))

    def forward(self, x):
        a = x * self.wide
        b = x + self.twos
        c = x.reshape(1, 3, 16)
        d = c.reshape(1, 48) + c.reshape(1, 48)            # inner reshape shared: no chain
        e = x.permute(0, 2, 3, 1)
        f = x * torch.ones(1, dtype=torch.float64)          # promotes the dtype
        g = x.contiguous()
        g.add_(1)                                           # written in place: x must stay apart
        return a.sum() + b.sum() + d.sum() + e.sum() + f.sum() + g.sum() + x.sum()


def test_declines_what_is_not_a_noop():
    gm, result = check_pass("eliminate_noops", Declines(), [torch.randn(1, 3, 4, 4)],
                            declines=["mutated in place"])
    assert result.stats == {}
    assert op_counts(gm)["mul"] == 2


def test_noop_free_graph_is_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    _, result = check_pass("eliminate_noops", model, [torch.randn(1, 3, 5, 5)])
    assert not result.changed


def test_scalar_identity_keeps_integer_dtypes():
    class M(nn.Module):
        def forward(self, x):
            i = x.long()
            return (i * 1 + 0).float() + i * 1.0    # i * 1.0 promotes to float: kept
    gm, result = check_pass("eliminate_noops", M(), [torch.randn(1, 3) * 10])
    assert result.stats == {"mul_one": 1, "add_zero": 1}
    assert op_counts(gm)["mul"] == 1


def test_contiguous_before_a_view_leaves_a_reshape():
    class Shuffle(nn.Module):
        def forward(self, x):
            return x.view(1, 2, 3, 4, 4).transpose(1, 2).contiguous().view(1, 6, 4, 4)
    gm, _ = check_pass("eliminate_noops", Shuffle(), [torch.randn(1, 6, 4, 4)], stats={"contiguous": 1})
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["view", "transpose", "reshape"]
