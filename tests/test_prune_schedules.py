"""Tests of dynarch.prune schedules (gradual magnitude, overparameterise-then-prune) and the
prune-method registry."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import dynarch
from dynarch._engine import engine_state
from dynarch.callbacks import LambdaCallback
from dynarch.events import Event
from dynarch.prune import (
    PRUNERS,
    GradualMagnitudePruning,
    OverparameterizeThenPrune,
    get_pruner,
    magnitude_prune,
    register_pruner,
    scheduled_sparsity,
)
from dynarch.train import Trainer
from models import mlp

SIZES = {"0": 60, "2": 120, "4": 36}
DATA = (torch.randn(40, 6, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 3)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def zhu_gupta(t: int, s_i: float, s_f: float, t0: int, n_dt: int) -> float:
    return s_f + (s_i - s_f) * (1 - (t - t0) / n_dt) ** 3


def pruned_sets(model: nn.Module) -> dict[str, Tensor]:
    return {n: ~model.get_submodule(n).weight_mask for n in SIZES}


def test_cubic_schedule_equals_formula() -> None:
    model = mlp()
    gmp = GradualMagnitudePruning(model, sgd(model), 0.8, 10, 50, 10, initial_sparsity=0.1)
    for t in range(0, 71):
        if t < 10:
            expected = 0.0
        elif t > 50:
            expected = 0.8
        else:
            expected = zhu_gupta(t, 0.1, 0.8, 10, 40)
        assert gmp.sparsity_at(t) == pytest.approx(expected, abs=1e-12)
    assert gmp.sparsity_at(10) == 0.1 and gmp.sparsity_at(50) == 0.8
    assert gmp.sparsity_at(30) == pytest.approx(0.7125)  # 0.8 - 0.7 / 8
    assert [t for t in range(70) if gmp.is_pruning_step(t)] == [10, 20, 30, 40, 50]
    off_grid = GradualMagnitudePruning(model, None, 0.5, 0, 10, 4)
    assert [t for t in range(20) if off_grid.is_pruning_step(t)] == [0, 4, 8, 10]
    linear = scheduled_sparsity(7, initial=0.2, final=0.6, start=5, end=9, schedule="linear")
    assert linear == pytest.approx(0.4)
    assert scheduled_sparsity(3, initial=0.2, final=0.6, start=5, end=9) == 0.2  # clamped


def test_gmp_with_trainer_events_and_zero_state(tmp_path: Path) -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gmp = GradualMagnitudePruning(model, opt, 0.9, start_step=2, end_step=8, frequency=3)
    history: list[dict[str, Tensor]] = []
    engine_state(model).add_listener(lambda e: history.append(pruned_sets(model)))
    trainer = Trainer(
        model, opt, DATA, batch_size=4, max_steps=10, callbacks=[gmp], run_dir=tmp_path,
        progress=False,
    )  # fmt: skip
    trainer.fit()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    events = [Event.from_dict(json.loads(line)) for line in lines]
    # Step 2 is on the schedule but its sparsity is 0 (initial_sparsity): nothing to prune.
    assert gmp.sparsity_at(2) == 0.0
    assert [(e.op, e.step) for e in events] == [("prune", 5), ("prune", 8)]
    for e in events:
        s = gmp.sparsity_at(e.step)
        assert e.details["target"] == s
        assert {n: d["pruned"] for n, d in e.details["layers"].items()} == {
            n: round(s * k) for n, k in SIZES.items()
        }
    for a, b in itertools.pairwise(history):  # never un-prunes
        assert all(bool((a[n] <= b[n]).all()) for n in SIZES)
    assert gmp.last_step == 8
    for n in SIZES:
        layer = model.get_submodule(n)
        mask = layer.weight_mask
        assert int((~mask).sum()) == round(0.9 * SIZES[n])
        assert bool((layer.weight[~mask] == 0).all())
        for key in ("exp_avg", "exp_avg_sq"):
            assert bool((opt.state[layer.weight][key][~mask] == 0).all())


def test_gmp_update_state_and_resume() -> None:
    model = mlp()
    gmp = GradualMagnitudePruning(model, sgd(model), 0.5, 0, 4, 2, scope="global")
    assert gmp.update(1) is None  # not a pruning step
    assert gmp.update(0) is None  # initial sparsity 0: nothing to prune
    event = gmp.update(2)
    assert event is not None and event.details["pruned"] == round(0.4375 * 216)
    assert gmp.update(2) is None  # already done
    buf = io.BytesIO()
    torch.save(gmp.state_dict(), buf)
    buf.seek(0)
    other = GradualMagnitudePruning(model, sgd(model), 0.5, 0, 4, 2, scope="global")
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.state_dict() == {"last_step": 2} and other.update(2) is None
    assert other.update(4) is not None
    assert [e.op for e in dynarch.history(model)] == ["prune", "prune"]
    with pytest.raises(ValueError, match=r"GradualMagnitudePruning state must have keys"):
        other.load_state_dict({})


def test_gmp_prunes_at_step_zero_on_fit_start() -> None:
    model = mlp()
    opt = sgd(model)
    gmp = GradualMagnitudePruning(model, opt, 0.8, 0, 10, 5, initial_sparsity=0.5)
    Trainer(model, opt, DATA, max_steps=1, callbacks=[gmp], progress=False).fit()
    assert [(e.step, e.details["target"]) for e in dynarch.history(model)] == [(0, 0.5)]


def test_otp_phases_and_schedule() -> None:
    model = mlp()
    otp = OverparameterizeThenPrune(model, sgd(model), 0.9, total_steps=100)
    assert (otp.train_end, otp.prune_end, otp.pruning.frequency) == (60, 80, 2)
    assert [otp.phase_at(t) for t in (0, 1, 60, 61, 79, 80, 81, 100)] == [
        "train", "train", "train", "prune", "prune", "prune", "finetune", "finetune",
    ]  # fmt: skip
    assert otp.phase == "train"
    assert otp.sparsity_at(70) == pytest.approx(0.7875)
    assert otp.sparsity_at(50) == 0.0 and otp.sparsity_at(90) == 0.9
    lin = OverparameterizeThenPrune(model, None, 0.9, 100, 0.5, 0.5, schedule="linear")
    assert lin.sparsity_at(75) == pytest.approx(0.45) and lin.prune_end == 100
    assert lin.phase_at(100) == "prune"


def test_otp_with_trainer() -> None:
    model = mlp()
    opt = sgd(model)
    otp = OverparameterizeThenPrune(
        model, opt, 0.75, total_steps=10, train_frac=0.4, prune_frac=0.4
    )
    phases: list[str] = []
    masks_after: dict[int, dict[str, Tensor]] = {}

    def record(trainer: Trainer) -> None:
        phases.append(otp.phase)
        masks_after[trainer.step] = {
            n: m.weight_mask.clone() for n, m in model.named_modules() if hasattr(m, "weight_mask")
        }

    cbs = [otp, LambdaCallback(on_step_end=record)]
    Trainer(model, opt, DATA, batch_size=4, max_steps=10, callbacks=cbs, progress=False).fit()
    assert phases == ["train"] * 4 + ["prune"] * 4 + ["finetune"] * 2
    events = dynarch.history(model)
    assert [e.step for e in events] == [5, 6, 7, 8]
    assert [e.reason for e in events] == ["overparameterize-then-prune"] * 4
    assert events[-1].details["pruned"] == round(0.75 * 216)  # global scope by default
    assert masks_after[4] == {}
    assert all(torch.equal(masks_after[10][n], m) for n, m in masks_after[8].items())
    buf = io.BytesIO()
    torch.save(otp.state_dict(), buf)
    buf.seek(0)
    other = OverparameterizeThenPrune(model, opt, 0.75, 10, 0.4, 0.4)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.phase == "finetune" and other.state_dict() == {
        "step": 10,
        "pruning": {"last_step": 8},
    }
    with pytest.raises(ValueError, match=r"OverparameterizeThenPrune state must have keys"):
        other.load_state_dict({"step": 1})


@pytest.mark.parametrize("kind", ["otp", "gmp"])
def test_schedule_without_optimizer_adopts_the_trainers(kind: str) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched: GradualMagnitudePruning | OverparameterizeThenPrune
    if kind == "otp":
        sched = OverparameterizeThenPrune(model, None, 0.75, total_steps=20, train_frac=0.2)
    else:
        sched = GradualMagnitudePruning(model, None, 0.75, 4, 8, 2)
    Trainer(model, opt, DATA, batch_size=4, max_steps=20, callbacks=[sched], progress=False).fit()
    masks = {n: m for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    assert set(masks) == set(SIZES)  # pruned, then fine-tuned with momentum for 12 steps
    assert all(int(m.weight[~m.weight_mask].count_nonzero()) == 0 for m in masks.values())
    assert all(
        not opt.state[m.weight]["momentum_buffer"][~m.weight_mask].any() for m in masks.values()
    )


def test_schedule_refuses_another_trainer_optimizer_or_model() -> None:
    model = mlp()
    otp = OverparameterizeThenPrune(model, sgd(model), 0.5, total_steps=10)
    trainer = Trainer(model, sgd(model), DATA, batch_size=4, max_steps=2, progress=False)
    with pytest.raises(
        ValueError,
        match=r"OverparameterizeThenPrune: .*another optimizer .* pass the trainer's optimizer",
    ):
        otp.on_fit_start(trainer)
    gmp = GradualMagnitudePruning(mlp(), None, 0.5, 0, 4, 1)
    with pytest.raises(
        ValueError, match=r"GradualMagnitudePruning: the trainer trains another model"
    ):
        gmp.on_fit_start(trainer)
    frozen = mlp()
    gmp = GradualMagnitudePruning(frozen, None, 0.5, 0, 4, 1)
    other = torch.optim.SGD([frozen[0].bias], lr=0.1)
    with pytest.raises(
        ValueError, match=r"GradualMagnitudePruning: the optimizer does not hold the weights"
    ):
        gmp.on_fit_start(Trainer(frozen, other, DATA, batch_size=4, max_steps=2, progress=False))
    assert dynarch.history(model) == [] and dynarch.history(frozen) == []


def test_schedule_errors() -> None:
    model = mlp()
    opt = sgd(model)
    with pytest.raises(
        ValueError, match=r"final_sparsity must be a number in \[0, 1\) .* got 1\.2"
    ):
        GradualMagnitudePruning(model, opt, 1.2, 0, 10, 1)
    with pytest.raises(ValueError, match=r"initial_sparsity 0\.6 must not exceed final_sparsity"):
        GradualMagnitudePruning(model, opt, 0.5, 0, 10, 1, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="start_step must be an int >= 0, got -1"):
        GradualMagnitudePruning(model, opt, 0.5, -1, 10, 1)
    with pytest.raises(ValueError, match="end_step must be an int >= 6, got 5"):
        GradualMagnitudePruning(model, opt, 0.5, 5, 5, 1)
    with pytest.raises(ValueError, match="frequency must be an int >= 1, got 0"):
        GradualMagnitudePruning(model, opt, 0.5, 0, 10, 0)
    with pytest.raises(ValueError, match=r"unknown scope 'model'; allowed: 'layer', 'global'"):
        GradualMagnitudePruning(model, opt, 0.5, 0, 10, 1, scope="model")
    with pytest.raises(ValueError, match=r"unknown schedule 'exp'; allowed: 'cubic', 'linear'"):
        GradualMagnitudePruning(model, opt, 0.5, 0, 10, 1, schedule="exp")
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer or None"):
        GradualMagnitudePruning(model, "adam", 0.5, 0, 10, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="include pattern 'x' matches no Linear/Conv2d module"):
        GradualMagnitudePruning(model, opt, 0.5, 0, 10, 1, include=["x"])
    with pytest.raises(ValueError, match="total_steps must be an int >= 1, got 0"):
        OverparameterizeThenPrune(model, opt, 0.5, 0)
    with pytest.raises(ValueError, match=r"train_frac must be a number in \[0, 1\], got 1.5"):
        OverparameterizeThenPrune(model, opt, 0.5, 10, train_frac=1.5)
    with pytest.raises(ValueError, match=r"prune_frac must be a number in \[0, 1\], got -0.1"):
        OverparameterizeThenPrune(model, opt, 0.5, 10, prune_frac=-0.1)
    with pytest.raises(ValueError, match=r"train_frac \+ prune_frac must be <= 1"):
        OverparameterizeThenPrune(model, opt, 0.5, 10, 0.7, 0.4)
    with pytest.raises(ValueError, match=r"prune phase of 10 steps with prune_frac=0\.01 is empty"):
        OverparameterizeThenPrune(model, opt, 0.5, 10, prune_frac=0.01)
    with pytest.raises(ValueError, match=r"unknown schedule 'step'; allowed"):
        scheduled_sparsity(1, initial=0, final=0.5, start=0, end=2, schedule="step")
    assert dynarch.history(model) == []


def test_registry() -> None:
    assert sorted(PRUNERS) == [
        "gradient_importance", "gradual_magnitude", "lottery_ticket", "magnitude",
        "overparameterize_then_prune", "structured",
    ]  # fmt: skip
    assert get_pruner("magnitude") is magnitude_prune
    assert get_pruner("overparameterize_then_prune") is OverparameterizeThenPrune
    with pytest.raises(ValueError, match=r"unknown pruner 'snip'; registered: \['gradient_"):
        get_pruner("snip")
    with pytest.raises(ValueError, match="a pruner named 'magnitude' is already registered"):
        register_pruner("magnitude")(lambda m: None)
    with pytest.raises(ValueError, match="pruner name must be a non-empty string, got ''"):
        register_pruner("")
    register_pruner("magnitude")(magnitude_prune)  # re-registering the same object is fine
    assert get_pruner("magnitude") is magnitude_prune
