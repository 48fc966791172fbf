"""Audit 10: growth schedules price FLOPs and dense budgets; activity taps behind a shared
activation; nested shared triggers; clear errors; cooldown; reasons; asymmetric bounds."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import dynarch
from dynarch.activity import Extrema, Utilization, activation_tap, try_analyse
from dynarch.callbacks import LambdaCallback
from dynarch.masks import sparsify
from dynarch.models import mlp
from dynarch.prune import magnitude_prune
from dynarch.schedules import (
    Action,
    Embargo,
    GrowAsNeeded,
    GrowPruneCycle,
    grow_once,
    make_action,
)
from dynarch.schedules.pricing import widen_plan
from dynarch.train import Trainer
from dynarch.triggers import (
    Budget,
    Every,
    GradientVarianceSpike,
    Plateau,
    all_of,
    any_of,
)


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )


def _trainer(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Trainer:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return Trainer(model, opt, (x, y), eval=(x, y), progress=False)


XI, YI = torch.randn(8, 1, 8, 8), torch.arange(8) % 10


# -- 1. FLOP budgets ----------------------------------------------------------------------


def test_widen_plan_prices_flops_exactly() -> None:
    model = _cnn()
    budget = Budget(max_flops=10**9, input_shape=(1, 8, 8))
    before = budget.flops(model)
    weights, others = widen_plan(model, "0", 16)
    positions = budget.positions(model)
    assert weights == {"0": 8 * 9, "3": 8 * 64 * 10} and others == 8
    assert positions == {"0": 64, "3": 1}
    dynarch.widen(model, "0", 16)
    assert budget.flops(model) - before == sum(positions[n] * w for n, w in weights.items())


@pytest.mark.parametrize(("slack", "grows"), [(0, True), (-1, False)])
def test_grow_once_respects_max_flops_at_the_boundary(slack: int, grows: bool) -> None:
    model = _cnn()
    added = 8 * 9 * 64 + 8 * 64 * 10  # conv rows at 64 positions + linear columns
    budget = Budget(max_flops=9728 + added + slack, input_shape=(1, 8, 8))
    assert budget.flops(model) == 9728
    act = make_action("widen", layers=["0"], amount=8)
    _, record = grow_once(_trainer(model, XI, YI), act, "test", budget=budget)
    assert (record["grown"], record["over_budget"]) == ((["0"], []) if grows else ([], ["0"]))
    assert model[0].out_channels == (16 if grows else 8)
    assert budget.headroom(model) == {"flops": slack if grows else added + slack}


def test_grow_as_needed_never_exceeds_max_flops() -> None:
    model = _cnn()
    budget = Budget(max_flops=12_000, input_shape=(1, 8, 8))
    g = GrowAsNeeded(Every(1), "widen", layers=["0"], amount=8, budget=budget)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    Trainer(model, opt, (x, y), eval=(x, y), epochs=2, batch_size=32, progress=False,
            callbacks=[g]).fit()  # fmt: skip
    assert [(a["grown"], a["over_budget"]) for a in g.attempts] == [([], ["0"])]
    assert budget.flops(model) == 9728 and not budget.must_prune(model)


def test_grow_prune_cycle_respects_max_flops() -> None:
    model = _cnn()
    budget = Budget(max_flops=12_000, input_shape=(1, 8, 8))
    cycle = GrowPruneCycle(1, 0, 0, grow={"name": "widen", "amount": 8, "layers": ["0"]},
                           prune=None, budget=budget)  # fmt: skip
    trainer = _trainer(model, XI, YI)
    trainer.step = 1
    assert cycle.act(trainer) == [] and cycle.attempts[0]["over_budget"] == ["0"]


class _Noop(Action):
    def targets(self, model: nn.Module, hint: object = None) -> list[str]:
        return ["0"]

    def apply(self, trainer: Trainer, targets: list[str], reason: str) -> list:
        return []


@pytest.mark.parametrize(
    ("budget", "kind"),
    [
        (Budget(max_flops=10, input_shape=(4,)), r"a FLOP budget \(max_flops\)"),
        (Budget(max_params=10, count_masked=True), r"a dense budget \(count_masked=True\)"),
    ],
)
def test_an_action_that_cannot_price_layers_is_refused(budget: Budget, kind: str) -> None:
    match = (
        f"GrowAsNeeded: {kind} needs an action that says which layers it grows "
        r"\(Action.weights_added, as 'widen' and 'patches' do\); _Noop only prices parameters"
    )
    with pytest.raises(ValueError, match=match):
        GrowAsNeeded(Every(1), _Noop(), budget=budget)
    with pytest.raises(ValueError, match=match.replace("GrowAsNeeded", "GrowPruneCycle")):
        GrowPruneCycle(1, 0, 0, grow=_Noop(), prune=None, budget=budget)


# -- 2. dense budgets on masked models ----------------------------------------------------


def _masked() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    sparsify(model, 0.1)
    return model


def test_dense_widen_plan_matches_the_dense_count() -> None:
    model = _masked()
    budget = Budget(max_params=10**6, count_masked=True)
    before = budget.count(model)
    weights, others = widen_plan(model, "0", 40, dense=True)
    assert weights == {"0": 8 * 20, "2": 5 * 8} and others == 8
    dynarch.widen(model, "0", 40)
    assert budget.count(model) - before == sum(weights.values()) + others == 208


@pytest.mark.parametrize(("slack", "grows"), [(0, True), (-1, False)])
def test_dense_budget_refuses_growth_over_it(slack: int, grows: bool) -> None:
    model = _masked()
    budget = Budget(max_params=837 + 208 + slack, count_masked=True)
    assert budget.count(model) == 837
    act = make_action("widen", layers=["0"], amount=8)
    x, y = torch.randn(8, 20), torch.arange(8) % 5
    _, record = grow_once(_trainer(model, x, y), act, "test", budget=budget)
    assert record["grown"] == (["0"] if grows else [])
    assert not budget.must_prune(model)


# -- 3. activity behind a shared activation module ----------------------------------------


class _Block(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=inplace)  # one module called twice (torchvision style)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("inplace", [False, True])
def test_shared_activation_is_applied_to_the_norm_output(inplace: bool) -> None:
    torch.manual_seed(0)
    m = _Block(inplace)
    with torch.no_grad():
        m.conv1.bias[:4] = -50.0
        m.bn1.running_mean[:4] = -50.0
    m.eval()
    x = torch.randn(16, 3, 8, 8)
    assert activation_tap(try_analyse(m), "conv1") == ("bn1", "relu")
    with torch.no_grad():
        expected_out = m(x)
        post1 = torch.relu(m.bn1(m.conv1(x)))
        post2 = torch.relu(m.bn2(m.conv2(post1)))
    u = Utilization(m, threshold=0.9)
    u.start()
    with torch.no_grad():
        out = m(x)
    u.stop()
    assert torch.equal(out, expected_out)  # the hook leaves the forward unchanged
    assert u.taps == {"conv1": "relu", "conv2": "relu"}
    util = u.utilization()
    assert util["conv1"] == pytest.approx(float((post1 != 0).double().mean()), abs=1e-12)
    assert util["conv2"] == pytest.approx(float((post2 != 0).double().mean()), abs=1e-12)
    ex = Extrema(m, eps=0.05)
    ex.observe(x)
    active = (post1 > 0).double().mean((0, 2, 3))
    assert ex.dead_units("conv1").tolist() == (active < 0.05).nonzero()[:, 0].tolist() == []


def test_bounded_saturation_through_a_shared_activation_uses_its_bounds() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.act = nn.Linear(2, 2), nn.Linear(2, 2), nn.Sigmoid()
            self.out = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(self.b(self.act(self.a(x)))))

    net = Net()
    with torch.no_grad():
        net.a.weight.zero_()
        net.a.bias.copy_(torch.tensor([50.0, 0.0]))
    ex = Extrema(net, ["a"], saturation="bounded")
    ex.observe(torch.randn(8, 2))
    assert ex.taps == {"a": "act"} and ex.saturated_units("a").tolist() == [0]


# -- 4. a trigger shared across nested composites ------------------------------------------


def test_nested_shared_trigger_is_refused() -> None:
    pl = Plateau(patience=4)
    with pytest.raises(
        ValueError,
        match=r"AnyOf: triggers\[1\]\.triggers\[0\] is the same object as triggers\[0\] "
        r"\(it would be updated twice per update\); pass distinct trigger objects",
    ):
        any_of(pl, all_of(pl, Every(1)))
    inner = all_of(Every(1))
    with pytest.raises(ValueError, match=r"AllOf: triggers\[1\] is the same object as "):
        all_of(inner, inner)
    shared = Every(2)
    with pytest.raises(ValueError, match=r"triggers\[1\]\.triggers\[0\] is the same object as "
                       r"triggers\[0\]\.triggers\[0\]"):  # fmt: skip
        any_of(all_of(shared), all_of(shared))


# -- 5. patches under a FLOP budget --------------------------------------------------------


def test_patches_with_a_flop_budget_stays_within_it() -> None:
    torch.manual_seed(0)
    m = mlp(16, [32], 4)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    sparsify(m, 0.1, distribution="uniform", optimizer=opt)
    budget = Budget(max_flops=140, input_shape=(16,))
    act = make_action("patches", amount=0.5, budget=budget)
    room = budget.headroom(m)["flops"]
    assert act.room(m, ["fc1"]) == room and act.cost(m, "fc1") == min(26, room)
    assert act.weights_added(m, "fc1") == ({"fc1": act.cost(m, "fc1")}, 0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    g = GrowAsNeeded(Every(1), act, budget=budget)
    Trainer(m, opt, (x, y), eval=(x, y), epochs=3, batch_size=32, progress=False,
            callbacks=[g]).fit()  # fmt: skip
    assert [e.op for e in dynarch.history(m)].count("patch") >= 1
    assert budget.flops(m) <= 140


def test_patches_room_with_a_dense_budget_is_unlimited() -> None:
    m = mlp(16, [32], 4)
    sparsify(m, 0.1, distribution="uniform")
    act = make_action("patches", budget=Budget(max_params=1, count_masked=True))
    assert act.room(m, ["fc1"]) is None and act.weights_added(m, "fc1", dense=True) == (
        {"fc1": 0},
        0,
    )


# -- 6. widen errors name each hidden layer's blocker ---------------------------------------


def test_widen_without_layers_names_each_blocker() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.o = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(torch.relu(self.a(torch.relu(self.a(x)))))

    with pytest.raises(
        ValueError,
        match=r"^widen: no hidden layer of the model can be widened with init='random': 'a': "
        r"'a' is called 2 times on inputs of different channel spaces \(coupled layers: "
        r"\['a'\]\)$",
    ):
        make_action("widen", init="random").check(Shared())


# -- 7. bad arguments refused up front -----------------------------------------------------


def test_embargo_refuses_unknown_ops() -> None:
    m = mlp(8, [16], 3)
    with pytest.raises(
        ValueError,
        match=r"Embargo: unknown op 'prunes' in ops \(no structural event has it, so it would "
        r"never embargo anything\); known ops: attach, branch, .*, widen$",
    ):
        Embargo(m, 100, ops=("prunes",))
    emb = Embargo(m, 100, ops=("prune", "rewire"))
    magnitude_prune(m, 0.5, include=["fc1"])
    assert emb.allowed("fc1") is False
    emb.close()


@pytest.mark.parametrize("norm", [-1, 0, "fro", math.nan, True])
def test_structured_prune_refuses_a_bad_norm(norm: object) -> None:
    with pytest.raises(
        ValueError,
        match=r"structured_prune: norm must be a number > 0 \(e\.g\. 1, 2 or math\.inf\), got ",
    ):
        make_action("structured_prune", layers=["fc1"], amount=4, norm=norm)
    assert make_action("structured_prune", layers=["fc1"], amount=4, norm=math.inf).norm == math.inf


# -- 8. spikes seen during a cooldown are dropped -------------------------------------------


def _gvs_run(spike_steps: set[int]) -> list[tuple[int, str]]:
    torch.manual_seed(0)
    m = mlp(8, [16], 3)
    spike = GradientVarianceSpike(m, k=6.0, warmup=3, momentum=None, layers=["fc1"])

    def inject(t: Trainer) -> None:
        if t.step + 1 in spike_steps:
            m.fc1.weight.grad.mul_(100.0)

    g = GrowAsNeeded(spike, "widen", layers=["fc1"], amount=2, cooldown=2)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    callbacks = [LambdaCallback(on_after_backward=inject), spike.callback(), g]
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    Trainer(m, opt, (x, y), eval=(x, y), epochs=7, batch_size=16, progress=False,
            callbacks=callbacks).fit()  # fmt: skip
    return [(e.step, e.op) for e in dynarch.history(m)]


def test_spikes_during_a_cooldown_do_not_grow() -> None:
    # evaluations every 4 steps: growth at 8, cooldown over the evaluations at 12 and 16
    assert _gvs_run({6}) == [(8, "widen")]
    assert _gvs_run({6, 14}) == [(8, "widen")]
    assert _gvs_run({6, 18}) == [(8, "widen"), (20, "widen")]  # after the cooldown: grows


def test_discard_pending_of_composites_reaches_children() -> None:
    layer = nn.Linear(2, 1, bias=False)
    spike = GradientVarianceSpike(layer, warmup=1, momentum=None)
    for g in ([1.0, -1.0], [1.0, -1.0], [5.0, -5.0]):
        layer.weight.grad = torch.tensor([g])
        spike.observe()
    both = any_of(spike, Plateau(patience=1))
    before = copy.deepcopy(spike.statistics())
    both.discard_pending()
    assert both.update(1.0) is False and spike.statistics() == before


# -- 9. the reason names the trigger that fired ---------------------------------------------


def test_any_of_reason_names_the_children_that_fired() -> None:
    m = mlp(8, [16], 3)
    g = GrowAsNeeded(any_of(Plateau(patience=50), Every(2)), "widen", layers=["fc1"], amount=2)
    assert g.reason == "any_of(val_loss)"
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    Trainer(m, torch.optim.SGD(m.parameters(), lr=0.01), (x, y), eval=(x, y), epochs=3,
            batch_size=32, progress=False, callbacks=[g]).fit()  # fmt: skip
    assert [e.reason for e in dynarch.history(m)] == ["any_of[every](val_loss)"]
    assert g.attempts[0]["reason"] == "any_of[every](val_loss)"
    nested = GrowAsNeeded(any_of(Plateau(), any_of(Every(1))), "widen", tag="t")
    nested.trigger.update(1.0)
    assert nested._reason(fired=True) == "t:any_of[any_of[every]](val_loss)"


# -- 10. asymmetric bounds ------------------------------------------------------------------


def test_asymmetric_hardtanh_checks_each_bound() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.Hardtanh(min_val=-2.0, max_val=1.0), nn.Linear(4, 2))
    with torch.no_grad():
        m[0].weight.zero_()
        m[0].bias.copy_(torch.tensor([50.0, -50.0, 0.5, -1.5]))
    ex = Extrema(m, saturation="bounded", eps=0.01)
    ex.observe(torch.randn(32, 4))
    assert ex.saturated_units("0").tolist() == [0, 1]  # pinned at +1 and at -2
    assert ex.fractions()["0"]["saturated"] == 0.5
