"""Audit 10 (dynarch.lr): CosineLR composes with LRPlan (both orders, growth, exact resume), a
torch LR scheduler beside a plan is refused, LARS under ``step(closure)`` and LARS leaving
biases at factor 1."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynarch
from dynarch._engine import engine_state
from dynarch.callbacks import At, Callback, CosineLR
from dynarch.lr import LARS, LRPlan, Warmup
from dynarch.models import mlp
from dynarch.train import Trainer

X = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(2))
STEPS = 8  # 4 batches x 2 epochs


class _Stop(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer: Trainer) -> None:
        trainer.should_stop = trainer.step >= self.at


def _strategies() -> list[object]:
    return ["cascade", Warmup(steps=4)]  # static and dynamic (new units warm up)


def _grow(trainer: Trainer) -> None:
    dynarch.deepen(trainer.model, "fc1", optimizer=trainer.optimizer)


def _record(opt: torch.optim.Optimizer, used: list[dict[str, float]]) -> None:
    """Record the rate of every group at each update (post-step hook: what the step used)."""
    opt.register_step_post_hook(
        lambda o, a, k: used.append({g["name"]: g["lr"] for g in o.param_groups})
    )


def _run(order: str, stop: int = 99) -> tuple[Trainer, list[dict[str, float]]]:
    torch.manual_seed(0)
    model = mlp(4, [8, 8], 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    used: list[dict[str, float]] = []
    _record(opt, used)
    plan = LRPlan(model, 0.1, _strategies())
    first: list[Callback] = {"plan": [plan], "cosine-plan": [CosineLR(0.2), plan],
                             "plan-cosine": [plan, CosineLR(0.2)]}[order]  # fmt: skip
    trainer = Trainer(model, opt, (X, Y), batch_size=8, epochs=2, seed=3, progress=False,
                      callbacks=[*first, At(3, _grow), _Stop(stop)])  # fmt: skip
    return trainer.fit(), used


def _scale(step: int) -> float:
    """CosineLR(0.2)'s multiplier for the update of optimizer step ``step + 1``."""
    return 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * step / STEPS))


@pytest.mark.parametrize("order", ["cosine-plan", "plan-cosine"])
def test_cosine_scales_the_plans_rates_before_and_after_growth(order: str) -> None:
    _, plain = _run("plan")
    trainer, used = _run(order)
    assert len(used) == len(plain) == STEPS
    assert "act1_deep" not in used[2] and "act1_deep" in used[3]  # grown after step 3
    for k, (got, want) in enumerate(zip(used, plain, strict=True)):
        assert got == {n: pytest.approx(v * _scale(k), rel=1e-12) for n, v in want.items()}, k
    # the new unit (cascade depth 1 of 4: 0.1 ** (2/3)) warms up (1/4, 2/4) under the schedule
    assert used[3]["act1_deep"] == pytest.approx(0.1 * 0.1 ** (2 / 3) * 0.25 * _scale(3))
    assert used[4]["act1_deep"] == pytest.approx(0.1 * 0.1 ** (2 / 3) * 0.5 * _scale(4))
    for group in trainer.optimizer.param_groups:
        assert group["lr_schedule"] == pytest.approx(0.2)
        assert group["lr_base"] == pytest.approx(0.1 * group["lr_factor"])
        assert group["lr"] == pytest.approx(group["lr_base"] * 0.2)


