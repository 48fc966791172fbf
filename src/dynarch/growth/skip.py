"""Forward skips: a zero-initialised projection of one module's output added to a later one's.

A skip is a :class:`SkipConnection` registered as a child of the ``target`` module (e.g.
``fc3.skip``) holding a bias-free projection ``proj``: a ``Linear`` for feature vectors, a
``1x1 Conv2d`` for feature maps. Two forward hooks do the wiring: one on ``source`` keeps its
output, one on ``target`` returns ``target(x) + proj(kept)``. No existing module is renamed
or replaced, so every state_dict key of the model stays as it was (the skip only adds
``<target>.<name>.proj.weight``, and ``weight_mask`` when sparse); ``copy.deepcopy`` and
pickling carry the hooks (they are bound methods of the skip); ``torch.compile`` traces them.

Widths come from the traced graph: ``source``/``target`` must be a Linear/Conv2d or follow
one through activations, norms, dropout or pooling. ``widen``/``shrink`` of those layers
re-index the projection too (registered with :func:`dynarch.remap.register_remap_extra`).
Checkpoints rebuild skips (replays ``"skip"`` and ``"highway"``).

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
    ...                       nn.Linear(8, 2))
    >>> x = torch.randn(3, 4); before = model(x)
    >>> event = add_skip(model, "1", "4")
    >>> event.details["module"], event.details["params"]
    ('4.skip', 16)
    >>> torch.equal(model(x), before)
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from .._engine import engine_state, transaction
from .._validate import check_optimizer
from ..activity import carrier, try_analyse
from ..events import Event
from ..graph import ChannelGroup, ModelGraph, UnsupportedModelError, resolve
from ..insert import _anchored
from ..masks import MASK, enforce
from ..optim import transplant
from ..remap import out_units, register_remap_extra
from ..replay import register_replay
from ..select import topk_mask
from ._spatial import _resizers
from ._units import check_reason

__all__ = ["SkipConnection", "add_skip", "build_skip", "plan_skip", "replay_skip", "skips"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class SkipConnection(nn.Module):
    """The projection of a forward skip plus the two hooks that wire it (see module doc).

    ``source``/``target`` are the module names at creation (for messages); the live source
    module is kept un-registered, so it is neither a child nor in the state_dict.

    Example:
        >>> skip = SkipConnection("a", "b", nn.Linear(3, 2, bias=False))
        >>> skip(torch.ones(1, 3)).shape
        torch.Size([1, 2])
    """

    is_dynarch_skip = True

    def __init__(self, source: str, target: str, proj: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.source = source
        self.target = target
        self.proj = proj
        self._kept: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)

    def tap(self, module: nn.Module, args: Any, output: Tensor) -> None:
        """Forward hook on the source: keep its output for the target."""
        self._kept["x"] = output

    def add(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        """Forward hook on the target: its output plus the projected source output."""
        x = self._kept.pop("x", None)
        if x is None:
            raise RuntimeError(
                f"skip from '{self.source}' to '{self.target}': '{self.target}' ran before "
                f"'{self.source}' in this forward pass; a skip must go forward"
            )
        y = self.proj(x)
        if y.shape != output.shape:
            raise RuntimeError(
                f"skip from '{self.source}' to '{self.target}': the projected source has shape "
                f"{tuple(y.shape)} but '{self.target}' outputs {tuple(output.shape)}; feature "
                "maps must have the same spatial size"
            )
        return output + y

    def extra_repr(self) -> str:
        return f"source='{self.source}'"


def skips(model: nn.Module) -> dict[str, SkipConnection]:
    """The skip connections of ``model`` by module name.

    Example:
        >>> skips(nn.Linear(2, 2))
        {}
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, SkipConnection)}


def _fresh_name(parent: nn.Module, base: str = "skip") -> str:
    name, n = base, 2
    while name in parent._modules or hasattr(parent, name):
        name, n = f"{base}{n}", n + 1
    return name


def _projection(kind: str, n_in: int, n_out: int, like: Tensor) -> nn.Linear | nn.Conv2d:
    """A zero, bias-free projection (skip_init: the global RNG is not consumed)."""
    proj: nn.Linear | nn.Conv2d
    if kind == "Linear":
        proj = skip_init(nn.Linear, n_in, n_out, bias=False, device=like.device, dtype=like.dtype)
    else:
        proj = skip_init(
            nn.Conv2d, n_in, n_out, 1, bias=False, device=like.device, dtype=like.dtype
        )
    with torch.no_grad():
        proj.weight.zero_()
    return proj


