"""Tests of dynarch.schedules.GrowAsNeeded (trigger → growth → cooldown, budget, embargo,
exact resume)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dynarch
from dynarch._engine import count_params, engine_state
from dynarch.callbacks import At, Callback, LambdaCallback
from dynarch.events import Event
from dynarch.models import mlp
from dynarch.prune import magnitude_prune
from dynarch.schedules import Embargo, GrowAsNeeded, grow_once
from dynarch.train import Trainer
from dynarch.triggers import Plateau, Trigger

DATA = (torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3)


class Script(Trigger):
    """Fires on the listed update numbers (1-based); counts updates and resets."""

    def __init__(self, fires: set[int] | None = None, where: list[str] | None = None) -> None:
        self.fires = fires
        self.n = 0
        self.resets = 0
        self._where = where

    def update(self, value: float) -> bool:
        self.n += 1
        return self.fires is None or self.n in self.fires

    def reset(self) -> None:
        self.resets += 1

    def where(self) -> list[str] | None:
        return self._where

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n, self.resets = state["n"], state["resets"]


class Cap:
    """A duck-typed budget: at most ``limit`` parameters; records every question."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.asked: list[int] = []

    def can_grow(self, model: nn.Module, n_params: int) -> bool:
        self.asked.append(n_params)
        return count_params(model) + n_params <= self.limit


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(8, [10, 6], 3)


def trainer(model: nn.Module, callbacks: Sequence[Callback] = (), **kw: Any) -> Trainer:
    # tests below drive steps by hand: a long horizon keeps them before the run's last step
    kw.setdefault("epochs", 100)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Trainer(model, opt, DATA, eval=DATA, batch_size=16, progress=False,
                   callbacks=callbacks, **kw)  # fmt: skip


def at_step(t: Trainer, step: int) -> Trainer:
    t.step = engine_state(t.model).step = step
    return t


def evaluate(grow: GrowAsNeeded, t: Trainer, *values: float) -> None:
    for v in values:
        grow.on_evaluate(t, {"val_loss": v, "val_accuracy": 0.5})


def widths(model: nn.Module) -> tuple[int, int]:
    return model.fc1.out_features, model.fc2.out_features


def test_cooldown_counts_evaluations_and_trigger_resets_after_growth() -> None:
    model = net()
    t = trainer(model)
    trig = Script()  # fires at every update it gets
    grow = GrowAsNeeded(trig, "widen", layers=["fc1"], amount=2, cooldown=2)
    seen = []
    for v in range(7):
        evaluate(grow, t, float(v))
        seen.append((model.fc1.out_features, grow.cooldown_left))
    assert seen == [(12, 2), (12, 1), (12, 0), (14, 2), (14, 1), (14, 0), (16, 2)]
    assert (trig.n, trig.resets, grow.growths) == (3, 3, 3)  # not fed during cooldown
    assert [e.reason for e in grow.events] == ["script(val_loss)"] * 3


def test_plateau_fires_grows_and_is_reset() -> None:
    model = net()
    t = at_step(trainer(model), 40)
    plateau = Plateau(patience=2, threshold=0.1)
    grow = GrowAsNeeded(plateau, "widen", layers=["fc1", "fc2"], factor=2.0)
    evaluate(grow, t, 1.0, 0.95)
    assert plateau.state_dict() == {"best": 1.0, "wait": 1} and widths(model) == (10, 6)
    evaluate(grow, t, 0.97)  # second non-improvement: fires
    assert widths(model) == (20, 12) and plateau.state_dict() == {"best": None, "wait": 0}
    assert [(e.op, e.target, e.step, e.reason) for e in grow.events] == [
        ("widen", "fc1", 40, "plateau(val_loss)"),
        ("widen", "fc2", 40, "plateau(val_loss)"),
    ]
    assert grow.attempts == [
        {"step": 40, "reason": "plateau(val_loss)", "grown": ["fc1", "fc2"], "embargoed": [],
         "over_budget": [], "unaffordable": [], "paid": [], "events": 2}
    ]  # fmt: skip