@pytest.mark.parametrize("order", ["cosine-plan", "plan-cosine"])
def test_cosine_with_plan_resumes_exactly_after_growth(order: str, tmp_path: Path) -> None:
    full, used_full = _run(order)
    first, used_first = _run(order, stop=5)
    assert len(used_first) == 5
    dynarch.save(tmp_path / "ck", first.model, first.optimizer, trainer=first.state_dict())
    ck = dynarch.load(tmp_path / "ck")
    opt = ck.load_optimizer(torch.optim.SGD(ck.param_groups(), lr=0.1))
    used: list[dict[str, float]] = []
    _record(opt, used)
    plan = LRPlan(ck.model, 0.1, _strategies())
    cbs: list[Callback] = [CosineLR(0.2), plan] if order == "cosine-plan" else [plan, CosineLR(0.2)]
    second = Trainer(ck.model, opt, (X, Y), batch_size=8, epochs=2, seed=3, progress=False,
                     callbacks=[*cbs, At(3, _grow), _Stop(99)])  # fmt: skip
    second.load_state_dict(ck.state["trainer"])
    ck.restore_rng()
    second.fit()
    assert used_first + used == used_full  # the same rates, exactly
    for (name, p), q in zip(ck.model.named_parameters(), full.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_cosine_schedules_a_group_added_later_from_its_own_rate() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    extra = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    add = At(2, lambda t: opt.add_param_group({"params": extra.parameters(), "lr": 0.5}))
    trainer = Trainer(model, opt, (X, Y), batch_size=8, epochs=2, progress=False,
                      callbacks=[add, CosineLR(), _Stop(4)])  # fmt: skip
    trainer.fit()
    assert [g["lr_base"] for g in opt.param_groups] == [1.0, 0.5]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([_cos(4), 0.5 * _cos(4)])


def _cos(step: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / STEPS))


# ------------------------------------------------------------------ torch LR schedulers
SCHEDULER = re.escape(
    "LRPlan cannot share its optimizer with a torch.optim.lr_scheduler (one was created on "
    "it): the plan sets every group's learning rate at structural events and for dynamic "
    "strategies, which would undo the scheduler's decay. Use dynarch.callbacks.CosineLR (it "
    "composes with the plan), plan.set_base_lr or a step-dependent strategy ('age', "
    "'warmup') instead, or leave the rates to the scheduler alone (plan.detach())"
)


def _lrs(opt: torch.optim.Optimizer) -> list[tuple[str, float]]:
    return [(g.get("name", ""), g["lr"]) for g in opt.param_groups]


def test_torch_scheduler_created_after_attach_is_refused_before_any_reset() -> None:
    torch.manual_seed(0)
    model = mlp(4, [8, 8], 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plan = LRPlan(model, 0.1, ["cascade"]).attach(opt)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for g in opt.param_groups:
        g["lr"] *= 0.25  # what the scheduler would have decayed to
    decayed = _lrs(opt)
    dynarch.widen(model, "fc1", 12, optimizer=opt)  # the plan does not reset the rates
    assert _lrs(opt) == decayed
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(X), Y).backward()
    with pytest.raises(ValueError, match=SCHEDULER):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    with pytest.raises(ValueError, match=SCHEDULER):
        plan.update()
    assert _lrs(opt) == decayed


