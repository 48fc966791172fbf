"""Structural actions a schedule can take: named, planned (targets, cost) and registered.

An :class:`Action` answers *what* a schedule does when it acts, in three steps the schedules
drive: :meth:`Action.targets` (the places it would change), :meth:`Action.cost` (parameters a
change adds there, checked against a budget; :meth:`Action.adds` splits it into connections
and units for a credit economy) and :meth:`Action.apply` (do it, one or more engine events,
each with the schedule's ``reason``). Actions are registered by name in
:data:`ACTIONS` so configs can name them (``{"name": "widen", "layers": ["fc1"]}``)::

    >>> import torch
    >>> from dynarch.models import mlp
    >>> model = mlp(8, [16], 3)
    >>> act = make_action("widen", layers=["fc1"], amount=4)
    >>> act.targets(model), act.new_width(model, "fc1"), act.cost(model, "fc1")
    (['fc1'], 20, 48)

The built-in actions live in :mod:`dynarch.schedules.builtin`. A plain function
``fn(trainer)`` (or ``fn(trainer, reason=...)``) is wrapped in a
:class:`FunctionAction`: it cannot be planned, so it cannot be checked against a budget or
an embargo.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from torch import nn

from .._registry import registrar
from ..events import Event
from ..triggers import check_state
from ..triggers.base import check_kwargs

if TYPE_CHECKING:
    from ..train import Trainer

__all__ = [
    "ACTIONS", "Action", "FunctionAction", "as_action", "make_action", "prices_layers",
    "register_action",
]  # fmt: skip


class Action:
    """Base class of a structural action. Subclasses override :meth:`apply` and, to be
    plannable (budget, embargo), :meth:`targets`, :meth:`places` and :meth:`cost`.

    Example:
        >>> class Nothing(Action):
        ...     def apply(self, trainer, targets, reason):
        ...         return []
        >>> Nothing().planned
        True
    """

    name: ClassVar[str] = ""
    planned: ClassVar[bool] = True
    #: grow targets one at a time, each priced after the ones before it have grown (for
    #: actions whose cost at one target depends on growth at another, such as widen)
    sequential: ClassVar[bool] = False
    """Whether :meth:`targets`/:meth:`cost` describe what :meth:`apply` will do."""

    def check(self, model: nn.Module) -> None:
        """Raise a clear error if the action cannot apply to ``model`` (run at fit start)."""

    def targets(self, model: nn.Module, hint: Sequence[str] | None = None) -> list[str]:
        """The places (module names) this action would change now, in order. ``hint`` is
        where a trigger suggests acting (e.g. ``GradientVarianceSpike.where()``)."""
        return []

    def places(self, model: nn.Module, target: str) -> list[str]:
        """Every place a change at ``target`` touches (checked against an embargo)."""
        return [target]

    def cost(self, model: nn.Module, target: str) -> int:
        """Parameters the change at ``target`` adds (checked against a budget)."""
        return 0

    def adds(self, model: nn.Module, target: str) -> tuple[int, int]:
        """``(connections, units)`` the change at ``target`` adds: active Linear/Conv2d
        weights and new units, what a :class:`~dynarch.triggers.CreditEconomy` is asked to
        afford. Default: ``(cost(model, target), 0)``, every added parameter a connection."""
        return self.cost(model, target), 0

    def weights_added(
        self, model: nn.Module, target: str, *, dense: bool = False
    ) -> tuple[dict[str, int], int]:
        """What the change at ``target`` adds, per layer: ``({Linear/Conv2d name: weights},
        other parameters)``. Weights count as :meth:`cost` does (a masked layer: its active
        new weights), or with ``dense`` every new weight position, active or not. A schedule
        needs it to price a growth against a FLOP budget (``max_flops``: a layer's added
        weights times the positions it is applied at) or a dense one (``count_masked=True``);
        an action that does not override it is refused with such a budget.

        Example:
            >>> from dynarch.models import mlp
            >>> make_action("widen", amount=2).weights_added(mlp(8, [16], 3), "fc1")
            ({'fc1': 16, 'out': 6}, 2)
        """
        raise NotImplementedError(
            f"action {type(self).__name__} does not say which layers it grows "
            "(Action.weights_added)"
        )

    def apply(self, trainer: Trainer, targets: list[str], reason: str) -> list[Event]:
        """Change ``targets`` of ``trainer.model``; returns the engine events."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (empty: the built-in actions are stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        check_state(type(self).__name__, state, set())


