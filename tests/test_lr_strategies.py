"""Learning-rate strategies: the documented rate of every parameter before and after growth."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dynarch
from dynarch._engine import engine_state, transaction
from dynarch.lr import (
    LARS,
    STRATEGIES,
    AgeDecay,
    Cascade,
    ComponentLR,
    DifferentialDecay,
    DualScaffoldPatch,
    GrowthAware,
    LRPlan,
    PretrainedNew,
    ProgressiveFreezing,
    Sedimentary,
    SparsityAware,
    Strategy,
    Warmup,
    is_growth,
)
from dynarch.models import mlp

BASE = 0.1
OPTIMIZERS = [
    pytest.param(lambda g: torch.optim.SGD(g, lr=BASE, momentum=0.9), id="sgd"),
    pytest.param(lambda g: torch.optim.Adam(g, lr=BASE), id="adam"),
]


def setup(strategies: list[object], make=None) -> tuple[nn.Module, LRPlan, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = mlp(4, [8, 8], 2)
    plan = LRPlan(model, BASE, strategies)
    opt = (make or (lambda g: torch.optim.SGD(g, lr=BASE)))(plan.param_groups())
    plan.attach(opt)
    return model, plan, opt


def param_lrs(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate of every named parameter of ``model`` in ``opt``."""
    of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {n: of[id(p)] for n, p in model.named_parameters()}


def expect(model: nn.Module, factors: dict[str, float]) -> dict[str, float]:
    """Expected parameter learning rates from per-module factors."""
    out = {}
    for name, _ in model.named_parameters():
        owner = name.rpartition(".")[0]
        out[name] = pytest.approx(BASE * factors[owner], rel=1e-12)
    return out


def at_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """Advance the engine step and run an optimizer step (no grads: only the hooks act)."""
    engine_state(model).step = step
    opt.step()


def fake_connect(model: nn.Module, layer: str) -> None:
    """A growth event that turns mask positions on (the shape of ``dynarch.growth.connect``)."""
    with transaction(model, "connect", layer) as tx:
        tx.details = {"layer": layer, "added": 1}


def add_patch(module: nn.Module, rows: slice) -> torch.Tensor:
    patch = torch.zeros_like(module.weight, dtype=torch.bool)
    patch[rows] = True
    module.register_buffer("weight_patch", patch)
    return patch


def test_registry_holds_the_twelve_strategies() -> None:
    assert sorted(STRATEGIES) == sorted(
        ["cascade", "dual", "age", "component", "pretrained", "growth", "warmup", "lars",
         "freeze", "differential", "sparsity", "sedimentary"]
    )  # fmt: skip


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_cascade_before_and_after_deepen(make) -> None:
    model, _, opt = setup([Cascade(decay=0.1)], make)
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.1, "fc2": 0.1**0.5, "out": 1.0})
    dynarch.deepen(model, "fc1", optimizer=opt)
    assert [g["name"] for g in opt.param_groups] == ["fc1", "act1_deep", "fc2", "out"]
    assert param_lrs(model, opt) == expect(
        model, {"fc1": 0.1, "act1_deep": 0.1 ** (2 / 3), "fc2": 0.1 ** (1 / 3), "out": 1.0}
    )


