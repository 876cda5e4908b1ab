import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt import ir
from fxopt.errors import PassError
from fxopt.pass_manager import PassContext, apply
from fxopt.testing import check_pass, op_counts


class ManySpellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.act6 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()
        self.hs = nn.Hardswish()

    def forward(self, x):
        a = self.act(x * 2)
        b = torch.relu(x) + F.relu(x, inplace=False) + x.relu()
        c = torch.add(a, b) + a.add(b)
        d = self.hs(self.act6(self.ident(c)))
        return self.drop(self.flat(self.pool(torch.sigmoid(d) + d.sigmoid())))


def test_spellings_collapse_to_canonical_calls():
    x = torch.randn(2, 3, 5, 5)
    gm, result = check_pass(
        "canonicalize", ManySpellings(), (x,),
        stats={"drop_noop": 2, "respell": 11, "functionalize": 1},
        ops_after={"relu": 4, "add": 6, "sigmoid": 2, "relu6": 1, "hardswish": 1, "dropout": 0, "identity": 0},
    )
    assert not any(n.op in ("call_module", "call_method") for n in gm.graph.nodes)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.relu not in targets and F.relu in targets


class InplaceThenReuse(nn.Module):
    """Eager semantics: the add reads the mutated x."""

    def forward(self, x):
        x = x * 1.5
        x.relu_()
        y = F.hardtanh(x, -0.5, 0.5, inplace=True)
        return x + y


def test_functionalize_keeps_mutation_semantics():
    x = torch.randn(1, 4, 3, 3)
    gm, _ = check_pass("canonicalize", InplaceThenReuse(), (x,), stats={"functionalize": 2, "respell": 2},
                       ops_after={"relu": 1, "hardtanh": 1})
    hardtanh = next(n for n in gm.graph.nodes if ir.op_key(n, gm) == "hardtanh")
    assert hardtanh.kwargs == {"min_val": -0.5, "max_val": 0.5}
    add = next(n for n in gm.graph.nodes if ir.op_key(n, gm) == "add")
    assert add.args == (hardtanh, hardtanh)


class InplaceOnView(nn.Module):
    def forward(self, x):
        x = x * 1
        head = x[:, :2]
        head.relu_()  # mutates x through the view
        return x


def test_inplace_on_view_is_declined():
    x = torch.randn(1, 4, 3)
    gm, result = check_pass("canonicalize", InplaceOnView(), (x,), stats={},
                            declines=["may be a view of another tensor"])
    assert any(n.op == "call_method" and n.target == "relu_" for n in gm.graph.nodes)


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 2, 3, 3))
        self.b = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.lw = nn.Parameter(torch.randn(5, 6))
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)

    def forward(self, x):
        y = F.conv2d(x, self.w, self.b, stride=2, padding=1, groups=2)
        y = F.batch_norm(y, self.mean, self.var, None, None, False, 0.1, 1e-3)
        y = torch.conv2d(y, self.w2 * 1, None, 1, 1, 1, 2)  # computed weight: stays functional
        return F.linear(y.mean((2, 3)), self.lw)


def test_functional_parametric_ops_become_modules():
    x = torch.randn(1, 4, 8, 8)
    gm, _ = check_pass("canonicalize", FunctionalConv(), (x,), stats={"to_module": 3, "respell": 1},
                       ops_after={"conv2d": 2, "batch_norm": 1, "linear": 1},
                       declines=["weight is computed in the graph"])
    modules = [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    assert modules == [nn.Conv2d, nn.BatchNorm2d, nn.Linear]
    conv = gm.get_submodule(next(n.target for n in gm.graph.nodes if n.op == "call_module"))
    assert (conv.stride, conv.padding, conv.groups, conv.in_channels) == ((2, 2), (1, 1), 2, 4)


def test_batch_norm_with_batch_statistics_is_declined():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(3))
            self.register_buffer("var", torch.ones(3))

        def forward(self, x):
            return F.batch_norm(x, self.mean.clone(), self.var.clone(), training=True)

    check_pass("canonicalize", M(), (torch.randn(4, 3),), stats={}, declines=["batch statistics (training=True)"])


def test_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()
    x = torch.randn(1, 3, 4, 4)
    gm = ir.trace(model, (x,))
    gm.get_submodule("1").train()
    with pytest.raises(PassError, match=r"training mode \(e.g. submodule '1'\).*model.eval\(\)"):
        apply(ir_pass("canonicalize"), gm, PassContext(example_inputs=(x,)))


def ir_pass(name):
    from fxopt.pass_manager import create_pass

    return create_pass(name)


def test_unknown_ops_are_left_alone():
    class M(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 0) + torch.add(x, x, alpha=3)

    gm, _ = check_pass("canonicalize", M(), (torch.randn(4),), stats={})
    assert op_counts(gm) == {"add": 1}
