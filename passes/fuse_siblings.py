"""fuse_siblings: convs or linears reading the same tensor become one wider op."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxopt import ir
from fxopt.pass_manager import Pass, PassContext, PreconditionError, register
from fxopt.passes.affine import module_name

log = logging.getLogger(__name__)

POLICIES = ("static", "measured", "always")


def _geometry(module: nn.Module) -> tuple | None:
    """What siblings must share to be one op (None: not a fusable layer)."""
    if type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros" \
            and not isinstance(module.padding, str):
        return ("conv2d", module.in_channels, module.kernel_size, module.stride, module.padding, module.dilation,
                module.weight.dtype, module.weight.device)
    if type(module) is nn.Linear:
        return ("linear", module.in_features, module.weight.dtype, module.weight.device)
    return None


def _fused_module(layers: list[nn.Module]) -> nn.Module:
    """One layer computing every layer's outputs, concatenated in order."""
    first = layers[0]
    weight = torch.cat([layer.weight.detach() for layer in layers])
    has_bias = any(layer.bias is not None for layer in layers)
    bias = torch.cat([layer.bias.detach() if layer.bias is not None else
                      torch.zeros(layer.weight.shape[0], dtype=weight.dtype, device=weight.device)
                      for layer in layers]) if has_bias else None
    if isinstance(first, nn.Linear):
        fused = nn.Linear(first.in_features, weight.shape[0], bias=has_bias, dtype=weight.dtype, device=weight.device)
    else:
        fused = nn.Conv2d(first.in_channels, weight.shape[0], first.kernel_size, first.stride, first.padding,
                          first.dilation, bias=has_bias, dtype=weight.dtype, device=weight.device)
    fused.weight = nn.Parameter(weight, requires_grad=first.weight.requires_grad)
    if has_bias:
        fused.bias = nn.Parameter(bias, requires_grad=first.weight.requires_grad)
    return fused.eval()


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


@dataclass
class _Group:
    source: fx.Node
    members: list[fx.Node]  # in the fused op's channel order
    layers: list[nn.Module]
    channel_dim: int
    cat: fx.Node | None = None  # a cat that reads exactly the members' outputs (or activations), in order
    activation: str | None = None  # the one activation every member feeds alone, hoisted above the slices

    def outputs(self) -> list[fx.Node]:
        """The nodes whose values the fused op must provide: members, or their activations."""
        return [_only_user(m) for m in self.members] if self.activation else list(self.members)