def test_cascade_late_norms_share_their_layer_depth_and_single_layer() -> None:
    model = mlp(4, [8, 8], 2, batchnorm=True)
    plan = LRPlan(model, BASE, [Cascade(decay=0.01, slow="late")])
    assert plan.factors() == {"fc1": 1.0, "bn1": 1.0, "fc2": 0.1, "bn2": 0.1, "out": 0.01}
    assert LRPlan(nn.Linear(2, 2), BASE, ["cascade"]).factors() == {"<root>": 1.0}


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_dual_scaffold_and_patch(make) -> None:
    model, plan, opt = setup([DualScaffoldPatch(scaffold=0.2, patch=1.0)], make)
    add_patch(model.fc2, slice(0, 3))
    fake_connect(model, "fc2")
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.2, "fc2": 0.2, "out": 0.2})
    assert plan.patch_factors() == {"fc2": 1.0}
    dynarch.attach(model, "after:act1", nn.Linear(8, 8), optimizer=opt)
    assert param_lrs(model, opt) == expect(
        model,
        {"fc1": 0.2, "act1_slot": 0.2, "act1_slot.module": 0.2, "fc2": 0.2, "out": 0.2},
    )


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_age_decays_with_steps_since_creation(make) -> None:
    model, _, opt = setup([AgeDecay(decay=0.5, period=10)], make)
    assert param_lrs(model, opt) == expect(model, {"fc1": 1.0, "fc2": 1.0, "out": 1.0})
    at_step(model, opt, 20)
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.25, "fc2": 0.25, "out": 0.25})
    dynarch.attach(model, "after:act1", nn.Linear(8, 8), optimizer=opt)
    new = {"act1_slot": 1.0, "act1_slot.module": 1.0}
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.25, "fc2": 0.25, "out": 0.25} | new)
    at_step(model, opt, 25)
    old = 0.5**2.5
    new = {"act1_slot": 0.5**0.5, "act1_slot.module": 0.5**0.5}
    assert param_lrs(model, opt) == expect(model, {"fc1": old, "fc2": old, "out": old} | new)


def test_age_staircase() -> None:
    model, plan, opt = setup([AgeDecay(decay=0.5, period=10, staircase=True)])
    at_step(model, opt, 29)
    assert plan.factors() == {"fc1": 0.25, "fc2": 0.25, "out": 0.25}


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_component_globs_new_scaffold_and_patch(make) -> None:
    strategy = ComponentLR(scaffold=0.1, patch=0.5, new=1.0, components={"out": 0.3})
    model, plan, opt = setup([strategy], make)
    add_patch(model.fc2, slice(0, 2))
    fake_connect(model, "fc2")
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.1, "fc2": 0.1, "out": 0.3})
    assert plan.patch_factors() == {"fc2": 0.5}
    dynarch.attach(model, "after:act1", nn.Linear(8, 8), optimizer=opt)
    new = {"act1_slot": 1.0, "act1_slot.module": 1.0}
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.1, "fc2": 0.1, "out": 0.3} | new)


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_pretrained_adapter_and_new(make) -> None:
    model, _, opt = setup([PretrainedNew(pretrained=0.01, new=1.0, adapter=0.5)], make)
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.01, "fc2": 0.01, "out": 0.01})
    dynarch.attach(model, "after:act1", nn.Linear(8, 8), optimizer=opt)
    dynarch.deepen(model, "fc2", optimizer=opt)
    assert param_lrs(model, opt) == expect(
        model,
        {"fc1": 0.01, "act1_slot": 0.5, "act1_slot.module": 0.5, "fc2": 0.01,
         "act2_deep": 1.0, "out": 0.01},
    )  # fmt: skip


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_growth_aware_halves_old_units_per_growth_event(make) -> None:
    model, _, opt = setup([GrowthAware(decay=0.5, fresh=1.0)], make)
    assert param_lrs(model, opt) == expect(model, {"fc1": 1.0, "fc2": 1.0, "out": 1.0})
    dynarch.widen(model, "fc1", 12, optimizer=opt)
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.5, "fc2": 0.5, "out": 0.5})
    dynarch.sparsify(model, 0.5, optimizer=opt)  # not growth: no parameters added
    dynarch.attach(model, "after:act1", nn.Linear(12, 12), optimizer=opt)
    new = {"act1_slot": 1.0, "act1_slot.module": 1.0}
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.25, "fc2": 0.25, "out": 0.25} | new)
    fake_connect(model, "fc2")  # mask growth counts (op in GROWTH_OPS)
    new = {"act1_slot": 0.5, "act1_slot.module": 0.5}
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.125, "fc2": 0.125, "out": 0.125} | new)


