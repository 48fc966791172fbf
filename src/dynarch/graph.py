"""Which layers share a channel space: the dependency analysis behind every structural op.

A *channel space* is the set of output units of a ``Linear``/``Conv2d`` (its rows) together
with everything that indexes the same units downstream: BatchNorm/LayerNorm parameters, the
input columns of the next ``Linear``/``Conv2d`` (a block of columns per channel after a
``Flatten``), and — through residual adds — the outputs of every other layer added to it
(*coupled* producers, which must change together).

The model is traced once with :mod:`torch.fx`; element-wise ops, activations, dropout and
pooling pass a space through unchanged, ``add``/``sub``/``mul`` of two tracked tensors unite
their spaces, anything else that touches a space is remembered as a *problem* and reported
only if that space is changed (so an exotic op elsewhere in the model never blocks you).
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["ChannelGroup", "ModelGraph", "UnsupportedModelError", "analyse", "resolve"]


class UnsupportedModelError(ValueError):
    """The model (or the part of it an op touches) is outside what dynarch can change."""


ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip
#: Activations ``a`` with ``a(a(x)) == a(x)``: a copy may follow an inserted identity layer.
IDEMPOTENT: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
PASS_MODULES: tuple[type[nn.Module], ...] = (
    *ACTIVATIONS, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)

_UNARY_FUNCS: set[Callable[..., Any]] = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.tanh, torch.sigmoid, F.tanh, F.sigmoid, F.hardtanh, F.hardswish, F.hardsigmoid,
    F.softplus, F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, torch.abs, torch.neg, operator.neg,
}  # fmt: skip
_UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "abs", "neg", "clamp", "clamp_min",
}  # fmt: skip
_BINARY = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, torch.add, torch.sub, torch.mul,
}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}
_SPATIAL_REDUCE_METHODS = {"mean", "sum", "amax"}


@dataclass
class _Ref:
    """A tracked tensor: which space, on which axis (1 or -1), rank if known, flattened?"""

    space: int
    axis: int
    rank: int | None
    flat: bool = False


@dataclass
class ChannelGroup:
    """Everything that indexes one (coupled) channel space.

    Attributes:
        producers: names of Linear/Conv2d whose output rows are the space (coupled ones too).
        consumers: ``(name, flat)``: Linear/Conv2d reading the space as inputs; ``flat``
            means each channel is a block of input columns (a Flatten sits between).
        norms: names of BatchNorm/LayerNorm modules normalising the space.
        layernorm_over_channels: LayerNorm names whose statistics include the channel axis.
        problems: why this space cannot be changed (empty when it can).
    """

    producers: list[str] = field(default_factory=list)
    consumers: list[tuple[str, bool]] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    layernorm_over_channels: list[str] = field(default_factory=list)
    norm_dims: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class ModelGraph:
    """The traced graph and its channel groups."""

    graph: fx.Graph
    modules: dict[str, nn.Module]
    groups: list[ChannelGroup]
    group_of: dict[str, int]  # producer module name -> group index
    calls: dict[str, list[fx.Node]]  # module name -> its call_module nodes

    def group(self, target: str) -> ChannelGroup:
        if target not in self.group_of:
            raise UnsupportedModelError(f"'{target}' is not a Linear or Conv2d called in forward")
        return self.groups[self.group_of[target]]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def resolve(
    model: nn.Module, name: str, kinds: tuple[type[nn.Module], ...] | None = None
) -> nn.Module:
    """The submodule called ``name``; a clear error when absent or of the wrong kind."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        close = [n for n in names if name in n or n in name]
        similar = set(difflib.get_close_matches(name, names, n=5))
        close += [n for n in names if n in similar and n not in close]  # in model order
        close = close[:5]
        hint = f"; did you mean one of {close}?" if close else ""
        raise KeyError(f"model has no submodule named '{name}'{hint}")
    module = modules[name]
    if kinds is not None and not isinstance(module, kinds):
        allowed = ", ".join(k.__name__ for k in kinds)
        raise TypeError(f"'{name}' is a {type(module).__name__}; expected one of: {allowed}")
    return module


LEAF = "_dynarch_leaf"  # a class attribute: trace such modules as leaves, like torch.nn's


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return getattr(type(m), LEAF, False) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.Graph:
    """Symbolically trace ``model`` (standard torch.nn layers and dynarch's own layers, such
    as :class:`~dynarch.sparse.DynamicSparseLinear`, are leaves)."""
    if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        raise UnsupportedModelError(
            f"cannot change a model wrapped in {type(model).__name__}; operate on the wrapped "
            "model, model.module (its layers are named without the 'module.' prefix), and wrap "
            "it again afterwards"
        )
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds of errors
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "dynarch needs a forward without data-dependent control flow"
        ) from exc


