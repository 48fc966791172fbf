"""Slot states and the slot topology (ids, names, anchors, embargo timers).

See :mod:`dynarch.slots` for the lifecycle and how slots map to places in a model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

from torch import nn

from .._validate import check_int

__all__ = [
    "ALLOWED",
    "Slot",
    "SlotState",
    "SlotTopology",
    "SlotTransitionError",
    "register_topology",
    "topology_of",
]

_ATTR = "_dynarch_slots"


class SlotState(StrEnum):
    """Lifecycle state of a slot; the values are the lowercase names (``"dormant"`` …)."""

    DORMANT = "dormant"
    GERMINATED = "germinated"
    TRAINING = "training"
    INTEGRATED = "integrated"
    PRUNED = "pruned"
    EMBARGOED = "embargoed"


S = SlotState
#: The legal moves from each state.
ALLOWED: dict[SlotState, tuple[SlotState, ...]] = {
    S.DORMANT: (S.GERMINATED,), S.GERMINATED: (S.TRAINING,), S.TRAINING: (S.INTEGRATED, S.PRUNED),
    S.INTEGRATED: (), S.PRUNED: (S.EMBARGOED,), S.EMBARGOED: (S.DORMANT,),
}  # fmt: skip


class SlotTransitionError(ValueError):
    """An illegal slot transition (the message names the slot, its state, the allowed moves)."""


def _state(value: SlotState | str) -> SlotState:
    try:
        return SlotState(value)
    except ValueError:
        allowed = ", ".join(repr(s.value) for s in SlotState)
        raise ValueError(f"unknown slot state {value!r}; allowed: {allowed}") from None


@dataclass
class Slot:
    """One slot: where it reads (``anchor``), its state, and its engine bookkeeping.

    ``key`` is the engine slot (``after:<module>``) its module is attached at, ``since`` the
    step of its last transition, ``embargo_until`` the step its embargo ends, ``seq`` the
    attachment order (it orders the chain of slots sharing an anchor).
    """

    id: str
    depth: int | None = None
    parallel_idx: int | None = None
    anchor: str | None = None
    state: SlotState = SlotState.DORMANT
    key: str | None = None
    since: int = 0
    embargo_until: int | None = None
    seq: int = 0


class SlotTopology:
    """Grid slots ``r{row}c{col}`` plus layer slots ``after:<module>`` and functional names.

    Args:
        rows: grid depth (row ``r`` reads the output of ``anchors[r]``).
        cols: parallel slots per row.
        embargo_steps: steps a pruned slot stays embargoed before it is dormant again.
        names: functional names, ``{name: slot id}`` (an ``after:`` id is added if new).
        anchors: one module name per row (else :class:`SlottedNetwork` finds them).

    Example:
        >>> topo = SlotTopology(2, 2, embargo_steps=10, names={"residual_slot": "r1c0"})
        >>> topo.available_slots()
        ['r0c0', 'r0c1', 'r1c0', 'r1c1']
        >>> topo.transition("residual_slot", "germinated", step=3).state.value
        'germinated'
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        *,
        embargo_steps: int = 100,
        names: Mapping[str, str] | None = None,
        anchors: Sequence[str] | None = None,
    ) -> None:
        self.rows, self.cols = check_int("rows", rows, 0), check_int("cols", cols, 0)
        self.embargo_steps = check_int("embargo_steps", embargo_steps, 0)
        self.step = 0
        self._seq = 0
        self._slots = {
            f"r{r}c{c}": Slot(f"r{r}c{c}", depth=r, parallel_idx=c)
            for r in range(rows)
            for c in range(cols)
        }
        self._names: dict[str, str] = {}
        if names is not None and not isinstance(names, Mapping):
            raise TypeError(
                f"names must be a mapping {{functional name: slot id}} (e.g. "
                f"{{'head': 'r0c0'}} or {{'head': 'after:fc1'}}), got {type(names).__name__} "
                f"{names!r:.80}"
            )
        if anchors is not None:
            self.set_anchors(anchors)
        for name, slot_id in (names or {}).items():
            self.add_name(name, slot_id)

    def add_slot(self, slot_id: str, *, name: str | None = None) -> Slot:
        """Add the layer slot ``after:<module name>`` (optionally with a functional name)."""
        if not isinstance(slot_id, str) or not slot_id.startswith("after:") or slot_id == "after:":
            raise ValueError(f"a layer slot id is 'after:<module name>', got {slot_id!r}")
        if slot_id in self._slots:
            raise ValueError(f"slot '{slot_id}' already exists")
        if name is not None:
            self._check_name(name)  # before adding: a refused name leaves no slot behind
        self._slots[slot_id] = Slot(slot_id, anchor=slot_id.removeprefix("after:"))
        if name is not None:
            self.add_name(name, slot_id)
        return self._slots[slot_id]

    def _check_name(self, name: object) -> None:
        if not isinstance(name, str) or not name or name.startswith("after:") or name in self:
            raise ValueError(
                f"functional slot name {name!r} must be a non-empty string that is not a slot id "
                "or a name already in use"
            )

    def add_name(self, name: str, slot_id: str) -> None:
        """Make ``name`` a functional alias of ``slot_id`` (a new ``after:`` id is added)."""
        self._check_name(name)
        if isinstance(slot_id, str) and slot_id.startswith("after:") and slot_id not in self:
            self.add_slot(slot_id)
        if slot_id not in self:
            layer = isinstance(slot_id, str) and not re.fullmatch(r"r\d+c\d+", slot_id)
            hint = f"; did you mean 'after:{slot_id}'?" if layer else ""
            known = [*self._slots, *self._names]
            raise KeyError(
                f"functional name {name!r} names unknown slot {slot_id!r}: a slot id is a grid "
                f"id 'r<row>c<col>', a layer slot 'after:<module name>' or a functional name "
                f"(known: {known[:8]}{'...' if len(known) > 8 else ''}){hint}"
            )
        self._names[name] = self.resolve(slot_id)

    def set_anchors(self, anchors: Sequence[str]) -> None:
        """Set the module each grid row reads (one distinct name per row)."""
        anchors = list(anchors)
        if len(anchors) != self.rows or len(set(anchors)) != len(anchors):
            raise ValueError(f"anchors must be {self.rows} distinct module names, got {anchors}")
        if any(not isinstance(a, str) or not a for a in anchors):
            raise ValueError(f"anchors must be non-empty module names, got {anchors}")
        busy = [s.id for s in self._slots.values() if s.depth is not None and s.key is not None]
        if busy:
            raise ValueError(f"cannot move grid anchors while slots {busy} hold modules")
        for slot in self._slots.values():
            if slot.depth is not None:
                slot.anchor = anchors[slot.depth]

    def resolve(self, slot_id: str) -> str:
        """The slot id that ``slot_id`` (an id or a functional name) stands for."""
        if isinstance(slot_id, str) and slot_id in self._slots:
            return slot_id
        if isinstance(slot_id, str) and slot_id in self._names:
            return self._names[slot_id]
        raise KeyError(
            f"unknown slot {slot_id!r}; known slots: {list(self._slots)}, "
            f"names: {sorted(self._names)}"
        )

    def get_slot(self, slot_id: str) -> Slot:
        """The slot called ``slot_id`` (an id or a functional name)."""
        return self._slots[self.resolve(slot_id)]

    def __contains__(self, slot_id: object) -> bool:
        return slot_id in self._slots or slot_id in self._names

    def __iter__(self) -> Iterator[Slot]:
        return iter(list(self._slots.values()))

    def __len__(self) -> int:
        return len(self._slots)

    def slots_at_depth(self, depth: int) -> list[Slot]:
        """The grid slots of row ``depth``, by column."""
        if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth < self.rows:
            raise ValueError(f"depth {depth!r} is out of range; rows are 0..{self.rows - 1}")
        return [s for s in self._slots.values() if s.depth == depth]

    def states(self) -> dict[str, SlotState]:
        """``{slot id: state}`` for every slot."""
        return {sid: s.state for sid, s in self._slots.items()}

    def tick(self, step: int) -> list[str]:
        """Advance to ``step``; embargoed slots whose embargo ended become dormant (returned).

        The clock never goes back: a ``step`` before the topology's current :attr:`step` (its
        last tick or transition) is refused.

        Example:
            >>> topo = SlotTopology(1, 1); topo.tick(5)
            []
            >>> topo.tick(3)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: cannot tick the slot topology back to step 3: its last step is 5; ...
        """
        step = check_int("step", step, 0)
        if step < self.step:
            raise ValueError(
                f"cannot tick the slot topology back to step {step}: its last step is "
                f"{self.step}; steps must not decrease (tick(step) with step >= {self.step})"
            )
        self.step = step
        done = [s for s in self._slots.values() if s.state is S.EMBARGOED]
        done = [s for s in done if s.embargo_until is not None and s.embargo_until <= step]
        for slot in done:
            self.transition(slot.id, S.DORMANT, step)
        return [s.id for s in done]

    def available_slots(self, step: int | None = None) -> list[str]:
        """Dormant slots, after releasing expired embargoes (at ``step``, else the last tick)."""
        self.tick(self.step if step is None else step)
        return [sid for sid, s in self._slots.items() if s.state is S.DORMANT]

    def check(self, slot_id: str, state: SlotState | str, step: int | None = None) -> Slot:
        """Raise :class:`SlotTransitionError` unless ``slot_id`` may move to ``state`` now (a
        legal move, at a ``step`` not before the slot's last transition, not ending an embargo
        early)."""
        slot, target = self.get_slot(slot_id), _state(state)
        step = self.step if step is None else check_int("step", step, 0)
        allowed = ALLOWED[slot.state]
        if target not in allowed:
            moves = ", ".join(repr(s.value) for s in allowed) or "none (it is terminal)"
            raise SlotTransitionError(
                f"illegal transition of slot '{slot.id}' to '{target.value}': "
                f"slot '{slot.id}' is '{slot.state.value}'; allowed: {moves}"
            )
        if step < slot.since:
            raise SlotTransitionError(
                f"cannot move slot '{slot.id}' to '{target.value}' at step {step}: its last "
                f"transition was at step {slot.since}; steps must not decrease (give step >= "
                f"{slot.since})"
            )
        if target is S.DORMANT and slot.embargo_until is not None and step < slot.embargo_until:
            raise SlotTransitionError(
                f"slot '{slot.id}' is 'embargoed' until step {slot.embargo_until} (now step "
                f"{step}); it can become 'dormant' from step {slot.embargo_until}"
            )
        return slot

    def transition(self, slot_id: str, state: SlotState | str, step: int | None = None) -> Slot:
        """Move ``slot_id`` to ``state`` (a :class:`SlotState` or its value) at ``step``.

        Entering ``embargoed`` at step ``s`` starts an embargo that ends at
        ``s + embargo_steps``. A ``step`` before the slot's last transition (``slot.since``)
        is refused, so no move (an embargo included) is timed from the past. Returns the slot.

        Example:
            >>> topo = SlotTopology(1, 1)
            >>> topo.transition("r0c0", "germinated", step=4).since
            4
            >>> topo.transition("r0c0", "training", step=2)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            dynarch.slots.topology.SlotTransitionError: cannot move slot 'r0c0' to 'training' at \
step 2: its last transition was at step 4; ...
        """
        slot = self.check(slot_id, state, step)
        step = self.step if step is None else step
        slot.state, slot.since = _state(state), step
        self.step = max(self.step, step)
        if slot.state is S.EMBARGOED:
            slot.embargo_until = step + self.embargo_steps
        elif slot.state is S.DORMANT:
            slot.embargo_until = None
        return slot

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (slot states, embargo timers, names, anchors)."""
        slots = [{**asdict(s), "state": s.state.value} for s in self._slots.values()]
        return {
            "rows": self.rows, "cols": self.cols, "embargo_steps": self.embargo_steps,
            "step": self.step, "seq": self._seq, "names": dict(self._names), "slots": slots,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (of a topology with the same grid)."""
        keys = {"rows", "cols", "embargo_steps", "step", "seq", "names", "slots"}
        if not isinstance(state, dict) or set(state) != keys:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"slot topology state must have keys {sorted(keys)}, got {got}")
        if (state["rows"], state["cols"]) != (self.rows, self.cols):
            raise ValueError(
                f"state is for a {state['rows']}x{state['cols']} slot grid; "
                f"this topology is {self.rows}x{self.cols}"
            )
        known = {f.name for f in fields(Slot)}
        slots = {}
        for rec in state["slots"]:
            if not isinstance(rec, dict) or set(rec) != known:
                raise ValueError(f"slot record must have keys {sorted(known)}, got {rec!r:.80}")
            slots[rec["id"]] = Slot(**{**rec, "state": _state(rec["state"])})
        self.embargo_steps = check_int("embargo_steps", state["embargo_steps"], 0)
        self.step, self._seq = int(state["step"]), int(state["seq"])
        self._slots, self._names = slots, dict(state["names"])

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SlotTopology:
        """A topology rebuilt from :meth:`state_dict` output."""
        if not isinstance(state, dict) or "rows" not in state or "cols" not in state:
            raise ValueError(f"not a slot topology state: {state!r:.80}")
        topo = cls(state["rows"], state["cols"])
        topo.load_state_dict(state)
        return topo

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for s in self._slots.values():
            counts[s.state.value] = counts.get(s.state.value, 0) + 1
        return f"SlotTopology(rows={self.rows}, cols={self.cols}, states={counts})"


def topology_of(model: nn.Module) -> SlotTopology | None:
    """The slot topology registered on ``model`` (by :class:`SlottedNetwork` or a load)."""
    topo = model.__dict__.get(_ATTR)
    return topo if isinstance(topo, SlotTopology) else None


def register_topology(model: nn.Module, topology: SlotTopology) -> None:
    """Register ``topology`` on ``model`` so checkpoints save and restore its states.

    Example:
        >>> m = nn.Linear(2, 2); register_topology(m, SlotTopology(1, 1))
        >>> topology_of(m).rows
        1
    """
    if not isinstance(topology, SlotTopology):
        raise TypeError(f"topology must be a SlotTopology, got {type(topology).__name__}")
    model.__dict__[_ATTR] = topology  # not a submodule, parameter or buffer