def test_growth_aware_ops_restrict_the_events() -> None:
    model, plan, opt = setup([GrowthAware(decay=0.5, fresh=2.0, ops=["attach"])])
    dynarch.widen(model, "fc1", 12, optimizer=opt)
    assert plan.factors() == {"fc1": 1.0, "fc2": 1.0, "out": 1.0}
    dynarch.attach(model, "after:act1", nn.Linear(12, 12), optimizer=opt)
    assert plan.factors() == {
        "fc1": 0.5, "act1_slot": 2.0, "act1_slot.module": 2.0, "fc2": 0.5, "out": 0.5
    }  # fmt: skip


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_warmup_of_new_components(make) -> None:
    model, _, opt = setup([Warmup(steps=4)], make)
    at_step(model, opt, 10)
    assert param_lrs(model, opt) == expect(model, {"fc1": 1.0, "fc2": 1.0, "out": 1.0})
    dynarch.attach(model, "after:act1", nn.Linear(8, 8), optimizer=opt)
    for step, factor in [(10, 0.25), (11, 0.5), (12, 0.75), (13, 1.0), (30, 1.0)]:
        at_step(model, opt, step)
        new = {"act1_slot": factor, "act1_slot.module": factor}
        assert param_lrs(model, opt) == expect(model, {"fc1": 1.0, "fc2": 1.0, "out": 1.0} | new)


def test_warmup_initial_warms_up_everything() -> None:
    model, plan, opt = setup([Warmup(steps=4, initial=True)])
    assert plan.factors() == {"fc1": 0.25, "fc2": 0.25, "out": 0.25}
    at_step(model, opt, 2)
    assert plan.factors() == {"fc1": 0.75, "fc2": 0.75, "out": 0.75}


def _lars(model: nn.Module, names: list[str], trust: float) -> dict[str, float]:
    out = {}
    for name in names:
        w = model.get_submodule(name).weight
        out[name] = trust * float(w.detach().norm()) / (float(w.grad.norm()) + 1e-8)
    return out


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_lars_trust_ratio_per_layer(make) -> None:
    model, plan, opt = setup([LARS(trust=0.01)], make)
    assert param_lrs(model, opt) == expect(model, {"fc1": 1.0, "fc2": 1.0, "out": 1.0})
    model(torch.randn(5, 4)).pow(2).sum().backward()
    want = _lars(model, ["fc1", "fc2", "out"], 0.01)
    assert plan.factors() == pytest.approx(want, rel=1e-5)
    opt.step()  # the pre-step hook reads the gradients, before the weights change
    assert param_lrs(model, opt) == {  # biases are not adapted: the base rate
        n: pytest.approx(v.expected if n.endswith("weight") else BASE, rel=1e-5)
        for n, v in expect(model, want).items()
    }
    dynarch.attach(model, "after:act1", nn.Linear(8, 8), optimizer=opt)
    opt.zero_grad(set_to_none=True)
    model.act1_slot.alpha.data.fill_(0.5)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    want = _lars(model, ["fc1", "act1_slot.module", "fc2", "out"], 0.01) | {"act1_slot": 1.0}
    opt.step()
    assert param_lrs(model, opt) == {
        n: pytest.approx(v.expected if n.endswith("weight") else BASE, rel=1e-5)
        for n, v in expect(model, want).items()
    }


def test_lars_factor_is_one_without_gradient_or_with_a_zero_norm() -> None:
    model, plan, _ = setup([LARS(trust=0.01)])
    model.fc2.weight.grad = torch.zeros_like(model.fc2.weight)
    with torch.no_grad():
        model.out.weight.zero_()
    model.out.weight.grad = torch.ones_like(model.out.weight)
    assert plan.factors() == {"fc1": 1.0, "fc2": 1.0, "out": 1.0}