def test_max_growths_and_tag_and_monitor() -> None:
    model = net()
    t = trainer(model)
    grow = GrowAsNeeded(Script(), "widen", layers=["fc1"], amount=1, max_growths=2,
                        monitor="val_accuracy", tag="phase")  # fmt: skip
    evaluate(grow, t, 1.0, 1.0, 1.0, 1.0)
    assert model.fc1.out_features == 12 and grow.growths == 2
    assert grow.reason == "phase:script(val_accuracy)"
    with pytest.raises(ValueError, match=r"GrowAsNeeded monitors 'val_accuracy' but the eval"):
        grow.on_evaluate(t, {"val_loss": 1.0})


def test_budget_refuses_growth_that_would_exceed_it() -> None:
    model = net()
    t = trainer(model)
    base = count_params(model)  # 8*10+10 + 10*6+6 + 6*3+3 = 177
    cost_fc1, cost_fc2 = 2 * (8 + 1 + 6), 2 * (10 + 1 + 3)  # 30, 28
    budget = Cap(base + cost_fc2)
    trig = Plateau(patience=1, threshold=0.0)
    grow = GrowAsNeeded(trig, "widen", layers=["fc1", "fc2"], amount=2, budget=budget)
    evaluate(grow, t, 1.0, 1.0)
    assert budget.asked == [cost_fc1, cost_fc2] and widths(model) == (10, 8)
    assert grow.attempts[-1]["grown"] == ["fc2"] and grow.attempts[-1]["over_budget"] == ["fc1"]
    evaluate(grow, t, 1.0, 1.0)  # now nothing fits: no growth, trigger not reset
    assert widths(model) == (10, 8) and grow.growths == 1
    assert grow.attempts[-1] | {"step": 0} == {
        "step": 0, "reason": "plateau(val_loss)", "grown": [], "embargoed": [],
        "over_budget": ["fc1", "fc2"], "unaffordable": [], "paid": [], "events": 0,
    }  # fmt: skip
    assert trig.wait == 1  # still plateaued: retried at the next evaluation
    budget.limit += 1000
    evaluate(grow, t, 1.0)
    assert widths(model) == (12, 10) and trig.wait == 0


def test_embargo_prevents_thrashing() -> None:
    """Prune fc1 at step s; growing fc1 is refused until s + N, then allowed."""
    model = net()
    t = trainer(model)
    s, n = 10, 20
    embargo = Embargo(model, n)
    trig = Script()
    grow = GrowAsNeeded(trig, "widen", layers=["fc1"], amount=2, embargo=embargo)
    at_step(t, s)
    magnitude_prune(model, 0.5, include=["fc1"], reason="prune")
    for step in (s, s + 1, s + n - 1):
        evaluate(grow, at_step(t, step), 1.0)
        assert model.fc1.out_features == 10 and grow.attempts[-1]["embargoed"] == ["fc1"]
    assert trig.resets == 0 and grow.growths == 0
    evaluate(grow, at_step(t, s + n), 1.0)
    assert model.fc1.out_features == 12 and grow.attempts[-1]["grown"] == ["fc1"]
    assert trig.resets == 1 and engine_state(model).history[-1].step == s + n
    embargo.close()


def test_trigger_where_hint_and_function_actions() -> None:
    model = net()
    t = trainer(model)
    grow = GrowAsNeeded(Script(where=["fc2"]), "widen", amount=1)
    evaluate(grow, t, 1.0)
    assert widths(model) == (10, 7)
    calls: list[str] = []

    def fn(tr: Trainer, reason: str) -> Event:
        calls.append(reason)
        return dynarch.widen(tr.model, "fc1", tr.model.fc1.out_features + 1, reason=reason)

    grow = GrowAsNeeded(Script(), fn, cooldown=1)
    evaluate(grow, t, 1.0, 1.0, 1.0)
    assert calls == ["script(val_loss)"] * 2 and model.fc1.out_features == 12
    nothing = Script()
    idle = GrowAsNeeded(nothing, lambda tr: None)
    evaluate(idle, t, 1.0, 1.0)
    assert idle.growths == 0 and nothing.resets == 0 and len(idle.attempts) == 2


def test_grow_once_without_anything_to_do() -> None:
    model = net()
    t = trainer(model)
    events, record = grow_once(t, GrowAsNeeded(Script(), "widen", max_width=6).action, "r")
    assert events == [] and record["grown"] == [] and widths(model) == (10, 6)
    events, record = grow_once(t, GrowAsNeeded(Script(), "widen", max_width=7).action, "r")
    assert record["grown"] == ["fc2"] and widths(model) == (10, 7)


