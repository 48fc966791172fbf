"""Growth policies of a run config (dynarch.policies): the callbacks each ``growth:`` section
becomes, budgets kept during training, held-out batches drawn from training data only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from dynarch._engine import count_params, engine_state, set_seed
from dynarch.callbacks import Callback
from dynarch.cli import SparsifyAtStart, execute
from dynarch.config import ConfigError, GrowthConfig, validate_config
from dynarch.events import Event
from dynarch.growth.actions import BudgetEconomy, PatchesAction
from dynarch.growth.tournament import TournamentCallback
from dynarch.models import mlp
from dynarch.policies import growth_callbacks, held_out
from dynarch.report import active_params
from dynarch.schedules import GrowAsNeeded, WidenAction
from dynarch.train import Trainer
from dynarch.triggers import Budget, Every, Plateau

_GEN = torch.Generator().manual_seed(0)
X = torch.randn(256, 12, generator=_GEN)
Y = X[:, :3].argmax(1)
VX = torch.randn(64, 12, generator=_GEN)
VY = VX[:, :3].argmax(1)


def _model(hidden: list[int]) -> nn.Module:
    torch.manual_seed(0)
    model = mlp(12, hidden, 3)
    set_seed(model, 0)
    return model


def _exact(message: str) -> str:
    return f"^{re.escape(message)}$"


class _Log:
    """Engine listener: (op, target, reason, active params) after each structural change."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows: list[tuple[str, str, str, int]] = []
        engine_state(model).add_listener(self)

    def __call__(self, event: Event) -> None:
        self.rows.append((event.op, event.target, event.reason, active_params(self.model)))


def _active(model: nn.Module) -> dict[str, int]:
    """Active weights of each masked layer."""
    masked = [(n, m) for n, m in model.named_modules() if hasattr(m, "weight_mask")]
    return {n: int(m.get_buffer("weight_mask").sum()) for n, m in masked}


def _fit(model: nn.Module, callbacks: list[Callback], epochs: int) -> Trainer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(model, opt, (X, Y), eval=(VX, VY), epochs=epochs, batch_size=64,
                   callbacks=callbacks, progress=False).fit()  # fmt: skip


# ------------------------------------------------------------------ callbacks per policy


def test_widen_on_plateau_without_budget_is_grow_as_needed_without_budget() -> None:
    cfg = GrowthConfig(patience=3, threshold=0.1, factor=2.0, max_width=40, init="zero",
                       noise=0.5, max_events=2, cooldown=1, monitor="val_accuracy")  # fmt: skip
    (cb,) = growth_callbacks(cfg, _model([8, 8]), (X, Y))
    assert type(cb) is GrowAsNeeded and cb.budget is None
    act = cb.action
    assert isinstance(act, WidenAction)
    assert (act.layers, act.factor, act.max_width, act.init, act.noise) == (
        ["fc1", "fc2"], 2.0, 40, "zero", 0.5,
    )  # fmt: skip
    assert (cb.monitor, cb.max_growths, cb.cooldown) == ("val_accuracy", 2, 1)
    assert isinstance(cb.trigger, Plateau)
    assert (cb.trigger.patience, cb.trigger.threshold, cb.trigger.mode) == (3, 0.1, "max")


def test_widen_with_budget_is_grow_as_needed() -> None:
    model = _model([8, 8])  # 203 parameters
    cfg = GrowthConfig(max_params=0.5, targets=["fc2"], factor=2.0, init="random", noise=0.1,
                       max_width=20, cooldown=2, max_events=3, patience=4)  # fmt: skip
    (cb,) = growth_callbacks(cfg, model, (X, Y))
    assert type(cb) is GrowAsNeeded
    assert isinstance(cb.trigger, Plateau) and cb.trigger.patience == 4
    assert (cb.trigger.threshold, cb.trigger.mode) == (0.01, "min")
    assert isinstance(cb.budget, Budget) and cb.budget.max_params == 101
    assert (cb.monitor, cb.cooldown, cb.max_growths, cb.reason) == (
        "val_loss", 2, 3, "plateau(val_loss)",
    )  # fmt: skip
    act = cb.action
    assert isinstance(act, WidenAction)
    assert (act.layers, act.factor, act.init, act.noise, act.max_width) == (
        ["fc2"], 2.0, "random", 0.1, 20,
    )  # fmt: skip


def test_widen_every_evaluations() -> None:
    (cb,) = growth_callbacks(GrowthConfig(trigger="every", every=3), _model([8]), (X, Y))
    assert type(cb) is GrowAsNeeded and cb.budget is None
    assert isinstance(cb.trigger, Every) and cb.trigger.n == 3
    assert cb.reason == "every(val_loss)"


def test_widen_unknown_target() -> None:
    with pytest.raises(
        ConfigError,
        match=_exact(
            "growth.targets: 'fc3' is not a widenable layer of this model (did you mean 'fc2'?); "
            "allowed: fc1, fc2 (or 'hidden' for all)"
        ),
    ):
        growth_callbacks(GrowthConfig(targets=["fc3"]), _model([8, 8]), (X, Y))


