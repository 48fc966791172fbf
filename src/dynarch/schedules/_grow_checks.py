"""Argument checks of the grow schedules (one wording each): the budget, the embargo, the
action they need and the fit-start checks, shared by :class:`~dynarch.schedules.GrowAsNeeded`
and :class:`~dynarch.schedules.GrowPruneCycle`, and the trigger specification of
:class:`~dynarch.schedules.GrowAsNeeded`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..triggers import CreditEconomy, Trigger, make_trigger
from .actions import Action, prices_layers
from .embargo import Embargo
from .pricing import counts_dense, counts_flops

if TYPE_CHECKING:
    from ..train import Trainer

__all__: list[str] = []


def _check_budget(owner: str, budget: object, *, economy: bool = False) -> None:
    """Raise unless ``budget`` is None or has a callable ``can_grow(model, n_params)`` (or,
    with ``economy``, is a :class:`~dynarch.triggers.CreditEconomy`)."""
    if economy and isinstance(budget, CreditEconomy):
        return
    if budget is not None and not callable(getattr(budget, "can_grow", None)):
        also = " or be a dynarch.triggers.CreditEconomy" if economy else ""
        raise TypeError(
            f"{owner}: budget must have a method can_grow(model, n_params) -> bool "
            f"(e.g. dynarch.triggers.Budget){also}, got {type(budget).__name__}"
        )
    if counts_flops(budget) and not callable(getattr(budget, "positions", None)):
        raise TypeError(
            f"{owner}: a budget with max_flops must have a method positions(model) -> "
            "{layer: positions} to price growth in multiply-adds (e.g. dynarch.triggers.Budget), "
            f"got {type(budget).__name__}"
        )


def _check_embargo(owner: str, embargo: object) -> None:
    """Raise unless ``embargo`` is None or an :class:`Embargo`."""
    if embargo is not None and not isinstance(embargo, Embargo):
        raise TypeError(
            f"{owner}: embargo must be a dynarch.schedules.Embargo, got {type(embargo).__name__}"
        )


def _check_planned(
    owner: str, action: Action, budget: object, embargo: object, economy: bool = False
) -> None:
    """A budget, an embargo or a credit economy needs an action that names its targets and
    cost."""
    checks = (("budget", budget), ("embargo", embargo), ("a credit economy", economy or None))
    used = [name for name, v in checks if v is not None]
    if used and not action.planned:
        raise ValueError(
            f"{owner}: {' and '.join(used)} need{'s' if len(used) == 1 else ''} an action that "
            "names its targets and cost (a dynarch.schedules.Action such as 'widen'); a plain "
            "function cannot be checked"
        )
    kinds = [
        kind
        for kind, used in (
            ("a FLOP budget (max_flops)", counts_flops(budget)),
            ("a dense budget (count_masked=True)", counts_dense(budget)),
        )
        if used
    ]
    if kinds and not prices_layers(action):
        raise ValueError(
            f"{owner}: {' and '.join(kinds)} needs an action that says which layers it grows "
            f"(Action.weights_added, as 'widen' and 'patches' do); {type(action).__name__} "
            "only prices parameters"
        )


def _check_fit(owner: str, trainer: Trainer, action: Action, embargo: Embargo | None) -> None:
    """Checks run at fit start: the embargo watches this model; the action fits it."""
    if embargo is not None and embargo.model is not trainer.model:
        raise ValueError(
            f"{owner}: the embargo listens to a different model than the trainer's; "
            "build it with Embargo(trainer.model, ...)"
        )
    action.check(trainer.model)


def _trigger(spec: object) -> Trigger:
    if isinstance(spec, Trigger):
        return spec
    if isinstance(spec, str):
        return make_trigger(spec)
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        return make_trigger(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    raise TypeError(
        "GrowAsNeeded: trigger must be a dynarch.triggers.Trigger (e.g. Plateau(patience=2)), "
        f"a registered trigger name or a mapping with 'name'; got {spec!r}"
    )
