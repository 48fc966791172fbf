"""``Plateau``: a metric stopped improving."""

from __future__ import annotations

import math
from typing import Any

from .base import Trigger, check_mode, check_state, register_trigger

__all__ = ["Plateau"]


@register_trigger("plateau")
class Plateau(Trigger):
    """Fires when a metric has not improved by more than ``threshold`` for ``patience`` updates.

    Improvement is absolute: in ``"min"`` mode a value improves when it is below
    ``best - threshold`` (``"max"``: above ``best + threshold``). The first value always
    improves; NaN never does. Once fired, it keeps firing on every non-improving update
    until :meth:`reset` (which forgets the best value too).

    **Reset after growth.** Whoever acts on the plateau resets the trigger once the change is
    made (:class:`dynarch.callbacks.GrowOnPlateau` does, and so does a grow-as-needed
    schedule): the grown network then gets ``patience`` fresh updates, measured against its
    own new best value, before it can fire again::

        if plateau.update(val_loss):
            widen(model, "0", 2 * width, optimizer=optimizer)
            plateau.reset()

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
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"Plateau.update needs a metric value (a number such as the validation loss), "
                f"got {value!r}"
            ) from None
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
        """Forget the best value and the wait count (call it after acting on a plateau)."""
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