def _op_name(node: fx.Node) -> str:
    """``'cat' in module 'blk' (Block)``: the op and the module whose forward calls it."""
    t = node.target
    op = f"Tensor.{t}" if node.op == "call_method" else getattr(t, "__name__", str(t))
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        owner = f"module '{path}' ({getattr(cls, '__name__', cls)})"
    else:
        owner = f"{node.meta.get('dynarch_root', 'the model')}.forward"
    return f"'{op}' in {owner}"


def analyse(model: nn.Module) -> ModelGraph:
    """Trace ``model`` and compute its channel groups (see module docstring)."""
    graph = trace(model)
    modules = dict(model.named_modules())
    uf = _UnionFind()
    refs: dict[fx.Node, _Ref] = {}
    producers: dict[int, list[str]] = {}
    consumers: dict[int, list[tuple[str, bool]]] = {}
    norms: dict[int, list[str]] = {}
    ln_over: dict[int, list[str]] = {}
    problems: dict[int, list[str]] = {}
    calls: dict[str, list[fx.Node]] = {}
    norm_dims: dict[str, int] = {}
    out_space: dict[str, int] = {}
    inputs: dict[str, list[int | None]] = {}  # Linear/Conv2d name -> input space of each call

    def flag(ref: _Ref, why: str) -> None:
        problems.setdefault(ref.space, []).append(why)

    def tracked(args: Any) -> list[_Ref]:
        found: list[_Ref] = []
        fx.node.map_arg(args, lambda n: found.append(refs[n]) if n in refs else None)
        return found

    for node in graph.nodes:
        node.meta["dynarch_root"] = type(model).__name__
        ins = tracked((node.args, node.kwargs))
        first = refs.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "call_module":
            name = str(node.target)
            mod = modules[name]
            calls.setdefault(name, []).append(node)
            if isinstance(mod, (nn.Linear, nn.Conv2d, *NORMS)):
                inputs.setdefault(name, []).append(first.space if first is not None else None)
            if isinstance(mod, nn.Linear | nn.Conv2d):
                if first is not None:
                    if isinstance(mod, nn.Conv2d) and (first.flat or mod.groups != 1):
                        flag(first, f"'{name}' is a grouped or flattened Conv2d consumer")
                    elif isinstance(mod, nn.Conv2d) and first.axis != 1:
                        flag(first, f"Conv2d '{name}' reads axis 1 as its channels, but these "
                                    "units lie on the last axis (a Linear's output)")  # fmt: skip
                    if (
                        isinstance(mod, nn.Linear)
                        and first.axis == 1
                        and not first.flat
                        and (first.rank or 2) > 2
                    ):  # a Linear mixes the last axis of a feature map, not its channels
                        flag(first, f"Linear '{name}' reads the last axis of a feature map, "
                                    "not its channels")  # fmt: skip
                    consumers.setdefault(first.space, []).append((name, first.flat))
                if name in out_space:  # a module called twice produces one space
                    space = out_space[name]
                else:
                    space = out_space[name] = uf.new()
                producers.setdefault(space, []).append(name)
                if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                    problems.setdefault(space, []).append(f"'{name}' is a grouped Conv2d")
                conv = isinstance(mod, nn.Conv2d)
                refs[node] = _Ref(space, 1 if conv else -1, 4 if conv else None)
            elif isinstance(mod, NORMS) and first is not None:
                if isinstance(mod, nn.LayerNorm):
                    k = len(mod.normalized_shape)
                    if first.axis == -1:
                        norm_dims[name] = k - 1
                    elif first.rank is None or first.rank - 1 <= k:
                        norm_dims[name] = k - (first.rank - 1 if first.rank else k)
                    if name in norm_dims:
                        norms.setdefault(first.space, []).append(name)
                        ln_over.setdefault(first.space, []).append(name)
                else:
                    norms.setdefault(first.space, []).append(name)
                    norm_dims[name] = 0
                    if first.flat:
                        flag(first, f"BatchNorm '{name}' normalises flattened channels")
                    elif first.axis != 1:
                        why = _batchnorm_axis(name, mod, first, modules[producers[first.space][0]])
                        if why:
                            flag(first, why)
                refs[node] = first
            elif isinstance(mod, PASS_MODULES) and first is not None:
                if isinstance(mod, nn.PReLU) and mod.num_parameters != 1:
                    flag(first, f"PReLU '{name}' has one parameter per channel")
                refs[node] = first
            elif isinstance(mod, nn.Flatten) and first is not None:
                ref = _flatten(first, mod.start_dim, mod.end_dim)
                if ref is None:
                    flag(first, f"Flatten '{name}' (start_dim={mod.start_dim}) is not supported")
                else:
                    refs[node] = ref
            else:
                for r in ins:
                    flag(r, f"module '{name}' ({type(mod).__name__}) is not supported")
        elif node.op in ("call_function", "call_method") and ins:
            out = _function(node, first, ins, refs, modules, uf)
            if isinstance(out, str):
                for r in ins:
                    flag(r, out)
            elif out is not None:
                refs[node] = out
        elif node.op == "output":
            for r in ins:
                flag(
                    r,
                    "its output is an output of the model "
                    "(resizing it would change the output shape)",
                )

    for name, spaces in inputs.items():  # a layer or norm reused on different spaces
        origins = {uf.find(s) if s is not None else -1 for s in spaces}
        if len(origins) > 1:
            why = f"'{name}' is called {len(spaces)} times on inputs of different channel spaces"
            for s in spaces:
                if s is not None:
                    problems.setdefault(s, []).append(why)

    groups: dict[int, ChannelGroup] = {}

    def grp(space: int) -> ChannelGroup:
        return groups.setdefault(uf.find(space), ChannelGroup())

    for space, names in producers.items():
        g = grp(space)
        g.producers.extend(n for n in names if n not in g.producers)
    for space, cons in consumers.items():
        g = grp(space)
        g.consumers.extend(c for c in cons if c not in g.consumers)
    for table, attr in (
        (norms, "norms"),
        (ln_over, "layernorm_over_channels"),
        (problems, "problems"),
    ):
        for space, items in table.items():
            lst = getattr(grp(space), attr)
            lst.extend(i for i in items if i not in lst)
    for g in groups.values():
        g.norm_dims = {n: norm_dims[n] for n in g.norms}
    roots = sorted(groups)
    index = {r: i for i, r in enumerate(roots)}
    group_of = {name: index[uf.find(space)] for name, space in out_space.items()}
    return ModelGraph(graph, modules, [groups[r] for r in roots], group_of, calls)