def prices_layers(action: Action) -> bool:
    """Whether ``action`` says which layers it grows (overrides :meth:`Action.weights_added`),
    as a FLOP budget or a dense budget needs.

    Example:
        >>> prices_layers(make_action("widen")), prices_layers(FunctionAction(print))
        (True, False)
    """
    return type(action).weights_added is not Action.weights_added


ACTIONS: dict[str, type[Action]] = {}
"""Registered action classes by name."""

_A = TypeVar("_A", bound=type[Action])


_register = registrar("action", Action, ACTIONS)


def register_action(name: str) -> Callable[[_A], _A]:
    """Class decorator registering an :class:`Action` subclass in :data:`ACTIONS` as ``name``.

    Example:
        >>> @register_action("noop")
        ... class Noop(Action):
        ...     def apply(self, trainer, targets, reason):
        ...         return []
        >>> make_action("noop").name
        'noop'
        >>> del ACTIONS["noop"]
    """

    return _register(name)


def make_action(name: str, **kwargs: Any) -> Action:
    """Build the action registered as ``name`` with ``kwargs``.

    Example:
        >>> make_action("widen", layers=["fc1"], factor=2.0).factor
        2.0
    """
    if name not in ACTIONS:
        raise ValueError(f"unknown action {name!r}; registered actions: {sorted(ACTIONS)}")
    check_kwargs(f"action {name!r}", ACTIONS[name], kwargs)
    return ACTIONS[name](**kwargs)


def _as_events(owner: str, result: object) -> list[Event]:
    if result is None:
        return []
    if isinstance(result, Event):
        return [result]
    if isinstance(result, list | tuple) and all(isinstance(e, Event) for e in result):
        return list(result)
    raise TypeError(
        f"{owner} returned {type(result).__name__}; expected a dynarch Event, a list of Events "
        "or None (nothing done)"
    )


class FunctionAction(Action):
    """A plain function as an action: ``fn(trainer)``, or ``fn(trainer, reason=...)`` when it
    takes a ``reason`` argument (pass it on to the structural op so the event names its cause).
    It returns an Event, a list of Events or None. Not plannable.

    Example:
        >>> act = FunctionAction(lambda trainer, reason: None)
        >>> act.planned, act.takes_reason
        (False, True)
    """

    planned: ClassVar[bool] = False

    def __init__(self, fn: Callable[..., object]) -> None:
        if not callable(fn):
            raise TypeError(f"FunctionAction needs a callable, got {fn!r}")
        self.fn = fn
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # builtins without a signature
            params = []
        self.takes_reason = any(
            p.name == "reason" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params
        )

    def apply(self, trainer: Trainer, targets: list[str], reason: str) -> list[Event]:
        """Call the function; its result as a list of events."""
        result = self.fn(trainer, reason=reason) if self.takes_reason else self.fn(trainer)
        return _as_events(f"action {getattr(self.fn, '__name__', self.fn)!r}", result)


def as_action(owner: str, spec: object, kwargs: Mapping[str, Any] | None = None) -> Action:
    """An :class:`Action` from an Action, a registered name (with ``kwargs``), a mapping
    ``{"name": ..., **kwargs}`` or a plain function.

    Example:
        >>> as_action("demo", {"name": "widen", "layers": ["fc1"]}).layers
        ['fc1']
    """
    kwargs = dict(kwargs or {})
    if kwargs and not isinstance(spec, str):
        raise TypeError(
            f"{owner}: action keyword arguments {sorted(kwargs)} need a named action such as "
            f"'widen', got a {type(spec).__name__}"
        )
    if isinstance(spec, Action):
        return spec
    if isinstance(spec, str):
        return make_action(spec, **kwargs)
    if isinstance(spec, Mapping):
        if not isinstance(spec.get("name"), str):
            raise ValueError(
                f"{owner}: an action mapping needs a 'name' key naming a registered action "
                f"({sorted(ACTIONS)}), got keys {sorted(spec)}"
            )
        rest = {k: v for k, v in spec.items() if k != "name"}
        return make_action(spec["name"], **rest)
    if callable(spec):
        return FunctionAction(spec)
    raise TypeError(
        f"{owner}: action must be a dynarch.schedules.Action, a registered action name "
        f"({sorted(ACTIONS)}), a mapping with 'name', or a function of the trainer; got {spec!r}"
    )
