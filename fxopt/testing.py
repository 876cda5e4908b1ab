"""Test helpers for passes: ``check_pass`` and ``randomize_norm_stats`` (ARCHITECTURE.md §6)."""

from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import torch
from torch import fx, nn

from fxopt import ir, verify
from fxopt.pass_manager import Pass, PassContext, PassResult, apply
from fxopt.spec import build_pass


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial, seeded statistics and affine parameters (in place).

    A freshly built BatchNorm is the identity in eval mode, so a test with default statistics
    cannot tell a folded BN from a dropped one.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                c = module.num_features
                if module.track_running_stats and module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
                    module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(c, generator=generator) * 0.2)
    return model


def op_counts(gm: fx.GraphModule) -> Counter:
    """How many nodes of each canonical op key the graph holds."""
    return Counter(key for node in gm.graph.nodes if (key := ir.op_key(node, gm)) is not None)


def check_pass(
    pass_: Pass | str | dict,
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    stats: Mapping[str, int] | None = None,
    ops_after: Mapping[str, int] | None = None,
    declines: Sequence[str] = (),
    before: Sequence[Pass | str | dict] = (),
    rtol: float = verify.PASS_TOLERANCE[0],
    atol: float = verify.PASS_TOLERANCE[1],
) -> tuple[fx.GraphModule, PassResult]:
    """Trace ``model``, run ``before`` then the pass, and check everything a pass promises.

    - the IR verifies (lint, references resolve, shapes propagate);
    - the stats equal ``stats`` exactly (when given);
    - each op key in ``ops_after`` occurs exactly that many times afterwards;
    - each string in ``declines`` appears in some recorded decline reason;
    - outputs equal the eager model's on the inputs and on seeded random inputs;
    - running the pass again changes nothing.
    Returns the transformed module and the pass result.
    """
    model = model.eval()
    inputs = tuple(inputs)
    gm = ir.trace(model, inputs)
    ctx = PassContext(example_inputs=inputs, verify="off", reference=model)
    for p in before:
        apply(build_pass(p), gm, ctx)
    p = build_pass(pass_)
    result = apply(p, gm, PassContext(example_inputs=inputs, verify="off", reference=model))
    verify.check_ir(gm, inputs)
    if stats is not None:
        assert result.stats == Counter(stats), f"{p.name} stats {dict(result.stats)} != expected {dict(stats)}"
    if ops_after is not None:
        counts = op_counts(gm)
        wrong = {key: (counts.get(key, 0), want) for key, want in ops_after.items() if counts.get(key, 0) != want}
        assert not wrong, f"{p.name}: op counts (got, expected) {wrong}\n{gm.graph}"
    reasons = [d.reason for d in result.declines]
    for expected in declines:
        assert any(expected in r for r in reasons), f"{p.name}: no decline mentions {expected!r}; declines: {reasons}"
    verify.check_equivalent(model, gm, inputs, rtol=rtol, atol=atol)
    again = apply(p, gm, PassContext(example_inputs=inputs, verify="off"))
    assert not again.changed, f"{p.name} is not idempotent: second run stats {dict(again.stats)}"
    return gm, result
