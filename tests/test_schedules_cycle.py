"""Tests of dynarch.schedules.GrowPruneCycle (phases by step, actions, embargo, state)."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

import dynarch
from dynarch._engine import engine_state
from dynarch.callbacks import LambdaCallback
from dynarch.models import mlp
from dynarch.schedules import PHASES, Embargo, GrowAsNeeded, GrowPruneCycle
from dynarch.train import Trainer
from dynarch.triggers import Trigger

DATA = (torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 3)


class Always(Trigger):
    def __init__(self) -> None:
        self.n = 0

    def update(self, value: float) -> bool:
        self.n += 1
        return True

    def reset(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = state["n"]


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(8, [10, 6], 3)


def trainer(model: nn.Module, cycle: GrowPruneCycle | None = None, **kw: Any) -> Trainer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    callbacks = [] if cycle is None else [cycle]
    return Trainer(model, opt, DATA, eval=DATA, batch_size=8, progress=False,
                   callbacks=callbacks, **kw)  # fmt: skip


def test_phase_boundaries() -> None:
    cycle = GrowPruneCycle(3, 2, 1, grow="widen", prune=None)
    assert PHASES == ("grow", "prune", "stabilise") and cycle.cycle_length == 6
    assert [cycle.phase(t) for t in range(1, 14)] == [
        "grow", "grow", "grow", "prune", "prune", "stabilise",
        "grow", "grow", "grow", "prune", "prune", "stabilise", "grow",
    ]  # fmt: skip
    no_grow = GrowPruneCycle(0, 2, 1, grow=None, prune="widen")
    assert [no_grow.phase(t) for t in range(1, 7)] == ["prune", "prune", "stabilise"] * 2
    only = GrowPruneCycle(2, 0, 0, grow="widen", prune=None)
    assert [only.phase(t) for t in (1, 2, 3, 100)] == ["grow"] * 4


def test_acts_at_first_step_of_phase_and_every_n() -> None:
    prune = {"name": "magnitude_prune", "sparsity": 0.5}
    once = GrowPruneCycle(4, 3, 2, grow="widen", prune=prune)
    assert [t for t in range(1, 19) if once.acts_at(t)] == [1, 5, 10, 14]
    every = GrowPruneCycle(4, 3, 2, grow="widen", prune=prune, every=2)
    assert [t for t in range(1, 19) if every.acts_at(t)] == [1, 3, 5, 7, 10, 12, 14, 16]
    no_prune = GrowPruneCycle(4, 3, 2, grow="widen", prune=None, every=3)
    assert [t for t in range(1, 19) if no_prune.acts_at(t)] == [1, 4, 10, 13]


def test_cycle_grows_prunes_stabilises_with_embargo() -> None:
    """Grow fc1 at 1, shrink it at 5; the grow at 13 is refused (embargo until 15)."""
    model = net()
    embargo = Embargo(model, 10)
    cycle = GrowPruneCycle(4, 4, 4, grow={"name": "widen", "layers": ["fc1"], "amount": 4},
                           prune={"name": "structured_prune", "layers": ["fc1"], "amount": 2},
                           embargo=embargo)  # fmt: skip
    trainer(model, cycle, epochs=6).fit()  # 4 steps per epoch: 24 steps
    history = [(e.step, e.op, e.target, e.reason) for e in engine_state(model).history]
    assert history == [
        (1, "widen", "fc1", "grow-prune-cycle:grow"),
        (5, "shrink", "fc1", "grow-prune-cycle:prune"),
        (17, "shrink", "fc1", "grow-prune-cycle:prune"),
    ]
    assert model.fc1.out_features == 10
    assert [(a["step"], a["phase"], a["events"]) for a in cycle.attempts] == [
        (1, "grow", 1), (5, "prune", 1), (13, "grow", 0), (17, "prune", 1),
    ]  # fmt: skip
    assert cycle.attempts[2]["embargoed"] == ["fc1"] and embargo.until == {"fc1": 27}


def test_cycle_with_function_prune_and_every() -> None:
    model = net()
    steps: list[tuple[int, str]] = []

    def prune(t: Trainer, reason: str) -> None:
        steps.append((t.step, reason))

    cycle = GrowPruneCycle(2, 4, 2, grow=None, prune=prune, every=2)
    trainer(model, cycle, epochs=4).fit()  # 16 steps
    assert steps == [(3, "grow-prune-cycle:prune"), (5, "grow-prune-cycle:prune"),
                     (11, "grow-prune-cycle:prune"), (13, "grow-prune-cycle:prune")]  # fmt: skip
    assert engine_state(model).history == []


def test_inner_callbacks_get_hooks_only_in_their_phase() -> None:
    model = net()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DATA, eval=DATA,
                epochs=100, progress=False)  # fmt: skip
    trig = Always()
    grow = GrowAsNeeded(trig, "widen", layers=["fc1"], amount=1)
    seen: list[int] = []
    cycle = GrowPruneCycle(
        2, 2, 1, grow=grow, prune=LambdaCallback(on_step_end=lambda tr: seen.append(tr.step))
    )
    assert grow.tag == "grow-prune-cycle:grow"
    for step in range(1, 11):
        t.step = engine_state(model).step = step
        cycle.on_step_end(t)
        cycle.on_evaluate(t, {"val_loss": 1.0})
    assert seen == [3, 4, 8, 9]
    assert trig.n == 4 and model.fc1.out_features == 14  # grow steps 1, 2, 6, 7
    assert {e.reason for e in engine_state(model).history} == {
        "grow-prune-cycle:grow:always(val_loss)"
    }
    assert cycle.attempts == []  # callbacks act on their own triggers


def test_real_fit_with_inner_grow_as_needed() -> None:
    model = net()
    grow = GrowAsNeeded(Always(), "widen", layers=["fc2"], amount=2)
    cycle = GrowPruneCycle(4, 4, 0, grow=grow, prune={"name": "magnitude_prune", "sparsity": 0.5})
    trainer(model, cycle, epochs=4).fit()  # evaluations at 4 (grow), 8 (prune), 12, 16
    history = [(e.step, e.op, e.reason) for e in engine_state(model).history]
    assert history == [
        (4, "widen", "grow-prune-cycle:grow:always(val_loss)"),
        (5, "prune", "grow-prune-cycle:prune"),
        (12, "widen", "grow-prune-cycle:grow:always(val_loss)"),
        (13, "prune", "grow-prune-cycle:prune"),
    ]


def test_state_round_trip() -> None:
    model = net()
    embargo = Embargo(model, 3)
    cycle = GrowPruneCycle(2, 2, 0, grow={"name": "widen", "layers": ["fc1"], "amount": 1},
                           prune={"name": "structured_prune", "layers": ["fc1"], "amount": 1},
                           embargo=embargo)  # fmt: skip
    trainer(model, cycle, epochs=2).fit()
    buf = io.BytesIO()
    torch.save(cycle.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = GrowPruneCycle(2, 2, 0, grow={"name": "widen", "layers": ["fc1"], "amount": 1},
                           prune={"name": "structured_prune", "layers": ["fc1"], "amount": 1},
                           embargo=Embargo(net(), 3))  # fmt: skip
    fresh.load_state_dict(state)
    assert fresh.state_dict() == cycle.state_dict()
    assert [a["step"] for a in fresh.attempts] == [1, 3, 5, 7]
    assert state["embargo"] == {"until": {"fc1": 10}}
    with pytest.raises(ValueError, match=r"GrowPruneCycle state must have keys \['attempts', "):
        fresh.load_state_dict({})
    bare = GrowPruneCycle(2, 2, 0, grow="widen", prune=None)
    with pytest.raises(ValueError, match=r"disagree on 'prune' \(saved: present\); build it"):
        bare.load_state_dict(state | {"embargo": None})


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((-1, 2, 3), {}, ValueError, r"GrowPruneCycle: grow_steps must be an int >= 0, got -1"),
        ((1, 2.0, 3), {}, ValueError, r"GrowPruneCycle: prune_steps must be an int >= 0, got 2.0"),
        ((1, 2, True), {}, ValueError, r"stabilise_steps must be an int >= 0, got True"),
        ((0, 0, 0), {}, ValueError, r"GrowPruneCycle: the phases are all empty; give some phase"),
        ((1, 1, 1), {"every": 0}, ValueError, r"every must be None \(once per phase\) or an int"),
        ((1, 1, 1), {"grow": 3}, TypeError, r"GrowPruneCycle grow: action must be a dynarch"),
        ((1, 1, 1), {"budget": object()}, TypeError, r"GrowPruneCycle: budget must have a method"),
        ((1, 1, 1), {"embargo": "x"}, TypeError, r"GrowPruneCycle: embargo must be a dynarch"),
        (
            (1, 1, 1),
            {"grow": GrowAsNeeded(Always(), "widen"), "embargo": Embargo(nn.Linear(1, 1), 1)},
            ValueError,
            r"budget and embargo apply to a grow action; give them to the grow callback \(Grow",
        ),
        (
            (1, 1, 1),
            {"grow": None, "embargo": Embargo(nn.Linear(1, 1), 1)},
            ValueError,
            r"GrowPruneCycle: budget and embargo need a grow action, got grow=None",
        ),
        (
            (1, 1, 1),
            {"grow": lambda t: None, "embargo": Embargo(nn.Linear(1, 1), 1)},
            ValueError,
            r"GrowPruneCycle: embargo needs an action that names its targets and cost",
        ),
    ],
)
def test_errors(args: tuple[Any, ...], kwargs: dict[str, Any], exc: type, match: str) -> None:
    parts = {"grow": "widen", "prune": None} | kwargs
    with pytest.raises(exc, match=match):
        GrowPruneCycle(*args, **parts)


def test_phase_step_errors_and_fit_checks() -> None:
    cycle = GrowPruneCycle(1, 1, 1, grow="widen", prune=None)
    with pytest.raises(ValueError, match=r"step must be an int >= 1 \(steps count from 1\), got 0"):
        cycle.phase(0)
    model = net()
    bad = GrowPruneCycle(1, 1, 1, grow=None, prune={"name": "structured_prune", "layers": ["x"],
                                                    "amount": 1})  # fmt: skip
    with pytest.raises(KeyError, match="model has no submodule named 'x'"):
        trainer(model, bad).fit()
    other = GrowPruneCycle(1, 1, 1, grow="widen", prune=None, embargo=Embargo(net(), 2))
    with pytest.raises(ValueError, match=r"GrowPruneCycle: the embargo listens to a different"):
        trainer(model, other).fit()
    assert dynarch.history(model) == []
