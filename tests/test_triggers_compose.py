"""all_of / any_of composition, config-built children, and Plateau reset after growth."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from dynarch.callbacks import GrowOnPlateau
from dynarch.surgery import widen
from dynarch.triggers import (
    TRIGGERS,
    AllOf,
    AnyOf,
    CreditEconomy,
    Plateau,
    Trigger,
    all_of,
    any_of,
    make_trigger,
)


class Script(Trigger):
    """Answers from a fixed script and records every value it is fed."""

    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers
        self.seen: list[Any] = []
        self.resets = 0

    def update(self, value: Any = None) -> bool:
        self.seen.append(value)
        return self.answers[len(self.seen) - 1]

    def reset(self) -> None:
        self.resets += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = list(state["seen"])


def test_all_and_any_exact_and_never_short_circuit() -> None:
    a, b = Script([False, True, True, False]), Script([False, False, True, True])
    both, either = all_of(a, b), any_of(Script(a.answers), Script(b.answers))
    assert [both.update(v) for v in (1, 2, 3, 4)] == [False, False, True, False]
    assert [either.update(v) for v in (1, 2, 3, 4)] == [False, True, True, True]
    # every child saw every value, even when the answer was already decided
    assert a.seen == b.seen == [1, 2, 3, 4]
    assert both.last == [False, True] and both.fired() == [b]
    assert [t.seen for t in either.triggers] == [[1, 2, 3, 4]] * 2


def test_where_joins_the_places_of_the_children_that_fired() -> None:
    class Places(Script):
        def __init__(self, answers: list[bool], places: list[str]) -> None:
            super().__init__(answers)
            self.places = places

        def where(self) -> list[str]:
            return self.places

    either = any_of(
        Places([True, True], ["b", "a"]),
        Script([True, True]),  # no where(): names nothing
        Places([False, True], ["a", "c"]),
    )
    assert either.update(0) is True and either.where() == ["b", "a"]
    assert either.update(0) is True and either.where() == ["b", "a", "c"]


def test_reset_and_state_delegate_and_round_trip() -> None:
    def build() -> AnyOf:
        return any_of(
            Plateau(patience=2),
            all_of(Plateau(patience=1, mode="max"), {"name": "credit_economy", "initial": 1.0}),
        )

    first = build()
    # credit_economy is fed the metric values too: use whole numbers (numbers correct)
    assert [first.update(v) for v in (5, 6)] == [False, False]  # max-plateau improved on 6
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = build()
    second.load_state_dict(torch.load(buf, weights_only=True))
    assert second.state_dict() == first.state_dict()
    runs = [[t.update(v) for v in (6, 7, 7)] for t in (first, second)]
    # min-plateau: best 5, waits 1 (6), 2 (6) -> fires; max-plateau: 6 stalls -> fires
    assert runs[0] == runs[1] == [True, True, True]
    assert first.state_dict() == second.state_dict()
    inner = first.triggers[1]
    assert isinstance(inner, AllOf) and isinstance(inner.triggers[1], CreditEconomy)
    assert inner.triggers[1].balance == 1.0 + 5 + 6 + 6 + 7 + 7
    first.reset()
    assert first.last == [False, False] and inner.last == [False, False]
    assert first.triggers[0].state_dict() == {"best": None, "wait": 0}
    assert inner.triggers[0].state_dict() == {"best": None, "wait": 0}
    assert inner.triggers[1].balance == 32.0  # the ledger survives reset


def test_registered_names_and_config_children() -> None:
    assert TRIGGERS["all_of"] is AllOf and TRIGGERS["any_of"] is AnyOf
    t = make_trigger("any_of", triggers=[{"name": "plateau", "patience": 1}, Plateau(patience=3)])
    assert isinstance(t, AnyOf) and [type(c) for c in t.triggers] == [Plateau, Plateau]
    assert [t.triggers[0].patience, t.triggers[1].patience] == [1, 3]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown trigger 'plato'"):
        all_of({"name": "plato"})


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: all_of(), ValueError, "AllOf needs at least one trigger, got none"),
        (
            lambda: any_of(3),
            TypeError,
            r"AnyOf: triggers\[0\] must be a Trigger or a mapping with a 'name' key "
            r"\(e.g. \{'name': 'plateau', 'patience': 3\}\), got 3",
        ),
        (lambda: all_of({"patience": 3}), TypeError, r"got \{'patience': 3\}"),
        (lambda: AllOf(Plateau()), TypeError, "AllOf needs a list of triggers, got <"),
        (lambda: AnyOf("plateau"), TypeError, "AnyOf needs a list of triggers, got 'plateau'"),
    ],
)
def test_rejects_bad_children(build: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build()


def test_rejects_the_same_child_twice_and_foreign_states() -> None:
    p = Plateau()
    with pytest.raises(
        ValueError,
        match=r"AllOf: triggers\[1\] is the same object as triggers\[0\] .*; pass distinct",
    ):
        all_of(p, p)
    both = all_of(Plateau(), Plateau())
    with pytest.raises(ValueError, match=r"AllOf state must have keys \['last', 'triggers'\]"):
        both.load_state_dict({"triggers": []})
    with pytest.raises(
        ValueError,
        match="AllOf state holds 1 trigger states but this composite has 2 triggers; load a state",
    ):
        both.load_state_dict({"triggers": [{"best": None, "wait": 0}], "last": [False]})


def test_plateau_needs_a_number() -> None:
    with pytest.raises(
        TypeError, match=r"Plateau.update needs a metric value \(a number .*\), got None"
    ):
        Plateau().update(None)  # type: ignore[arg-type]


def test_plateau_reset_after_growth_in_a_grow_as_needed_loop() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    plateau = Plateau(patience=2, threshold=0.0)
    grown = []
    for step, loss in enumerate([1.0] * 7):
        if plateau.update(loss):
            widen(model, "0", model[0].out_features + 2)
            plateau.reset()  # the grown model gets `patience` fresh updates
            grown.append(step)
    # without the reset it would fire at every step from step 2 on
    assert grown == [2, 5] and model[0].out_features == 8
    stale = Plateau(patience=2, threshold=0.0)
    assert [stale.update(1.0) for _ in range(7)] == [False, False] + [True] * 5


def test_grow_on_plateau_resets_its_trigger_after_growth() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    grow = GrowOnPlateau(["0"], patience=1, factor=2.0)
    trainer = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    for loss in (1.0, 1.0):
        grow.on_evaluate(trainer, {"val_loss": loss})  # type: ignore[arg-type]
    assert model[0].out_features == 8
    assert grow.trigger.state_dict() == {"best": None, "wait": 0}


def test_every_fires_on_each_nth_update_and_round_trips() -> None:
    from dynarch.triggers import Every, make_trigger

    t = make_trigger("every", n=3)
    assert isinstance(t, Every)
    assert [t.update(0.0) for _ in range(7)] == [False, False, True, False, False, True, False]
    fresh = Every(3)
    fresh.load_state_dict(t.state_dict())
    assert [fresh.update(), t.update()] == [False, False]
    assert [fresh.update(), t.update()] == [True, True]
    with pytest.raises(ValueError, match=r"n must be an int >= 1, got 0"):
        Every(0)
    with pytest.raises(ValueError, match=r"Every state must have keys \['count'\]"):
        fresh.load_state_dict({"n": 1})