def test_progressive_freezing_front_to_back_and_stays_frozen() -> None:
    model, plan, opt = setup([ProgressiveFreezing(every=10)])
    at_step(model, opt, 9)
    assert plan.factors() == {"fc1": 1.0, "fc2": 1.0, "out": 1.0}
    at_step(model, opt, 10)
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.0, "fc2": 1.0, "out": 1.0})
    dynarch.deepen(model, "fc2", optimizer=opt)  # act2_deep (depth 2) born at step 10
    at_step(model, opt, 20)
    f = {"fc1": 0.0, "fc2": 0.0, "act2_deep": 1.0, "out": 1.0}
    assert param_lrs(model, opt) == expect(model, f)
    dynarch.deepen(model, "fc1", optimizer=opt)  # fc2 moves to depth 2: stays frozen
    at_step(model, opt, 29)
    f = {"fc1": 0.0, "act1_deep": 1.0, "fc2": 0.0, "act2_deep": 1.0, "out": 1.0}
    assert param_lrs(model, opt) == expect(model, f)
    at_step(model, opt, 30)  # act1_deep: depth 1 is due, but it is only 10 steps old now
    f = {"fc1": 0.0, "act1_deep": 0.0, "fc2": 0.0, "act2_deep": 1.0, "out": 1.0}
    assert param_lrs(model, opt) == expect(model, f)
    assert plan.strategies[0].state_dict() == {"frozen_at": {"fc1": 10, "fc2": 20, "act1_deep": 30}}


def test_progressive_freezing_start_frozen_factor_and_last_layer() -> None:
    model, plan, opt = setup([ProgressiveFreezing(every=5, start=10, frozen=0.01, keep_last=False)])
    at_step(model, opt, 25)
    assert plan.factors() == {"fc1": 0.01, "fc2": 0.01, "out": 0.01}


def test_new_unit_is_not_frozen_before_it_is_every_steps_old() -> None:
    model, plan, opt = setup([ProgressiveFreezing(every=10)])
    at_step(model, opt, 40)
    dynarch.deepen(model, "fc1", optimizer=opt)
    at_step(model, opt, 49)
    assert plan.factors()["act1_deep"] == 1.0
    at_step(model, opt, 50)
    assert plan.factors()["act1_deep"] == 0.0


def test_a_unit_recreated_under_a_frozen_name_is_a_new_unit() -> None:
    model, plan, opt = setup([ProgressiveFreezing(every=5, keep_last=False)])
    dynarch.attach(model, "after:act1", nn.Linear(8, 8), optimizer=opt)
    at_step(model, opt, 12)
    assert plan.factors()["act1_slot.module"] == 0.0
    assert plan.strategies[0].state_dict()["frozen_at"]["act1_slot.module"] == 12
    dynarch.detach(model, "after:act1", optimizer=opt)
    dynarch.attach(model, "after:act1", nn.Linear(8, 8), optimizer=opt)  # same name, born at 12
    assert plan.factors()["act1_slot.module"] == 1.0
    assert "act1_slot.module" not in plan.strategies[0].state_dict()["frozen_at"]
    at_step(model, opt, 16)
    assert plan.factors()["act1_slot.module"] == 1.0
    at_step(model, opt, 17)  # 5 steps old
    assert plan.factors()["act1_slot.module"] == 0.0


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_differential_decay_grown_adjacent_distant(make) -> None:
    model, plan, opt = setup([DifferentialDecay(grown=0.9, adjacent=0.7, distant=0.5)], make)
    assert param_lrs(model, opt) == expect(model, {"fc1": 1.0, "fc2": 1.0, "out": 1.0})
    dynarch.widen(model, "fc1", 12, optimizer=opt)
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.9, "fc2": 0.7, "out": 0.5})
    dynarch.deepen(model, "fc2", optimizer=opt)  # act2_deep at depth 2: fc2, out adjacent
    assert param_lrs(model, opt) == expect(
        model, {"fc1": 0.9 * 0.5, "fc2": 0.7 * 0.7, "act2_deep": 1.0, "out": 0.5 * 0.7}
    )
    dynarch.attach(model, "after:act2_deep_act", nn.Linear(8, 8), optimizer=opt)
    # the grown layer act2_deep_act_slot.module has depth 3: act2_deep (2) and out (4) are
    # adjacent, fc1/fc2 distant; out stays adjacent to the deepen event (depth 3 then)
    assert plan.factors() == pytest.approx(
        {"fc1": 0.45 * 0.5, "fc2": 0.49 * 0.5, "act2_deep": 0.7, "act2_deep_act_slot": 1.0,
         "act2_deep_act_slot.module": 1.0, "out": 0.35 * 0.7},
        rel=1e-12,
    )  # fmt: skip


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_sparsity_aware_by_mask_density(make) -> None:
    model, _, opt = setup([SparsityAware(sparse_below=0.1, sparse=2.0, dense_above=0.5)], make)
    dynarch.sparsify(model, 0.05, distribution="uniform", include=["fc1"], optimizer=opt)
    dynarch.sparsify(model, 0.25, distribution="uniform", include=["fc2"], optimizer=opt)
    assert param_lrs(model, opt) == expect(model, {"fc1": 2.0, "fc2": 1.0, "out": 1.0})
    with transaction(model, "connect", "fc2") as tx:  # growth turns fc2 positions on
        model.fc2.weight_mask[:6] = True
        tx.details = {"layer": "fc2"}
    assert param_lrs(model, opt) == expect(model, {"fc1": 2.0, "fc2": 0.5, "out": 1.0})


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_sedimentary_strata_by_age(make) -> None:
    strategy = Sedimentary(active_age=10, geological_age=100)
    model, plan, opt = setup([strategy], make)
    add_patch(model.out, slice(0, 1))
    fake_connect(model, "out")
    at_step(model, opt, 9)
    assert param_lrs(model, opt) == expect(model, {"fc1": 1.0, "fc2": 1.0, "out": 1.0})
    at_step(model, opt, 50)
    assert param_lrs(model, opt) == expect(model, {"fc1": 0.1, "fc2": 0.1, "out": 0.1})
    assert plan.patch_factors() == {"out": 0.5}
    dynarch.attach(model, "after:act1", nn.Linear(8, 8), optimizer=opt)
    for step, old, new in [(50, 0.1, 1.0), (120, 0.01, 0.1), (150, 0.01, 0.01)]:
        at_step(model, opt, step)
        f = {"fc1": old, "fc2": old, "out": old, "act1_slot": new, "act1_slot.module": new}
        assert param_lrs(model, opt) == expect(model, f)


