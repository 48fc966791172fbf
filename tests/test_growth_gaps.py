"""Growth audit gaps: GrowAsNeeded paid for by a CreditEconomy (estimate checked before,
actual growth charged after, state round trip) and Extrema.where() naming only the layers that
fire (so a grow-as-needed hint leaves healthy layers alone). Slot steps that go backwards are
tested in tests/test_slots.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from dynarch.activity import Extrema, Utilization
from dynarch.growth.candidates import active_params
from dynarch.masks import sparsify
from dynarch.models import mlp
from dynarch.schedules import GrowAsNeeded, GrowPruneCycle, economies_in, grow_once, make_action
from dynarch.train import Trainer
from dynarch.triggers import CreditEconomy, Every, Plateau, all_of, any_of

DATA = (torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(8, [10, 6], 3)


def trainer(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor] = DATA) -> Trainer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(model, opt, data, eval=data, batch_size=16, progress=False)


def plateau() -> Plateau:
    """Fires at the second evaluation without improvement (and again two after a reset)."""
    return Plateau(patience=1, threshold=0.0)


def evaluate(grow: GrowAsNeeded, t: Trainer, times: int) -> None:
    for _ in range(times):
        grow.on_evaluate(t, {"val_loss": 1.0})


def width(model: nn.Module, name: str = "fc1") -> int:
    layer = model.get_submodule(name)
    assert isinstance(layer, nn.Linear)
    return layer.out_features


def widths(model: nn.Module) -> tuple[int, int]:
    return width(model, "fc1"), width(model, "fc2")


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(state))
    return loaded


# ---------------------------------------------------------------- the price of a growth
@pytest.mark.parametrize(("cost_per_unit", "price"), [(None, 14.0), (3.0, 20.0)])
def test_widen_pays_exactly_its_new_weights_and_units(
    cost_per_unit: float | None, price: float
) -> None:
    """Widening fc1 by 2 adds 2 * (8 inputs + 6 fc2 columns) = 28 weights and 2 units:
    28 * 0.5 credits, plus 2 * 3.0 when units are priced; biases are free."""
    model = net()
    t = trainer(model)
    economy = CreditEconomy(initial=100.0, cost_per_connection=0.5, cost_per_unit=cost_per_unit)
    grow = GrowAsNeeded(all_of(plateau(), economy), "widen", layers=["fc1"], amount=2)
    assert grow.economies == [economy]
    assert grow.action.adds(model, "fc1") == (28, 2)
    before = active_params(model)[1]
    evaluate(grow, t, 2)
    assert widths(model) == (12, 6) and active_params(model)[1] - before == 28
    assert (economy.balance, economy.spent, economy.earned) == (100.0 - price, price, 0.0)
    assert grow.attempts == [
        {"step": 0, "reason": "all_of(val_loss)", "grown": ["fc1"], "embargoed": [],
         "over_budget": [], "unaffordable": [], "paid": [price], "events": 1}
    ]  # fmt: skip


def test_patches_pay_the_connections_they_turned_on() -> None:
    torch.manual_seed(0)
    model = mlp(16, [32], 4)
    sparsify(model, 0.1, distribution="uniform")
    data = (torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 4)
    t = trainer(model, data)
    economy = CreditEconomy(initial=1000.0, cost_per_connection=2.0)
    grow = GrowAsNeeded(all_of(plateau(), economy), "patches", amount=0.5, patch_size=4)
    assert grow.action.adds(model, "fc1") == (26, 0)  # the most a growth may add
    before = active_params(model)[1]
    evaluate(grow, t, 2)
    [event] = grow.events
    assert event.op == "patch" and event.details["added"] == 26
    assert active_params(model)[1] - before == 26
    assert (economy.balance, economy.spent) == (1000.0 - 2.0 * 26, 2.0 * 26)
    assert grow.attempts[-1]["paid"] == [52.0]


def test_a_masked_net2net_widen_is_priced_at_most_and_charged_what_it_added() -> None:
    """In a masked layer the Net2Net copies carry their sources' masks, which rows and
    columns are copied is drawn at random: the price is the most it can add (the densest
    row and column: 22 weights here), the charge what it did add (20)."""
    model = net()
    sparsify(model, 0.5, distribution="uniform")
    t = trainer(model)
    economy = CreditEconomy(initial=21.0)
    grow = GrowAsNeeded(all_of(plateau(), economy), "widen", layers=["fc1"], amount=2)
    assert grow.action.adds(model, "fc1") == (22, 2)
    evaluate(grow, t, 2)
    assert grow.events == [] and grow.attempts[-1]["unaffordable"] == ["fc1"]
    economy.earn(2.0)
    before = active_params(model)[1]
    evaluate(grow, t, 2)
    assert active_params(model)[1] - before == 20 and width(model) == 12
    assert (economy.balance, economy.spent) == (3.0, 20.0)
    assert grow.attempts[-1]["paid"] == [20.0]


# ---------------------------------------------------------------- unaffordable
def test_unaffordable_growth_waits_without_cooldown_and_retries() -> None:
    model = net()
    t = trainer(model)
    economy = CreditEconomy(initial=25.0)
    trig = plateau()
    grow = GrowAsNeeded(all_of(trig, economy), "widen", layers=["fc1", "fc2"], amount=2,
                        cooldown=3)  # fmt: skip
    # fc1 adds 2 * (8 + 6) = 28 connections, fc2 2 * (10 + 3) = 26: neither fits 25 credits
    evaluate(grow, t, 2)
    assert widths(model) == (10, 6) and grow.events == []
    assert (grow.growths, grow.cooldown_left, trig.wait) == (0, 0, 1)  # no cooldown, no reset
    assert grow.attempts == [
        {"step": 0, "reason": "all_of(val_loss)", "grown": [], "embargoed": [],
         "over_budget": [], "unaffordable": ["fc1", "fc2"], "paid": [], "events": 0}
    ]  # fmt: skip
    assert (economy.balance, economy.spent) == (25.0, 0.0)
    economy.earn(1)  # 26 credits: fc2 fits, fc1 does not
    evaluate(grow, t, 1)  # still plateaued: retried at the next evaluation
    assert widths(model) == (10, 8)
    assert (grow.attempts[-1]["grown"], grow.attempts[-1]["unaffordable"]) == (["fc2"], ["fc1"])
    assert grow.attempts[-1]["paid"] == [26.0] and (economy.balance, economy.spent) == (0.0, 26.0)
    assert (grow.growths, grow.cooldown_left, trig.wait) == (1, 3, 0)


def test_targets_are_priced_together() -> None:
    """Two targets that fit one at a time but not together: the first is grown."""
    model = net()
    t = trainer(model)
    economy = CreditEconomy(initial=53.0)  # 28 + 26 = 54 > 53
    grow = GrowAsNeeded(all_of(plateau(), economy), "widen", layers=["fc1", "fc2"], amount=2)
    evaluate(grow, t, 2)
    assert widths(model) == (12, 6) and grow.attempts[-1]["unaffordable"] == ["fc2"]
    assert economy.balance == 25.0


def test_an_empty_economy_does_not_fire_the_composite() -> None:
    model = net()
    t = trainer(model)
    grow = GrowAsNeeded(all_of(plateau(), CreditEconomy()), "widen", layers=["fc1"], amount=2)
    evaluate(grow, t, 3)
    assert grow.attempts == [] and widths(model) == (10, 6)


# ---------------------------------------------------------------- where economies are found
def test_economies_are_found_in_nested_composites_and_the_budget() -> None:
    inner, outer = CreditEconomy(), CreditEconomy(initial=1.0)
    trig = any_of(Plateau(), all_of(Every(1), inner))
    grow = GrowAsNeeded(trig, "widen", budget=outer)
    assert grow.economies == [inner, outer]
    assert GrowAsNeeded(all_of(Plateau(), inner), "widen", budget=inner).economies == [inner]
    assert GrowAsNeeded(Plateau(), "widen").economies == []
    assert economies_in(all_of(Plateau()), None, 3) == []


def test_economy_as_budget_pays_and_round_trips() -> None:
    model = net()
    t = trainer(model)

    def build(economy: CreditEconomy) -> GrowAsNeeded:
        return GrowAsNeeded(plateau(), "widen", layers=["fc1"], amount=2, budget=economy)

    economy = CreditEconomy(initial=50.0)
    grow = build(economy)
    evaluate(grow, t, 2)
    assert width(model) == 12 and grow.attempts[-1]["paid"] == [28.0]
    state = grow.state_dict()
    assert state["economy"] == {"balance": 22.0, "earned": 0.0, "spent": 28.0}
    copy_economy = CreditEconomy(initial=50.0)
    copy = build(copy_economy)
    copy.load_state_dict(round_trip(state))
    assert copy_economy.state_dict() == economy.state_dict() and copy.state_dict() == state
    evaluate(grow, t, 2)  # 22 credits < 2 * (8 + 6) = 28 at width 14 too: refused
    assert grow.attempts[-1]["unaffordable"] == ["fc1"] and width(model) == 12
    with pytest.raises(ValueError, match=r"disagree on the economy \(this one has no credit econ"):
        GrowAsNeeded(plateau(), "widen").load_state_dict(state)
    old = {k: v for k, v in GrowAsNeeded(plateau(), "widen").state_dict().items() if k != "economy"}
    GrowAsNeeded(plateau(), "widen").load_state_dict(old)  # saved before "economy" existed
    with pytest.raises(
        ValueError, match=r"disagree on the economy \(this one has a credit economy as budget\)"
    ):
        copy.load_state_dict(old)


def test_economy_in_the_trigger_round_trips_with_the_trigger() -> None:
    model = net()
    t = trainer(model)
    economy = CreditEconomy(initial=40.0)
    grow = GrowAsNeeded(all_of(plateau(), economy), "widen", layers=["fc1"], amount=2)
    evaluate(grow, t, 2)
    state = round_trip(grow.state_dict())
    assert state["economy"] is None and state["trigger"]["triggers"][1] == economy.state_dict()
    fresh = CreditEconomy(initial=40.0)
    copy = GrowAsNeeded(all_of(plateau(), fresh), "widen", layers=["fc1"], amount=2)
    copy.load_state_dict(state)
    assert fresh.balance == 12.0 and copy.state_dict() == grow.state_dict()


def test_grow_once_with_an_economy_budget() -> None:
    model = net()
    t = trainer(model)
    economy = CreditEconomy(initial=30.0, cost_per_unit=1.0)
    events, record = grow_once(t, make_action("widen", layers=["fc2"], amount=2), "r",
                               budget=economy)  # fmt: skip
    assert [e.op for e in events] == ["widen"] and record["paid"] == [26.0 + 2.0]
    assert economy.balance == 2.0


# ---------------------------------------------------------------- errors
def test_an_economy_needs_a_planned_action() -> None:
    fn: Callable[[Trainer], None] = lambda t: None  # noqa: E731
    msg = r"GrowAsNeeded: a credit economy needs an action that names its targets and cost"
    with pytest.raises(ValueError, match=msg):
        GrowAsNeeded(all_of(Plateau(), CreditEconomy()), fn)
    with pytest.raises(ValueError, match=r"GrowAsNeeded: budget and a credit economy need an"):
        GrowAsNeeded(Plateau(), fn, budget=CreditEconomy())
    model = net()
    with pytest.raises(ValueError, match=r"grow_once: a credit economy needs an action that"):
        grow_once(trainer(model), GrowAsNeeded(Plateau(), fn).action, "r",
                  economies=[CreditEconomy()])  # fmt: skip


def test_budget_errors_name_what_is_allowed() -> None:
    with pytest.raises(
        TypeError,
        match=r"GrowAsNeeded: budget must have a method can_grow\(model, n_params\) -> bool "
        r"\(e.g. dynarch.triggers.Budget\) or be a dynarch.triggers.CreditEconomy, got int",
    ):
        GrowAsNeeded(Plateau(), "widen", budget=5)
    with pytest.raises(
        TypeError, match=r"GrowPruneCycle: budget must have .*Budget\), got CreditEconomy$"
    ):
        GrowPruneCycle(1, 1, 1, grow="widen", prune=None, budget=CreditEconomy())


# ---------------------------------------------------------------- Extrema.where()
def half_dead() -> nn.Sequential:
    """fc1: 1 of 10 units dead (0.1); fc2: 3 of 6 dead (0.5)."""
    model = net()
    fc1, fc2 = model.fc1, model.fc2
    assert isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
    with torch.no_grad():
        fc1.bias[0] = -100.0
        fc2.bias[:3] = -100.0
    return model


def test_extrema_where_names_only_the_layers_that_fire() -> None:
    ex = Extrema(half_dead(), fire_fraction=0.3)
    ex.observe(DATA[0])
    assert ex.fractions() == {
        "fc1": {"dead": 0.1, "saturated": 0.0},
        "fc2": {"dead": 0.5, "saturated": 0.0},
    }
    assert ex.where() == ["fc2"] and ex.update() is True
    ex.fire_fraction = 0.1
    assert ex.where() == ["fc2", "fc1"]
    ex.fire_fraction = 0.6
    assert ex.where() == [] and ex.update() is False


@pytest.mark.parametrize("kind", ["extrema", "utilization"])
def test_activity_triggers_name_places_exactly_when_they_fire(kind: str) -> None:
    model = half_dead()
    limits = [0.05, 0.1, 0.3, 0.5, 0.6, 1.0]
    for limit in limits:
        trig: Extrema | Utilization = (
            Extrema(model, fire_fraction=limit)
            if kind == "extrema"
            else Utilization(model, threshold=limit)
        )
        trig.observe(DATA[0])
        assert bool(trig.where()) == trig.update(), limit


def test_grow_as_needed_widens_only_where_extrema_fire() -> None:
    model = half_dead()
    t = trainer(model)
    ex = Extrema(model, fire_fraction=0.3)
    grow = GrowAsNeeded(ex, "widen", amount=1)
    ex.observe(DATA[0])
    evaluate(grow, t, 1)
    assert widths(model) == (10, 7)  # fc1 (0.1 < 0.3) is left alone
    assert grow.attempts[-1]["grown"] == ["fc2"]
    assert ex.statistics("fc2") is None  # reset after growing
