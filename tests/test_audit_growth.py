"""Robustness audit of the growth API (issue 4) on model kinds beyond the plain MLP.

Four model kinds, each built from a fixed seed: (a) an ``nn.Sequential`` MLP, (b) a small
CNN (Conv2d + BatchNorm2d + ReLU + MaxPool + Flatten + Linear), (c) a custom ``nn.Module``
with a nested submodule and a residual add (``stem`` and ``block.fc2`` share one coupled
unit space) and (d) an MLP with LayerNorm and Dropout between layers. Triggers, schedules,
slots, the StructureNet growth ops and the learning-rate strategies are used exactly as the
issue describes them; function preservation is checked with ``assert_close`` and every
optimizer (SGD with momentum, Adam) keeps stepping with its state carried.
"""

from __future__ import annotations

import io
import math
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

from dynarch._engine import engine_state
from dynarch.activity import Extrema, Utilization
from dynarch.checkpoint import load, save
from dynarch.graph import UnsupportedModelError
from dynarch.growth import (
    IndefiniteGrowth,
    MultiScale,
    Tournament,
    add_patches,
    add_skip,
    clone_units,
    connect,
    find_seed,
    grow_proportional,
    highways,
)
from dynarch.lr import LRPlan
from dynarch.masks import enforce, global_density, sparsify
from dynarch.prune import magnitude_prune
from dynarch.schedules import (
    Embargo,
    GrowAsNeeded,
    GrowPruneCycle,
    OverparameterizeThenPrune,
    make_action,
)
from dynarch.slots import (
    BranchableLayer,
    LinearRamp,
    SlotState,
    SlottedNetwork,
    SlotTopology,
    SlotTransitionError,
    topology_of,
)
from dynarch.surgery import widen
from dynarch.train import Trainer
from dynarch.triggers import (
    Budget,
    Contribution,
    CreditEconomy,
    GradientVarianceSpike,
    Plateau,
    all_of,
    any_of,
    make_trigger,
)
from models import Custom

# ---------------------------------------------------------------- the four model kinds


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    )


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 3),
    )  # fmt: skip


def custom() -> Custom:
    torch.manual_seed(0)
    return Custom()


def normed() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.1), nn.Linear(12, 3),
    )  # fmt: skip


X = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
XI = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
KINDS: dict[str, tuple[Callable[[], nn.Module], Tensor]] = {
    "mlp": (mlp, X), "cnn": (cnn, XI), "custom": (custom, X), "normed": (normed, X),
}  # fmt: skip
LAYERS = {
    "mlp": ["0", "2", "4"], "cnn": ["0", "5", "7"],
    "custom": ["stem", "block.fc1", "block.fc2", "head.1"], "normed": ["0", "4", "7"],
}  # fmt: skip


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded: dict[str, Any] = torch.load(buf, weights_only=True)
    return loaded


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), Y).backward()
    opt.step()


def make_opt(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=0.01)


def state_of(opt: torch.optim.Optimizer, p: Tensor) -> Tensor:
    """The momentum buffer (SGD) or first moment (Adam) of ``p``."""
    st = opt.state[p]
    return st["momentum_buffer"] if "momentum_buffer" in st else st["exp_avg"]


def trainer(model: nn.Module, x: Tensor, callbacks: list[Any], epochs: int = 3) -> Trainer:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Trainer(model, opt, (x, Y), eval=(x, Y), epochs=epochs, batch_size=16,
                   callbacks=callbacks, progress=False)  # fmt: skip


def held_all(model: nn.Module, opt: torch.optim.Optimizer) -> bool:
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    return held == {id(p) for p in model.parameters()}


# ---------------------------------------------------------------- triggers


def test_plateau_as_documented_resets_and_round_trips() -> None:
    p = Plateau(patience=10, threshold=0.01)
    # 0.995 is within the threshold of 1.0: no improvement, so it fires on the 10th
    fired = [p.update(v) for v in [1.0] + [0.995] * 11]
    assert fired == [False] * 10 + [True, True]
    copy = Plateau(patience=10, threshold=0.01)
    copy.load_state_dict(round_trip(p.state_dict()))
    assert copy.state_dict() == p.state_dict() == {"best": 1.0, "wait": 11}
    p.reset()
    assert p.state_dict() == {"best": None, "wait": 0}
    assert p.update(torch.tensor(0.5)) is False and p.best == 0.5  # a 0-dim tensor is a number


@pytest.mark.parametrize("kind", list(KINDS))
def test_gradient_variance_spike_on_every_kind(kind: str) -> None:
    build, x = KINDS[kind]
    model = build()
    spike = GradientVarianceSpike(model, k=3.0, warmup=2, momentum=None)
    for scale in (1.0, 1.0, 1.0, 1000.0):  # the last backward: every gradient x1000
        model.zero_grad()
        (F.cross_entropy(model(x), Y) * scale).backward()
        spike.observe()
    assert spike.update() is True
    assert sorted(spike.where()) == sorted(LAYERS[kind])
    assert {n: s["count"] for n, s in spike.statistics().items()} == dict.fromkeys(LAYERS[kind], 4)
    fresh = GradientVarianceSpike(build(), k=3.0, warmup=2, momentum=None)
    fresh.load_state_dict(round_trip(spike.state_dict()))
    assert fresh.statistics() == spike.statistics() and fresh.where() == spike.where()


