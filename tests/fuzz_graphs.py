"""Random CNNs for fuzzing the passes: a hypothesis strategy of *recipes* and the module they build.

A recipe is plain JSON data, so every failure replays exactly from what the test prints::

    {"input": [N, C, H, W], "seed": S, "body": [item, ...], "head": {...} | null}

``body`` items act on the current tensor, in order (shapes are tracked while drawing, so every
recipe builds a valid model):

    {"op": "conv", "out", "k": [kh, kw], "stride", "dilation", "groups", "padding": [ph, pw],
     "bias", "mode" (padding_mode), "zero_out": [channels whose weights and bias are zero],
     "density": fraction of weights kept (None: dense)}
    {"op": "bn", "affine", "track"}            BatchNorm2d (random statistics from ``seed``)
    {"op": "act", "kind"}                      see ACTIVATIONS
    {"op": "pad", "pad": [l, r, t, b], "value"}
    {"op": "shuffle", "groups"}                ShuffleNet channel shuffle (view/transpose/reshape)
    {"op": "pool", "kind": "max"|"avg", "k", "stride", "padding"}
    {"op": "scale", "mul", "add"}              x * mul + add (scalars)
    {"op": "gate"}                             x * sigmoid(g).view(1, C, 1, 1): a constant subgraph
    {"op": "gather", "perm": [...]}            x[:, perm] (a static channel gather)
    {"op": "branches", "mode": "add"|"cat", "identity", "branches": [[item, ...], ...]}
                                               multi-branch block: branches read the same tensor,
                                               summed (RepVGG-like, plus x when identity) or
                                               concatenated along channels (Inception-like)
    {"op": "skip", "from": i}                  x + (output of body item i), same shape
    {"op": "output"}                           the current tensor also becomes a model output

``head`` ends the model with global average pooling, flatten and one or two linear layers
(``{"hidden": int | None, "bn": bool, "act": kind, "classes": int}``).

``build(recipe)`` gives an eval-mode ``nn.Module`` (weights from ``recipe["seed"]``) and its
example input. ``run_pass(spec, recipe)`` is the fuzz property for one pass spec (a pass, a
pipeline name or a list); run this file to replay one recorded failure::

    .venv/bin/python tests/fuzz_graphs.py '<pass spec JSON>' '<recipe JSON>'
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = ("relu", "relu_inplace", "relu6", "hardswish", "silu", "leaky_relu", "sigmoid", "gelu",
               "identity", "f_relu", "hardtanh")
MAX_CHANNELS = 8


# ---------------------------------------------------------------------------------------------
# Modules built from a recipe


def activation(kind: str) -> nn.Module:
    return {
        "relu": nn.ReLU, "relu_inplace": lambda: nn.ReLU(inplace=True), "relu6": lambda: nn.ReLU6(inplace=True),
        "hardswish": nn.Hardswish, "silu": nn.SiLU, "leaky_relu": lambda: nn.LeakyReLU(0.1),
        "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "identity": nn.Identity, "f_relu": FunctionalReLU,
        "hardtanh": lambda: nn.Hardtanh(-0.5, 0.5),
    }[kind]()


class FunctionalReLU(nn.Module):
    def forward(self, x):
        return F.relu(x)


class Pad(nn.Module):
    def __init__(self, pad, value):
        super().__init__()
        self.pad, self.value = tuple(pad), value

    def forward(self, x):
        return F.pad(x, self.pad, value=self.value)


class Shuffle(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Scale(nn.Module):
    def __init__(self, mul, add):
        super().__init__()
        self.mul, self.add = mul, add

    def forward(self, x):
        return x * self.mul + self.add


class Gate(nn.Module):
    def __init__(self, channels, generator):
        super().__init__()
        self.g = nn.Parameter(torch.randn(channels, generator=generator))

    def forward(self, x):
        return x * self.g.sigmoid().view(1, -1, 1, 1)


class Gather(nn.Module):
    def __init__(self, perm):
        super().__init__()
        self.register_buffer("perm", torch.tensor(perm))

    def forward(self, x):
        return x[:, self.perm]


class Branches(nn.Module):
    def __init__(self, branches, mode, identity):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.mode, self.identity = mode, identity

    def forward(self, x):
        ys = [branch(x) for branch in self.branches]
        if self.mode == "cat":
            return torch.cat(ys, 1)
        out = x if self.identity else ys.pop(0)
        for y in ys:
            out = out + y
        return out


class Head(nn.Module):
    def __init__(self, channels, spec):
        super().__init__()
        layers: list[nn.Module] = []
        width = channels
        if spec["hidden"]:
            layers.append(nn.Linear(width, spec["hidden"]))
            if spec["bn"]:
                layers.append(nn.BatchNorm1d(spec["hidden"]))
            layers.append(activation(spec["act"]))
            width = spec["hidden"]
        layers.append(nn.Linear(width, spec["classes"]))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(*layers)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


class FuzzNet(nn.Module):
    """The body's items in order; ``skips[i]``: add the output of item j; ``taps``: extra outputs."""

    def __init__(self, items, skips, taps, head):
        super().__init__()
        self.items = nn.ModuleList(items)
        self.skips, self.taps = skips, taps
        self.head = head

    def forward(self, x):
        outs, extra = [], []
        for i, item in enumerate(self.items):
            if i in self.skips:
                x = x + outs[self.skips[i]]
            elif i in self.taps:
                extra.append(x)
            else:
                x = item(x)
            outs.append(x)
        if self.head is not None:
            x = self.head(x)
        return (x, *extra) if extra else x


