"""Per-model engine state and the structural transaction.

Every structural change runs inside :func:`transaction`: it measures parameters and time,
bumps the model's structure ``version`` on entry and on exit (caches keyed on it are
invalidated, for code inside the change as well as after it), appends the
:class:`~dynarch.events.Event` to the history and notifies listeners (the trainer writes
them to ``events.jsonl``). The engine owns a seeded :class:`torch.Generator` per model, so
every random structural decision is reproducible and identical across DDP ranks; global RNG
state is never consumed.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .events import Event

__all__ = ["EngineState", "Transaction", "engine_state", "history", "set_seed", "transaction"]

_ATTR = "_dynarch_engine"
DEFAULT_SEED = 0
_ORDER = itertools.count()  # orders base captures and events across all models


def count_params(model: nn.Module) -> int:
    """Number of parameters (masked weights counted in full)."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class EngineState:
    """What the engine keeps beside a model: step, history, generator, base architecture."""

    generator: torch.Generator
    seed: int = DEFAULT_SEED
    step: int = 0
    version: int = 0
    history: list[Event] = field(default_factory=list)
    base_spec: dict[str, Any] | None = None
    base_order: int = -1  # when base_spec was captured (see _ORDER)
    last_order: int = -1  # when the latest event was recorded
    orders: list[int] = field(default_factory=list)  # when each event of history was recorded
    slots: dict[str, str] = field(default_factory=dict)  # slot -> attached module name
    wrapped: set[str] = field(default_factory=set)  # attached names whose anchor was wrapped
    listeners: list[Callable[[Event], None]] = field(default_factory=list)

    def add_listener(self, fn: Callable[[Event], None]) -> None:
        """Call ``fn(event)`` after every structural change of this model."""
        if fn not in self.listeners:
            self.listeners.append(fn)

    def remove_listener(self, fn: Callable[[Event], None]) -> None:
        if fn in self.listeners:
            self.listeners.remove(fn)


def engine_state(model: nn.Module) -> EngineState:
    """The engine state of ``model``, created (seed 0) on first use."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(DEFAULT_SEED)
        state = EngineState(generator=gen)
        # Stored in __dict__ directly: not a submodule, parameter or buffer.
        model.__dict__[_ATTR] = state
    return state


def set_seed(model: nn.Module, seed: int) -> None:
    """Seed the engine generator of ``model`` (used for every random structural decision).

    Example:
        >>> import torch.nn as nn, dynarch
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> dynarch.set_seed(m, 7)
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    st = engine_state(model)
    st.seed = seed
    st.generator.manual_seed(seed)


def history(model: nn.Module) -> list[Event]:
    """The structural events applied to ``model``, oldest first (a copy of the list)."""
    return list(engine_state(model).history)


@dataclass
class Transaction:
    """Handle given to the body of a :func:`transaction`; fill ``details``/``replay``."""

    model: nn.Module
    op: str
    target: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    replay: dict[str, Any] = field(default_factory=dict)
    event: Event | None = None


@contextmanager
def transaction(
    model: nn.Module, op: str, target: str, *, reason: str = "", record: bool = True
) -> Iterator[Transaction]:
    """Run one structural change of ``model`` and record it as an :class:`Event`.

    If the body raises, nothing is recorded (ops validate fully before they mutate).
    With ``record=False`` (used when replaying a checkpoint) no event is appended.
    """
    st = engine_state(model)
    if st.base_spec is None and record:
        from .spec import describe_model

        st.base_spec = describe_model(model)
        st.base_order = next(_ORDER)
    before = count_params(model)
    t0 = time.perf_counter()
    tx = Transaction(model=model, op=op, target=target, reason=reason)
    st.version += 1  # caches keyed on the version are stale from here on, inside the body too
    yield tx
    seconds = time.perf_counter() - t0
    st.version += 1
    event = Event(
        step=st.step,
        op=op,
        target=target,
        params_before=before,
        params_after=count_params(model),
        reason=reason,
        seconds=seconds,
        details=tx.details,
        replay=tx.replay,
    )
    tx.event = event
    if record:
        st.history.append(event)
        st.last_order = next(_ORDER)
        st.orders.append(st.last_order)
        for fn in list(st.listeners):
            fn(event)
