"""How the learning-rate strategies read the engine history: which modules an event
created, grew or named as neighbours, and which events are growth.

* A module is **created** by an event when its name is in ``details["module"]`` (a string,
  e.g. ``attach``), ``details["inserted"]`` or ``details["created"]`` (lists, e.g.
  ``deepen``), for every op but the removals in :data:`REMOVAL_OPS`.
* **Growth events** are those whose op is in :data:`GROWTH_OPS` or that add parameters. An
  event's *grown* modules are those it created plus ``details["producers"]``,
  ``details["norms"]``, ``details["layer"]`` and ``details["grown"]`` (``widen`` lists its
  layer as a producer, ``connect`` names it as ``layer``); its *adjacent* modules are
  ``details["consumers"]`` and ``details["anchor"]``. New structural ops follow these
  conventions to be understood.
"""

from __future__ import annotations

from collections.abc import Collection

from ..events import Event

__all__ = [
    "GROWTH_OPS",
    "REMOVAL_OPS",
    "adjacent_modules",
    "covers",
    "created_modules",
    "grown_modules",
    "is_growth",
]

GROWTH_OPS: set[str] = {"widen", "deepen", "attach", "connect", "patch"}
"""Ops that count as growth besides any event that adds parameters (``connect``/``patch``
turn mask positions on: no new parameters). Other such ops add their name here."""

REMOVAL_OPS: frozenset[str] = frozenset({"detach", "shrink", "prune"})
"""Ops whose ``details["module"]`` names a module they removed, not one they created."""


def _names(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str)]
    return []


def created_modules(event: Event) -> list[str]:
    """Names of the modules ``event`` created (see the module docstring).

    Example:
        >>> created_modules(Event(3, "attach", "after:act1", 10, 20, details={"module": "s"}))
        ['s']
    """
    if event.op in REMOVAL_OPS:
        return []
    d = event.details
    return _names(d.get("module")) + _names(d.get("inserted")) + _names(d.get("created"))


def grown_modules(event: Event) -> list[str]:
    """Modules ``event`` grew: the created ones, ``producers``, ``norms``, ``layer``, ``grown``.

    Example:
        >>> grown_modules(Event(3, "widen", "fc1", 10, 20, details={"producers": ["fc1"]}))
        ['fc1']
    """
    d = event.details
    keys = ("producers", "norms", "layer", "grown")
    return created_modules(event) + [n for k in keys for n in _names(d.get(k))]


def adjacent_modules(event: Event) -> list[str]:
    """Modules ``event`` names as neighbours of what it grew: ``consumers`` and ``anchor``.

    Example:
        >>> adjacent_modules(Event(3, "widen", "fc1", 10, 20, details={"consumers": ["fc2"]}))
        ['fc2']
    """
    return _names(event.details.get("consumers")) + _names(event.details.get("anchor"))


def is_growth(event: Event, ops: Collection[str] | None = None) -> bool:
    """Whether ``event`` is growth: its op is in ``ops`` or, when ``ops`` is ``None``, in
    :data:`GROWTH_OPS` or it added parameters.

    Example:
        >>> is_growth(Event(0, "rewire", "*", 10, 10)), is_growth(Event(0, "widen", "0", 1, 2))
        (False, True)
    """
    if ops is not None:
        return event.op in ops
    return event.op in GROWTH_OPS or event.params_after > event.params_before


def covers(prefixes: Collection[str], name: str) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or lies inside one of them.

    Example:
        >>> covers(["act1_slot"], "act1_slot.module"), covers(["fc1"], "fc10")
        (True, False)
    """
    return any(name == p or name.startswith(p + ".") for p in prefixes)
