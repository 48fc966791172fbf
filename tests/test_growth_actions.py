"""Growth methods as schedule actions: PatchesAction ("patches") and BudgetEconomy."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

from dynarch._engine import engine_state, set_seed
from dynarch.growth.actions import BudgetEconomy, PatchesAction
from dynarch.masks import sparsify
from dynarch.models import mlp
from dynarch.schedules import ACTIONS, make_action
from dynarch.train import Trainer
from dynarch.triggers import Budget


def _exact(message: str) -> str:
    return f"^{re.escape(message)}$"


def _sparse(density: float = 0.1, include: Sequence[str] | None = None) -> Trainer:
    """A trainer over ``16 -> 32 -> 32 -> 4`` masked at ``density`` (random, uniform)."""
    torch.manual_seed(0)
    model = mlp(16, [32, 32], 4)
    set_seed(model, 0)
    sparsify(model, density, distribution="uniform", score="random", include=include)
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(128, 16, generator=gen), torch.randint(0, 4, (128,), generator=gen))
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, progress=False)


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``weight_mask`` of every masked layer, by name."""
    masked = [(n, m) for n, m in model.named_modules() if hasattr(m, "weight_mask")]
    return {n: m.get_buffer("weight_mask") for n, m in masked}


def _active(model: nn.Module) -> dict[str, int]:
    return {n: int(mask.sum()) for n, mask in _masks(model).items()}


def test_registered_as_patches() -> None:
    assert ACTIONS["patches"] is PatchesAction
    act = make_action("patches", amount=0.25, patch_size=8)
    assert isinstance(act, PatchesAction) and act.name == "patches" and act.planned
    assert (act.amount, act.patch_size, act.quantile, act.eps, act.sample, act.init) == (
        0.25, 8, 0.9, 0.01, 1024, "zero",
    )  # fmt: skip
    assert act.layers is None and act.budget is None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"amount": 0}, ValueError, "amount must be a finite number > 0, got 0"),
        ({"amount": "x"}, ValueError, "amount must be a finite number > 0, got 'x'"),
        ({"patch_size": 0}, ValueError, "patch_size must be an int >= 1, got 0"),
        ({"quantile": 1.0}, ValueError, "quantile must be in (0, 1), got 1.0"),
        ({"quantile": 0}, ValueError, "quantile must be in (0, 1), got 0"),
        ({"eps": -1}, ValueError, "eps must be a finite number >= 0, got -1"),
        ({"sample": 0}, ValueError, "sample must be an int >= 1, got 0"),
        ({"layers": "fc1"}, ValueError,
         "patches: layers must be None or a list of names, got 'fc1'"),
        ({"layers": []}, ValueError, "patches: layers must be None or a list of names, got []"),
        ({"init": "net2net"}, ValueError,
         "patches: init must be 'zero' or 'random', got 'net2net'"),
        ({"budget": 3}, TypeError, "patches: budget needs a headroom(model) method, got 3"),
    ],
)  # fmt: skip
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=_exact(message)):
        PatchesAction(**kwargs)


def test_targets_are_the_masked_hidden_layers() -> None:
    model = _sparse().model
    assert PatchesAction().targets(model) == ["fc1", "fc2"]  # "out" is masked but not hidden
    assert PatchesAction(layers=["out", "fc1"]).targets(model) == ["out", "fc1"]
    only_fc2 = _sparse(include=["fc2"]).model
    assert list(_active(only_fc2)) == ["fc2"]
    assert PatchesAction().targets(only_fc2) == ["fc2"]
    assert PatchesAction().targets(mlp(4, [8], 2)) == []


def test_cost_is_amount_times_active_rounded_up() -> None:
    model = _sparse().model
    assert _active(model) == {"fc1": 51, "fc2": 102, "out": 13}
    act = PatchesAction(amount=0.1)
    assert [act.cost(model, n) for n in ("fc1", "fc2")] == [6, 11]  # ceil(5.1), ceil(10.2)
    assert PatchesAction(amount=2.0).cost(model, "fc1") == 102


def test_check_refuses_a_dense_model_and_unknown_layers() -> None:
    message = (
        "patches: no masked hidden layer to patch; sparsify the model first "
        "(config: a sparsity: section)"
    )
    with pytest.raises(ValueError, match=_exact(message)):
        PatchesAction().check(mlp(4, [8], 2))
    model = _sparse().model
    PatchesAction().check(model)  # masked: fine
    with pytest.raises(ValueError, match=_exact(message)):
        PatchesAction(layers=["fc1"]).check(_sparse(include=["fc2"]).model)
    with pytest.raises(
        ValueError,
        match=_exact(
            "patches: layers: 'fc9' is not a Linear/Conv2d of the model; hidden layers: fc1, fc2"
        ),
    ):
        PatchesAction(layers=["fc9"]).check(model)