def build_skip(
    model: nn.Module,
    source: str,
    target: str,
    *,
    kind: str,
    n_in: int,
    n_out: int,
    mask: Tensor | None,
    name: str | None = None,
) -> tuple[str, SkipConnection]:
    """Create and wire a zero skip (no checks, no event; call inside a transaction). ``mask``
    (bool, shaped like the projection weight) makes it sparse. Returns its full name.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> build_skip(net, "1", "2", kind="Linear", n_in=3, n_out=1, mask=None)[0]
        '2.skip'
    """
    src, tgt = model.get_submodule(source), model.get_submodule(target)
    like = next(tgt.parameters(), None)
    if like is None:
        like = next(model.parameters())
    skip = SkipConnection(source, target, _projection(kind, n_in, n_out, like))
    if mask is not None:
        skip.proj.register_buffer(MASK, mask.to(like.device), persistent=True)
    skip.__dict__["_source_module"] = src  # not registered: no new child, no state
    name = name or _fresh_name(tgt)
    tgt.add_module(name, skip)
    src.register_forward_hook(skip.tap)
    tgt.register_forward_hook(skip.add)
    return f"{target}.{name}" if target else name, skip


def _ends(model: nn.Module, graph: ModelGraph | None, source: str, target: str) -> tuple[str, str]:
    """The Linear/Conv2d whose units the outputs of ``source`` and ``target`` carry; checks."""
    for what, name in (("source", source), ("target", target)):
        if name == "":
            raise ValueError(f"skip {what} '' is the whole model; name one of its modules")
        mod = resolve(model, name)
        if isinstance(mod, _CONTAINERS):
            raise ValueError(
                f"skip {what} '{name}' is a container ({type(mod).__name__}); name the module "
                "inside it whose output to use"
            )
        if isinstance(mod, SkipConnection) or any(
            isinstance(m, SkipConnection) for m in _ancestors(model, name)
        ):
            raise ValueError(f"skip {what} '{name}' belongs to a skip connection")
    if source == target:
        raise ValueError(f"a skip needs two different modules, got source = target = '{source}'")
    if graph is not None:
        for name in (source, target):
            calls = len(graph.calls.get(name, []))
            inner = [n for n in graph.calls if n.startswith(name + ".")]
            if calls == 0 and inner:
                raise ValueError(
                    f"'{name}' ({type(model.get_submodule(name)).__name__}) is not called as one "
                    f"module in the traced forward: the trace goes inside it (it calls {inner}); "
                    f"name the module inside it whose output to use, e.g. '{inner[-1]}'"
                )
            if calls != 1:
                raise UnsupportedModelError(
                    f"'{name}' is called {calls} times in forward; a skip needs a source and a "
                    "target called exactly once"
                )
        order = {node: i for i, node in enumerate(graph.graph.nodes)}
        if order[graph.calls[source][0]] > order[graph.calls[target][0]]:
            raise ValueError(
                f"'{target}' runs before '{source}' in forward; a skip goes forward: swap them"
            )
    ends = []
    for what, name in (("source", source), ("target", target)):
        found = carrier(graph, name)
        if found is None and isinstance(model.get_submodule(name), nn.Linear | nn.Conv2d):
            found = name
        if found is None:
            raise UnsupportedModelError(
                f"cannot tell the width of skip {what} '{name}': it must be a Linear/Conv2d or "
                "follow one through activations, norms, dropout or pooling"
            )
        ends.append(found)
    return ends[0], ends[1]


def _ancestors(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def plan_skip(
    model: nn.Module, source: str, target: str, graph: ModelGraph | None
) -> tuple[str, int, int]:
    """``(kind, in width, out width)`` of a skip from ``source`` to ``target``; checks.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> plan_skip(net, "1", "2", try_analyse(net))
        ('Linear', 3, 1)
    """
    src_layer, tgt_layer = _ends(model, graph, source, target)
    a, b = model.get_submodule(src_layer), model.get_submodule(tgt_layer)
    if type(a) is not type(b) and not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)):
        raise UnsupportedModelError(
            f"cannot add a skip from '{source}' (units of {type(a).__name__} '{src_layer}') to "
            f"'{target}' (units of {type(b).__name__} '{tgt_layer}'): both ends must carry "
            "Linear units or both Conv2d channels"
        )
    kind = "Conv2d" if isinstance(a, nn.Conv2d) else "Linear"
    if kind == "Conv2d" and graph is not None:
        changes = _resizers(graph, source, target)
        if changes:
            raise UnsupportedModelError(
                f"cannot add a skip from '{source}' to '{target}': {changes[0]} between them "
                "can change the feature maps' spatial size, and a 1x1 skip needs maps of the "
                "same size; pick a target before it (highways: a smaller span)"
            )
    return kind, out_units(a), out_units(b)