def test_budget_on_the_cnn_dense_and_masked() -> None:
    model = cnn()
    # params: conv 216 + 8, bn 16, fc 1280 + 10, out 30 + 3; multiply-adds for one 3x8x8
    # sample: conv 216 weights at 64 positions, then 1280 and 30
    budget = Budget(max_params=1600, max_flops=15200, input_shape=(3, 8, 8), model=model)
    assert (budget.count(), budget.flops()) == (1563, 216 * 64 + 1280 + 30)
    assert budget.headroom() == {"params": 37, "flops": 66}
    assert budget.can_grow(nn.Linear(6, 5)) is True  # 35 params: the issue's can_grow(module)
    assert budget.can_grow(nn.Linear(6, 6)) is False  # 42 params
    assert budget.can_grow(model, 37) is True and budget.can_grow(model, 37, flops=67) is False
    assert budget.must_prune() is False and budget.update() is False
    widen(model, "5", 11)  # +128 + 1 + 3 params, +128 multiply-adds
    assert budget.headroom() == {"params": 37 - 132, "flops": 66 - 131}
    assert budget.must_prune() is True and budget.update() is True
    masked = cnn()
    sparsify(masked, 0.5, distribution="uniform")
    active = [int(m.weight_mask.sum()) for m in (masked[0], masked[5], masked[7])]
    assert Budget(max_params=1).count(masked) == 1563 - (216 + 1280 + 30) + sum(active)
    flops = Budget(max_flops=1, input_shape=(3, 8, 8)).flops(masked)
    assert flops == active[0] * 64 + active[1] + active[2]
    assert Budget(max_params=1, count_masked=True).count(masked) == 1563
    budget.load_state_dict(round_trip(budget.state_dict()))  # stateless
    assert budget.state_dict() == {}


@pytest.mark.parametrize(
    ("kind", "module"),
    [("mlp", "2"), ("cnn", "0"), ("cnn", "1"), ("custom", "block"), ("custom", "block.fc1"),
     ("normed", "3")],
)  # fmt: skip
def test_contribution_is_the_counterfactual_loss_difference(kind: str, module: str) -> None:
    build, x = KINDS[kind]
    model = build().eval()
    trigger = Contribution(model, module, (x, Y), metric="loss", threshold=0.05)
    fired = trigger.update()
    with torch.no_grad():
        with_it = F.cross_entropy(model(x), Y)
        handle = model.get_submodule(module).register_forward_hook(
            lambda m, a, out: torch.zeros_like(out)
        )
        without = F.cross_entropy(model(x), Y)
        handle.remove()
    assert trigger.last == pytest.approx(float(without - with_it), abs=1e-6)
    assert fired == (trigger.last < 0.05)
    assert trigger.where() == ([module] if fired else [])
    copy = Contribution(build(), module, (x, Y), metric="loss")
    copy.load_state_dict(round_trip(trigger.state_dict()))
    assert copy.last == trigger.last


@pytest.mark.parametrize(
    ("kind", "layer", "tap"),
    [("mlp", "0", "1"), ("cnn", "0", "2"), ("custom", "stem", "act"), ("normed", "0", "2")],
)
def test_extrema_finds_forced_dead_units_on_every_kind(kind: str, layer: str, tap: str) -> None:
    build, x = KINDS[kind]
    model = build().eval()
    with torch.no_grad():
        model.get_submodule(layer).bias[[0, 1]] = -100.0  # units 0 and 1 never fire
    ex = Extrema(model, eps=0.01, fire_fraction=0.1)
    assert ex.taps[layer] == tap  # post-activation, through BatchNorm/LayerNorm
    ex.observe(x)
    width = model.get_submodule(layer).weight.shape[0]
    assert ex.dead_units(layer).tolist() == [0, 1]
    assert ex.fractions()[layer]["dead"] == 2 / width
    assert ex.update() is True and layer in ex.where()
    copy = Extrema(build())
    copy.load_state_dict(round_trip(ex.state_dict()))
    assert copy.fractions() == ex.fractions()


def test_utilization_on_cnn_activations_matches_the_relu_output() -> None:
    model = cnn().eval()
    util = Utilization(model, threshold=0.6)
    assert util.layers == ["0", "5"] and util.taps == {"0": "2", "5": "6"}
    outputs: dict[str, Tensor] = {}
    hooks = [
        model[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(str(i), out))
        for i in (2, 6)
    ]
    util.observe(XI)
    for h in hooks:
        h.remove()
    expected = {"0": outputs["2"], "5": outputs["6"]}
    got = util.utilization()
    for name, out in expected.items():
        assert got[name] == pytest.approx(float((out != 0).double().mean()), abs=1e-12)
    assert util.update() == any(v < 0.6 for v in got.values())
    assert util.where() == sorted((n for n in got if got[n] < 0.6), key=got.__getitem__)
    copy = Utilization(cnn(), threshold=0.6)
    copy.load_state_dict(round_trip(util.state_dict()))
    assert copy.utilization() == got


def test_credit_economy_ignores_metric_values_fed_by_composites() -> None:
    economy = CreditEconomy(earn_per_correct=0.5, cost_per_connection=2.0)
    # a float is a metric (e.g. the val_loss a schedule feeds every trigger): earns nothing
    assert [economy.update(v) for v in (0.83, 3, torch.tensor([True, True]), 1.0)] == [
        False, False, True, True,
    ]  # fmt: skip
    assert economy.balance == 2.5 and economy.earned == 2.5
    copy = CreditEconomy()
    copy.load_state_dict(round_trip(economy.state_dict()))
    assert copy.state_dict() == {"balance": 2.5, "earned": 2.5, "spent": 0.0}


