"""Capacity schedules: when a network grows and shrinks, as training-loop callbacks.

* :class:`GrowAsNeeded` — trigger → growth action → cooldown (within a budget, outside
  embargoes, paid for by a :class:`~dynarch.triggers.CreditEconomy` among its triggers);
* :class:`OverparameterizeThenPrune` — train dense / prune gradually / fine-tune
  (from :mod:`dynarch.prune.schedules`);
* :class:`GrowPruneCycle` — grow / prune / stabilise phases by step;
* :class:`Embargo` — a place that was just pruned cannot grow again for N steps.

What a schedule does when it acts is an :class:`Action` (registered by name in
:data:`ACTIONS`: ``"widen"``, ``"magnitude_prune"``, ``"structured_prune"``) or a plain
function of the trainer. Every state is plain data, so a resumed run behaves identically::

    >>> from dynarch.triggers import Plateau
    >>> from dynarch.models import mlp
    >>> model = mlp(8, [16], 3)
    >>> embargo = Embargo(model, steps=50)
    >>> grow = GrowAsNeeded(Plateau(patience=2), "widen", layers=["fc1"], amount=8,
    ...                     cooldown=1, embargo=embargo)
    >>> sorted(grow.state_dict())
    ['action', 'attempts', 'cooldown_left', 'economy', 'embargo', 'growths', 'trigger']
"""

from __future__ import annotations

from ..prune.schedules import PHASES as OTP_PHASES
from ..prune.schedules import OverparameterizeThenPrune
from .actions import ACTIONS, Action, FunctionAction, as_action, make_action, register_action
from .builtin import MagnitudePruneAction, StructuredPruneAction, WidenAction, widen_cost
from .cycle import PHASES, GrowPruneCycle
from .embargo import EMBARGO_OPS, Embargo, event_places
from .grow import GrowAsNeeded, economies_in, grow_once

__all__ = [
    "ACTIONS", "EMBARGO_OPS", "OTP_PHASES", "PHASES", "Action", "Embargo", "FunctionAction",
    "GrowAsNeeded", "GrowPruneCycle", "MagnitudePruneAction", "OverparameterizeThenPrune",
    "StructuredPruneAction", "WidenAction", "as_action", "economies_in", "event_places",
    "grow_once", "make_action", "register_action", "widen_cost",
]  # fmt: skip
