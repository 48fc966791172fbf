"""Structural learning-rate strategies: factors that follow from the model and its history.

Cascading by depth, dual scaffold/patch, component-specific, pretrained + new, growth-aware
adjustment, differential decay after events and sparsity-aware rates. Each maps a
:class:`~dynarch.lr.base.Unit` to a factor of the plan's base learning rate (``L`` = number
of layer depths; see :mod:`dynarch.lr.base` for depth, creation and growth events). They
change only when the structure does, so :class:`~dynarch.lr.LRPlan` evaluates them once per
structural version, and they need no saved state.

====================  =======================================================================
name                  factor
====================  =======================================================================
``cascade``           ``decay ** ((L-1-depth)/(L-1))`` (``slow="early"``) or
                      ``decay ** (depth/(L-1))`` (``slow="late"``); 1 when ``L == 1``
``dual``              ``scaffold``; ``patch`` on patch connections
``component``         first matching ``components`` glob; else ``new`` for created units,
                      ``scaffold`` for original ones; ``patch`` on patch connections
``pretrained``        ``pretrained`` (original), ``adapter`` (created by ``adapter_ops``),
                      ``new`` (created by any other op)
``growth``            ``decay ** n`` for original units, ``fresh * decay ** n`` for created
                      ones; ``n`` = growth events after the unit's creation
``differential``      product over growth events after the unit's creation of ``grown`` (the
                      event grew it), ``adjacent`` (named as neighbour, or a depth within 1
                      of a grown unit, among the units of that time) or ``distant``
``sparsity``          ``sparse`` if mask density ``< sparse_below``, ``dense`` if
                      ``> dense_above``, else 1; 1 for units without a ``weight_mask``
====================  =======================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from ._checks import check_factor, check_ops
from .base import LRContext, Strategy, Unit, register_strategy
from .history import adjacent_modules, covers, grown_modules

__all__ = [
    "Cascade",
    "ComponentLR",
    "DifferentialDecay",
    "DualScaffoldPatch",
    "GrowthAware",
    "PretrainedNew",
    "SparsityAware",
]


@register_strategy("cascade")
class Cascade(Strategy):
    """Cascading by depth: the slow end gets ``decay``, the other end 1, geometric between.

    Example:
        >>> Cascade(decay=0.1, slow="early")
        Cascade(decay=0.1, slow='early')
    """

    def __init__(self, decay: float = 0.1, slow: str = "early") -> None:
        self.decay = check_factor("cascade", "decay", decay, positive=True)
        if slow not in ("early", "late"):
            raise ValueError(f"cascade: slow must be 'early' or 'late', got {slow!r}")
        self.slow = slow

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        if ctx.layers <= 1:
            return 1.0
        dist = ctx.layers - 1 - unit.depth if self.slow == "early" else unit.depth
        return self.decay ** (dist / (ctx.layers - 1))


@register_strategy("dual")
class DualScaffoldPatch(Strategy):
    """Dual rates: ``scaffold`` for every unit, ``patch`` on its patch connections.

    Example:
        >>> DualScaffoldPatch(scaffold=0.2, patch=1.0)
        DualScaffoldPatch(scaffold=0.2, patch=1.0)
    """

    def __init__(self, scaffold: float = 0.2, patch: float = 1.0) -> None:
        self.scaffold = check_factor("dual", "scaffold", scaffold)
        self.patch = check_factor("dual", "patch", patch)

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        return self.scaffold

    def patch_factor(self, unit: Unit, ctx: LRContext, factor: float) -> float:
        return self.patch


def _check_patterns(owner: str, components: object) -> dict[str, float]:
    if components is None:
        return {}
    if not isinstance(components, Mapping) or not all(isinstance(k, str) for k in components):
        raise ValueError(
            f"{owner}: components must map module-name globs to factors, got {components!r}"
        )
    return {k: check_factor(owner, f"components[{k!r}]", v) for k, v in components.items()}


@register_strategy("component")
class ComponentLR(Strategy):
    """Component-specific: user globs first, then ``new`` / ``scaffold``; ``patch`` on patches.

    ``components`` maps ``fnmatch`` globs over unit names (``"fc*"``, ``"*_slot.*"``) to
    factors; the first matching glob wins.

    Example:
        >>> ComponentLR(components={"out": 0.3})
        ComponentLR(scaffold=0.1, patch=0.5, new=1.0, components={'out': 0.3})
    """

    def __init__(
        self,
        scaffold: float = 0.1,
        patch: float = 0.5,
        new: float = 1.0,
        components: Mapping[str, float] | None = None,
    ) -> None:
        self.scaffold = check_factor("component", "scaffold", scaffold)
        self.patch = check_factor("component", "patch", patch)
        self.new = check_factor("component", "new", new)
        self.components = _check_patterns("component", components)

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        for pattern, value in self.components.items():
            if fnmatchcase(unit.name, pattern):
                return value
        return self.scaffold if unit.creator is None else self.new

    def patch_factor(self, unit: Unit, ctx: LRContext, factor: float) -> float:
        return self.patch


@register_strategy("pretrained")
class PretrainedNew(Strategy):
    """Pretrained + new: original units nearly frozen, adapters medium, new layers fast.

    Adapters are units created by an op in ``adapter_ops`` (``attach`` puts a residual
    branch ``x + alpha * f(x)`` on the model: an adapter).

    Example:
        >>> PretrainedNew(pretrained=0.01, adapter=0.5, new=1.0).adapter_ops
        ('attach',)
    """

    def __init__(
        self,
        pretrained: float = 0.01,
        new: float = 1.0,
        adapter: float = 0.5,
        adapter_ops: Sequence[str] = ("attach",),
    ) -> None:
        self.pretrained = check_factor("pretrained", "pretrained", pretrained)
        self.new = check_factor("pretrained", "new", new)
        self.adapter = check_factor("pretrained", "adapter", adapter)
        self.adapter_ops = check_ops("pretrained", adapter_ops, "adapter_ops") or ()

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        if unit.creator is None:
            return self.pretrained
        return self.adapter if ctx.history[unit.creator].op in self.adapter_ops else self.new


@register_strategy("growth")
class GrowthAware(Strategy):
    """Growth-aware: every growth event multiplies the older units' factor by ``decay``;
    units it creates start at ``fresh``.

    ``ops`` restricts which events count (default: :func:`~dynarch.lr.base.is_growth`).

    Example:
        >>> GrowthAware(decay=0.5, fresh=1.0)
        GrowthAware(decay=0.5, fresh=1.0, ops=None)
    """

    def __init__(
        self, decay: float = 0.5, fresh: float = 1.0, ops: Sequence[str] | None = None
    ) -> None:
        self.decay = check_factor("growth", "decay", decay)
        self.fresh = check_factor("growth", "fresh", fresh)
        self.ops = check_ops("growth", ops)

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        start = 1.0 if unit.creator is None else self.fresh
        return start * self.decay ** len(ctx.growth_after(unit, self.ops))


@register_strategy("differential")
class DifferentialDecay(Strategy):
    """Differential decay after events: each growth event multiplies the units it grew by
    ``grown``, their neighbours by ``adjacent`` and every other unit by ``distant``.

    Neighbours are the modules the event names as such (``consumers``, ``anchor``) and
    units at a depth within 1 of a grown layer (of a grown unit if it grew no layer), depths
    counted over the units that existed at the event (the current units minus those created
    later). A unit created by an event
    is not decayed by it. ``ops`` as in :class:`GrowthAware`.

    Example:
        >>> DifferentialDecay(grown=0.9, adjacent=0.7, distant=0.5).distant
        0.5
    """

    def __init__(
        self,
        grown: float = 0.9,
        adjacent: float = 0.7,
        distant: float = 0.5,
        ops: Sequence[str] | None = None,
    ) -> None:
        self.grown = check_factor("differential", "grown", grown)
        self.adjacent = check_factor("differential", "adjacent", adjacent)
        self.distant = check_factor("differential", "distant", distant)
        self.ops = check_ops("differential", ops)

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        return self.factors(ctx)[unit.name]

    def factors(self, ctx: LRContext) -> dict[str, float]:
        relation: dict[int, dict[str, float]] = {}
        for i in ctx.growth_events(self.ops):
            relation[i] = self._relation(ctx, i)
        return {
            u.name: math.prod(relation[i][u.name] for i in ctx.growth_after(u, self.ops))
            for u in ctx.units
        }

    def _relation(self, ctx: LRContext, index: int) -> dict[str, float]:
        """The multiplier of event ``index`` for each unit that existed then (depths counted
        over those units only, so later insertions do not change an old event's effect)."""
        event = ctx.history[index]
        grown, near = grown_modules(event), adjacent_modules(event)
        existed = [u for u in ctx.units if u.creator is None or u.creator <= index]
        depth, depths, layers = -1, {}, set()
        for u in existed:
            if any(p.dim() >= 2 for p in u.params):
                depth += 1
                layers.add(u.name)
            depths[u.name] = max(depth, 0)
        hit_units = [u.name for u in existed if covers(grown, u.name)]
        # grown layers define the neighbourhood (a grown norm or alpha only without one)
        hit = {depths[n] for n in hit_units if n in layers} or {depths[n] for n in hit_units}
        out = {}
        for u in existed:
            if covers(grown, u.name):
                out[u.name] = self.grown
            elif covers(near, u.name) or any(abs(depths[u.name] - d) <= 1 for d in hit):
                out[u.name] = self.adjacent
            else:
                out[u.name] = self.distant
        return out


@register_strategy("sparsity")
class SparsityAware(Strategy):
    """Sparsity-aware: very sparse layers learn faster, dense ones slower.

    Example:
        >>> SparsityAware(sparse_below=0.02, sparse=2.0, dense_above=0.1, dense=0.5).dense
        0.5
    """

    def __init__(
        self,
        sparse_below: float = 0.02,
        sparse: float = 2.0,
        dense_above: float = 0.1,
        dense: float = 0.5,
    ) -> None:
        self.sparse_below = check_factor("sparsity", "sparse_below", sparse_below)
        self.sparse = check_factor("sparsity", "sparse", sparse)
        self.dense_above = check_factor("sparsity", "dense_above", dense_above)
        self.dense = check_factor("sparsity", "dense", dense)
        if not self.sparse_below <= self.dense_above <= 1.0:
            raise ValueError(
                "sparsity: need 0 <= sparse_below <= dense_above <= 1, got "
                f"sparse_below={sparse_below!r}, dense_above={dense_above!r}"
            )

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        density = ctx.density(unit)
        if density is None:
            return 1.0
        if density < self.sparse_below:
            return self.sparse
        return self.dense if density > self.dense_above else 1.0