def _layer(item: dict[str, Any], channels: int, generator: torch.Generator) -> tuple[nn.Module, int]:
    op = item["op"]
    if op == "conv":
        conv = nn.Conv2d(channels, item["out"], tuple(item["k"]), item["stride"], tuple(item["padding"]),
                         item["dilation"], item["groups"], item["bias"], padding_mode=item["mode"])
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / math.sqrt(conv.weight[0].numel()))
            if conv.bias is not None:
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.2)
            if item["density"] is not None:
                keep = torch.rand(conv.weight.shape, generator=generator) < item["density"]
                conv.weight.mul_(keep)
            for c in item["zero_out"]:
                conv.weight[c] = 0
                if conv.bias is not None:
                    conv.bias[c] = 0
        return conv, item["out"]
    if op == "bn":
        return nn.BatchNorm2d(channels, affine=item["affine"], track_running_stats=item["track"]), channels
    if op == "act":
        return activation(item["kind"]), channels
    if op == "pad":
        return Pad(item["pad"], item["value"]), channels
    if op == "shuffle":
        return Shuffle(item["groups"]), channels
    if op == "pool":
        cls = nn.MaxPool2d if item["kind"] == "max" else nn.AvgPool2d
        return cls(item["k"], item["stride"], item["padding"]), channels
    if op == "scale":
        return Scale(item["mul"], item["add"]), channels
    if op == "gate":
        return Gate(channels, generator), channels
    if op == "gather":
        return Gather(item["perm"]), channels
    if op == "branches":
        branches, outs = [], []
        for seq in item["branches"]:
            layers, c = [], channels
            for sub in seq:
                layer, c = _layer(sub, c, generator)
                layers.append(layer)
            branches.append(nn.Sequential(*layers) if layers else nn.Identity())
            outs.append(c)
        out = sum(outs) if item["mode"] == "cat" else outs[0]
        return Branches(branches, item["mode"], item["identity"]), out
    if op in ("skip", "output"):
        return nn.Identity(), channels
    raise ValueError(f"unknown recipe op {op!r}")


