"""Prune methods by name, so configs and the CLI can pick one.

>>> sorted(PRUNERS)[:3]
['gradient_importance', 'gradual_magnitude', 'lottery_ticket']
>>> get_pruner("magnitude").__name__
'magnitude_prune'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .importance import GradientImportance
from .lottery import LotteryTicket
from .magnitude import magnitude_prune, structured_prune
from .schedules import GradualMagnitudePruning, OverparameterizeThenPrune

__all__ = ["PRUNERS", "get_pruner", "register_pruner"]

PRUNERS: dict[str, Callable[..., Any]] = {
    "magnitude": magnitude_prune,
    "structured": structured_prune,
    "gradient_importance": GradientImportance,
    "lottery_ticket": LotteryTicket,
    "gradual_magnitude": GradualMagnitudePruning,
    "overparameterize_then_prune": OverparameterizeThenPrune,
}
"""Registered prune functions and callback classes by name."""

_F = TypeVar("_F", bound=Callable[..., Any])


def register_pruner(name: str) -> Callable[[_F], _F]:
    """Decorator registering a prune function or class in :data:`PRUNERS` as ``name``.

    Example:
        >>> @register_pruner("nothing")
        ... def prune_nothing(model):
        ...     return None
        >>> get_pruner("nothing") is prune_nothing
        True
        >>> del PRUNERS["nothing"]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"pruner name must be a non-empty string, got {name!r}")

    def deco(obj: _F) -> _F:
        if name in PRUNERS and PRUNERS[name] is not obj:
            raise ValueError(f"a pruner named {name!r} is already registered")
        PRUNERS[name] = obj
        return obj

    return deco


def get_pruner(name: str) -> Callable[..., Any]:
    """The prune function or callback class registered as ``name``.

    Example:
        >>> get_pruner("lottery_ticket").__name__
        'LotteryTicket'
    """
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; registered: {sorted(PRUNERS)}")
    return PRUNERS[name]