@register
@dataclass
class FuseSiblings(Pass):
    """Fuse convs (or linears) that read the same tensor into one op with concatenated outputs.

    Algebra: [W1; W2] x + [b1; b2] = [W1 x + b1; W2 x + b2], so
      siblings:   conv1(x), conv2(x), ...  =>  y = conv(x; cat(W), cat(b));  conv_i(x) = y[:, o_i : o_i + c_i]
      sibling_cat:  cat([conv1(x), conv2(x)], 1)  =>  conv(x; cat(W), cat(b))      (no slice at all)
    The same for nn.Linear along the last dim. A common activation after every sibling is
    applied once to the fused output (act(y[:, s]) = act(y)[:, s]). Members are ordered as a
    cat that reads them, so the cat disappears.

    Preconditions: shapes in node.meta; policy="measured" needs ctx.target.

    Policies: "static" (default) fuses only when no slice is left (every output goes into one
    cat, in order); "measured" also fuses where slices remain when the fused op plus its slices
    measure faster on ctx.target than the separate ops; "always" fuses every compatible group.

    Declines: groups=1 convs only (a grouped conv's outputs would interleave), equal kernel,
    stride, padding, dilation, dtype (otherwise the group splits by geometry); slices would
    remain (static); measured slower (with both figures).

    Stats: sibling_groups (fused ops made), sibling_ops (layers fused), sibling_cat (cats removed).
    """

    name = "fuse_siblings"
    policy: str = "static"
    min_gain: float = 0.03  # measured: the fused version must be this much faster

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if self.policy not in POLICIES:
            raise PreconditionError(f"fuse_siblings option policy={self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.policy == "measured" and ctx.target is None:
            raise PreconditionError("policy='measured' needs a target to measure on: pass target=..., "
                                    "or use policy='static' or 'always'")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Counter:
        stats: Counter = Counter()
        for source in list(gm.graph.nodes):
            if source.graph is not gm.graph or len(source.users) < 2:
                continue
            for group in self._groups(gm, source):
                if self._worth_it(gm, group, ctx):
                    self._rewrite(gm, group)
                    stats["sibling_groups"] += 1
                    stats["sibling_ops"] += len(group.members)
                    stats["sibling_cat"] += group.cat is not None
        if stats:
            gm.delete_all_unused_submodules()
        return +stats

    def _groups(self, gm: fx.GraphModule, source: fx.Node) -> list[_Group]:
        by_geometry: dict[tuple, list[fx.Node]] = defaultdict(list)
        for user in source.users:
            if user.op == "call_module" and user.args == (source,) and not user.kwargs:
                geometry = _geometry(gm.get_submodule(user.target))
                if geometry is not None:
                    by_geometry[geometry].append(user)
        groups = []
        for geometry, members in by_geometry.items():
            if len(members) < 2:
                continue
            channel_dim = -1 if geometry[0] == "linear" else 1
            group = _Group(source, members, [gm.get_submodule(m.target) for m in members], channel_dim)
            self._find_activation(gm, group)
            self._find_cat(gm, group)
            groups.append(group)
        return groups

    @staticmethod
    def _find_activation(gm: fx.GraphModule, group: _Group) -> None:
        users = [_only_user(m) for m in group.members]
        if any(u is None for u in users):
            return
        forms = [ir.classify(u, gm) for u in users]
        if any(f is None or f.key not in ir.ELEMENTWISE_ACTIVATIONS or f.inplace for f in forms):
            return
        if len({(f.key, tuple(sorted(f.kwargs.items()))) for f in forms}) == 1 and \
                all(f.args == (m,) for f, m in zip(forms, group.members)):
            group.activation = forms[0].key

    @staticmethod
    def _find_cat(gm: fx.GraphModule, group: _Group) -> None:
        """Order the members as a cat reads them when one cat reads all of them and nothing else."""
        outputs = group.outputs()
        consumers = {u for out in outputs for u in out.users}
        if len(consumers) != 1 or any(len(out.users) != 1 for out in outputs):
            return
        cat = next(iter(consumers))
        if ir.op_key(cat, gm) != "cat" or cat.op != "call_function":
            return
        tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        rank = len(ir.shape_of(cat) or ())
        if not isinstance(tensors, (list, tuple)) or not rank or dim % rank != group.channel_dim % rank:
            return
        if sorted(map(id, tensors)) != sorted(map(id, outputs)):
            return
        order = [outputs.index(t) for t in tensors]
        group.members = [group.members[i] for i in order]
        group.layers = [group.layers[i] for i in order]
        group.cat = cat

    def _worth_it(self, gm: fx.GraphModule, group: _Group, ctx: PassContext) -> bool:
        if group.cat is not None or self.policy == "always":
            return True
        names = ", ".join(m.name for m in group.members)
        if self.policy == "static":
            ctx.decline("siblings", group.members[0],
                        f"fusing {names} leaves slices of the fused output (policy='static'; "
                        "policy='measured' decides by measuring)")
            return False
        separate, fused = self._measure(group, ctx)
        if fused.value > separate.value * (1 - self.min_gain):
            ctx.decline("siblings", group.members[0], f"fused {names} measured {fused} against {separate} apart")
            return False
        return True

    @staticmethod
    def _measure(group: _Group, ctx: PassContext):
        from fxopt.measure import measure

        shape = ir.shape_of(group.source)
        example = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0))
        activation = ir.stateless_module(group.activation) if group.activation else nn.Identity()
        separate = _Separate(group.layers, activation)
        fused = _Fused(_fused_module(group.layers), [layer.weight.shape[0] for layer in group.layers],
                       group.channel_dim, activation)
        apart, together = (measure(m.eval(), (example,), ctx.target) for m in (separate, fused))
        log.info("fuse_siblings: %s apart %s, fused %s", [m.name for m in group.members], apart, together)
        return apart, together

    @staticmethod
    def _rewrite(gm: fx.GraphModule, group: _Group) -> None:
        graph = gm.graph
        outputs = group.outputs()
        position = {node: i for i, node in enumerate(graph.nodes)}
        first = min(group.members, key=position.__getitem__)
        name = ir.add_module(gm, module_name(group.members[0]) + "_siblings", _fused_module(group.layers))
        with graph.inserting_before(first):
            fused = graph.call_module(name, (group.source,))
            if group.activation:
                # act(conv_i(x)) = act(conv(x))[:, s_i]: one activation for all
                act_form = ir.classify(outputs[0], gm)
                fused = graph.call_function(act_form.canonical, (fused,), act_form.kwargs)
        if group.cat is not None:
            # cat([conv1(x), conv2(x)]) => conv(x)
            group.cat.replace_all_uses_with(fused)
            fused.meta = dict(group.cat.meta)
            graph.erase_node(group.cat)
        else:
            # conv_i(x) => conv(x)[:, o_i : o_i + c_i]
            offset = 0
            for output, layer in zip(outputs, group.layers):
                channels = layer.weight.shape[0]
                with graph.inserting_before(output):
                    piece = graph.call_function(torch.narrow, (fused, group.channel_dim, offset, channels))
                piece.meta = dict(output.meta)
                output.replace_all_uses_with(piece)
                offset += channels
        for node in (outputs if group.activation else []) + group.members:
            graph.erase_node(node)


class _Separate(nn.Module):
    """The siblings as they are: the measured baseline."""

    def __init__(self, layers, activation):
        super().__init__()
        self.layers, self.activation = nn.ModuleList(layers), activation

    def forward(self, x):
        return tuple(self.activation(layer(x)) for layer in self.layers)


class _Fused(nn.Module):
    """The fused op and the slices it leaves: the measured alternative."""

    def __init__(self, layer, sizes, dim, activation):
        super().__init__()
        self.layer, self.sizes, self.dim, self.activation = layer, sizes, dim, activation

    def forward(self, x):
        return tuple(torch.split(self.activation(self.layer(x)), self.sizes, self.dim))