def build(recipe: dict[str, Any]) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The eval-mode model a recipe describes and its example input (both seeded by the recipe)."""
    from fxopt.testing import randomize_norm_stats

    generator = torch.Generator().manual_seed(recipe["seed"])
    channels = recipe["input"][1]
    items, skips, taps = [], {}, []
    for i, item in enumerate(recipe["body"]):
        layer, channels = _layer(item, channels, generator)
        items.append(layer)
        if item["op"] == "skip":
            skips[i] = item["from"]
        elif item["op"] == "output":
            taps.append(i)
    head = Head(channels, recipe["head"]) if recipe["head"] else None
    model = FuzzNet(items, skips, taps, head)
    randomize_norm_stats(model, recipe["seed"])
    x = torch.randn(recipe["input"], generator=generator)
    return model.eval(), (x,)


# ---------------------------------------------------------------------------------------------
# The strategy: recipes whose shapes are valid by construction


def _conv_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


@st.composite
def conv_item(draw, shape, *, out=None, stride=None, same=False, allow_sparse=True):
    """A conv on (C, H, W); ``same``: odd kernel with centred padding (branches of one block
    must agree on the output size: out = (H - 1) // stride + 1)."""
    c, h, w = shape
    out = out if out is not None else draw(st.integers(1, MAX_CHANNELS))
    divisors = [g for g in range(1, c + 1) if c % g == 0 and out % g == 0]
    groups = draw(st.sampled_from(divisors)) if len(divisors) > 1 and draw(st.booleans()) else 1
    stride = stride if stride is not None else draw(st.sampled_from([1, 1, 2]))
    if same:
        kh = kw = draw(st.sampled_from([1, 3, 3, 5]))
        dilation = draw(st.sampled_from([1, 1, 2])) if kh > 1 else 1
        padding = [dilation * (kh - 1) // 2] * 2
    else:
        kh, kw = draw(st.sampled_from([(1, 1), (2, 2), (3, 3), (3, 3), (5, 5), (1, 3), (3, 1)]))
        dilation = draw(st.sampled_from([1, 1, 2])) if max(kh, kw) > 1 else 1
        padding = []
        for k, size in ((kh, h), (kw, w)):
            low = max(0, -(-(dilation * (k - 1) + 1 - size) // 2))  # size + 2p >= d(k-1) + 1
            padding.append(draw(st.integers(low, max(low, dilation * (k - 1) // 2 + 1))))
    mode = "zeros"
    if max(padding) > 0 and max(padding) < min(h, w) and draw(st.integers(0, 9)) == 0:
        mode = draw(st.sampled_from(["reflect", "replicate", "circular"]))
    zero_out = sorted(draw(st.sets(st.integers(0, out - 1), max_size=out - 1))) if out > 1 and draw(st.integers(0, 3)) == 0 else []
    density = None
    if allow_sparse and draw(st.integers(0, 5)) == 0:
        density = draw(st.sampled_from([0.0, 0.1, 0.3, 0.6]))
    item = {"op": "conv", "out": out, "k": [kh, kw], "stride": stride, "dilation": dilation, "groups": groups,
            "padding": padding, "bias": draw(st.booleans()), "mode": mode, "zero_out": zero_out, "density": density}
    oh = _conv_size(h, kh, stride, padding[0], dilation)
    ow = _conv_size(w, kw, stride, padding[1], dilation)
    assert oh >= 1 and ow >= 1, (item, shape)
    return item, (out, oh, ow)


@st.composite
def simple_item(draw, shape):
    """One item of a branch or the body that is not a block: conv, bn, act, pad, shuffle, pool, scale."""
    c, h, w = shape
    kinds = ["conv", "conv", "conv", "bn", "bn", "act", "act", "pad", "shuffle", "pool", "scale", "gate", "gather"]
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        return draw(conv_item(shape))
    if kind == "bn":
        # without running statistics BN normalizes by the batch: it needs more than one value
        track = h * w == 1 or draw(st.integers(0, 5)) > 0
        return {"op": "bn", "affine": draw(st.integers(0, 5)) > 0, "track": track}, shape
    if kind == "act":
        return {"op": "act", "kind": draw(st.sampled_from(ACTIVATIONS))}, shape
    if kind == "pad":
        pad = draw(st.lists(st.integers(0, 2), min_size=4, max_size=4))
        if draw(st.booleans()):
            pad = [pad[0], pad[0], pad[0], pad[0]]
        value = 0.0 if draw(st.integers(0, 3)) else draw(st.sampled_from([0.5, -1.0]))
        return {"op": "pad", "pad": pad, "value": value}, (c, h + pad[2] + pad[3], w + pad[0] + pad[1])
    if kind == "shuffle":
        groups = [g for g in range(2, c + 1) if c % g == 0 and g < c]
        if not groups:
            return {"op": "act", "kind": "relu"}, shape
        return {"op": "shuffle", "groups": draw(st.sampled_from(groups))}, shape
    if kind == "pool":
        k = draw(st.sampled_from([k for k in (1, 2, 3) if k <= min(h, w)]))
        stride = draw(st.sampled_from([1, 2])) if k > 1 else 1
        padding = draw(st.integers(0, k // 2))
        pool = draw(st.sampled_from(["max", "avg"]))
        return ({"op": "pool", "kind": pool, "k": k, "stride": stride, "padding": padding},
                (c, _conv_size(h, k, stride, padding, 1), _conv_size(w, k, stride, padding, 1)))
    if kind == "gate":
        return {"op": "gate"}, shape
    if kind == "gather":
        return {"op": "gather", "perm": draw(st.permutations(list(range(c))))}, shape
    mul = draw(st.sampled_from([0.5, 2.0, -1.0, 1.0]))
    add = draw(st.sampled_from([0.0, 0.0, 0.25]))
    return {"op": "scale", "mul": mul, "add": add}, shape


@st.composite
def branches_item(draw, shape):
    c, h, w = shape
    mode = draw(st.sampled_from(["add", "add", "cat"]))
    stride = draw(st.sampled_from([1, 1, 2]))
    n = draw(st.integers(2, 3))
    out_shape_hw = ((h - 1) // stride + 1, (w - 1) // stride + 1)
    identity = mode == "add" and stride == 1 and draw(st.booleans())
    common = c if identity else draw(st.integers(1, MAX_CHANNELS))
    branches = []
    total = 0
    for _ in range(n):
        out = common if mode == "add" else draw(st.integers(1, 4))
        conv, (oc, oh, ow) = draw(conv_item(shape, out=out, stride=stride, same=True))
        seq = [conv]
        if draw(st.integers(0, 3)):
            seq.append({"op": "bn", "affine": True, "track": True})
        if draw(st.integers(0, 3)) == 0:  # a 1x1 conv after it (a branch of two convs)
            conv2, _ = draw(conv_item((oc, oh, ow), out=out, stride=1, same=True))
            conv2["k"], conv2["padding"], conv2["dilation"] = [1, 1], [0, 0], 1
            seq.append(conv2)
        if mode == "cat" and draw(st.booleans()):
            seq.append({"op": "act", "kind": draw(st.sampled_from(ACTIVATIONS))})
        branches.append(seq)
        total += out
    if mode == "add" and stride == 1 and not identity and draw(st.integers(0, 2)) == 0 and common == c:
        branches.append([{"op": "bn", "affine": True, "track": True}])  # RepVGG's BN identity branch
    out_c = total if mode == "cat" else common
    return {"op": "branches", "mode": mode, "identity": identity, "branches": branches}, (out_c, *out_shape_hw)


@st.composite
def recipes(draw, max_items: int = 7):
    """A random CNN recipe (see the module docstring)."""
    n = draw(st.sampled_from([1, 1, 2]))
    c = draw(st.integers(1, 4))
    h = draw(st.integers(4, 12))
    w = draw(st.integers(4, 12)) if draw(st.integers(0, 3)) == 0 else h
    shape = (c, h, w)
    body: list[dict] = []
    shapes: list[tuple[int, int, int]] = []
    for _ in range(draw(st.integers(1, max_items))):
        kind = draw(st.sampled_from(["simple"] * 5 + ["branches"] * 2 + ["skip", "output"]))
        same_shape = [i for i, s in enumerate(shapes) if s == shape and body[i]["op"] not in ("skip", "output")]
        if kind == "skip" and same_shape:
            item = {"op": "skip", "from": draw(st.sampled_from(same_shape))}
        elif kind == "output" and body:
            item = {"op": "output"}
        elif kind == "branches":
            item, shape = draw(branches_item(shape))
        else:
            item, shape = draw(simple_item(shape))
        body.append(item)
        shapes.append(shape)
        if item["op"] == "pad" and draw(st.booleans()):  # an explicit pad before a conv (fold_pad)
            item, shape = draw(conv_item(shape))
            body.append(item)
            shapes.append(shape)
    head = None
    if draw(st.integers(0, 2)) == 0:
        hidden = draw(st.sampled_from([None, 4, 6]))
        head = {"hidden": hidden, "bn": hidden is not None and draw(st.booleans()),
                "act": draw(st.sampled_from(["relu", "hardswish", "identity"])), "classes": draw(st.integers(1, 5))}
    return {"input": [n, c, h, w], "seed": draw(st.integers(0, 2**16)), "body": body, "head": head}


# ---------------------------------------------------------------------------------------------
# The property



def run_pass(pass_spec: Any, recipe: dict[str, Any]) -> str:
    """Build ``recipe``, run ``pass_spec`` (a pass spec item after canonicalize, or a named
    pipeline / list through fxopt.optimize) and check: equal outputs (fxopt.testing.check_pass:
    IR valid, outputs equal at rtol 1e-4 relative to the output scale, running the pass again
    changes nothing) or a clean decline (a PreconditionError, or a PassError caused by another
    FxoptError). Returns "changed", "unchanged" or "declined"; anything else raises."""
    from fxopt import optimize
    from fxopt.errors import FxoptError, PassError, VerificationError
    from fxopt.pass_manager import PreconditionError
    from fxopt.testing import check_pass

    model, inputs = build(recipe)
    try:
        if isinstance(pass_spec, (dict,)) or (isinstance(pass_spec, str) and pass_spec not in ("default",)):
            before = [] if pass_spec == "canonicalize" else ["canonicalize"]
            _, result = check_pass(pass_spec, model, inputs, before=before)
            return "changed" if result.changed else "unchanged"
        optimized = optimize(model, inputs, pass_spec, verify="each")
        assert optimized.report.verification["ok"]
        return "changed" if any(row.changed for row in optimized.report.passes) else "unchanged"
    except VerificationError:
        raise
    except PreconditionError:
        return "declined"
    except PassError as exc:
        if exc.__cause__ is None or isinstance(exc.__cause__, FxoptError):
            return "declined"
        raise


def describe(pass_spec: Any, recipe: dict[str, Any]) -> str:
    """The replay command for one case."""
    return (f".venv/bin/python tests/fuzz_graphs.py '{json.dumps(pass_spec)}' '{json.dumps(recipe)}'")


if __name__ == "__main__":  # replay: python tests/fuzz_graphs.py PASS_SPEC_JSON RECIPE_JSON
    sys.path.insert(0, ".")
    spec_arg, recipe_arg = sys.argv[1:3]
    print(run_pass(json.loads(spec_arg), json.loads(recipe_arg)))