def test_grow_on_plateau_when_affordable_trains_with_a_composite() -> None:
    """all_of(Plateau, CreditEconomy) receives the val_loss at every evaluation: it used to
    crash in CreditEconomy.update (a float is not a count of correct predictions). The growth
    is paid for: one more unit of "5" adds 128 inputs + 3 outputs = 131 connections."""
    model = cnn()
    economy = CreditEconomy(cost_per_connection=0.125)  # 131 * 0.125 = 16.375 credits
    grow = GrowAsNeeded(all_of(Plateau(patience=1, threshold=10.0), economy), "widen",
                        layers=["5"], amount=1)  # fmt: skip
    trainer(model, XI, [economy.callback(), grow]).fit()
    assert economy.earned > 16.375 and economy.earned == int(economy.earned)
    assert [e.details["new_width"] for e in grow.events] == [
        11
    ]  # the plateau is reset after growing
    assert grow.attempts[0]["paid"] == [16.375] and economy.spent == 16.375
    assert economy.balance == economy.earned - 16.375
    assert grow.reason == "all_of(val_loss)"
    # at the full price (131 credits) the same run cannot afford the unit: nothing grows
    model = cnn()
    poor = CreditEconomy()
    grow = GrowAsNeeded(all_of(Plateau(patience=1, threshold=10.0), poor), "widen",
                        layers=["5"], amount=1)  # fmt: skip
    trainer(model, XI, [poor.callback(), grow]).fit()
    assert 0 < poor.earned < 131 and poor.spent == 0.0 and grow.events == []
    assert [a["unaffordable"] for a in grow.attempts] == [["5"]] * len(grow.attempts) != []


def test_composites_accept_a_list_and_round_trip_mixed_children() -> None:
    def build(model: nn.Module) -> Any:
        return any_of([
            Plateau(patience=1),
            all_of(GradientVarianceSpike(model, warmup=1), Extrema(model)),
            {"name": "credit_economy", "initial": 1.0},
        ])  # fmt: skip

    model = cnn()
    either = build(model)
    ex = either.triggers[1].triggers[1]
    ex.observe(XI)
    assert [either.update(v) for v in (1.0, 1.0)] == [True, True]  # the economy can afford
    assert either.last == [True, False, True]
    copy = build(cnn())
    copy.load_state_dict(round_trip(either.state_dict()))
    assert copy.triggers[1].triggers[1].fractions() == ex.fractions()
    assert copy.last == either.last and copy.triggers[0].state_dict() == {"best": 1.0, "wait": 1}


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("kind", "layers", "grown"),
    [("cnn", ["0"], [["0"]]), ("cnn", None, [["0", "5"]]),
     ("custom", ["block.fc1"], [["block.fc1"]]),
     # stem and block.fc2 are coupled: widened once, as one group
     ("custom", None, [["stem", "block.fc1"]])],
)  # fmt: skip
def test_grow_as_needed_on_cnn_and_custom(kind: str, layers: Any, grown: list[list[str]]) -> None:
    build, x = KINDS[kind]
    model = build()
    grow = GrowAsNeeded(Plateau(patience=1, threshold=10.0), "widen", layers=layers, amount=2,
                        max_growths=1)  # fmt: skip
    t = trainer(model, x, [grow])
    t.fit()
    assert [a["grown"] for a in grow.attempts] == grown
    assert {e.op for e in grow.events} == {"widen"} and held_all(model, t.optimizer)
    assert model(x).shape == (32, 3)
    restored = GrowAsNeeded(Plateau(patience=1, threshold=10.0), "widen", layers=layers, amount=2)
    restored.load_state_dict(round_trip(grow.state_dict()))
    assert restored.attempts == grow.attempts and restored.growths == 1


@pytest.mark.parametrize("kind", ["cnn", "custom"])
def test_grow_where_a_gradient_spike_points_skips_the_output_layer(kind: str) -> None:
    """GradientVarianceSpike.where() names every layer, the output one too: WidenAction used
    to widen it and crash mid-training."""
    build, x = KINDS[kind]
    model = build()
    spike = GradientVarianceSpike(model, k=0.1, warmup=1)
    grow = GrowAsNeeded(spike, "widen", amount=1)
    trainer(model, x, [spike.callback(), grow], epochs=5).fit()
    grown = [n for a in grow.attempts for n in a["grown"]]
    assert grown and LAYERS[kind][-1] not in grown
    assert model(x).shape == (32, 3)


def test_widen_schedule_refuses_a_layernorm_layer_before_training() -> None:
    model = normed()
    grow = GrowAsNeeded(Plateau(patience=1), "widen", layers=["0"], amount=2)
    t = trainer(model, X, [grow])
    with pytest.raises(
        UnsupportedModelError,
        match=r"widen: cannot widen '0': LayerNorm '1' normalises over its units, so "
        r"init='net2net' cannot preserve the function; use init='random'",
    ):
        t.fit()
    assert t.step == 0  # refused at fit start
    model = normed()
    random_init = GrowAsNeeded(Plateau(patience=1, threshold=10.0), "widen", layers=["0"],
                               amount=2, init="random", max_growths=1)  # fmt: skip
    trainer(model, X, [random_init]).fit()
    assert model[0].out_features == 18 and model[1].normalized_shape == (18,)
    # without layers, only the layers that can be widened are: '4' (a LayerNorm follows '0')
    model = normed()
    auto = GrowAsNeeded(Plateau(patience=1, threshold=10.0), "widen", amount=2, max_growths=1)
    trainer(model, X, [auto]).fit()
    assert [a["grown"] for a in auto.attempts] == [["4"]]


@pytest.mark.parametrize("kind", ["cnn", "custom"])
def test_overparameterize_then_prune_reaches_its_sparsity(kind: str) -> None:
    build, x = KINDS[kind]
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    otp = OverparameterizeThenPrune(model, opt, 0.5, total_steps=6, train_frac=0.3,
                                    prune_frac=0.4)  # fmt: skip
    Trainer(model, opt, (x, Y), eval=(x, Y), epochs=3, batch_size=16, callbacks=[otp],
            progress=False).fit()  # fmt: skip
    assert otp.phase == "finetune" and global_density(model) == pytest.approx(0.5, abs=1e-3)
    copy = OverparameterizeThenPrune(build(), None, 0.5, total_steps=6, train_frac=0.3,
                                     prune_frac=0.4)  # fmt: skip
    copy.load_state_dict(round_trip(otp.state_dict()))
    assert copy.state_dict() == otp.state_dict()