def test_torch_scheduler_created_before_attach_is_refused_untouched() -> None:
    model = mlp(4, [8], 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    plan = LRPlan(model, 0.1, ["cascade"])
    with pytest.raises(ValueError, match=SCHEDULER):
        plan.attach(opt)
    assert len(opt.param_groups) == 1 and plan.optimizer is None
    trainer = Trainer(model, opt, (X, Y), batch_size=8, max_steps=1, progress=False,
                      callbacks=[plan])  # fmt: skip
    with pytest.raises(ValueError, match=SCHEDULER):
        trainer.fit()
    assert trainer.step == 0 and len(opt.param_groups) == 1


# ------------------------------------------------------------------ LARS
def _lars_ratio(w: torch.Tensor, g: torch.Tensor, trust: float) -> float:
    return trust * float(w.norm()) / (float(g.norm()) + 1e-8)


@pytest.mark.parametrize("as_kwarg", [False, True])
def test_lars_with_a_closure_uses_the_closures_gradients(as_kwarg: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    LRPlan(model, 1.0, [LARS(trust=0.01)]).attach(opt)
    y = torch.randint(0, 3, (16,))
    for scale in (1.0, 10.0, 0.1):  # gradients of very different size from step to step
        x = torch.randn(16, 6) * scale

        def closure(x: torch.Tensor = x) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        w = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
        loss = opt.step(closure=closure) if as_kwarg else opt.step(closure)
        assert isinstance(loss, torch.Tensor)
        want = [_lars_ratio(w[0], model[0].weight.grad, 0.01),
                _lars_ratio(w[1], model[2].weight.grad, 0.01)]  # fmt: skip
        weights = [g["lr"] for g in opt.param_groups if g["params"][0].dim() == 2]
        assert weights == pytest.approx(want, rel=1e-6)


def test_closure_step_equals_a_plain_step_with_patches() -> None:
    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = mlp(4, [8, 8], 2)
        patch = torch.zeros_like(model.fc2.weight, dtype=torch.bool)
        patch[:3] = True
        model.fc2.register_buffer("weight_patch", patch)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        LRPlan(model, 0.5, [LARS(trust=0.1), {"name": "dual", "patch": 3.0}]).attach(opt)
        return model, opt

    plain, opt_plain = make()
    closed, opt_closed = make()
    for _ in range(3):
        opt_plain.zero_grad()
        F.cross_entropy(plain(X), Y).backward()
        opt_plain.step()

        def closure() -> torch.Tensor:
            opt_closed.zero_grad()
            loss = F.cross_entropy(closed(X), Y)
            loss.backward()
            return loss

        opt_closed.step(closure)
        assert _lrs(opt_closed) == _lrs(opt_plain)
    for p, q in zip(closed.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)


def test_lars_leaves_bias_and_norm_parameters_at_factor_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    weights = [p for p in model.parameters() if p.dim() > 1]
    others = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": weights, "weight_decay": 1e-4}, {"params": others, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=1.0, momentum=0.9)
    plan = LRPlan(model, 1.0, [LARS(trust=0.001), {"name": "cascade", "decay": 0.5}])
    plan.attach(opt)
    names = {id(p): n for n, p in model.named_parameters()}
    layout = [([names[id(p)] for p in g["params"]], g["weight_decay"]) for g in opt.param_groups]
    assert layout == [(["0.weight"], 1e-4), (["0.bias"], 0.0), (["1.weight", "1.bias"], 0.0),
                      (["3.weight"], 1e-4), (["3.bias"], 0.0)]  # fmt: skip
    F.cross_entropy(model(torch.randn(32, 6)), torch.randint(0, 3, (32,))).backward()
    lars0 = _lars_ratio(model[0].weight.detach(), model[0].weight.grad, 0.001)
    lars3 = _lars_ratio(model[3].weight.detach(), model[3].weight.grad, 0.001)
    assert plan.factors() == pytest.approx({"0": 0.5 * lars0, "1": 0.5, "3": lars3}, rel=1e-5)
    opt.step()
    want = [0.5 * lars0, 0.5, 0.5, lars3, 1.0]  # cascade: depth 0 halved, for every parameter
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(want, rel=1e-5)
    assert [g["lr_factor"] for g in opt.param_groups] == pytest.approx(want, rel=1e-5)
    # growth keeps the split: every group holds only weights or only other parameters
    dynarch.deepen(model, "0", optimizer=opt)
    F.cross_entropy(model(torch.randn(32, 6)), torch.randint(0, 3, (32,))).backward()
    opt.step()
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()} and len(held) == 8
    kinds = [{p.dim() >= 2 for p in g["params"]} for g in opt.param_groups]
    assert all(len(k) == 1 for k in kinds)
    deep = [g for g in opt.param_groups if g["name"].endswith("_deep")]
    assert [len(g["params"]) for g in deep] == [1, 1]
    assert deep[1]["lr_factor"] == pytest.approx(0.5**0.5)  # its bias: cascade (depth 1 of 3)


def test_param_groups_split_weights_from_biases_with_lars() -> None:
    model = mlp(4, [8], 2)
    groups = LRPlan(model, 0.1, ["lars", "cascade"]).param_groups()
    assert [(g["name"], [tuple(p.shape) for p in g["params"]], g["lr"]) for g in groups] == [
        ("fc1", [(8, 4)], pytest.approx(0.01)),
        ("fc1", [(8,)], pytest.approx(0.01)),
        ("out", [(2, 8)], 0.1),
        ("out", [(2,)], 0.1),
    ]
    unsplit = LRPlan(model, 0.1, ["cascade"]).param_groups()
    assert [len(g["params"]) for g in unsplit] == [2, 2]
    assert engine_state(model).step == 0
