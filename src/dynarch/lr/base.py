"""What a learning-rate strategy sees (:class:`Unit`, :class:`LRContext`), the
:class:`Strategy` base class and the name registry.

A *unit* is a module that directly owns parameters (``fc1`` owns ``fc1.weight`` and
``fc1.bias``; a :class:`~dynarch.nn.Residual` owns its ``alpha``); every unit gets one
learning-rate factor, and :class:`~dynarch.lr.LRPlan` makes one optimizer param group per
unit. Facts about units are read from the model and its engine history:

* **depth** — index of the unit among the model's *layers* (units owning a parameter of
  two or more dimensions: Linear, Conv, …) in module order; other units (norms, a
  ``Residual``'s ``alpha``) take the depth of the layer before them (0 if none).
* **birth** — the step of the latest event that *created* the unit or a module holding it
  (see :mod:`dynarch.lr.history`). Units present from the start have birth 0, so their
  **age** (``step - birth``) is the step itself.
* **growth events** — see :func:`~dynarch.lr.history.is_growth`.
* **patch** — a layer's persistent bool buffer ``weight_patch`` (:data:`PATCH`), shaped
  like its weight, marks the connections growth added ("patches"); the rest of the layer
  is the "scaffold".
"""

from __future__ import annotations

import bisect
import difflib
import inspect
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from .._registry import registrar
from ..events import Event
from ._checks import check_state
from .history import created_modules, is_growth

__all__ = [
    "PATCH",
    "STRATEGIES",
    "LRContext",
    "Strategy",
    "Unit",
    "as_strategy",
    "build_units",
    "make_strategy",
    "register_strategy",
]

PATCH = "weight_patch"
"""Name of the bool buffer marking the connections of a layer that growth added."""

PATCH = "weight_patch"
"""Name of the bool buffer marking the connections of a layer that growth added."""


@dataclass(frozen=True, eq=False)
class Unit:
    """A module that directly owns parameters, with what strategies need to know about it.

    Attributes:
        name: fully-qualified module name (``""`` for the model itself).
        module: the module.
        params: its own parameters (not those of submodules; a tied parameter counts once).
        depth: layer index (see :mod:`dynarch.lr.base`).
        birth: step of the event that created it (0 for modules present from the start).
        creator: index in the engine history of that event, ``None`` for original modules.
        patch: its ``weight_patch`` buffer when that marks at least one connection.

    Example:
        >>> from dynarch.models import mlp
        >>> unit = build_units(mlp(4, [8], 2), [])[0]
        >>> unit.name, unit.group, unit.depth, unit.birth, unit.creator, len(unit.params)
        ('fc1', 'fc1', 0, 0, None, 2)
    """

    name: str
    module: nn.Module
    params: tuple[nn.Parameter, ...]
    depth: int
    birth: int = 0
    creator: int | None = None
    patch: Tensor | None = None

    @property
    def group(self) -> str:
        """The optimizer param-group name of this unit (``"<root>"`` for the model itself)."""
        return self.name or "<root>"


@dataclass
class LRContext:
    """Everything a strategy may read when it assigns factors.

    Attributes:
        model: the model.
        step: the engine step (optimizer steps completed; the trainer keeps it current).
        units: the units in module order.
        history: the engine history (oldest event first).
        layers: number of distinct depths (at least 1).

    Example:
        >>> from dynarch.models import mlp
        >>> model = mlp(4, [8], 2)
        >>> ctx = LRContext(model, 30, build_units(model, []), [], 2)
        >>> ctx.age(ctx.units[0]), ctx.density(ctx.units[0]), ctx.growth_events()
        (30, None, [])
    """

    model: nn.Module
    step: int
    units: list[Unit]
    history: list[Event]
    layers: int
    cache: dict[Any, Any] = field(default_factory=dict)  # shared by contexts of one structure

    def age(self, unit: Unit) -> int:
        """Steps since ``unit`` was created (the step itself for original units)."""
        return max(0, self.step - unit.birth)

    def growth_events(self, ops: Collection[str] | None = None) -> list[int]:
        """History indices of the growth events (see :func:`is_growth`), oldest first."""
        key = ("growth", None if ops is None else frozenset(ops))
        if key not in self.cache:
            self.cache[key] = [i for i, e in enumerate(self.history) if is_growth(e, ops)]
        found: list[int] = self.cache[key]
        return found

    def growth_after(self, unit: Unit, ops: Collection[str] | None = None) -> list[int]:
        """The growth events after the one that created ``unit`` (all, for original units)."""
        events = self.growth_events(ops)
        first = -1 if unit.creator is None else unit.creator
        return events[bisect.bisect_right(events, first) :]

    def density(self, unit: Unit) -> float | None:
        """Active fraction of ``unit``'s ``weight_mask`` (``None`` when it has no mask)."""
        if "density" not in self.cache:
            from ..masks import layer_density  # one host sync for all layers

            self.cache["density"] = layer_density(self.model)
        value: float | None = self.cache["density"].get(unit.name)
        return value


def _patch(name: str, module: nn.Module) -> Tensor | None:
    patch = module._buffers.get(PATCH)
    if patch is None:
        return None
    weight = getattr(module, "weight", None)
    if patch.dtype != torch.bool or not isinstance(weight, Tensor) or patch.shape != weight.shape:
        shape = None if not isinstance(weight, Tensor) else tuple(weight.shape)
        raise ValueError(
            f"module '{name}' has a {PATCH} buffer of dtype {patch.dtype} and shape "
            f"{tuple(patch.shape)}; it must be a bool tensor shaped like its weight {shape} "
            "(the op that changed the layer must update it as it does weight_mask)"
        )
    return patch