def test_apply_adds_exactly_amount_of_the_active_connections() -> None:
    trainer = _sparse()
    model = trainer.model
    before, history = _active(model), len(engine_state(model).history)
    act = PatchesAction(amount=0.1, patch_size=32)
    limit = sum(math.ceil(0.1 * before[n]) for n in ("fc1", "fc2"))
    events = act.apply(trainer, ["fc1", "fc2"], "manual")
    after = _active(model)
    assert limit == 17 and sum(after.values()) - sum(before.values()) == limit
    assert len(events) == 1 and events[0] is engine_state(model).history[-1]
    assert len(engine_state(model).history) == history + 1
    event = events[0]
    assert (event.op, event.reason, event.details["added"]) == ("patch", "manual", limit)
    assert event.details["patch_size"] == 32 and event.details["init"] == "zero"
    assert {n: after[n] - before[n] for n in after} == {
        n: facts["added"] for n, facts in event.details["layers"].items()
    } | {n: 0 for n in after if n not in event.details["layers"]}


def test_apply_keeps_the_function_with_zero_init() -> None:
    trainer = _sparse()
    x = trainer.train_data[0][:32]
    out = trainer.model(x).detach()
    assert PatchesAction(amount=0.5).apply(trainer, ["fc1", "fc2"], "manual")
    assert torch.allclose(trainer.model(x), out, atol=1e-6)


def test_apply_stops_at_the_budget_headroom() -> None:
    trainer = _sparse()
    count = Budget(max_params=1).count(trainer.model)
    act = PatchesAction(amount=0.5, budget=Budget(max_params=count + 5))
    (event,) = act.apply(trainer, ["fc1", "fc2"], "manual")
    assert event.details["added"] == 5
    assert Budget(max_params=1).count(trainer.model) == count + 5
    history = len(engine_state(trainer.model).history)
    assert act.apply(trainer, ["fc1", "fc2"], "manual") == []  # no headroom left: no event
    assert len(engine_state(trainer.model).history) == history


def test_apply_with_nothing_to_do_records_no_event() -> None:
    trainer = _sparse(density=1.0)  # every patch position is already on
    history = len(engine_state(trainer.model).history)
    assert PatchesAction(amount=0.5).apply(trainer, ["fc1", "fc2"], "manual") == []
    assert PatchesAction(amount=0.5).apply(_sparse(), [], "manual") == []
    assert len(engine_state(trainer.model).history) == history


def test_apply_is_deterministic_for_an_engine_seed() -> None:
    def run() -> list[torch.Tensor]:
        trainer = _sparse()
        PatchesAction(amount=0.1, sample=64).apply(trainer, ["fc1", "fc2"], "manual")
        return [mask.clone() for mask in _masks(trainer.model).values()]

    assert all(torch.equal(a, b) for a, b in zip(run(), run(), strict=True))


# -------------------------------------------------------------------------- economy


def test_budget_economy_prices_connections_plus_units() -> None:
    model = nn.Linear(4, 4)  # 20 parameters
    eco = BudgetEconomy(Budget(max_params=30), model)
    assert (eco.budget.max_params, eco.model) == (30, model)
    assert eco.can_afford() and eco.can_afford(connections=10)
    assert not eco.can_afford(connections=11)
    assert eco.can_afford(connections=8, units=2) and not eco.can_afford(connections=8, units=3)


def test_budget_economy_spend_changes_nothing() -> None:
    model = nn.Linear(4, 4)
    budget = Budget(max_params=30)
    eco = BudgetEconomy(budget, model)
    assert eco.spend(connections=10) == 0.0
    assert budget.headroom(model) == {"params": 10}
    # the tournament pays after applying: a candidate that used up the room can be paid for
    assert eco.spend(connections=10, units=5) == 0.0 and eco.can_afford(connections=10)


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("can_afford", {"connections": -1},
         "BudgetEconomy: connections must be an int >= 0, got -1"),
        ("can_afford", {"units": 1.5}, "BudgetEconomy: units must be an int >= 0, got 1.5"),
        ("spend", {"units": True}, "BudgetEconomy: units must be an int >= 0, got True"),
        ("spend", {"connections": -2},
         "BudgetEconomy: connections must be an int >= 0, got -2"),
    ],
)  # fmt: skip
def test_budget_economy_bad_amounts(method: str, kwargs: dict[str, Any], message: str) -> None:
    eco = BudgetEconomy(Budget(max_params=30), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=_exact(message)):
        getattr(eco, method)(**kwargs)


def test_budget_economy_needs_can_grow() -> None:
    with pytest.raises(
        TypeError, match=_exact("BudgetEconomy needs a budget with can_grow(), got 3")
    ):
        BudgetEconomy(3, nn.Linear(2, 2))
