"""GrowAsNeeded: trigger → growth action → cooldown, within a budget, outside embargoes.

>>> from dynarch.triggers import Plateau
>>> grow = GrowAsNeeded(Plateau(patience=2), "widen", layers=["fc1"], amount=8, cooldown=1)
>>> grow.reason
'plateau(val_loss)'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from ..callbacks import Callback, _monitored, training_done
from ..events import Event
from ..remap import out_units
from ..triggers import AnyOf, CreditEconomy, Trigger, check_state
from ._grow_checks import _check_budget, _check_embargo, _check_fit, _check_planned, _trigger
from .actions import Action, as_action
from .embargo import Embargo
from .pricing import fits, price

if TYPE_CHECKING:
    from ..train import Trainer

__all__ = ["GrowAsNeeded", "economies_in", "grow_once"]


def economies_in(*sources: object) -> list[CreditEconomy]:
    """The :class:`~dynarch.triggers.CreditEconomy` objects among ``sources``, looking
    inside composite triggers (``all_of``/``any_of``, recursively); each once, in order.

    Example:
        >>> from dynarch.triggers import Plateau, all_of, any_of
        >>> economy = CreditEconomy()
        >>> economies_in(all_of(Plateau(), any_of(Plateau(), economy)), economy) == [economy]
        True
    """
    found: list[CreditEconomy] = []
    stack = list(reversed(sources))
    while stack:
        item = stack.pop()
        if isinstance(item, CreditEconomy):
            if all(item is not e for e in found):
                found.append(item)
        elif isinstance(children := getattr(item, "triggers", None), list):
            stack.extend(reversed(children))
    return found


def _footprint(model: nn.Module) -> tuple[int, int]:
    """``(active Linear/Conv2d weights, units of every Linear/Conv2d)`` of ``model``."""
    from ..growth.candidates import active_params  # lazy: dynarch.growth imports schedules

    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return active_params(model)[1], sum(out_units(m) for m in layers)


def _priced_units(economy: CreditEconomy, units: int) -> int:
    """Units an economy charges: none when it prices a unit by its connections (as in
    :class:`~dynarch.growth.Tournament`)."""
    return units if economy.cost_per_unit is not None else 0


def grow_once(
    trainer: Trainer,
    action: Action,
    reason: str,
    *,
    budget: Any = None,
    embargo: Embargo | None = None,
    hint: Sequence[str] | None = None,
    economies: Sequence[CreditEconomy] = (),
) -> tuple[list[Event], dict[str, Any]]:
    """Apply ``action`` where it may grow now; returns its events and a plain-data record
    ``{"step", "reason", "grown", "embargoed", "over_budget", "unaffordable", "paid",
    "events"}``.

    Targets are considered in the action's order: an embargoed one (any place it touches
    blocked at ``trainer.step``) is skipped, then each remaining one is kept only if
    ``budget.can_grow(model, cost so far + its cost)`` (a budget with ``max_flops`` also gets
    ``flops=`` the multiply-adds so far plus its own: each weight the action adds to a layer,
    :meth:`~Action.weights_added`, times the positions ``budget.positions(model)`` says the
    layer is applied at, exact for widen; a ``count_masked=True`` budget is charged every new
    weight position, active or not) and every economy (``economies``, and
    ``budget`` itself when it is a :class:`~dynarch.triggers.CreditEconomy`) can afford the
    connections and units so far plus its :meth:`~Action.adds`. After the action each
    economy is charged the *actual* growth, measured on the model (active Linear/Conv2d
    weights and Linear/Conv2d units after minus before; units only when the economy has a
    ``cost_per_unit``), even past its balance (``spend(..., overdraft=True)``) when the
    estimate was low; ``"paid"`` lists the credits each economy paid. Unplanned actions are
    just called (they cannot be used with an economy).

    Example:
        >>> import torch
        >>> from dynarch.models import mlp
        >>> from dynarch.train import Trainer
        >>> model = mlp(4, [8], 2)
        >>> data = (torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
        >>> t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, progress=False)
        >>> events, record = grow_once(t, as_action("demo", "widen", {"amount": 2}), "manual")
        >>> record["grown"], model.fc1.out_features
        (['fc1'], 10)
    """
    model = trainer.model
    if isinstance(budget, CreditEconomy):
        budget, economies = None, economies_in(*economies, budget)
    record: dict[str, Any] = {"step": trainer.step, "reason": reason, "grown": []}
    record |= {"embargoed": [], "over_budget": [], "unaffordable": [], "paid": [], "events": 0}
    if not action.planned:
        if economies:
            raise ValueError(
                "grow_once: a credit economy needs an action that names its targets and cost "
                "(a dynarch.schedules.Action such as 'widen'); a plain function cannot be priced"
            )
        done = action.apply(trainer, [], reason)
        record["events"] = len(done)
        return done, record
    # A sequential action (widen) grows one target at a time, each priced on the model the
    # targets before it left (widening fc1 adds inputs to fc2, so fc2's widening then costs
    # more); any other is priced on the model as it is and applied to all chosen at once.
    sequential = bool(getattr(action, "sequential", False))
    chosen: list[str] = []
    events: list[Event] = []
    total = total_flops = connections = units = 0  # priced, not yet applied (batch actions)
    grown_c = grown_u = 0  # applied this round (sequential actions)
    for target in action.targets(model, hint):
        places = action.places(model, target)
        if embargo is not None and not all(embargo.allowed(p) for p in places):  # engine step
            record["embargoed"].append(target)
            continue
        if budget is not None:
            cost, flops = price(action, model, target, budget)
            if not fits(budget, model, total + cost, total_flops + flops):
                record["over_budget"].append(target)
                continue
        if economies:
            c, u = action.adds(model, target)
            c, u = c + connections + grown_c, u + units + grown_u
            if not all(e.can_afford(c, _priced_units(e, u)) for e in economies):
                record["unaffordable"].append(target)
                continue
        chosen.append(target)
        if not sequential:
            if budget is not None:
                total, total_flops = total + cost, total_flops + flops
            if economies:
                connections, units = c - grown_c, u - grown_u
            continue
        before = _footprint(model) if economies else (0, 0)
        events += action.apply(trainer, [target], reason)
        if economies:
            after = _footprint(model)
            grown_c += max(after[0] - before[0], 0)
            grown_u += max(after[1] - before[1], 0)
    if chosen and not sequential:
        before = _footprint(model) if economies else (0, 0)
        events = action.apply(trainer, chosen, reason)
        if economies:
            after = _footprint(model)
            grown_c, grown_u = max(after[0] - before[0], 0), max(after[1] - before[1], 0)
    if events and economies:
        record["paid"] = [
            e.spend(grown_c, _priced_units(e, grown_u), overdraft=True) for e in economies
        ]
    record["grown"], record["events"] = chosen, len(events)
    return events, record


def _trigger_label(trigger: Trigger, fired: bool = False) -> str:
    """A trigger's registered name, else its class name in lower case; with ``fired``, an
    ``any_of`` names in brackets the children whose last answer was True (``any_of[every]``,
    nested ones alike), so the reason says which one caused the growth.

    Example:
        >>> from dynarch.triggers import Every, Plateau, any_of
        >>> either = any_of(Plateau(patience=5), Every(1))
        >>> either.update(1.0), _trigger_label(either), _trigger_label(either, fired=True)
        (True, 'any_of', 'any_of[every]')
    """
    label = trigger.name or type(trigger).__name__.lower()
    if fired and isinstance(trigger, AnyOf) and (children := trigger.fired()):
        label += "[" + ", ".join(_trigger_label(c, fired=True) for c in children) + "]"
    return label


class GrowAsNeeded(Callback):
    """Grow when a trigger fires: trigger → growth action → cooldown.

    At each evaluation ``metrics[monitor]`` is fed to ``trigger``. When it fires, no
    cooldown is running and fewer than ``max_growths`` growths happened, :meth:`grow` runs
    ``action`` (see :func:`grow_once`: embargoed targets and targets over ``budget`` are
    skipped). If it changed anything, the trigger is reset and a cooldown of ``cooldown``
    **evaluations** starts, during which the trigger is neither fed nor consulted (what it
    observed on its own meanwhile, e.g. a ``GradientVarianceSpike``'s spikes, is dropped at
    each of those evaluations: :meth:`~dynarch.triggers.Trigger.discard_pending`). If nothing
    could be grown (all embargoed, over budget, nothing to do) the trigger is not reset, so
    growth is retried at the next evaluation. Every attempt is logged in :attr:`attempts`.

    ``action`` is an :class:`~dynarch.schedules.Action`, a registered action name with its
    keyword arguments (``"widen", layers=["fc1"], amount=8`` or ``factor=1.5``, ``init=``), a
    mapping ``{"name": "widen", ...}``, or a function ``fn(trainer)`` / ``fn(trainer,
    reason=...)`` returning an Event, a list of Events or None (no budget/embargo then).
    Events carry the reason :attr:`reason`, e.g. ``"plateau(val_loss)"`` (prefixed by
    ``tag + ":"`` when ``tag`` is set; an ``any_of`` names the children that fired, as in
    ``"any_of[every](val_loss)"``). When the trigger has a ``where()`` method, its
    answer is passed to the action as a hint (``WidenAction(layers=None)`` grows there).

    **Credits.** A :class:`~dynarch.triggers.CreditEconomy` among the triggers (also inside
    ``all_of``/``any_of``, e.g. ``all_of(Plateau(patience=3), economy)``) or given as
    ``budget`` makes growth paid for: a target is grown only when every such economy can
    afford it (the action's estimate :meth:`~dynarch.schedules.Action.adds`: new connections
    and units), and after growing each economy is charged the **price** of what was actually
    added, ``connections × cost_per_connection + units × cost_per_unit``, where
    ``connections`` are the active Linear/Conv2d weights the growth added (a widen's new
    weights; a patch's newly active mask positions) and ``units`` the units it added
    (charged only when ``cost_per_unit`` is set; otherwise a unit costs its connections, as in
    :class:`~dynarch.growth.Tournament`). Biases and norm entries are free. Unaffordable
    targets are listed under ``"unaffordable"`` in :attr:`attempts` and, if nothing else could
    grow, nothing happens: no cooldown, no reset, a retry at the next evaluation. An economy
    passed as ``budget`` is saved in :meth:`state_dict` (one inside the trigger is saved with
    the trigger); pair it with ``economy.callback()`` so it earns.

    Example:
        >>> from dynarch.triggers import Plateau
        >>> grow = GrowAsNeeded(Plateau(patience=3), "widen", layers=["fc1"], factor=2.0,
        ...                     cooldown=2, max_growths=4)
        >>> grow.growths, grow.cooldown_left
        (0, 0)
    """

    def __init__(
        self,
        trigger: Trigger | str | Mapping[str, Any],
        action: Action | str | Mapping[str, Any] | Any,
        *,
        monitor: str = "val_loss",
        cooldown: int = 0,
        budget: Any = None,
        embargo: Embargo | None = None,
        max_growths: int | None = None,
        tag: str = "",
        **action_kwargs: Any,
    ) -> None:
        owner = "GrowAsNeeded"
        self.trigger = _trigger(trigger)
        self.action = as_action(owner, action, action_kwargs)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                f"{owner}: monitor must be a metric name such as 'val_loss', got {monitor!r}"
            )
        if not isinstance(cooldown, int) or isinstance(cooldown, bool) or cooldown < 0:
            raise ValueError(
                f"{owner}: cooldown must be an int >= 0 (evaluations), got {cooldown!r}"
            )
        if max_growths is not None and (
            not isinstance(max_growths, int) or isinstance(max_growths, bool) or max_growths < 1
        ):
            raise ValueError(
                f"{owner}: max_growths must be None or an int >= 1, got {max_growths!r}"
            )
        if not isinstance(tag, str):
            raise TypeError(f"{owner}: tag must be a str, got {tag!r}")
        _check_budget(owner, budget, economy=True)
        _check_embargo(owner, embargo)
        self.economies = economies_in(self.trigger, budget)
        """The credit economies that pay for growth (trigger's first, then ``budget``)."""
        _check_planned(owner, self.action, budget, embargo, bool(self.economies))
        self.monitor = monitor
        self.cooldown = cooldown
        self.budget = budget
        self.embargo = embargo
        self.max_growths = max_growths
        self.tag = tag
        self.growths = 0
        self.cooldown_left = 0
        self.attempts: list[dict[str, Any]] = []
        self.events: list[Event] = []
        """Events of this run (not checkpointed: the model's history holds them all)."""

    @property
    def reason(self) -> str:
        """The reason given to growth events, e.g. ``"plateau(val_loss)"`` (an ``any_of``
        trigger's growth names the children that fired: ``"any_of[every](val_loss)"``)."""
        return self._reason()

    def _reason(self, fired: bool = False) -> str:
        base = f"{_trigger_label(self.trigger, fired)}({self.monitor})"
        return f"{self.tag}:{base}" if self.tag else base

    def on_fit_start(self, trainer: Trainer) -> None:
        """Fail before training, not at the first trigger: eval data, embargo, action."""
        if trainer.eval_data is None:
            raise ValueError(
                f"GrowAsNeeded monitors {self.monitor!r} at evaluations but the trainer has no "
                "eval data; pass eval=(x, y) to the Trainer"
            )
        _check_fit("GrowAsNeeded", trainer, self.action, self.embargo)

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Feed the trigger; grow when it fires outside a cooldown."""
        value = _monitored("GrowAsNeeded", self.monitor, metrics)
        if self.max_growths is not None and self.growths >= self.max_growths:
            return
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.trigger.discard_pending()  # what it observed meanwhile is not answered for
            return
        if self.trigger.update(value) and not training_done(trainer):
            self.grow(trainer)  # never after the last step: nothing would train the growth

    def grow(self, trainer: Trainer) -> list[Event]:
        """Run the action now (whatever the trigger says); returns the events (may be empty)."""
        where = getattr(self.trigger, "where", None)
        hint = where() if callable(where) else None
        budget = None if isinstance(self.budget, CreditEconomy) else self.budget
        events, record = grow_once(
            trainer, self.action, self._reason(fired=True), budget=budget, embargo=self.embargo,
            hint=hint,
            economies=self.economies,
        )  # fmt: skip
        self.attempts.append(record)
        if events:
            self.growths += 1
            self.cooldown_left = self.cooldown
            self.trigger.reset()
            self.events.extend(events)
        return events

    def state_dict(self) -> dict[str, Any]:
        """Trigger, counters, attempts, action, embargo and economy (a
        :class:`~dynarch.triggers.CreditEconomy` passed as ``budget``) states (plain data)."""
        economy = self.budget if isinstance(self.budget, CreditEconomy) else None
        return {
            "trigger": self.trigger.state_dict(),
            "action": self.action.state_dict(),
            "growths": self.growths,
            "cooldown_left": self.cooldown_left,
            "attempts": [dict(a) for a in self.attempts],
            "embargo": None if self.embargo is None else self.embargo.state_dict(),
            "economy": None if economy is None else economy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (a state saved before ``"economy"`` existed
        loads as one without an economy budget)."""
        keys = {"trigger", "action", "growths", "cooldown_left", "attempts", "embargo"}
        if isinstance(state, dict) and "economy" not in state and set(state) == keys:
            state = {**state, "economy": None}
        check_state("GrowAsNeeded", state, keys | {"economy"})
        economy = self.budget if isinstance(self.budget, CreditEconomy) else None
        for name, mine, what in (
            ("embargo", self.embargo, "embargo"),
            ("economy", economy, "credit economy as budget"),
        ):
            if (state[name] is None) != (mine is None):
                have = "has no" if mine is None else "has an" if name == "embargo" else "has a"
                raise ValueError(
                    f"GrowAsNeeded: the saved state and this schedule disagree on the {name} "
                    f"(this one {have} {what}); build it with the same arguments"
                )
        if economy is not None:
            economy.load_state_dict(state["economy"])
        self.trigger.load_state_dict(state["trigger"])
        self.action.load_state_dict(state["action"])
        self.growths = int(state["growths"])
        self.cooldown_left = int(state["cooldown_left"])
        self.attempts = [dict(a) for a in state["attempts"]]
        if self.embargo is not None:
            self.embargo.load_state_dict(state["embargo"])