def build_units(model: nn.Module, history: list[Event]) -> list[Unit]:
    """The units of ``model`` in module order (see :class:`Unit`).

    Example:
        >>> from dynarch.models import mlp
        >>> [(u.name, u.depth) for u in build_units(mlp(4, [8], 2), [])]
        [('fc1', 0), ('out', 1)]
    """
    births: dict[str, int] = {}
    for i, event in enumerate(history):
        for name in created_modules(event):
            births[name] = i
    raw: list[tuple[str, nn.Module, tuple[nn.Parameter, ...], int, Tensor | None]] = []
    seen: set[int] = set()
    depth = -1
    for name, module in model.named_modules():
        own: list[nn.Parameter] = []
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                own.append(p)
        if not own:
            continue
        if any(p.dim() >= 2 for p in own):
            depth += 1
        raw.append((name, module, tuple(own), max(depth, 0), _patch(name, module)))
    patches = [r[4] for r in raw if r[4] is not None]
    flags = [p.any().to(patches[0].device) for p in patches]  # one host sync below
    marked = iter(torch.stack(flags).tolist() if patches else [])
    units = []
    for name, module, params, d, patch in raw:
        parts = name.split(".")
        prefixes = [".".join(parts[:k]) for k in range(len(parts), 0, -1)] if name else []
        found = [births[p] for p in prefixes if p in births]
        creator = max(found) if found else None
        units.append(
            Unit(
                name=name,
                module=module,
                params=params,
                depth=d,
                birth=0 if creator is None else history[creator].step,
                creator=creator,
                patch=patch if patch is not None and next(marked) else None,
            )
        )
    return units


class Strategy:
    """Base class: maps every :class:`Unit` to a learning-rate factor.

    Override :meth:`factor` (or :meth:`factors` to compute all units at once) and, for a
    distinct factor on patch connections, :meth:`patch_factor`. Set ``dynamic = True`` when
    the factor depends on the step (it is then re-evaluated before every optimizer step),
    ``needs_grads = True`` when it reads gradients, ``weights_only = True`` when the factor
    applies to the unit's parameters of two or more dimensions only (its bias and norm
    parameters keep factor 1 from this strategy: :class:`~dynarch.lr.LRPlan` then gives them
    a param group of their own). Stateful strategies override
    :meth:`state_dict`/:meth:`load_state_dict` (plain data).

    Example:
        >>> class Halve(Strategy):
        ...     def factor(self, unit: Unit, ctx: LRContext) -> float:
        ...         return 0.5
        >>> Halve().factor(None, None)  # type: ignore[arg-type]
        0.5
    """

    name: ClassVar[str] = ""
    dynamic: ClassVar[bool] = False
    needs_grads: ClassVar[bool] = False
    weights_only: ClassVar[bool] = False

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        """The factor of ``unit``'s learning rate."""
        raise NotImplementedError

    def factors(self, ctx: LRContext) -> dict[str, float]:
        """The factor of every unit, by unit name."""
        return {u.name: self.factor(u, ctx) for u in ctx.units}

    def patch_factor(self, unit: Unit, ctx: LRContext, factor: float) -> float:
        """The factor on ``unit``'s patch connections (default: its own ``factor``)."""
        return factor

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (empty: most strategies derive everything from the history)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        check_state(type(self).__name__, state, set())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


STRATEGIES: dict[str, type[Strategy]] = {}
"""Registered strategy classes by name."""

_S = TypeVar("_S", bound=type[Strategy])


_register = registrar("strategy", Strategy, STRATEGIES)


def register_strategy(name: str) -> Callable[[_S], _S]:
    """Class decorator registering a :class:`Strategy` subclass in :data:`STRATEGIES`.

    Example:
        >>> @register_strategy("half")
        ... class Half(Strategy):
        ...     def factor(self, unit: Unit, ctx: LRContext) -> float:
        ...         return 0.5
        >>> STRATEGIES["half"] is Half
        True
        >>> del STRATEGIES["half"]
    """

    return _register(name)


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build the strategy registered as ``name`` with ``kwargs``.

    Example:
        >>> make_strategy("warmup", steps=10)
        Warmup(steps=10, initial=False)
    """
    if name not in STRATEGIES:
        close = difflib.get_close_matches(str(name), list(STRATEGIES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown learning-rate strategy {name!r}{hint}; allowed: {', '.join(STRATEGIES)}"
        )
    cls = STRATEGIES[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"strategy {name!r} got unknown arguments {unknown}; allowed: {', '.join(allowed)}"
        )
    return cls(**kwargs)


def as_strategy(spec: object, index: int = 0) -> Strategy:
    """A :class:`Strategy` from an instance, a registered name or ``{"name": ..., **kwargs}``.

    Example:
        >>> as_strategy({"name": "cascade", "decay": 0.5})
        Cascade(decay=0.5, slow='early')
    """
    if isinstance(spec, Strategy):
        return spec
    if isinstance(spec, str):
        return make_strategy(spec)
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        return make_strategy(spec["name"], **kwargs)
    raise TypeError(
        f"strategies[{index}] must be a Strategy, a registered name or a dict "
        f"{{'name': ..., **kwargs}}, got {spec!r}"
    )