def test_combination_multiplies_factors() -> None:
    specs = [Cascade(decay=0.1), PretrainedNew(), Warmup(steps=4), GrowthAware(decay=0.5)]
    model, plan, opt = setup(specs)
    dynarch.deepen(model, "fc1", optimizer=opt)
    at_step(model, opt, 1)
    alone = [LRPlan(model, BASE, [s]).factors() for s in specs]
    want = {n: math.prod(a[n] for a in alone) for n in alone[0]}
    assert plan.factors() == pytest.approx(want, rel=1e-12)
    assert want["act1_deep"] == pytest.approx(0.1 ** (2 / 3) * 1.0 * 0.5 * 1.0)
    assert want["fc1"] == pytest.approx(0.1 * 0.01 * 1.0 * 0.5)
    assert param_lrs(model, opt) == expect(model, want)


def test_combination_multiplies_patch_factors() -> None:
    model, plan, _ = setup([DualScaffoldPatch(0.2, 1.0), ComponentLR(), Cascade()])
    add_patch(model.fc2, slice(0, 1))
    fake_connect(model, "fc2")
    c = 0.1**0.5
    assert plan.factors()["fc2"] == pytest.approx(0.2 * 0.1 * c)
    assert plan.patch_factors() == {"fc2": pytest.approx(1.0 * 0.5 * c)}


def test_is_growth_rules() -> None:
    from dynarch.events import Event

    rewire = Event(0, "rewire", "*", 10, 10)
    assert [is_growth(rewire), is_growth(Event(0, "custom", "x", 1, 2))] == [False, True]
    assert is_growth(Event(0, "connect", "x", 1, 1))
    assert is_growth(rewire, ops=["rewire"]) and not is_growth(Event(0, "widen", "0", 1, 2), [])


def test_custom_strategy_subclass() -> None:
    class Half(Strategy):
        def factor(self, unit, ctx) -> float:  # type: ignore[no-untyped-def]
            return 0.5

    assert LRPlan(mlp(4, [8], 2), BASE, [Half()]).factors() == {"fc1": 0.5, "out": 0.5}
    with pytest.raises(NotImplementedError):
        LRPlan(mlp(4, [8], 2), BASE, [Strategy()]).factors()