def test_grow_prune_cycle_with_embargo_on_the_coupled_custom_model() -> None:
    model = custom()
    embargo = Embargo(model, steps=100)
    cycle = GrowPruneCycle(
        1, 1, 1,
        grow={"name": "widen", "layers": ["stem"], "amount": 1},
        prune={"name": "magnitude_prune", "sparsity": 0.5, "include": ["block.fc2"]},
        embargo=embargo,
    )  # fmt: skip
    trainer(model, X, [cycle, embargo], epochs=2).fit()  # 4 steps: grow, prune, -, grow
    phases = [(a["phase"], a.get("grown"), a.get("embargoed")) for a in cycle.attempts]
    # pruning block.fc2 embargoes it, and stem is coupled to it: the next growth is refused
    assert phases == [("grow", ["stem"], []), ("prune", None, None), ("grow", [], ["stem"])]
    assert embargo.blocked(4) == {"block.fc2": 98}
    assert model.stem.out_features == 17
    copy = Embargo(custom(), steps=100)
    copy.load_state_dict(round_trip(embargo.state_dict()))
    assert copy.until == {"block.fc2": 102}


# ---------------------------------------------------------------- slots


def test_slot_topology_api_as_the_issue_describes_it() -> None:
    topo = SlotTopology(2, 3, embargo_steps=5)
    assert topo.get_slot("r1c2").depth == 1 and topo.get_slot("r1c2").parallel_idx == 2
    assert [s.id for s in topo.slots_at_depth(1)] == ["r1c0", "r1c1", "r1c2"]
    assert topo.available_slots() == ["r0c0", "r0c1", "r0c2", "r1c0", "r1c1", "r1c2"]
    assert topo.transition("r0c0", SlotState.GERMINATED, step=1).state is SlotState.GERMINATED
    assert topo.transition("r0c0", "training", step=2).state.value == "training"
    with pytest.raises(
        SlotTransitionError,
        match=r"illegal transition of slot 'r0c0' to 'dormant': slot 'r0c0' is 'training'; "
        r"allowed: 'integrated', 'pruned'",
    ):
        topo.transition("r0c0", "dormant")
    topo.transition("r0c0", "pruned", step=3)
    topo.transition("r0c0", "embargoed", step=3)
    assert topo.available_slots(step=7) == ["r0c1", "r0c2", "r1c0", "r1c1", "r1c2"]
    assert topo.available_slots(step=8)[0] == "r0c0"  # the embargo ended at 3 + 5
    with pytest.raises(ValueError, match=r"unknown slot state 'GERMINATED'; allowed: 'dormant'"):
        topo.transition("r0c1", "GERMINATED")
    with pytest.raises(KeyError, match=r"unknown slot 'r9c9'; known slots: \['r0c0'"):
        topo.get_slot("r9c9")
    with pytest.raises(ValueError, match=r"depth 2 is out of range; rows are 0..1"):
        topo.slots_at_depth(2)
    copy = SlotTopology(2, 3)
    copy.load_state_dict(round_trip(topo.state_dict()))
    assert copy.states() == topo.states()


def test_slotted_network_grows_the_custom_model_and_survives_a_checkpoint() -> None:
    model = custom()
    before = model(X).detach()
    net = SlottedNetwork(model, SlotTopology(2, 2), alpha_schedule=LinearRamp(3))
    assert [s.anchor for s in net.topology] == ["act", "act", "block.act", "block.act"]
    net.add_module_to_slot("r0c0", nn.Linear(16, 16))
    net.add_module_to_slot("r1c0", nn.Linear(12, 12))
    assert_close(model(X), before, rtol=0, atol=0)  # alpha = 0: exactly unchanged
    t = trainer(model, X, [net], epochs=2)  # 4 steps: training, alpha ramps, integrated at 3
    t.fit()
    assert net.topology.states() == {
        "r0c0": SlotState.INTEGRATED, "r0c1": SlotState.DORMANT,
        "r1c0": SlotState.INTEGRATED, "r1c1": SlotState.DORMANT,
    }  # fmt: skip
    assert float(net.residual("r0c0").alpha) == 1.0 and held_all(model, t.optimizer)
    with tempfile.TemporaryDirectory() as d:
        save(f"{d}/ck", model)
        loaded = load(f"{d}/ck", model=Custom).model
    assert_close(loaded(X), model(X))
    topo = topology_of(loaded)
    assert topo is not None and topo.states() == net.topology.states()


def test_branchable_layer_inside_the_custom_model() -> None:
    model = custom()
    model.block.fc1 = BranchableLayer(nn.Linear(16, 12))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, opt, X)
    old = {n: state_of(opt, p).clone() for n, p in model.named_parameters()}
    before = model(X).detach()
    event = model.block.fc1.add_branch(nn.Linear(16, 12), model=model, optimizer=opt)
    assert (event.op, event.target) == ("branch", "block.fc1")
    assert_close(model(X), before, rtol=0, atol=0)
    assert model.block.fc1.weights().tolist() == [1.0, 0.0]
    gates = model.block.fc1.branch_gates
    assert state_of(opt, gates).tolist() == [old["block.fc1.branch_gates"][0].item(), 0.0]
    assert torch.equal(state_of(opt, model.stem.weight), old["stem.weight"])
    train_step(model, opt, X)
    assert held_all(model, opt) and gates.grad is not None and gates.grad[1] != 0
    with pytest.raises(ValueError, match=r"the new branch of 'block.fc1' returns shape \(5,\)"):
        model.block.fc1.add_branch(nn.Linear(16, 5), model=model, optimizer=opt)


