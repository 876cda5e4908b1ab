"""fold_constant_subgraphs: parameter-only subgraphs computed once."""

import torch
from torch import nn

import fxopt
import fxopt.passes  # noqa: F401
from fxopt.testing import check_pass, op_counts


class Gated(nn.Module):
    """Weights reparameterized in forward: a sigmoid gate and a standardized scale."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = nn.Parameter(torch.randn(8))
        self.log_scale = nn.Parameter(torch.randn(8))

    def forward(self, x):
        scale = self.gate.sigmoid() * self.log_scale.exp()
        scale = (scale - scale.mean()) / scale.std()
        return self.conv(x) * scale.reshape(1, -1, 1, 1) + torch.ones(8).reshape(1, 8, 1, 1)


def test_parameter_subgraphs_become_buffers():
    gm, result = check_pass("fold_constant_subgraphs", Gated(), [torch.randn(1, 3, 6, 6)])
    # the tracer already made torch.ones(8).reshape(...) a constant; the scale is 10 ops
    assert result.stats == {"constant_subgraph": 1, "constant_ops": 10}
    assert not hasattr(gm, "gate") and not hasattr(gm, "log_scale")   # the folded parameters went
    assert len([n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]) == 2


def test_then_the_folds_absorb_the_constants():
    optimized = fxopt.optimize(Gated().eval(), (torch.randn(1, 3, 6, 6),))
    assert op_counts(optimized.module) == {"conv2d": 1}


class Random(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        noise = torch.rand_like(self.w)     # random: never a constant
        acc = torch.zeros_like(self.w)
        acc.add_(self.w)                    # written in place: not a constant either
        return x * noise + acc + self.w.abs()


def test_random_and_mutated_values_are_not_folded():
    torch.manual_seed(0)
    model = Random().eval()
    from fxopt import ir
    gm = ir.trace(model, (torch.randn(2, 4),))
    from fxopt.pass_manager import PassContext
    from fxopt.spec import build_pass
    result = build_pass("fold_constant_subgraphs")(gm, PassContext(example_inputs=(torch.randn(2, 4),)))
    assert result.stats["constant_subgraph"] == 1   # only w.abs()
    targets = {n.target for n in gm.graph.nodes}
    assert torch.rand_like in targets and torch.zeros_like in targets and "add_" in targets


def test_large_expansions_stay_computed():
    class Expand(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return x + self.bias.expand(1, 4, 512, 512)
    gm, result = check_pass({"name": "fold_constant_subgraphs", "max_bytes": 1 << 16}, Expand(),
                            [torch.randn(1, 4, 512, 512)], stats={}, declines=["would store"])


def test_a_folded_result_read_by_another_folded_result():
    """Found by the pytorchcv corpus (isqrtcovresnet18): a constant read at run time and by another
    constant that is read at run time. Folding the first rewired the second's input to the new
    buffer, which the size check did not know (KeyError)."""

    class SharedConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            a = self.w.repeat(2)
            return x + a + a * 2

    gm, _ = check_pass("fold_constant_subgraphs", SharedConstant(), [torch.randn(3, 8)],
                       stats={"constant_subgraph": 2, "constant_ops": 3})
    assert not hasattr(gm, "w")


def test_a_constant_written_through_a_view_is_not_folded():
    """Found by the pytorchcv corpus (isqrtcovresnet18, captured by torch.export): ``y =
    torch.zeros(...); y[:, i] = ...`` is select(zeros) -> aten.copy_. Neither the zeros nor the
    select is a constant: folding them dropped every write (outputs 100% wrong)."""

    class FillSlices(nn.Module):
        def forward(self, x):
            y = torch.zeros(1, 2, 4, 3, 3)
            y[:, 0] = x
            y[:, 1] = x * 2
            return y[:, 0] + y[:, 1]

    x = torch.randn(1, 4, 3, 3)
    optimized = fxopt.optimize(FillSlices().eval(), (x,), "canonicalize,eliminate_noops,fold_constant_subgraphs",
                               capture="export")  # verifies against eager
    assert optimized.report.capture == "export"
    assert optimized.report.passes[-1].stats.get("constant_subgraph", 0) == 0
    torch.testing.assert_close(optimized.module(x), 3 * x)
