"""``CreditEconomy``: growth must be paid for with credits earned by correct predictions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._validate import check_int
from .base import Trigger, check_number, check_state, register_trigger

if TYPE_CHECKING:
    from ..callbacks import Callback

__all__ = ["CreditEconomy"]


def _count(correct: object) -> int:
    """Number of correct predictions in an int count or a bool/integer tensor (one sync)."""
    if isinstance(correct, int) and not isinstance(correct, bool) and correct >= 0:
        return correct
    if isinstance(correct, float) and correct.is_integer() and correct >= 0:
        return int(correct)
    if isinstance(correct, Tensor) and not (correct.is_floating_point() or correct.is_complex()):
        if correct.dtype == torch.bool:
            return int(correct.count_nonzero())
        if correct.numel() == 0:
            return 0
        total, low = torch.stack([correct.sum(), correct.min().to(torch.int64)]).tolist()
        if low >= 0:
            return int(total)
        shown = f"an integer tensor with negative entries (min {low})"
    elif isinstance(correct, Tensor):
        shown = f"a {correct.dtype} tensor"
    else:
        shown = repr(correct)
    raise ValueError(
        "the number correct must be a whole number >= 0 or a bool/integer tensor of per-sample "
        f"correctness (its sum is the count), got {shown}"
    )


@register_trigger("credit_economy")
class CreditEconomy(Trigger):
    """Credits earned per correct prediction, spent per added connection or unit.

    ``earn(correct)`` adds ``earn_per_correct`` per correct prediction (the balance never
    exceeds ``cap``); ``spend(connections, units)`` pays ``connections * cost_per_connection +
    units * cost_per_unit`` or refuses (nothing spent) when the balance is short. Growth code
    asks ``can_afford`` first and spends when it grows.

    **Units.** With ``cost_per_unit=None`` (the default) a unit has no price of its own: it
    costs as many credits as its connections, so pass ``connections=<the unit's fan-in +
    fan-out>`` and ``units=0``; asking for ``units`` then raises. Give ``cost_per_unit`` to
    price units separately (their connections are then not charged unless passed too).

    **As a trigger.** ``update(value)`` earns ``value`` (a number correct: an int or a
    bool/integer tensor; ``None`` for nothing) and answers whether the cheapest purchase, one
    connection, is affordable. A float ``value`` is a metric, not a count (a schedule such as
    :class:`~dynarch.schedules.GrowAsNeeded` or a composite ``all_of(Plateau(...), economy)``
    feeds the validation loss to every trigger): it earns nothing, so compose the economy
    with metric triggers and let ``economy.callback()`` earn from the training batches.
    ``reset()`` keeps the ledger: credits are an account, not a detection window, so a
    schedule that resets its triggers after growing does not refund or wipe them.

    **In the Trainer.** ``callbacks=[economy.callback()]`` earns from every training batch's
    predictions (``trainer.last_output.argmax(1) == trainer.last_target``) in
    ``on_step_end``; that callback's state is the economy's.

    Example:
        >>> economy = CreditEconomy(earn_per_correct=0.5, cost_per_connection=2.0)
        >>> economy.earn(torch.tensor([True, False, True, True]))
        1.5
        >>> economy.can_afford(connections=1), economy.update(1), economy.balance
        (False, True, 2.0)
        >>> economy.spend(connections=1), economy.balance
        (2.0, 0.0)
    """

    def __init__(
        self,
        *,
        earn_per_correct: float = 1.0,
        cost_per_connection: float = 1.0,
        cost_per_unit: float | None = None,
        initial: float = 0.0,
        cap: float | None = None,
    ) -> None:
        self.earn_per_correct = check_number("earn_per_correct", earn_per_correct, low=0)
        self.cost_per_connection = check_number(
            "cost_per_connection", cost_per_connection, low=0, strict=True
        )
        self.cost_per_unit = (
            None
            if cost_per_unit is None
            else check_number("cost_per_unit", cost_per_unit, low=0, strict=True)
        )
        self.initial = check_number("initial", initial, low=0)
        self.cap = None if cap is None else check_number("cap", cap, low=0)
        if self.cap is not None and self.initial > self.cap:
            raise ValueError(f"initial ({initial!r}) must not exceed cap ({cap!r})")
        self._balance = self.initial
        self.earned = 0.0
        self.spent = 0.0

    @property
    def balance(self) -> float:
        """Credits available now (``initial + earned - spent``)."""
        return self._balance

    def earn(self, correct: float | Tensor) -> float:
        """Credit ``correct`` correct predictions; returns the credits actually added (capped).

        ``correct`` is a count (an int, or a whole float such as ``3.0``), a bool tensor of
        per-sample correctness, or an integer tensor whose sum is the count.

        Example:
            >>> CreditEconomy(earn_per_correct=2.0, cap=5.0).earn(3)
            5.0
        """
        credits = self.earn_per_correct * _count(correct)
        if self.cap is not None:
            credits = max(0.0, min(credits, self.cap - self._balance))
        self._balance += credits
        self.earned += credits
        return credits

    def cost(self, connections: int = 0, units: int = 0) -> float:
        """Price of ``connections`` new connections plus ``units`` new units.

        Example:
            >>> CreditEconomy(cost_per_connection=0.5, cost_per_unit=3.0).cost(4, units=1)
            5.0
        """
        check_int("connections", connections, 0)
        check_int("units", units, 0)
        if units and self.cost_per_unit is None:
            raise ValueError(
                f"units={units} but cost_per_unit is None: a unit costs as many credits as its "
                "connections, so pass connections=<the unit's connection count> and units=0, "
                "or give CreditEconomy a cost_per_unit"
            )
        return connections * self.cost_per_connection + units * (self.cost_per_unit or 0.0)

    def can_afford(self, connections: int = 0, units: int = 0) -> bool:
        """Whether the balance covers :meth:`cost` of the purchase.

        Example:
            >>> CreditEconomy(initial=1.0).can_afford(connections=2)
            False
        """
        return self.cost(connections, units) <= self._balance

    def spend(self, connections: int = 0, units: int = 0, *, overdraft: bool = False) -> float:
        """Pay for the purchase and return its cost; ValueError (nothing spent) if unaffordable.

        ``overdraft=True`` always pays, letting the balance go negative: a debt that later
        earnings repay before anything is affordable again. A schedule that checked the
        *estimated* price first uses it to charge the *actual* price after growing
        (:class:`~dynarch.schedules.GrowAsNeeded`).

        Example:
            >>> economy = CreditEconomy(initial=3.0)
            >>> economy.spend(connections=2), economy.balance
            (2.0, 1.0)
            >>> economy.spend(connections=3, overdraft=True), economy.balance
            (3.0, -2.0)
        """
        price = self.cost(connections, units)
        if price > self._balance and not overdraft:
            raise ValueError(
                f"cannot afford {connections} connection(s) and {units} unit(s): they cost "
                f"{price:g} credits but the balance is {self._balance:g}; nothing was spent "
                "(check can_afford() first)"
            )
        self._balance -= price
        self.spent += price
        return price

    def update(self, value: float | Tensor | None = None) -> bool:
        """Earn ``value`` correct predictions (``None`` or a float metric: none, see the class
        doc); True when one connection is affordable.

        Example:
            >>> economy = CreditEconomy()
            >>> economy.update(2), economy.update(0.37), economy.balance  # 0.37: a metric
            (True, True, 2.0)
        """
        metric = isinstance(value, float) or (
            isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex())
        )
        if value is not None and not metric:
            self.earn(value)
        return self.can_afford(connections=1)

    def callback(self) -> Callback:
        """A Trainer callback earning from each training batch's correct predictions.

        Example:
            >>> economy = CreditEconomy()
            >>> economy.callback().trigger is economy
            True
        """
        from ._callbacks import EarnCredits  # lazy: dynarch.callbacks imports triggers

        return EarnCredits(self)

    def reset(self) -> None:
        """Nothing to forget: the ledger (balance, earned, spent) is kept, see the class doc."""

    def state_dict(self) -> dict[str, Any]:
        """``{"balance": float, "earned": float, "spent": float}``."""
        return {"balance": self._balance, "earned": self.earned, "spent": self.spent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        check_state("CreditEconomy", state, {"balance", "earned", "spent"})
        self._balance = float(state["balance"])
        self.earned = float(state["earned"])
        self.spent = float(state["spent"])
