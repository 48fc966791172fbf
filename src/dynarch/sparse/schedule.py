"""When dynamic sparse training rewires, and how much: the update schedule.

Steps count optimizer steps from 1. An update happens after step ``s`` when ``s`` is a
multiple of ``delta_t`` and ``s < t_end`` (RigL's convention: at ``t_end`` the cosine
fraction is 0, and from then on the mask stays fixed). The fraction of each layer's active
weights that an update drops is annealed from ``drop_fraction`` (``f0``):

* ``"constant"``: ``f(t) = f0``
* ``"cosine"`` (RigL): ``f(t) = f0 / 2 * (1 + cos(pi * t / t_end))``
* ``"linear"``: ``f(t) = f0 * (1 - t / t_end)``

with ``t`` clipped to ``[0, t_end]``.

Example:
    >>> s = Schedule(delta_t=100, t_end=1000, drop_fraction=0.3, anneal="cosine")
    >>> s.fraction(500), s.is_update(500), s.is_update(1000)
    (0.15, True, False)
"""

from __future__ import annotations

import math

from ..budgets import check_choice

__all__ = ["ANNEALS", "Schedule", "check_count", "check_positive"]

ANNEALS = ("constant", "cosine", "linear")


def check_count(name: str, value: object, low: int, what: str) -> int:
    """``value`` as an int ``>= low``; a clear error naming ``name`` and ``what`` it is."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low} ({what}), got {value!r}")
    return value


def check_positive(name: str, value: object, what: str) -> float:
    """``value`` as a finite float ``> 0``; a clear error naming ``name`` and ``what``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name} must be a finite number > 0 ({what}), got {value!r}")
    return float(value)


class Schedule:
    """Update steps and annealed drop fraction of a dynamic sparse training run.

    ``t_end=None`` leaves the horizon open: a :class:`~dynarch.sparse.Rewirer` used as a
    training callback fills it in from the trainer (``max_steps`` or ``epochs *
    batches_per_epoch``, whichever ends training first); without a horizon updates never
    stop, and ``"cosine"``/``"linear"`` annealing cannot be computed (a clear error).

    Example:
        >>> Schedule(delta_t=10, t_end=40, drop_fraction=0.5, anneal="linear").fraction(10)
        0.375
    """

    def __init__(
        self,
        delta_t: int = 100,
        t_end: int | None = None,
        drop_fraction: float = 0.3,
        anneal: str = "cosine",
    ) -> None:
        self.delta_t = check_count("delta_t", delta_t, 1, "optimizer steps between updates")
        if t_end is not None:
            check_count("t_end", t_end, 1, "the step from which the mask stays fixed; or None")
        self.t_end = t_end
        if (
            isinstance(drop_fraction, bool)
            or not isinstance(drop_fraction, int | float)
            or not 0 < drop_fraction <= 1
        ):
            raise ValueError(
                "drop_fraction must be a number in (0, 1] (the fraction of each layer's active "
                f"weights dropped per update), got {drop_fraction!r}"
            )
        self.drop_fraction = float(drop_fraction)
        check_choice("anneal", anneal, ANNEALS)
        self.anneal = anneal

    def is_update(self, step: int) -> bool:
        """Whether the mask is updated after optimizer step ``step`` (counted from 1)."""
        if step < 1 or step % self.delta_t:
            return False
        return self.t_end is None or step < self.t_end

    def next_update(self, step: int) -> int | None:
        """The first update step ``>= step``, or ``None`` when no update is left."""
        first = max(1, -(-step // self.delta_t)) * self.delta_t
        return first if self.t_end is None or first < self.t_end else None

    def fraction(self, step: int) -> float:
        """Annealed drop fraction at ``step`` (``t`` clipped to ``[0, t_end]``)."""
        f0 = self.drop_fraction
        if self.anneal == "constant":
            return f0
        if self.t_end is None:
            raise ValueError(
                f"anneal={self.anneal!r} needs the training horizon: pass t_end=... (steps), "
                "use anneal='constant', or train with dynarch.fit / Trainer, which sets it"
            )
        t = min(max(step, 0), self.t_end) / self.t_end
        if self.anneal == "cosine":
            return f0 / 2 * (1 + math.cos(math.pi * t))
        return f0 * (1 - t)