# ---------------------------------------------------------------- growth ops


def _prepared(kind: str, density: float | None, opt_kind: str) -> Any:
    build, x = KINDS[kind]
    model = build()
    if density is not None:
        sparsify(model, density, distribution="uniform")
    opt = make_opt(model, opt_kind)
    if density is not None:
        enforce(model, opt)
    train_step(model, opt, x)
    model.eval()
    return model, opt, x


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize(
    ("kind", "units"),
    [("cnn", {"0": [1, 5]}), ("mlp", {"0": [1, 5]}), ("custom", {"stem": [2], "block.fc1": [0]})],
)
def test_patches_keep_the_function_and_the_optimizer_state(
    kind: str, units: dict[str, list[int]], opt_kind: str
) -> None:
    model, opt, x = _prepared(kind, 0.3, opt_kind)
    before = model(x).detach()
    masks = {
        n: m.weight_mask.clone() for n, m in model.named_modules() if hasattr(m, "weight_mask")
    }
    states = {n: state_of(opt, model.get_submodule(n).weight).clone() for n in masks}
    event = add_patches(model, units, optimizer=opt, patch_size=4)
    assert_close(model(x), before)
    assert event.details["added"] == sum(v["added"] for v in event.details["layers"].values())
    for name in event.details["layers"]:
        layer = model.get_submodule(name)
        new = layer.weight_mask & ~masks[name]
        assert int(new.sum()) == event.details["layers"][name]["added"]
        assert torch.equal(layer.weight_patch, new)  # flagged as grown
        assert torch.equal(state_of(opt, layer.weight)[masks[name]], states[name][masks[name]])
        assert not state_of(opt, layer.weight)[new].any()  # new positions: zero state
    train_step(model, opt, x)
    for name in masks:  # masks enforced after the step
        layer = model.get_submodule(name)
        assert not layer.weight[~layer.weight_mask].any()


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_connect_on_the_masked_cnn(opt_kind: str) -> None:
    model, opt, x = _prepared("cnn", 0.3, opt_kind)
    before = model(x).detach()
    off = ~model[0].weight_mask
    event = connect(model, "0", off, optimizer=opt)
    assert event.details == {"layer": "0", "added": int(off.sum()), "active": 216,
                             "density": 1.0, "init": "zero"}  # fmt: skip
    assert_close(model(x), before)
    train_step(model, opt, x)
    assert model[0].weight[off].abs().sum() > 0  # the new connections learn


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize(
    ("kind", "layer", "density"),
    [("cnn", "0", None), ("cnn", "0", 0.5), ("cnn", "5", None), ("custom", "stem", None),
     ("custom", "block.fc1", None), ("normed", "4", None), ("mlp", "2", 0.5)],
)  # fmt: skip
def test_clone_units_keeps_the_function_and_carries_state(
    kind: str, layer: str, density: float | None, opt_kind: str
) -> None:
    model, opt, x = _prepared(kind, density, opt_kind)
    before = model(x).detach()
    weight = model.get_submodule(layer).weight
    old_state, width = state_of(opt, weight).clone(), weight.shape[0]
    event = clone_units(model, layer, [1, 3, 1], optimizer=opt)
    assert event.details["sources"] == [1, 3, 1] and event.details["new_width"] == width + 3
    assert_close(model(x), before)
    new = model.get_submodule(layer).weight
    assert torch.equal(state_of(opt, new)[:width], old_state)
    assert not state_of(opt, new)[width:].any()
    train_step(model, opt, x)
    assert held_all(model, opt)


@pytest.mark.parametrize(
    ("kind", "source", "target", "shape"),
    [("mlp", "1", "4", (3, 16)), ("custom", "act", "block.fc2", (16, 16)),
     ("custom", "block.act", "head.1", (3, 12)), ("normed", "3", "7", (3, 16))],
)  # fmt: skip
def test_add_skip_is_zero_and_joins_the_optimizer(
    kind: str, source: str, target: str, shape: tuple[int, int]
) -> None:
    model, opt, x = _prepared(kind, None, "adam")
    before = model(x).detach()
    event = add_skip(model, source, target, optimizer=opt)
    assert event.details["module"] == f"{target}.skip" and event.details["params"] == math.prod(
        shape
    )
    assert_close(model(x), before, rtol=0, atol=0)
    proj = model.get_submodule(f"{target}.skip.proj").weight
    assert proj.shape == shape and held_all(model, opt)
    train_step(model, opt, x)
    assert proj.abs().sum() > 0 and "exp_avg" in opt.state[proj]


def test_highways_on_each_kind() -> None:
    model, opt, x = _prepared("mlp", None, "sgd")
    with torch.no_grad():
        model[0].bias[[0, 1]] = -100.0
    before = model(x).detach()
    (event,) = highways(model, {"0": [0, 1]}, optimizer=opt)
    assert (event.details["target"], event.details["active"]) == ("4", 6)
    assert_close(model(x), before)
    train_step(model, opt, x)
    with pytest.raises(
        UnsupportedModelError,
        match=r"cannot route the dead units of '0' into a highway: LayerNorm '1' normalises",
    ):
        highways(normed(), {"0": [0]})
    with pytest.raises(UnsupportedModelError, match=r"'5' reads the 8 units of '0' as 128 inputs"):
        highways(cnn(), {"0": [0]})
    with pytest.raises(UnsupportedModelError, match=r"through 'block.fc2': its units are shared"):
        highways(custom(), {"block.fc1": [0]})