def test_constructor_errors() -> None:
    fn = lambda t: None  # noqa: E731
    cases: list[tuple[dict[str, Any], type, str]] = [
        ({"trigger": 3}, TypeError, r"trigger must be a dynarch.triggers.Trigger .* got 3"),
        ({"trigger": "nope"}, ValueError, r"unknown trigger 'nope'; registered triggers"),
        ({"action": 3}, TypeError, r"GrowAsNeeded: action must be a dynarch.schedules.Action"),
        ({"action": fn, "amount": 2}, TypeError, r"action keyword arguments \['amount'\] need"),
        ({"monitor": ""}, ValueError, r"monitor must be a metric name such as 'val_loss', got ''"),
        ({"cooldown": -1}, ValueError, r"cooldown must be an int >= 0 \(evaluations\), got -1"),
        ({"max_growths": 0}, ValueError, r"max_growths must be None or an int >= 1, got 0"),
        ({"tag": 3}, TypeError, r"GrowAsNeeded: tag must be a str, got 3"),
        ({"budget": 5}, TypeError, r"budget must have a method can_grow\(model, n_params\)"),
        ({"embargo": 5}, TypeError, r"embargo must be a dynarch.schedules.Embargo, got int"),
        (
            {"action": fn, "budget": Cap(1)},
            ValueError,
            r"GrowAsNeeded: budget needs an action that names its targets and cost",
        ),
    ]
    for kwargs, exc, match in cases:
        args = {"trigger": Script(), "action": "widen"} | kwargs
        with pytest.raises(exc, match=match):
            GrowAsNeeded(args.pop("trigger"), args.pop("action"), **args)


def test_trigger_by_name_and_mapping() -> None:
    grow = GrowAsNeeded({"name": "plateau", "patience": 4}, {"name": "widen", "amount": 3})
    assert isinstance(grow.trigger, Plateau) and grow.trigger.patience == 4
    assert GrowAsNeeded("plateau", "widen").reason == "plateau(val_loss)"


def test_fit_start_errors() -> None:
    model = net()
    no_eval = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DATA, progress=False,
                      callbacks=[GrowAsNeeded(Script(), "widen")])  # fmt: skip
    with pytest.raises(ValueError, match=r"monitors 'val_loss' at evaluations but the trainer has"):
        no_eval.fit()
    other = GrowAsNeeded(Script(), "widen", embargo=Embargo(net(), 3))
    with pytest.raises(ValueError, match=r"the embargo listens to a different model than the"):
        trainer(model, [other]).fit()
    with pytest.raises(KeyError, match="model has no submodule named 'fc7'"):
        trainer(model, [GrowAsNeeded(Script(), "widen", layers=["fc7"])]).fit()


def test_load_state_errors() -> None:
    grow = GrowAsNeeded(Script(), "widen")
    with pytest.raises(ValueError, match=r"GrowAsNeeded state must have keys \['action', "):
        grow.load_state_dict({"trigger": {}})
    state = GrowAsNeeded(Script(), "widen", embargo=Embargo(net(), 2)).state_dict()
    with pytest.raises(ValueError, match=r"disagree on the embargo \(this one has no embargo\)"):
        grow.load_state_dict(state)


# ----------------------------------------------------------------------- exact resume
STEPS, STOP = 48, 22  # 4 steps per epoch; the stop is mid-epoch


def run(path: Path, *, stop: int | None, resume: bool) -> dict[str, Any]:
    losses: list[float] = []
    if resume:
        ck = dynarch.load(path)
        model = ck.model
    else:
        model = net()
    embargo = Embargo(model, 30)
    grow = GrowAsNeeded(Plateau(patience=2, threshold=10.0), "widen", layers=["fc1", "fc2"],
                        amount=3, cooldown=1, embargo=embargo)  # fmt: skip
    callbacks = [
        embargo,
        At(6, lambda t: magnitude_prune(t.model, 0.5, include=["fc2"], optimizer=t.optimizer)),
        grow,
        LambdaCallback(on_step_end=lambda t: losses.append(float(t.last_loss))),
    ]
    t = trainer(model, callbacks, epochs=12, max_steps=stop or STEPS, seed=3)
    if resume:
        t.optimizer = ck.load_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        t.load_state_dict(ck.state["trainer"])
        ck.restore_rng()
    t.fit()
    if stop is not None:
        dynarch.save(path, model, t.optimizer, trainer=t.state_dict())
    history = [(e.step, e.op, e.target, e.reason) for e in engine_state(model).history]
    return {"losses": losses, "params": model.state_dict(), "grow": grow.state_dict(),
            "history": history}  # fmt: skip


