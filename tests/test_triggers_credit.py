"""CreditEconomy: exact ledger, prices, the Trainer callback, state, errors."""

from __future__ import annotations

import io
import math
import re
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from dynarch.callbacks import LambdaCallback
from dynarch.train import Trainer
from dynarch.triggers import TRIGGERS, CreditEconomy, make_trigger


def test_exact_sequence_earn_update_spend() -> None:
    economy = CreditEconomy(earn_per_correct=0.5, cost_per_connection=2.0)
    assert economy.update(3) is False and economy.balance == 1.5
    assert economy.update(torch.tensor([True, False])) is True and economy.balance == 2.0
    assert economy.update() is True  # None earns nothing
    assert economy.spend(connections=1) == 2.0
    assert (economy.balance, economy.can_afford(1), economy.update(None)) == (0.0, False, False)
    assert (economy.earned, economy.spent) == (2.0, 2.0)


def test_earn_counts_ints_and_tensors_with_one_number() -> None:
    economy = CreditEconomy()
    assert economy.earn(torch.tensor([True, True, False])) == 2.0
    assert economy.earn(torch.tensor([1, 0, 2])) == 3.0  # integer tensor: its sum
    assert economy.earn(torch.tensor([1, 1], dtype=torch.uint8)) == 2.0
    assert economy.earn(torch.tensor(4)) == 4.0
    assert economy.earn(torch.zeros(0, dtype=torch.int64)) == 0.0
    assert economy.earn(3.0) == 3.0 and economy.earn(0) == 0.0
    assert economy.balance == 14.0


def test_cap_and_initial() -> None:
    economy = CreditEconomy(earn_per_correct=2.0, initial=1.0, cap=6.0)
    assert economy.balance == 1.0
    assert economy.earn(2) == 4.0
    assert economy.earn(2) == 1.0  # only 1 credit of room left
    assert economy.earn(5) == 0.0 and economy.balance == 6.0 and economy.earned == 5.0


def test_prices_of_connections_and_units() -> None:
    per_unit = CreditEconomy(cost_per_connection=0.5, cost_per_unit=3.0, initial=5.0)
    assert per_unit.cost(4) == 2.0 and per_unit.cost(units=2) == 6.0
    assert per_unit.cost(4, units=1) == 5.0 and per_unit.can_afford(4, units=1)
    assert not per_unit.can_afford(5, units=1)
    assert per_unit.spend(2, units=1) == 4.0 and per_unit.balance == 1.0
    # cost_per_unit=None: a unit is paid through its connections only
    plain = CreditEconomy(cost_per_connection=0.25)
    assert plain.cost(connections=12) == 3.0
    with pytest.raises(
        ValueError,
        match=r"units=1 but cost_per_unit is None: a unit costs as many credits as its "
        r"connections, so pass connections=<the unit's connection count> and units=0",
    ):
        plain.cost(units=1)
    with pytest.raises(ValueError, match="connections must be an int >= 0, got -1"):
        plain.cost(connections=-1)
    with pytest.raises(ValueError, match=r"units must be an int >= 0, got 1\.5"):
        per_unit.can_afford(units=1.5)  # type: ignore[arg-type]


def test_unaffordable_spend_raises_and_spends_nothing() -> None:
    economy = CreditEconomy(initial=2.0)
    with pytest.raises(
        ValueError,
        match=r"cannot afford 3 connection\(s\) and 0 unit\(s\): they cost 3 credits but the "
        r"balance is 2; nothing was spent \(check can_afford\(\) first\)",
    ):
        economy.spend(connections=3)
    assert (economy.balance, economy.spent) == (2.0, 0.0)


def test_overdraft_pays_past_the_balance_and_the_debt_is_repaid_first() -> None:
    economy = CreditEconomy(initial=3.0, cap=4.0)
    assert economy.spend(connections=5, overdraft=True) == 5.0
    assert (economy.balance, economy.spent) == (-2.0, 5.0)
    assert (economy.can_afford(connections=1), economy.update(None)) == (False, False)
    with pytest.raises(ValueError, match=r"they cost 1 credits but the balance is -2; nothing"):
        economy.spend(connections=1)  # without overdraft a debt buys nothing
    fresh = CreditEconomy(cap=4.0)
    fresh.load_state_dict(economy.state_dict())
    for e in (economy, fresh):
        assert e.earn(2) == 2.0 and e.update(None) is False  # -2 + 2 = 0: still nothing
        assert e.earn(9) == 4.0 and e.balance == 4.0  # the cap bounds the balance, not the debt
        assert (e.earned, e.spent) == (6.0, 5.0)