@pytest.mark.parametrize(
    ("kind", "ops"),
    [("mlp", ["skip", "proportional"]), ("cnn", ["proportional"]),
     ("custom", ["proportional"]), ("normed", ["skip", "proportional"])],
)  # fmt: skip
def test_grow_proportional_keeps_the_active_count(kind: str, ops: list[str]) -> None:
    model, opt, x = _prepared(kind, 0.3, "sgd")
    active = sum(int(m.weight_mask.sum()) for m in model.modules() if hasattr(m, "weight_mask"))
    events = grow_proportional(model, 0.1, optimizer=opt)
    assert [e.op for e in events] == ops
    assert events[-1].details["grown"] == events[-1].details["pruned"] == round(0.1 * active)
    after = sum(int(m.weight_mask.sum()) for m in model.modules() if hasattr(m, "weight_mask"))
    assert after == active and held_all(model, opt)
    train_step(model, opt, x)


@pytest.mark.parametrize(
    ("kind", "candidates"),
    [
        ("cnn", ["insert", "widen"]),
        ("custom", ["insert", "widen", "skip"]),
        ("normed", ["widen", "skip"]),
    ],
)
def test_tournament_keeps_the_function(kind: str, candidates: list[str]) -> None:
    model, opt, x = _prepared(kind, None, "sgd")
    before = model(x).detach()
    t = Tournament(model, data=(x, Y), candidates=candidates, probe_steps=1, seed=0,
                   widen_noise=0.0)  # fmt: skip
    event = t.run(opt)
    assert event is not None and event.details["chosen"] in [c.name for c in t.last]
    assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    train_step(model, opt, x)
    assert held_all(model, opt)
    if kind == "normed":  # widen '0' is refused (LayerNorm) and reported, not raised
        assert [name for name, _ in t.rejected] == ["widen:0"]


@pytest.mark.parametrize("kind", ["cnn", "custom"])
def test_indefinite_growth_keeps_the_function(kind: str) -> None:
    build, x = KINDS[kind]
    model = build().eval()
    before = model(x).detach()
    grow = IndefiniteGrowth(model, lambda m, o: 0.5, data=(x, Y), threshold=0.0, max_rounds=2)
    rows = grow.run()
    assert [r.round for r in rows] == [0, 1, 2] and grow.stop_reason == "max_rounds"
    model.eval()
    assert_close(model(x), before, atol=1e-5, rtol=1e-4)


def test_multiscale_and_find_seed_stay_tiny() -> None:
    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(4))

    def build(side: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(side * side, 8), nn.ReLU(), nn.Dropout(0.1),
                             nn.Linear(8, 3))  # fmt: skip

    rows = MultiScale([4, 8], build, epochs_per_scale=1).run(((images, Y), (images, Y))).rows
    assert [(r["scale"], r["init"]) for r in rows] == [(4, "none"), (8, "hierarchical")]
    # hierarchical initialisation: the 8x8 network starts where the 4x4 one ended
    assert rows[1]["accuracy_at_init"] == rows[0]["accuracy"]
    built: list[int] = []

    def conv_opt(model: nn.Module) -> torch.optim.Optimizer:
        built.append(1)
        return torch.optim.Adam(model.parameters())

    with pytest.raises(ValueError, match=r"small model has a Conv2d \('0'\) with parameters"):
        MultiScale([4, 8], _conv_net, optimizer_fn=conv_opt).run(((XI, Y), (XI, Y)))
    assert built == []  # refused before the first scale trained
    search = find_seed(((X, Y), (X, Y)), hidden_options=[(), (4,)], densities=[0.5], seeds=[0],
                       epochs=1)  # fmt: skip
    assert [r["hidden"] for r in search.rows] == [(), (4,)]
    assert search.rows[0]["weights"] == 9  # half of the 6 x 3 weights


# ---------------------------------------------------------------- learning-rate strategies

# (strategy, factors before, factors after) widening CNN layer '5' (units '0', '1' (the
# BatchNorm: depth of '0'), '5', '7': depths 0, 0, 1, 2) and custom layer 'block.fc1' (units
# 'stem', 'block.fc1', 'block.fc2', 'head.1': depths 0..3), at engine step 5
_CNN = ("0", "1", "5", "7")
_CUSTOM = ("stem", "block.fc1", "block.fc2", "head.1")
_FREEZE = {"name": "freeze", "every": 2}  # depth d frozen from step 2(d+1); last depth kept
_SEDIMENT = {"name": "sedimentary", "active_age": 3, "geological_age": 5}  # age 5: geological


def _f(names: tuple[str, ...], *values: float) -> dict[str, float]:
    return dict(zip(names, values, strict=True))


LR_EXPECTED: dict[str, dict[str, tuple[Any, dict[str, float], dict[str, float]]]] = {
    "cnn": {
        "cascade": ("cascade", *(_f(_CNN, 0.1, 0.1, 0.1**0.5, 1.0),) * 2),
        "dual": ("dual", *(_f(_CNN, 0.2, 0.2, 0.2, 0.2),) * 2),
        "component": ("component", *(_f(_CNN, 0.1, 0.1, 0.1, 0.1),) * 2),
        "pretrained": ("pretrained", *(_f(_CNN, 0.01, 0.01, 0.01, 0.01),) * 2),
        "growth": ("growth", _f(_CNN, 1, 1, 1, 1), _f(_CNN, 0.5, 0.5, 0.5, 0.5)),
        "differential": ("differential", _f(_CNN, 1, 1, 1, 1), _f(_CNN, 0.7, 0.7, 0.9, 0.7)),
        "warmup": ("warmup", *(_f(_CNN, 1, 1, 1, 1),) * 2),  # original units: no warm-up
        "freeze": (_FREEZE, *(_f(_CNN, 0, 0, 0, 1),) * 2),
        "sedimentary": (_SEDIMENT, *(_f(_CNN, 0.01, 0.01, 0.01, 0.01),) * 2),
    },
    "custom": {
        "cascade": ("cascade", *(_f(_CUSTOM, 0.1, 0.1 ** (2 / 3), 0.1 ** (1 / 3), 1),) * 2),
        "dual": ("dual", *(_f(_CUSTOM, 0.2, 0.2, 0.2, 0.2),) * 2),
        "component": ("component", *(_f(_CUSTOM, 0.1, 0.1, 0.1, 0.1),) * 2),
        "pretrained": ("pretrained", *(_f(_CUSTOM, 0.01, 0.01, 0.01, 0.01),) * 2),
        "growth": ("growth", _f(_CUSTOM, 1, 1, 1, 1), _f(_CUSTOM, 0.5, 0.5, 0.5, 0.5)),
        "differential": (
            "differential", _f(_CUSTOM, 1, 1, 1, 1), _f(_CUSTOM, 0.7, 0.9, 0.7, 0.5),
        ),
        "warmup": ("warmup", *(_f(_CUSTOM, 1, 1, 1, 1),) * 2),
        "freeze": (_FREEZE, *(_f(_CUSTOM, 0, 0, 1, 1),) * 2),  # step 5: depths 0, 1 frozen
        "sedimentary": (_SEDIMENT, *(_f(_CUSTOM, 0.01, 0.01, 0.01, 0.01),) * 2),
    },
}  # fmt: skip
WIDEN = {"cnn": ("5", 14), "custom": ("block.fc1", 15)}


