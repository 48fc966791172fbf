"""Embargo: a place that was just pruned cannot grow again for N steps (no thrashing).

:class:`Embargo` listens to a model's structural events. Each event whose op is one of its
``ops`` embargoes the places it touched (see :func:`event_places`) from the event's step
``s`` up to step ``s + steps``: growth there is refused at steps ``s … s + steps - 1`` and
allowed again from step ``s + steps``. Growth schedules (:class:`~dynarch.schedules.GrowAsNeeded`,
:class:`~dynarch.schedules.GrowPruneCycle`) consult it before growing::

    >>> import torch.nn as nn
    >>> from dynarch._engine import engine_state
    >>> from dynarch.prune import magnitude_prune
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> embargo = Embargo(model, steps=10)
    >>> engine_state(model).step = 5
    >>> _ = magnitude_prune(model, 0.5, include=["0"])
    >>> embargo.allowed("0", step=14), embargo.allowed("0", step=15), embargo.remaining("0", 7)
    (False, True, 8)
    >>> embargo.close()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .._engine import engine_state
from .._validate import check_model
from ..callbacks import Callback
from ..events import Event
from ..triggers import check_state

__all__ = ["EMBARGO_OPS", "KNOWN_OPS", "Embargo", "event_places"]

EMBARGO_OPS = ("prune", "shrink", "detach")
"""Ops that embargo the places they touch by default (``"rewire"`` can be added)."""

KNOWN_OPS = (
    "attach", "branch", "connect", "deepen", "detach", "highway", "patch", "proportional",
    "prune", "rewire", "shrink", "skip", "sparsify", "tournament", "widen",
)  # fmt: skip
"""The ops of the engine's structural events (an op registered with
:func:`dynarch.checkpoint.register_replay` is accepted too)."""


def _check_ops(ops: object) -> tuple[str, ...]:
    """``ops`` as a tuple, refusing an op name no event carries (it would never embargo)."""
    from ..replay import replay_function  # lazy: the replays import much of the package

    if (
        isinstance(ops, str)
        or not isinstance(ops, Sequence)
        or not ops
        or not all(isinstance(op, str) and op for op in ops)
    ):
        raise ValueError(
            f"Embargo: ops must be a non-empty sequence of op names such as "
            f"{EMBARGO_OPS}, got {ops!r}"
        )
    unknown = [op for op in ops if op not in KNOWN_OPS and replay_function(op) is None]
    if unknown:
        raise ValueError(
            f"Embargo: unknown op {unknown[0]!r} in ops (no structural event has it, so it "
            f"would never embargo anything); known ops: {', '.join(KNOWN_OPS)}"
        )
    return tuple(ops)


def _names(value: object) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, dict):
        return [k for k in value if isinstance(k, str) and k]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str) and v]
    return []


def event_places(event: Event) -> list[str]:
    """The places (module or slot names) a structural event touched, in a stable order.

    They are: the event's ``target`` (unless ``"*"``); ``details["producers"]`` (layers
    coupled to a widened/shrunk one); the keys of ``details["layers"]`` (a ``prune``);
    ``details["module"]`` (the module of an ``attach``/``detach``); and, for a ``rewire``,
    each key of ``details`` holding a per-layer record.

    Example:
        >>> e = Event(3, "prune", "*", 10, 10, details={"layers": {"fc1": {}, "fc2": {}}})
        >>> event_places(e)
        ['fc1', 'fc2']
    """
    places = [] if event.target == "*" else _names(event.target)
    details = event.details
    places += _names(details.get("producers"))
    places += _names(details.get("layers"))
    places += _names(details.get("module"))
    if event.op == "rewire":
        places += [k for k, v in details.items() if isinstance(v, dict) and k]
    return list(dict.fromkeys(places))


def _check_step(step: object) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"Embargo: step must be an int >= 0, got {step!r}")
    return step


class Embargo(Callback):
    """Refuses growth at places touched by recent ``ops`` events for ``steps`` steps.

    Construction adds a listener to ``engine_state(model)``; :meth:`close` (or leaving a
    ``with`` block) removes it, keeping the timers. It is a :class:`Callback` with no hooks
    so a :class:`~dynarch.train.Trainer` checkpoints its timers (the growth schedules given
    it save them too; loading them twice is harmless). A place blocks itself and every
    module inside it (``"block"`` blocks ``"block.conv"``). ``step=None`` means the model's
    current engine step (the trainer keeps it current).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with Embargo(model, 100, ops=("prune", "rewire")) as embargo:
        ...     embargo.blocked()
        {}
    """

    def __init__(self, model: nn.Module, steps: int, *, ops: Sequence[str] = EMBARGO_OPS) -> None:
        check_model(model)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"Embargo: steps must be an int >= 0, got {steps!r}")
        self.ops = _check_ops(ops)
        self.model = model
        self.steps = steps
        self.until: dict[str, int] = {}
        """Place -> first step at which growth there is allowed again."""
        engine_state(model).add_listener(self._on_event)

    def _on_event(self, event: Event) -> None:
        if event.op not in self.ops:
            return
        end = event.step + self.steps
        for place in event_places(event):
            self.until[place] = max(self.until.get(place, 0), end)

    def embargo(self, place: str, step: int | None = None) -> None:
        """Embargo ``place`` by hand from ``step`` (default: now) for :attr:`steps` steps.

        Example:
            >>> e = Embargo(nn.Linear(2, 2), 5)
            >>> e.embargo("fc1", step=10); e.until
            {'fc1': 15}
        """
        if not isinstance(place, str) or not place:
            raise ValueError(f"Embargo: place must be a non-empty module name, got {place!r}")
        now = self._now(step)
        self.until[place] = max(self.until.get(place, 0), now + self.steps)

    def _now(self, step: int | None) -> int:
        return engine_state(self.model).step if step is None else _check_step(step)

    def remaining(self, target: str, step: int | None = None) -> int:
        """Steps until growth at ``target`` is allowed (0: allowed now)."""
        if not isinstance(target, str):
            raise TypeError(f"Embargo: target must be a module name (str), got {target!r}")
        now = self._now(step)
        ends = [
            end
            for place, end in self.until.items()
            if target == place or target.startswith(place + ".")
        ]
        return max([end - now for end in ends] + [0])

    def allowed(self, target: str, step: int | None = None) -> bool:
        """Whether growth at ``target`` is allowed at ``step``."""
        return self.remaining(target, step) == 0

    def blocked(self, step: int | None = None) -> dict[str, int]:
        """``{place: steps remaining}`` of every place embargoed at ``step``, sorted by name."""
        now = self._now(step)
        return {p: end - now for p, end in sorted(self.until.items()) if end > now}

    def close(self) -> None:
        """Stop listening to the model's events (the timers are kept)."""
        engine_state(self.model).remove_listener(self._on_event)

    def __enter__(self) -> Embargo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """``{"until": {place: step}}``."""
        return {"until": dict(self.until)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        check_state("Embargo", state, {"until"})
        until = state["until"]
        if not isinstance(until, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in until.items()
        ):
            raise ValueError(f"Embargo state 'until' must map place names to steps, got {until!r}")
        self.until = dict(until)