def test_reset_keeps_the_ledger_and_state_round_trip() -> None:
    economy = make_trigger("credit_economy", earn_per_correct=0.75, cost_per_connection=1.5)
    assert isinstance(economy, CreditEconomy) and TRIGGERS["credit_economy"] is CreditEconomy
    economy.earn(4)
    economy.spend(connections=1)
    economy.reset()
    assert economy.state_dict() == {"balance": 1.5, "earned": 3.0, "spent": 1.5}
    buf = io.BytesIO()
    torch.save(economy.state_dict(), buf)
    buf.seek(0)
    fresh = CreditEconomy(earn_per_correct=0.75, cost_per_connection=1.5)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    # 1.5 credits, +0, +1.5, +0: one connection (1.5) is always affordable; two cost 3.0
    runs = [[e.update(v) for v in (0, 2, None)] + [e.spend(2), e.balance] for e in (economy, fresh)]
    assert runs[0] == runs[1] == [True, True, True, 3.0, 0.0]
    with pytest.raises(
        ValueError, match=r"CreditEconomy state must have keys \['balance', 'earned', 'spent'\]"
    ):
        fresh.load_state_dict({"balance": 1.0})


def test_callback_earns_from_every_training_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    economy = CreditEconomy(earn_per_correct=0.5)
    counted: list[int] = []
    check = LambdaCallback(
        on_step_end=lambda t: counted.append(int((t.last_output.argmax(1) == t.last_target).sum()))
    )
    cb = economy.callback()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    Trainer(model, opt, (x, y), batch_size=8, epochs=2, callbacks=[cb, check], progress=False).fit()
    assert len(counted) == 8
    assert economy.earned == economy.balance == 0.5 * sum(counted) > 0
    assert cb.state_dict() == economy.state_dict()
    cb.on_step_end(SimpleNamespace(last_output=None, last_target=None))  # type: ignore[arg-type]
    assert economy.earned == 0.5 * sum(counted)  # no batch yet: nothing earned
    for out, target in (
        (torch.zeros(4), torch.zeros(4, dtype=torch.int64)),
        (torch.zeros(4, 3), torch.zeros(4)),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64)),
    ):
        trainer = SimpleNamespace(last_output=out, last_target=target)
        with pytest.raises(
            ValueError,
            match=r"CreditEconomy earns from classification batches: .*; got output "
            + re.escape(f"{tuple(out.shape)} and target {tuple(target.shape)} of dtype ")
            + str(target.dtype),
        ):
            cb.on_step_end(trainer)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "shown"),
    [
        (-1, "-1"),
        (True, "True"),
        (2.5, "2.5"),
        (math.nan, "nan"),
        ("3", "'3'"),
        (torch.tensor([0.5, 1.0]), "a torch.float32 tensor"),
        (torch.tensor([1, -2]), r"an integer tensor with negative entries \(min -2\)"),
    ],
)
def test_earn_rejects_non_counts(bad: Any, shown: str) -> None:
    economy = CreditEconomy()
    with pytest.raises(
        ValueError,
        match=r"the number correct must be a whole number >= 0 or a bool/integer tensor of "
        rf"per-sample correctness \(its sum is the count\), got {shown}$",
    ):
        economy.earn(bad)
    assert economy.balance == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"earn_per_correct": -1}, "earn_per_correct must be a finite number >= 0, got -1"),
        ({"cost_per_connection": 0}, "cost_per_connection must be a finite number > 0, got 0"),
        ({"cost_per_unit": 0.0}, "cost_per_unit must be a finite number > 0, got 0.0"),
        ({"initial": math.inf}, "initial must be a finite number >= 0, got inf"),
        ({"cap": -1.0}, "cap must be a finite number >= 0, got -1.0"),
        ({"initial": 5.0, "cap": 2.0}, r"initial \(5.0\) must not exceed cap \(2.0\)"),
    ],
)
def test_validates_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CreditEconomy(**kwargs)
