"""``Every``: fires on every ``n``-th update (a fixed growth schedule as a trigger)."""

from __future__ import annotations

from typing import Any

from .._validate import check_int
from .base import Trigger, check_state, register_trigger

__all__ = ["Every"]


@register_trigger("every")
class Every(Trigger):
    """Fires on the ``n``-th, ``2n``-th, … update since the last :meth:`reset`; the value fed
    to :meth:`update` is ignored. Use it to grow on a schedule (every ``n`` evaluations)
    through the same schedules that take a data-driven trigger.

    Example:
        >>> t = Every(2)
        >>> [t.update(0.0) for _ in range(5)]
        [False, True, False, True, False]
        >>> t.reset(); t.update(0.0)
        False
    """

    def __init__(self, n: int = 1) -> None:
        self.n = check_int("n", n, 1)
        self.count = 0

    def update(self, value: float | None = None) -> bool:
        """Count one update; True on every ``n``-th."""
        self.count += 1
        return self.count % self.n == 0

    def reset(self) -> None:
        """Start counting from zero again."""
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        """``{"count": updates since the last reset}``."""
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        check_state("Every", state, {"count"})
        self.count = int(state["count"])
