"""Structural events: the record of every change the engine made to a model.

Every structural operation (``widen``, ``deepen``, ``shrink``, ``attach``, ``detach``,
``sparsify``, …) returns one :class:`Event` and appends it to the model's history::

    >>> import torch.nn as nn, dynarch
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> event = dynarch.widen(model, "0", 12)
    >>> event.op, event.target, event.params_before, event.params_after
    ('widen', '0', 58, 86)
    >>> dynarch.history(model)[-1] is event
    True

``Event.replay`` holds the arguments needed to redo the change's *structure* on a fresh
copy of the base model (weights come from the checkpoint), which is how
:func:`dynarch.load` rebuilds a grown or pruned model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Event"]


@dataclass
class Event:
    """One structural change.

    Attributes:
        step: training step at which the change happened (the trainer keeps it current).
        op: operation name (``"widen"``, ``"sparsify"``, …).
        target: fully-qualified module name the change was aimed at (``"*"`` for the model).
        params_before: number of parameters before the change.
        params_after: number of parameters after the change.
        reason: why it happened (a trigger's name, ``"manual"``, …).
        seconds: wall time the change took.
        details: op-specific facts (affected modules, widths, densities, …); JSON-serialisable.
        replay: arguments that rebuild the structure of this change; JSON-serialisable.
    """

    step: int
    op: str
    target: str
    params_before: int
    params_after: int
    reason: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    replay: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the line written to ``events.jsonl``)."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a foreign record)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"event record has unknown keys {sorted(unknown)}; expected {sorted(known)}"
            )
        missing = {"step", "op", "target", "params_before", "params_after"} - set(data)
        if missing:
            raise ValueError(f"event record is missing keys {sorted(missing)}")
        return cls(**data)

    def summary(self) -> str:
        """One human-readable line, e.g. ``step 120 widen 0: 58 -> 90 params (plateau)``."""
        why = f" ({self.reason})" if self.reason else ""
        return (
            f"step {self.step} {self.op} {self.target}: "
            f"{self.params_before} -> {self.params_after} params{why}"
        )