def _lrs(opt: torch.optim.Optimizer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in opt.param_groups}


@pytest.mark.parametrize(
    ("kind", "strategy"), [(k, s) for k, table in LR_EXPECTED.items() for s in table]
)
def test_lr_strategy_before_and_after_a_widen(kind: str, strategy: str) -> None:
    build, x = KINDS[kind]
    model = build()
    spec, before, after = LR_EXPECTED[kind][strategy]
    plan = LRPlan(model, 0.1, [spec])
    opt = torch.optim.SGD(plan.param_groups(), lr=0.1, momentum=0.9)
    plan.attach(opt)
    engine_state(model).step = 5
    train_step(model, opt, x)
    assert _lrs(opt) == pytest.approx({n: 0.1 * f for n, f in before.items()})
    layer, width = WIDEN[kind]
    widen(model, layer, width, optimizer=opt)
    assert _lrs(opt) == pytest.approx({n: 0.1 * f for n, f in after.items()})
    assert held_all(model, opt)
    train_step(model, opt, x)  # momentum of the widened layer was carried: every param stepped
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


@pytest.mark.parametrize("kind", ["cnn", "custom"])
def test_dynamic_and_sparse_strategies_before_and_after_a_widen(kind: str) -> None:
    build, x = KINDS[kind]
    model = build()
    sparsify(model, 0.5, distribution="uniform")  # 0.5 > dense_above=0.1: factor 0.5
    strategies = ["age", {"name": "warmup", "steps": 10, "initial": True}, "sparsity", "lars"]
    plan = LRPlan(model, 1.0, strategies)
    opt = torch.optim.Adam(plan.param_groups(), lr=1.0)
    plan.attach(opt)
    layer, width = WIDEN[kind]
    for widened in (False, True):
        if widened:
            widen(model, layer, width, optimizer=opt)
        engine_state(model).step = 6
        opt.zero_grad()
        F.cross_entropy(model(x), Y).backward()
        plan.update()
        masked = {n for n, m in model.named_modules() if hasattr(m, "weight_mask")}
        for group in opt.param_groups:
            unit = model.get_submodule(group["name"])
            lars = 1.0  # LARS adapts the >=2-D parameters only (their own group)
            if group["params"][0].dim() >= 2:
                w, g = unit.weight.detach(), unit.weight.grad
                lars = 0.001 * float(w.norm() / (g.norm() + 1e-8))
            expected = 0.1 ** (6 / 1000) * (7 / 10) * (0.5 if group["name"] in masked else 1.0)
            assert group["lr"] == pytest.approx(expected * lars, rel=1e-5), group["name"]
        opt.step()
    assert held_all(model, opt)


# ---------------------------------------------------------------- bad inputs


def _conv_net(side: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * side**2, 3))