def add_skip(
    model: nn.Module,
    source: str,
    target: str,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    density: float | None = None,
    reason: str = "",
) -> Event:
    """Add a forward skip: ``target``'s output plus a zero-initialised projection of
    ``source``'s output (op ``"skip"``). The function is unchanged (the projection is zero).

    ``source`` must run before ``target`` (checked on the traced graph; untraceable models
    whose ends are Linear/Conv2d layers are checked at the first forward). With ``density``
    in ``(0, 1]`` the projection is masked: exactly ``max(1, round(density × weights))``
    active positions drawn from the engine generator (masks are enforced after every step of
    ``optimizer``). The new parameter joins ``optimizer`` after the target's parameters.

    The event's details: ``source``, ``target``, ``module`` (the skip's name), ``kind``,
    ``in``, ``out``, ``params``, ``density`` (``None``: dense), ``active``.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
        ...                       nn.Linear(4, 1))
        >>> add_skip(model, "1", "4", density=0.5).details["active"]
        2
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_optimizer(optimizer, optional=True)
    check_reason(reason)
    if density is not None and (
        not isinstance(density, int | float)
        or isinstance(density, bool)
        or not math.isfinite(density)
        or not 0 < density <= 1
    ):
        raise ValueError(f"density must be None (dense) or a number in (0, 1], got {density!r}")
    graph = try_analyse(model)
    kind, n_in, n_out = plan_skip(model, source, target, graph)
    mask = None
    if density is not None:
        n = n_in * n_out
        keys = torch.rand(n, generator=engine_state(model).generator)
        mask = topk_mask(keys, max(1, round(density * n)), engine_state(model).generator)
        mask = mask.view(n_out, n_in, *((1, 1) if kind == "Conv2d" else ()))
    with transaction(model, "skip", target, reason=reason) as tx:
        name, skip = build_skip(model, source, target, kind=kind, n_in=n_in, n_out=n_out, mask=mask)
        _join(model, skip, optimizer)
        tx.details = _details(name, skip, kind, n_in, n_out) | {"density": density}
        tx.replay = _skip_replay(name, skip, kind, n_in, n_out)
    assert tx.event is not None
    return tx.event


def _join(model: nn.Module, skip: SkipConnection, optimizer: torch.optim.Optimizer | None) -> None:
    """Add the skip's parameter to ``optimizer`` (and enforce its mask)."""
    transplant(optimizer, added=_anchored(model, list(skip.parameters()), optimizer))
    if optimizer is not None and skip.proj._buffers.get(MASK) is not None:
        enforce(model, optimizer)


def _details(name: str, skip: SkipConnection, kind: str, n_in: int, n_out: int) -> dict[str, Any]:
    """The facts recorded for a new skip."""
    mask = skip.proj._buffers.get(MASK)
    numel = skip.proj.weight.numel()
    return {"source": skip.source, "target": skip.target, "module": name, "kind": kind,
            "in": n_in, "out": n_out, "params": numel,
            "active": numel if mask is None else int(mask.sum())}  # fmt: skip


def _skip_replay(name: str, skip: SkipConnection, kind: str, n_in: int, n_out: int) -> dict:
    """Replay arguments that rebuild the skip's structure."""
    masked = skip.proj._buffers.get(MASK) is not None
    return {"source": skip.source, "target": skip.target, "name": name.rpartition(".")[2],
            "kind": kind, "in": n_in, "out": n_out, "masked": masked}  # fmt: skip


def replay_skip(model: nn.Module, args: dict[str, Any], _mods: Any = None) -> None:
    """Rebuild a recorded skip (zero weights, all-True mask: values come from the checkpoint;
    the engine generator is not consumed).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> replay_skip(model, {"source": "0", "target": "2", "name": "skip", "kind": "Linear",
        ...                     "in": 3, "out": 1, "masked": False})
        >>> list(skips(model))
        ['2.skip']
    """
    need = {"source", "target", "name", "kind", "in", "out", "masked"}
    if not isinstance(args, dict) or not need <= set(args):
        raise ValueError(f"skip replay args need keys {sorted(need)}, got {args!r}")
    shape = (args["out"], args["in"], *((1, 1) if args["kind"] == "Conv2d" else ()))
    mask = torch.ones(shape, dtype=torch.bool) if args["masked"] else None
    with transaction(model, "skip", args["target"], record=False):
        build_skip(model, args["source"], args["target"], kind=args["kind"], n_in=args["in"],
                   n_out=args["out"], mask=mask, name=args["name"])  # fmt: skip


register_replay("skip")(replay_skip)
register_replay("highway")(replay_skip)


@register_remap_extra
def _skip_roles(model: nn.Module, graph: ModelGraph, group: ChannelGroup) -> dict[str, set[str]]:
    """Skip projections reading (``"in"``) or adding to (``"out"``) the units of ``group``."""
    names = {id(m): n for n, m in graph.modules.items()}
    roles: dict[str, set[str]] = {}
    for name, skip in skips(model).items():
        source = names.get(id(skip.__dict__.get("_source_module")))
        target = name.rpartition(".")[0]
        found = set()
        if source is not None and carrier(graph, source) in group.producers:
            found.add("in")
        if carrier(graph, target) in group.producers:
            found.add("out")
        if found:
            roles[f"{name}.proj"] = found
    return roles
