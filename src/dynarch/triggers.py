"""Triggers: small stateful detectors that decide *when* a structural change should happen.

A trigger is fed one observation at a time with :meth:`Trigger.update` and answers whether it
fires. Triggers are registered by name in :data:`TRIGGERS`, so configs can name them; adding a
trigger is one class with ``@register_trigger("name")``::

    >>> from dynarch.triggers import make_trigger
    >>> t = make_trigger("plateau", patience=2, threshold=0.1)
    >>> [t.update(v) for v in (1.0, 0.95, 0.97)]
    [False, False, True]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

__all__ = ["TRIGGERS", "Plateau", "Trigger", "make_trigger", "register_trigger"]


class Trigger:
    """Base class: ``update(value) -> bool`` fires; ``reset()`` starts over; state is a dict."""

    name: ClassVar[str] = ""

    def update(self, value: float) -> bool:
        """Feed one observation; return True when the trigger fires."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything seen so far (called after the triggered change is made)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state, loadable with ``torch.load(weights_only=True)``."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        raise NotImplementedError


TRIGGERS: dict[str, type[Trigger]] = {}
"""Registered trigger classes by name."""

_T = TypeVar("_T", bound=type[Trigger])


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

    def decorate(cls: _T) -> _T:
        if not (isinstance(cls, type) and issubclass(cls, Trigger)):
            raise TypeError(f"register_trigger({name!r}) needs a Trigger subclass, got {cls!r}")
        if name in TRIGGERS:
            raise ValueError(
                f"trigger name {name!r} is already registered to {TRIGGERS[name].__name__}; "
                "choose another name"
            )
        cls.name = name
        TRIGGERS[name] = cls
        return cls

    return decorate


def make_trigger(name: str, **kwargs: Any) -> Trigger:
    """Build the trigger registered as ``name`` with ``kwargs``.

    Example:
        >>> make_trigger("plateau", patience=3).patience
        3
    """
    if name not in TRIGGERS:
        raise ValueError(f"unknown trigger {name!r}; registered triggers: {sorted(TRIGGERS)}")
    return TRIGGERS[name](**kwargs)


def check_mode(mode: str) -> None:
    """Raise unless ``mode`` is ``"min"`` or ``"max"``."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def check_state(owner: str, state: dict[str, Any], keys: set[str]) -> None:
    """Raise unless ``state`` is a dict with exactly ``keys`` (a foreign or stale state)."""
    if not isinstance(state, dict) or set(state) != keys:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{owner} state must have keys {sorted(keys)}, got {got}")


@register_trigger("plateau")
class Plateau(Trigger):
    """Fires when a metric has not improved by more than ``threshold`` for ``patience`` updates.

    Improvement is absolute: in ``"min"`` mode a value improves when it is below
    ``best - threshold`` (``"max"``: above ``best + threshold``). The first value always
    improves; NaN never does. Once fired, it keeps firing on every non-improving update
    until :meth:`reset` (which forgets the best value too).

    Example:
        >>> p = Plateau(patience=2, threshold=0.01)
        >>> [p.update(v) for v in (1.0, 0.9, 0.895, 0.899, 0.5)]
        [False, False, False, True, False]
    """

    def __init__(self, patience: int = 10, threshold: float = 0.01, mode: str = "min") -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience must be a positive int, got {patience!r}")
        if (
            not isinstance(threshold, int | float)
            or isinstance(threshold, bool)
            or not math.isfinite(threshold)
            or threshold < 0
        ):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        check_mode(mode)
        self.patience = patience
        self.threshold = float(threshold)
        self.mode = mode
        self.best: float | None = None
        self.wait = 0

    def update(self, value: float) -> bool:
        """Feed one metric value; True when it has stalled for ``patience`` updates."""
        value = float(value)
        if self.best is None:
            improved = not math.isnan(value)
        elif self.mode == "min":
            improved = value < self.best - self.threshold
        else:
            improved = value > self.best + self.threshold
        if improved:
            self.best = value
            self.wait = 0
            return False
        self.wait += 1
        return self.wait >= self.patience

    def reset(self) -> None:
        """Forget the best value and the wait count."""
        self.best = None
        self.wait = 0

    def state_dict(self) -> dict[str, Any]:
        """``{"best": float | None, "wait": int}``."""
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        check_state("Plateau", state, {"best", "wait"})
        self.best = None if state["best"] is None else float(state["best"])
        self.wait = int(state["wait"])
