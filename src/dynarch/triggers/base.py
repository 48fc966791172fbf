"""The :class:`Trigger` protocol, the name registry and the argument checks triggers share."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from .._registry import registrar

__all__ = [
    "TRIGGERS",
    "Trigger",
    "check_kwargs",
    "check_mode",
    "check_number",
    "check_state",
    "make_trigger",
    "register_trigger",
]


class Trigger:
    """Base class: ``update(value) -> bool`` fires; ``reset()`` starts over; state is a dict.

    A trigger answers one question ("should we act now?"; some also say where, with
    ``where()``: the places where the firing condition holds, most urgent first, and ``[]``
    when it would not fire, so a schedule acting there leaves healthy places alone).
    ``state_dict()`` returns plain data (numbers, strings, lists, dicts) so it
    loads with ``torch.load(weights_only=True)``.

    Example:
        >>> class Above(Trigger):
        ...     def update(self, value: float) -> bool:
        ...         return value > 1.0
        >>> Above().update(2.0)
        True
    """

    name: ClassVar[str] = ""

    def update(self, value: float) -> bool:
        """Feed one observation; return True when the trigger fires."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything seen so far (called after the triggered change is made)."""
        raise NotImplementedError

    def discard_pending(self) -> None:
        """Drop what was observed since the last :meth:`update` without answering for it
        (a schedule calls it for an evaluation it ignores, such as one in a cooldown).
        Nothing to drop for a trigger fed only by :meth:`update` (the default); one that
        observes between updates (e.g. ``GradientVarianceSpike``) forgets its pending
        observations."""

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state, loadable with ``torch.load(weights_only=True)``."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        raise NotImplementedError


TRIGGERS: dict[str, type[Trigger]] = {}
"""Registered trigger classes by name."""

_T = TypeVar("_T", bound=type[Trigger])


_register = registrar("trigger", Trigger, TRIGGERS)


def register_trigger(name: str) -> Callable[[_T], _T]:
    """Class decorator registering a :class:`Trigger` subclass in :data:`TRIGGERS` as ``name``.

    Example:
        >>> @register_trigger("always")
        ... class Always(Trigger):
        ...     def update(self, value: float) -> bool:
        ...         return True
        >>> TRIGGERS["always"] is Always
        True
        >>> del TRIGGERS["always"]
    """

    return _register(name)


def make_trigger(name: str, **kwargs: Any) -> Trigger:
    """Build the trigger registered as ``name`` with ``kwargs``.

    Example:
        >>> make_trigger("plateau", patience=3).patience
        3
    """
    if name not in TRIGGERS:
        raise ValueError(f"unknown trigger {name!r}; registered triggers: {sorted(TRIGGERS)}")
    check_kwargs(f"trigger {name!r}", TRIGGERS[name], kwargs)
    return TRIGGERS[name](**kwargs)


def check_kwargs(owner: str, cls: type, kwargs: Mapping[str, Any]) -> None:
    """Raise a TypeError naming the keyword arguments ``cls(...)`` does not take, and the
    ones it does (a class taking ``**kwargs`` accepts everything).

    Example:
        >>> check_kwargs("trigger 'plateau'", TRIGGERS["plateau"], {"patience": 3})
    """
    params = list(inspect.signature(cls).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"{owner} got unknown arguments {unknown}; allowed: {', '.join(allowed) or 'none'}"
        )


def check_mode(mode: str) -> None:
    """Raise unless ``mode`` is ``"min"`` or ``"max"``.

    Example:
        >>> check_mode("max")
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def check_state(owner: str, state: dict[str, Any], keys: set[str]) -> None:
    """Raise unless ``state`` is a dict with exactly ``keys`` (a foreign or stale state).

    Example:
        >>> check_state("Plateau", {"best": None, "wait": 0}, {"best", "wait"})
    """
    if not isinstance(state, dict) or set(state) != keys:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{owner} state must have keys {sorted(keys)}, got {got}")


def check_number(
    name: str, value: object, *, low: float | None = None, strict: bool = False
) -> float:
    """``float(value)`` if it is a finite real number (``>= low``, or ``> low`` if ``strict``).

    The error names the argument, the bound and the value given.

    Example:
        >>> check_number("k", 3, low=0, strict=True)
        3.0
    """
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low  # type: ignore[operator]
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]