BAD: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("budget can_grow without a model", lambda: Budget(max_params=5).can_grow(nn.Linear(2, 2)),
     ValueError, r"Budget.can_grow needs the model to price: pass it .*Budget\(\.\.\., model="),
    ("budget must_prune without a model", lambda: Budget(max_params=5).must_prune(), ValueError,
     r"Budget.must_prune needs the model to price"),
    ("budget can_grow int model", lambda: Budget(max_params=5).can_grow(3, 4), TypeError,
     r"model must be a torch.nn.Module, got int"),
    ("budget input shape", lambda: Budget(max_flops=10, input_shape=(6,)).flops(cnn()),
     ValueError, r"a forward pass of one zero sample shaped input_shape=\(6,\) failed"),
    ("plateau patience", lambda: Plateau(patience=0), ValueError,
     r"patience must be a positive int, got 0"),
    ("trigger kwarg", lambda: make_trigger("plateau", patiance=3), TypeError,
     r"trigger 'plateau' got unknown arguments \['patiance'\]; allowed: patience, threshold"),
    ("action kwarg", lambda: GrowAsNeeded(Plateau(), "widen", amout=3), TypeError,
     r"action 'widen' got unknown arguments \['amout'\]; allowed: layers, amount"),
    ("action name", lambda: make_action("grow"), ValueError, r"unknown action 'grow'"),
    ("gvs layers", lambda: GradientVarianceSpike(cnn(), layers=["zz*"]), ValueError,
     r"include pattern 'zz\*' matches no Linear/Conv2d module"),
    ("contribution name", lambda: Contribution(custom(), "nope", (X, Y)), KeyError,
     r"model has no submodule named 'nope'"),
    ("extrema relu bounded", lambda: Extrema(cnn(), saturation="bounded"), ValueError,
     r"'0' is followed by ReLU"),
    ("extrema not a layer", lambda: Extrema(cnn(), layers=["1"]), TypeError,
     r"'1' is a BatchNorm2d; expected one of: Linear, Conv2d"),
    ("credit float tensor", lambda: CreditEconomy().earn(torch.tensor([1.0])), ValueError,
     r"got a torch.float32 tensor"),
    ("any_of empty", lambda: any_of(), ValueError, r"AnyOf needs at least one trigger"),
    ("patches dense", lambda: add_patches(cnn(), {"0": [1]}), ValueError,
     r"layer '0' is dense \(it has no weight_mask\)"),
    ("patches bn", lambda: add_patches(cnn(), {"1": [1]}), TypeError,
     r"'1' is a BatchNorm2d; expected one of: Linear, Conv2d"),
    ("patches unit", lambda: add_patches(cnn(), {"0": [99]}), ValueError,
     r"units of '0' must lie in \[0, 8\) \(its output units\), got min 99"),
    ("connect float", lambda: connect(cnn(), "0", torch.tensor([1.0])), ValueError,
     r"layer '0' is dense"),
    ("clone output", lambda: clone_units(cnn(), "7", [0]), UnsupportedModelError,
     r"cannot widen '7': its output is an output of the model"),
    ("clone layernorm", lambda: clone_units(normed(), "0", [0]), UnsupportedModelError,
     r"LayerNorm '1' normalises over the widened units"),
    ("clone unit", lambda: clone_units(custom(), "block.fc1", [12]), ValueError,
     r"indices outside \[0, 12\) for 'block.fc1' \(min 12, max 12\)"),
    ("skip composite", lambda: add_skip(custom(), "stem", "block"), ValueError,
     r"'block' \(Inner\) is not called as one module in the traced forward: the trace goes "
     r"inside it \(it calls \['block.fc1', 'block.act', 'block.fc2'\]\); name the module "
     r"inside it whose output to use, e.g. 'block.fc2'"),
    ("skip conv to linear", lambda: add_skip(cnn(), "2", "7"), UnsupportedModelError,
     r"both ends must carry Linear units or both Conv2d channels"),
    ("skip backwards", lambda: add_skip(custom(), "head.1", "stem"), ValueError,
     r"'stem' runs before 'head.1' in forward; a skip goes forward: swap them"),
    ("proportional dense", lambda: grow_proportional(cnn(), 0.1), ValueError,
     r"model has no masked layer; sparsify it first"),
    ("proportional fraction", lambda: grow_proportional(cnn(), 1.5), ValueError,
     r"fraction must be a number in \(0, 1\], got 1.5"),
    ("tournament float labels", lambda: Tournament(cnn(), data=(XI, Y.float())), ValueError,
     r"data: y must be a 1-D tensor of integer class indices .*got dtype torch.float32"),
    ("tournament layers", lambda: Tournament(cnn(), data=(XI, Y), layers=["1"]).propose(),
     ValueError, r"layers \['1'\] are not Linear/Conv2d modules; available: \['0', '5', '7'\]"),
    ("indefinite layers", lambda: IndefiniteGrowth(cnn(), lambda m, o: 0.0, data=(XI, Y),
                                                   layers=["9"]),
     KeyError, r"model has no submodule named '9'"),
    ("indefinite train_fn", lambda: IndefiniteGrowth(cnn(), lambda m, o: None,
                                                     data=(XI, Y)).run(),
     TypeError, r"train_fn must return the validation accuracy \(a number\), got None"),
    ("multiscale conv", lambda: MultiScale([4, 8], _conv_net, epochs_per_scale=5).run(
        ((XI, Y), (XI, Y))), ValueError, r"small model has a Conv2d \('0'\) with parameters"),
    ("slot anchors", lambda: SlottedNetwork(custom(), ["after:nope"]), KeyError,
     r"slot 'after:nope' anchors at model has no submodule named 'nope'"),
    ("slot width", lambda: SlottedNetwork(custom(), ["after:stem"]).add_module_to_slot(
        "after:stem", nn.Linear(7, 7)), ValueError,
     r"module cannot read the output of slot 'after:stem' \(width 16\)"),
    ("slot rows", lambda: SlottedNetwork(cnn(), SlotTopology(3, 1)), ValueError,
     r"the topology has 3 rows but the model has 2 hidden layers"),
    ("lr strategy", lambda: LRPlan(cnn(), 0.1, ["cascad"]), ValueError,
     r"unknown learning-rate strategy 'cascad' \(did you mean 'cascade'\?\)"),
    ("widen nothing widenable", lambda: make_action("widen").check(
        nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))),
     ValueError, r"widen: no hidden layer of the model can be widened with init='net2net': "
     r"'0': LayerNorm '1' normalises over its units, .*; use init='random'"),
    ("embargo ops", lambda: Embargo(cnn(), steps=1, ops="prune"), ValueError,
     r"ops must be a non-empty sequence of op names .* got 'prune'"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "call", "error", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(
    label: str, call: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call()


def test_a_pruned_place_refuses_growth_through_the_coupled_group() -> None:
    model = custom()
    embargo = Embargo(model, steps=10)
    magnitude_prune(model, 0.5, include=["block.fc2"])
    assert embargo.allowed("stem", 9) is True  # stem itself was not pruned
    grow = GrowAsNeeded(Plateau(patience=1, threshold=10.0), "widen", layers=["stem"], amount=1,
                        embargo=embargo)  # fmt: skip
    trainer(model, X, [grow, embargo], epochs=3).fit()  # the plateau fires at evaluation 2
    assert [a["embargoed"] for a in grow.attempts] == [["stem"]]
    assert model.stem.out_features == 16