def test_patches_is_grow_as_needed_with_patches_action() -> None:
    model = _model([32, 32])
    cfg = GrowthConfig(policy="patches", amount=0.25, patch_size=8, max_params=300,
                       monitor="val_accuracy", cooldown=1)  # fmt: skip
    (cb,) = growth_callbacks(cfg, model, (X, Y))
    assert type(cb) is GrowAsNeeded and isinstance(cb.action, PatchesAction)
    assert (cb.action.amount, cb.action.patch_size) == (0.25, 8)
    assert cb.action.budget is cb.budget and cb.budget.max_params == 300
    assert (cb.reason, cb.cooldown) == ("plateau(val_accuracy)", 1)
    assert isinstance(cb.trigger, Plateau) and cb.trigger.mode == "max"
    (free,) = growth_callbacks(GrowthConfig(policy="patches"), model, (X, Y))
    assert free.budget is None and free.action.budget is None  # type: ignore[attr-defined]


def test_tournament_callbacks() -> None:
    model = _model([8, 8])
    cfg = GrowthConfig(policy="tournament", trigger="every", every=2, max_params=0.5,
                       candidates=["patch", "widen"], patch_size=4, max_events=5)  # fmt: skip
    (cb,) = growth_callbacks(cfg, model, (X, Y))
    assert type(cb) is TournamentCallback
    assert (cb.every, cb.plateau, cb.monitor, cb.max_rounds) == (2, None, "val_loss", 5)
    t = cb.tournament
    assert t.model is model and t.kinds == ("patch", "widen") and t.patch_size == 4
    assert isinstance(t.economy, BudgetEconomy) and t.economy.budget.max_params == 101
    assert (t.probe_data[0].shape[0], t.held_out[0].shape[0]) == (128, 128)  # 256 samples, halved
    cfg = GrowthConfig(policy="tournament", patience=3, threshold=0.5, monitor="val_accuracy")
    (cb,) = growth_callbacks(cfg, model, (X, Y))
    assert cb.every is None and cb.tournament.economy is None  # type: ignore[attr-defined]
    plateau = cb.plateau  # type: ignore[attr-defined]
    assert (plateau.patience, plateau.threshold, plateau.mode) == (3, 0.5, "max")


def test_tournament_takes_a_dataset_and_refuses_other_data() -> None:
    class Data:
        train_x, train_y = X[:10], Y[:10]

    (cb,) = growth_callbacks(GrowthConfig(policy="tournament"), _model([8]), Data())
    assert cb.tournament.held_out[0].shape[0] + cb.tournament.probe_data[0].shape[0] == 10  # type: ignore[attr-defined]
    message = "growth.policy tournament needs the training data as an (x, y) pair"
    for bad in ([X, Y], (X,), X):
        with pytest.raises(ConfigError, match=_exact(message)):
            growth_callbacks(GrowthConfig(policy="tournament"), _model([8]), bad)


def test_patches_on_a_dense_model_fails_at_fit_start() -> None:
    model = _model([8])
    message = (
        "patches: no masked hidden layer to patch; sparsify the model first "
        "(config: a sparsity: section)"
    )
    with pytest.raises(ValueError, match=_exact(message)):
        _fit(model, growth_callbacks(GrowthConfig(policy="patches"), model, (X, Y)), 1)


# ---------------------------------------------------------------------- budgeted runs


def test_budgeted_widen_grows_and_never_exceeds_the_budget() -> None:
    model = _model([8, 8])
    assert count_params(model) == 203
    (cb,) = growth_callbacks(GrowthConfig(trigger="every", max_params=400), model, (X, Y))
    log = _Log(model)
    _fit(model, [cb], epochs=5)
    widened = [r for r in log.rows if r[0] == "widen"]
    assert [r[1] for r in widened] == ["fc1", "fc2"]  # one growth, both layers, then full
    assert all(r[2] == "every(val_loss)" and r[3] <= 400 for r in log.rows)
    assert active_params(model) == count_params(model) == 351
    assert cb.attempts[-1]["over_budget"] == ["fc1", "fc2"]  # type: ignore[attr-defined]


def test_budgeted_widen_of_a_sparse_model_stays_within_a_fraction() -> None:
    model = _model([32, 32])
    cfg = GrowthConfig(trigger="every", max_params=0.3)
    callbacks = growth_callbacks(cfg, model, (X, Y))
    cap = cfg.budget(count_params(model))
    assert cap == 471
    log = _Log(model)
    _fit(model, [SparsifyAtStart(0.1, "erk"), *callbacks], epochs=4)
    assert log.rows[0][:2] == ("sparsify", "*")
    # fc2 is priced after fc1 has grown (its inputs with it), at the most its Net2Net copies
    # can add: it no longer fits the budget
    assert [r[1] for r in log.rows if r[0] == "widen"] == ["fc1"]
    assert all(r[3] <= cap for r in log.rows) and active_params(model) <= cap