def test_resume_mid_run_is_identical(tmp_path: Path) -> None:
    full = run(tmp_path / "unused", stop=None, resume=False)
    first = run(tmp_path / "ckpt", stop=STOP, resume=False)
    saved = torch.load(io.BytesIO(_saved(tmp_path / "ckpt")), weights_only=True)
    callbacks = saved["user"]["trainer"]["callbacks"]
    assert callbacks[0]["state"] == {"until": {"fc2": 36}}  # the Embargo itself
    assert callbacks[2]["state"] == first["grow"]
    assert first["grow"]["growths"] == 1 and first["grow"]["embargo"] == {"until": {"fc2": 36}}
    assert first["grow"]["trigger"]["wait"] == 0 and first["grow"]["trigger"]["best"] is not None
    second = run(tmp_path / "ckpt", stop=None, resume=True)
    assert first["losses"] + second["losses"] == full["losses"]
    assert second["grow"] == full["grow"] and second["history"] == full["history"]
    assert full["params"].keys() == second["params"].keys()
    for name, value in full["params"].items():
        assert torch.equal(value, second["params"][name]), name
    # growth happened before and after the stop; fc2 was refused while embargoed (6..35)
    grown = [(a["step"], a["grown"], a["embargoed"]) for a in full["grow"]["attempts"]]
    assert grown == [(12, ["fc1"], ["fc2"]), (28, ["fc1"], ["fc2"]), (44, ["fc1", "fc2"], [])]
    assert full["history"] == [
        (6, "prune", "*", ""),
        (12, "widen", "fc1", "plateau(val_loss)"),
        (28, "widen", "fc1", "plateau(val_loss)"),
        (44, "widen", "fc1", "plateau(val_loss)"),
        (44, "widen", "fc2", "plateau(val_loss)"),
    ]
    assert full["params"]["fc1.weight"].shape == (19, 8)


def _saved(path: Path) -> bytes:
    return (path / "state.pt").read_bytes()


def test_no_growth_at_the_evaluation_after_the_last_step() -> None:
    from dynarch.callbacks import GrowOnPlateau, training_done
    from dynarch.triggers import Every

    model = net()
    grow = GrowAsNeeded(Every(1), "widen", layers=["fc1"], amount=1)
    t = trainer(model, [grow], epochs=3)  # 4 steps per epoch: evaluations at 4, 8 and 12
    t.fit()
    assert t.total_steps == 12 and training_done(t)
    assert [(e.op, e.step) for e in engine_state(model).history] == [("widen", 4), ("widen", 8)]
    assert model.fc1.out_features == 12
    # the older GrowOnPlateau: the plateau fires at the second evaluation (step 8)
    for kw, grown in (({"epochs": 2}, []), ({"epochs": 3, "max_steps": 9}, [("widen", 8)])):
        model = net()
        old = GrowOnPlateau(["fc1"], patience=1, threshold=10.0)
        trainer(model, [old], **kw).fit()  # step 8 is the last step of the first run only
        assert [(e.op, e.step) for e in engine_state(model).history] == grown


def test_each_widen_target_is_priced_after_the_ones_before_it_grew() -> None:
    model = net()  # 8-10-6-3
    t = trainer(model)
    base = count_params(model)
    cost_fc1 = 2 * (8 + 1 + 6)  # 30: fc1 gets 2 rows (and biases), fc2 2 input columns
    cost_fc2_after = 2 * (12 + 1 + 3)  # 32: fc2's rows now have 12 inputs, not 10 (28)
    budget = Cap(base + cost_fc1 + 30)  # room for fc2 as priced before fc1 grew, not after
    grow = GrowAsNeeded(Plateau(patience=1, threshold=0.0), "widen", layers=["fc1", "fc2"],
                        amount=2, budget=budget)  # fmt: skip
    evaluate(grow, t, 1.0, 1.0)
    assert budget.asked == [cost_fc1, cost_fc2_after]
    assert widths(model) == (12, 6) and count_params(model) <= budget.limit
    assert grow.attempts[-1]["grown"] == ["fc1"] and grow.attempts[-1]["over_budget"] == ["fc2"]