def _batchnorm_axis(name: str, norm: nn.Module, ref: _Ref, producer: nn.Module) -> str | None:
    """Why a BatchNorm cannot follow units on the last axis (``ref.axis == -1``), or ``None``.

    A BatchNorm normalises axis 1. That is the last axis only for a 2-D ``(batch, units)``
    input; for a Linear applied along the last axis of a ``(B, C, L)`` input it is ``C``.
    When the rank is unknown, a feature count different from the number of units tells.
    """
    assert isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d)
    units = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if isinstance(norm, nn.BatchNorm1d) and (
        ref.rank == 2 or (ref.rank is None and norm.num_features == units)
    ):
        return None
    return (
        f"{type(norm).__name__} '{name}' ({norm.num_features} features) normalises axis 1 of "
        f"its input, but these {units} units lie on its last axis (a Linear applied along the "
        "last axis)"
    )


def _flatten(ref: _Ref, start: int, end: int) -> _Ref | None:
    if ref.flat or end != -1:
        return None
    if ref.axis == 1 and ref.rank == 4 and start == 1:
        return _Ref(ref.space, -1, 2, flat=True)
    if ref.axis == -1 and start in (1, -1) and ref.rank in (None, 2):
        return ref
    return None


def _function(
    node: fx.Node,
    first: _Ref | None,
    ins: list[_Ref],
    refs: dict[fx.Node, _Ref],
    modules: dict[str, nn.Module],
    uf: _UnionFind,
) -> _Ref | str | None:
    """Propagate a space through a call_function/call_method node, or say why not."""
    t = node.target
    is_method = node.op == "call_method"
    if (not is_method and t in _UNARY_FUNCS) or (is_method and t in _UNARY_METHODS):
        if first is not None and len(ins) == 1:
            return first
    elif (not is_method and t in _BINARY) or (is_method and t in _BINARY_METHODS):
        if len(ins) == 2:
            a, b = ins
            if a.axis != b.axis or a.flat != b.flat:
                return f"{_op_name(node)} combines tensors with different layouts"
            uf.union(a.space, b.space)
            return a
        other = [x for x in node.args if not (isinstance(x, fx.Node) and x in refs)]
        if len(ins) == 1 and all(_is_scalar(x, modules) for x in other):
            return ins[0]
    elif (not is_method and t is torch.flatten) or (is_method and t == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if first is not None and isinstance(start, int) and isinstance(end, int):
            ref = _flatten(first, start, end)
            if ref is not None:
                return ref
    elif is_method and t in ("view", "reshape") and first is not None and len(node.args) == 3:
        size, last = node.args[1], node.args[2]
        batch = isinstance(size, fx.Node) and size.op == "call_method" and size.target == "size"
        if batch and last == -1:
            ref = _flatten(first, 1, -1)
            if ref is not None:
                return ref
    elif is_method and t in _SPATIAL_REDUCE_METHODS and first is not None and first.rank == 4:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", False)
        if isinstance(dims, tuple | list) and sorted(int(d) % 4 for d in dims) == [2, 3]:
            return first if keep else _Ref(first.space, -1, 2)
    elif is_method and t == "size":
        return None
    return f"{_op_name(node)} is not supported on a changed channel space"


def _is_scalar(x: Any, modules: dict[str, nn.Module]) -> bool:
    if isinstance(x, int | float):
        return True
    if isinstance(x, fx.Node) and x.op == "get_attr":
        owner, _, attr = str(x.target).rpartition(".")
        value = getattr(modules.get(owner), attr, None)
        return isinstance(value, torch.Tensor) and value.numel() == 1
    return False