class _Before(Callback):
    """Records the model's output on ``x`` at each evaluation, before growth callbacks run."""

    def __init__(self, x: Tensor) -> None:
        self.x, self.out = x, torch.empty(0)

    def on_evaluate(self, trainer: Any, metrics: dict[str, float]) -> None:
        with torch.no_grad():
            self.out = trainer.model(self.x)


def test_patches_run_adds_connections_within_budget_and_keeps_the_function() -> None:
    model = _model([32, 32])
    cfg = GrowthConfig(policy="patches", trigger="every", max_params=0.3, amount=0.5,
                       patch_size=4)  # fmt: skip
    cap = cfg.budget(count_params(model))
    assert cap is not None and cap == 471  # 0.3 x 1571
    before = _Before(X[:32])
    kept: list[bool] = []
    masks: list[int] = []

    def check(event: Event) -> None:
        if event.op == "patch":
            with torch.no_grad():
                kept.append(torch.allclose(model(before.x), before.out, atol=1e-6))
            masks.append(sum(_active(model).values()))

    engine_state(model).add_listener(check)
    log = _Log(model)
    callbacks = [SparsifyAtStart(0.1, "uniform"), before, *growth_callbacks(cfg, model, (X, Y))]
    _fit(model, callbacks, epochs=6)
    patches = [e for e in engine_state(model).history if e.op == "patch"]
    assert len(patches) >= 2 and all(e.reason == "every(val_loss)" for e in patches)
    assert all(e.details["added"] > 0 and e.details["init"] == "zero" for e in patches)
    assert log.rows[0][:2] == ("sparsify", "*")
    sparse = log.rows[0][3]
    added = [e.details["added"] for e in patches]
    # every patch event adds exactly the connections it reports, within the budget
    grown = [m - masks[0] + added[0] for m in masks]
    assert grown == [sum(added[: i + 1]) for i in range(len(added))]
    assert all(r[3] <= cap for r in log.rows) and active_params(model) == sparse + sum(added)
    assert kept == [True] * len(patches)
    assert added[0] == 70  # ceil(0.5 * 38) + ceil(0.5 * 102): amount x active of fc1 and fc2


def test_tournament_run_grows_within_budget() -> None:
    model = _model([16, 16])
    cfg = GrowthConfig(policy="tournament", trigger="every", max_params=0.4,
                       candidates=["patch", "widen"])  # fmt: skip
    cap = cfg.budget(count_params(model))
    assert cap is not None and cap == 212
    log = _Log(model)
    callbacks = growth_callbacks(cfg, model, (X, Y))
    _fit(model, [SparsifyAtStart(0.1, "uniform"), *callbacks], epochs=3)
    rounds = [r for r in log.rows if r[0] == "tournament"]
    assert len(rounds) >= 1 and callbacks[0].rounds == len(rounds)  # type: ignore[attr-defined]
    assert all(r[3] <= cap for r in log.rows) and active_params(model) <= cap
    assert active_params(model) > log.rows[0][3]  # grew past the sparse start


# ------------------------------------------------------------------------ held-out data


def test_held_out_is_deterministic_for_an_engine_seed() -> None:
    x, y = torch.arange(100.0)[:, None], torch.arange(100)

    def draw(seed: int) -> tuple[Tensor, Tensor]:
        model = nn.Linear(1, 1)
        set_seed(model, seed)
        return held_out((x, y), 10, model)

    a, b, c = draw(3), draw(3), draw(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(a[0][:, 0].long(), a[1])  # rows stay paired
    assert a[1].unique().numel() == 10  # without replacement
    model = nn.Linear(1, 1)
    set_seed(model, 3)
    assert torch.equal(held_out((x, y), 1000, model)[1].sort().values, y)  # capped at the data


def test_execute_gives_growth_only_the_training_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dynarch.policies

    seen: list[Any] = []
    real = dynarch.policies.growth_callbacks

    def spy(cfg: GrowthConfig, model: nn.Module, train: Any) -> list[Callback]:
        seen.append(train)
        return real(cfg, model, train)

    monkeypatch.setattr(dynarch.policies, "growth_callbacks", spy)
    cfg = validate_config({
        "seed": 0, "threads": 1, "run_dir": str(tmp_path / "run"),
        "data": {"name": "mnist1d", "n_train": 300, "n_test": 100, "n_val": 100},
        "model": {"kind": "mlp", "hidden": [8]}, "train": {"epochs": 1, "batch_size": 100},
        "growth": {"policy": "tournament", "trigger": "every", "candidates": ["widen"]},
    })  # fmt: skip
    execute(cfg, progress=False, echo=lambda s: None, plots=False)
    from dynarch.data import load

    full = load("mnist1d", progress=False).subset(300, 100)
    ((x, y),) = seen
    assert torch.equal(x, full.train_x[:200]) and torch.equal(y, full.train_y[:200])
