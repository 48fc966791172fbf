"""GrowPruneCycle: alternate grow, prune and stabilise phases by step.

>>> cycle = GrowPruneCycle(3, 2, 1, grow="widen", prune=None)
>>> [cycle.phase(t) for t in range(1, 8)]
['grow', 'grow', 'grow', 'prune', 'prune', 'stabilise', 'grow']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..callbacks import Callback
from ..events import Event
from ..triggers import check_state
from .actions import Action, as_action
from .embargo import Embargo
from .grow import GrowAsNeeded, _check_budget, _check_embargo, _check_fit, _check_planned, grow_once

if TYPE_CHECKING:
    from ..train import Trainer

__all__ = ["PHASES", "GrowPruneCycle"]

PHASES = ("grow", "prune", "stabilise")
_OWNER = "GrowPruneCycle"


def _steps(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{_OWNER}: {name} must be an int >= 0, got {value!r}")
    return value


class GrowPruneCycle(Callback):
    """Cycles of ``grow_steps`` grow, ``prune_steps`` prune and ``stabilise_steps`` stabilise
    steps; step ``t`` (counting from 1) is at position ``(t - 1) % cycle_length`` of its cycle.

    ``grow`` and ``prune`` are each ``None`` (the phase does nothing), an action (an
    :class:`~dynarch.schedules.Action`, a registered name, a mapping ``{"name": ..., ...}``
    or a function of the trainer, as for :class:`~dynarch.schedules.GrowAsNeeded`), or a
    :class:`~dynarch.callbacks.Callback` acting on its own trigger (e.g. a ``GrowAsNeeded``).
    An action acts after the first step of its phase and every ``every`` steps after that
    within the phase (``every=None``: once per phase). A callback gets its hooks only while
    its phase runs (``on_fit_start``/``on_fit_end`` always); a ``GrowAsNeeded`` without a
    ``tag`` is tagged ``"grow-prune-cycle:grow"``. During ``"stabilise"`` nothing changes.
    Events of scheduled actions have the reason ``"grow-prune-cycle:<phase>"``. ``budget``
    and ``embargo`` check the grow action (see :func:`~dynarch.schedules.grow_once`).

    Example:
        >>> cycle = GrowPruneCycle(4, 2, 2, grow={"name": "widen", "amount": 2},
        ...                        prune={"name": "magnitude_prune", "sparsity": 0.5}, every=2)
        >>> [t for t in range(1, 17) if cycle.acts_at(t)]
        [1, 3, 5, 9, 11, 13]
    """

    def __init__(
        self,
        grow_steps: int,
        prune_steps: int,
        stabilise_steps: int,
        *,
        grow: Any,
        prune: Any,
        every: int | None = None,
        budget: Any = None,
        embargo: Embargo | None = None,
    ) -> None:
        self.lengths = (
            _steps("grow_steps", grow_steps),
            _steps("prune_steps", prune_steps),
            _steps("stabilise_steps", stabilise_steps),
        )
        if sum(self.lengths) == 0:
            raise ValueError(f"{_OWNER}: the phases are all empty; give some phase >= 1 step")
        if every is not None and (
            not isinstance(every, int) or isinstance(every, bool) or every < 1
        ):
            raise ValueError(
                f"{_OWNER}: every must be None (once per phase) or an int >= 1, got {every!r}"
            )
        _check_budget(_OWNER, budget)
        _check_embargo(_OWNER, embargo)
        self.every = every
        self.budget = budget
        self.embargo = embargo
        self.grow = self._part("grow", grow)
        self.prune = self._part("prune", prune)
        if isinstance(self.grow, Callback) and (budget is not None or embargo is not None):
            raise ValueError(
                f"{_OWNER}: budget and embargo apply to a grow action; give them to the grow "
                f"callback ({type(self.grow).__name__}) instead"
            )
        if isinstance(self.grow, Action):
            _check_planned(_OWNER, self.grow, budget, embargo)
        elif self.grow is None and (budget is not None or embargo is not None):
            raise ValueError(f"{_OWNER}: budget and embargo need a grow action, got grow=None")
        if isinstance(self.grow, GrowAsNeeded) and not self.grow.tag:
            self.grow.tag = "grow-prune-cycle:grow"
        self.attempts: list[dict[str, Any]] = []
        self.events: list[Event] = []
        """Events of this run (not checkpointed: the model's history holds them all)."""

    @staticmethod
    def _part(phase: str, spec: object) -> Action | Callback | None:
        if spec is None or isinstance(spec, Callback):
            return spec
        return as_action(f"{_OWNER} {phase}", spec)

    @property
    def cycle_length(self) -> int:
        """Steps per grow → prune → stabilise cycle."""
        return sum(self.lengths)

    def _position(self, step: object) -> tuple[str, int]:
        """The phase of ``step`` and the step's offset inside that phase."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(
                f"{_OWNER}: step must be an int >= 1 (steps count from 1), got {step!r}"
            )
        pos = (step - 1) % self.cycle_length
        for phase, length in zip(PHASES, self.lengths):
            if pos < length:
                return phase, pos
            pos -= length
        raise AssertionError("unreachable: pos < cycle_length")

    def phase(self, step: int) -> str:
        """``"grow"``, ``"prune"`` or ``"stabilise"``: the phase of step number ``step``."""
        return self._position(step)[0]

    def acts_at(self, step: int) -> bool:
        """Whether a scheduled grow/prune action acts after step ``step``."""
        phase, offset = self._position(step)
        if phase == "stabilise" or not isinstance(self._for(phase), Action):
            return False
        return offset == 0 if self.every is None else offset % self.every == 0

    def _for(self, phase: str) -> Action | Callback | None:
        return {"grow": self.grow, "prune": self.prune}.get(phase)

    def _forward(self, hook: str, step: int, trainer: Trainer, *args: Any) -> None:
        part = self._for(self.phase(max(step, 1)))
        if isinstance(part, Callback):
            getattr(part, hook)(trainer, *args)

    def on_fit_start(self, trainer: Trainer) -> None:
        """Check the grow and prune parts against the trainer before training."""
        for part in (self.grow, self.prune):
            if isinstance(part, Callback):
                part.on_fit_start(trainer)
        if isinstance(self.grow, Action):
            _check_fit(_OWNER, trainer, self.grow, self.embargo)
        if isinstance(self.prune, Action):
            self.prune.check(trainer.model)

    def on_epoch_start(self, trainer: Trainer) -> None:
        self._forward("on_epoch_start", trainer.step + 1, trainer)

    def on_after_backward(self, trainer: Trainer) -> None:
        self._forward("on_after_backward", trainer.step + 1, trainer)

    def on_step_end(self, trainer: Trainer) -> None:
        """Forward to the phase's callback; run the phase's action when due."""
        self._forward("on_step_end", trainer.step, trainer)
        if self.acts_at(trainer.step):
            self.act(trainer)

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._forward("on_evaluate", trainer.step, trainer, metrics)

    def on_epoch_end(self, trainer: Trainer) -> None:
        self._forward("on_epoch_end", trainer.step, trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        for part in (self.grow, self.prune):
            if isinstance(part, Callback):
                part.on_fit_end(trainer)

    def act(self, trainer: Trainer) -> list[Event]:
        """Run the action of the current step's phase now; returns its events."""
        phase = self.phase(max(trainer.step, 1))
        part = self._for(phase)
        if not isinstance(part, Action):
            return []
        reason = f"grow-prune-cycle:{phase}"
        if phase == "grow":
            events, record = grow_once(
                trainer, part, reason, budget=self.budget, embargo=self.embargo
            )
        else:
            targets = part.targets(trainer.model) if part.planned else []
            events = part.apply(trainer, targets, reason) if targets or not part.planned else []
            record = {"step": trainer.step, "reason": reason, "pruned": targets}
            record["events"] = len(events)
        record["phase"] = phase
        self.attempts.append(record)
        self.events.extend(events)
        return events

    def state_dict(self) -> dict[str, Any]:
        """States of the grow and prune parts, the attempts and the embargo (plain data)."""
        return {
            "grow": None if self.grow is None else self.grow.state_dict(),
            "prune": None if self.prune is None else self.prune.state_dict(),
            "attempts": [dict(a) for a in self.attempts],
            "embargo": None if self.embargo is None else self.embargo.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        check_state(_OWNER, state, {"grow", "prune", "attempts", "embargo"})
        for name, part in (("grow", self.grow), ("prune", self.prune), ("embargo", self.embargo)):
            if (state[name] is None) != (part is None):
                raise ValueError(
                    f"{_OWNER}: the saved state and this cycle disagree on {name!r} (saved: "
                    f"{'none' if state[name] is None else 'present'}); build it with the same "
                    "arguments"
                )
        if self.grow is not None:
            self.grow.load_state_dict(state["grow"])
        if self.prune is not None:
            self.prune.load_state_dict(state["prune"])
        if self.embargo is not None:
            self.embargo.load_state_dict(state["embargo"])
        self.attempts = [dict(a) for a in state["attempts"]]
