import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt import ir
from fxopt.errors import InputError, TraceError


class Spellings(nn.Module):
    """Every recognized spelling of relu, add and conv2d, side by side."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.weight = nn.Parameter(torch.randn(3, 3, 3, 3))

    def forward(self, x):
        a = self.conv(x)
        b = F.conv2d(x, self.weight, padding=1)
        c = torch.conv2d(x, self.weight, None, 1, 1)
        r = [self.act(a), F.relu(b), torch.relu(c), a.relu(), F.relu(b, inplace=False)]
        s = [a + b, torch.add(a, c), a.add(b), operator.add(b, c)]
        return sum(r) + sum(s)


def test_trace_is_module_level_with_shapes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    gm = ir.trace(model, (torch.randn(1, 3, 8, 8),))
    ops = [n.op for n in gm.graph.nodes]
    assert ops.count("call_module") == 4
    keys = [ir.op_key(n, gm) for n in gm.graph.nodes if n.op == "call_module"]
    assert keys == ["conv2d", "batch_norm", "flatten", "linear"]
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert tuple(ir.shape_of(conv)) == (1, 4, 6, 6)
    assert gm.meta["fxopt"]["capture"] == "fx"


def test_trace_copies_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    gm = ir.trace(model, (torch.randn(1, 3, 8, 8),))
    assert gm.get_submodule("0") is not model[0]
    with torch.no_grad():
        gm.get_submodule("0").weight.zero_()
    assert model[0].weight.abs().sum() > 0


def test_op_keys_read_every_spelling_as_one_op():
    gm = ir.trace(Spellings().eval(), (torch.randn(1, 3, 6, 6),))
    keys = [ir.op_key(n, gm) for n in gm.graph.nodes]
    assert keys.count("relu") == 5
    assert keys.count("conv2d") == 3
    assert keys.count("add") >= 4 + 2  # the four spellings plus the adds of sum()
    assert None in keys  # placeholder/get_attr/output have no op key


def test_inplace_spellings_are_marked():
    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            y.add_(1)  # (fx records `y += 1` as an out-of-place operator.add already)
            y.relu_()
            return F.relu(y, inplace=True)

    gm = ir.trace(M(), (torch.randn(4),))
    forms = [ir.classify(n, gm) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert [(f.key, f.inplace) for f in forms] == [("mul", False), ("add", True), ("relu", True), ("relu", True)]
    assert forms[-1].kwargs == {} and forms[0].is_canonical and not forms[-1].is_canonical


def test_add_with_alpha_is_not_add():
    class M(nn.Module):
        def forward(self, x):
            return torch.add(x, x, alpha=2)

    gm = ir.trace(M(), (torch.randn(4),))
    assert [ir.op_key(n, gm) for n in gm.graph.nodes if n.op == "call_function"] == [None]


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return x * 2
        return x


class HasBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = Branchy()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_untraceable_model_names_line_and_submodule():
    with pytest.raises(TraceError) as info:
        ir.trace(HasBranchy().eval(), (torch.randn(1, 3, 4, 4),))
    message = str(info.value)
    assert "test_ir.py" in message and "if x.sum() > 0" in message
    assert "'gate'" in message and "leaf_modules=[Branchy]" in message


@pytest.mark.parametrize("leaf", [Branchy, "Branchy", "gate"])
def test_leaf_modules_make_it_traceable(leaf):
    model = HasBranchy().eval()
    x = torch.randn(1, 3, 4, 4)
    gm = ir.trace(model, (x,), leaf_modules=[leaf])
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize(
    "inputs, message",
    [
        ((), "takes 1 input(s), but 0"),
        ((torch.randn(1, 3, 8, 8), torch.randn(1)), "takes 1 input(s), but 2"),
        ((torch.randn(1, 5, 8, 8),), "fails on the example inputs"),
        ((torch.zeros(1, 3, 8, 8, dtype=torch.int64),), "fails on the example inputs"),
        ((3.0,), "not a torch.Tensor"),
    ],
)
def test_bad_example_inputs(inputs, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ir.trace(model, inputs)


def test_training_mode_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(InputError, match=r"training mode .*'1'.*model.eval\(\)"):
        ir.check_eval_mode(model)
    ir.check_eval_mode(model.eval())


def test_count_macs():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    gm = ir.trace(model, (torch.randn(1, 4, 6, 6),))
    assert ir.count_macs(gm) == 8 * 4 * 4 * (2 * 3 * 3) + 10 * 128
