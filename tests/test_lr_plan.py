"""LRPlan: grouping, optimizer state through regrouping, patch update scaling, the trainer
callback and its state, checkpoints, and every error message of dynarch.lr."""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn

import dynarch
from dynarch._engine import engine_state, transaction
from dynarch.callbacks import At
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
    make_strategy,
    register_strategy,
)
from dynarch.models import mlp
from dynarch.train import Trainer


def small() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(4, [8, 8], 2)


def states(opt: torch.optim.Optimizer) -> dict[int, tuple[dict, dict[str, torch.Tensor]]]:
    """Per parameter id: the state dict object and a copy of its tensors."""
    return {
        id(p): (s, {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)})
        for p, s in opt.state.items()
    }


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(6, 4)).pow(2).sum().backward()
    opt.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.8, 0.9)),
    ],
    ids=["sgd", "adam"],
)
def test_attach_regroups_and_keeps_hyperparameters_and_state(make) -> None:
    model = small()
    opt = make(model.parameters())
    train_step(model, opt)
    before = states(opt)
    plan = LRPlan(model, 0.1, ["cascade"]).attach(opt)
    assert [g["name"] for g in opt.param_groups] == ["fc1", "fc2", "out"]
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(model.fc1.weight), id(model.fc1.bias)],
        [id(model.fc2.weight), id(model.fc2.bias)],
        [id(model.out.weight), id(model.out.bias)],
    ]
    keep = {k: v for k, v in opt.defaults.items() if k != "lr"}
    assert all({k: g[k] for k in keep} == keep for g in opt.param_groups)
    assert [g["lr_factor"] for g in opt.param_groups] == pytest.approx([0.1, 0.1**0.5, 1.0])
    after = states(opt)
    assert after.keys() == before.keys()
    for pid, (obj, tensors) in before.items():
        assert after[pid][0] is obj
        assert all(torch.equal(after[pid][1][k], v) for k, v in tensors.items())
    # growth: the old parameters' state is untouched by the regrouping
    train_step(model, opt)
    before = states(opt)
    params = {id(p): p for p in model.parameters()}
    dynarch.deepen(model, "fc1", optimizer=opt)
    dynarch.attach(model, "after:act2", nn.Linear(8, 8), optimizer=opt)
    assert [g["name"] for g in opt.param_groups] == [
        "fc1", "act1_deep", "fc2", "act2_slot", "act2_slot.module", "out"
    ]  # fmt: skip
    for pid, (obj, tensors) in before.items():
        assert opt.state[params[pid]] is obj
        assert all(torch.equal(obj[k], v) for k, v in tensors.items())
    assert len({id(p) for g in opt.param_groups for p in g["params"]}) == len(
        list(model.parameters())
    )
    train_step(model, opt)  # the regrouped optimizer steps
    assert plan.optimizer is opt


def test_widen_keeps_the_state_of_old_units_in_the_regrouped_optimizer() -> None:
    model = small()
    plan = LRPlan(model, 0.1, ["growth"])
    opt = torch.optim.Adam(plan.param_groups())
    plan.attach(opt)
    train_step(model, opt)
    old = opt.state[model.fc1.weight]["exp_avg"].clone()
    dynarch.widen(model, "fc1", 12, optimizer=opt)
    new = opt.state[model.fc1.weight]["exp_avg"]
    assert torch.equal(new[:8], old) and torch.equal(new[8:], torch.zeros(4, 4))
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [
        ("fc1", 0.05), ("fc2", 0.05), ("out", 0.05)
    ]  # fmt: skip


def _patched(model: nn.Module) -> torch.Tensor:
    patch = torch.zeros(8, 8, dtype=torch.bool)
    patch[2:5, 1:6] = True
    model.fc2.register_buffer("weight_patch", patch)
    with transaction(model, "connect", "fc2") as tx:
        tx.details = {"layer": "fc2"}
    return patch


@pytest.mark.parametrize(
    "make",
    [
        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=0.01, nesterov=True),
        lambda ps, lr: torch.optim.Adam(ps, lr=lr),
        lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_patch_positions_move_ratio_times_the_scaffold_update(make) -> None:
    # elementwise optimizers and fixed gradients: every position follows its own trajectory,
    # patch positions the one of lr 0.1 * 1.0, the others the one of lr 0.1 * 0.2
    model, slow, fast = small(), small(), small()
    patch = _patched(model)
    plan = LRPlan(model, 0.1, [DualScaffoldPatch(scaffold=0.2, patch=1.0)])
    opt = make(plan.param_groups(), 0.1)
    plan.attach(opt)
    refs = [make(slow.parameters(), 0.1 * 0.2), make(fast.parameters(), 0.1)]
    gen = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    for _ in range(3):
        for net in (model, slow, fast):
            for n, p in net.named_parameters():
                p.grad = grads[n].clone()
        for o in (opt, *refs):
            o.step()
    want = torch.where(patch, fast.fc2.weight, slow.fc2.weight).detach()
    torch.testing.assert_close(model.fc2.weight.detach(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.fc1.weight, slow.fc1.weight)
    assert not torch.allclose(model.fc2.weight[patch], slow.fc2.weight[patch])


def test_frozen_unit_freezes_its_patches_too() -> None:
    model = small()
    _patched(model)
    plan = LRPlan(model, 0.1, [ComponentLR(scaffold=0.0, patch=0.5)])
    opt = torch.optim.SGD(plan.param_groups(), lr=0.1)
    plan.attach(opt)
    w0 = model.fc2.weight.detach().clone()
    train_step(model, opt)
    assert torch.equal(model.fc2.weight, w0)


def test_plan_with_a_masked_layer_and_patches_keeps_masked_weights_zero() -> None:
    model = small()
    dynarch.sparsify(model, 0.5, distribution="uniform", include=["fc2"])
    patch = model.fc2.weight_mask.clone()
    patch[4:] = False
    model.fc2.register_buffer("weight_patch", patch)
    plan = LRPlan(model, 0.1, [DualScaffoldPatch(0.5, 1.0)])
    opt = torch.optim.Adam(plan.param_groups())
    plan.attach(opt)
    dynarch.masks.enforce(model, opt)
    for _ in range(3):
        train_step(model, opt)
    assert torch.equal(model.fc2.weight[~model.fc2.weight_mask], torch.zeros(32))


def test_unrecorded_change_is_regrouped_before_the_next_step() -> None:
    model = small()
    plan = LRPlan(model, 0.1, ["cascade"])
    opt = torch.optim.SGD(plan.param_groups(), lr=0.1)
    plan.attach(opt)
    dynarch.deepen(model, "fc1", optimizer=opt, record=False)  # as when replaying
    assert [g["name"] for g in opt.param_groups] == ["fc1", "fc2", "out"]
    train_step(model, opt)
    assert [g["name"] for g in opt.param_groups] == ["fc1", "act1_deep", "fc2", "out"]
    assert opt.param_groups[3]["lr"] == 0.1 and opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_detach_stops_updates() -> None:
    model = small()
    plan = LRPlan(model, 0.1, ["cascade"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan.attach(opt)
    plan.detach()
    assert plan.optimizer is None and engine_state(model).listeners == []
    dynarch.deepen(model, "fc1", optimizer=opt)
    assert [g["name"] for g in opt.param_groups] == ["fc1", "fc2", "out"]
    plan.attach(opt)
    assert [g["name"] for g in opt.param_groups] == ["fc1", "act1_deep", "fc2", "out"]
    assert plan.attach(opt) is plan  # attaching again to the same optimizer is a refresh


def test_param_groups_root_tied_frozen_and_partial_optimizer() -> None:
    lin = nn.Linear(3, 3)
    assert [g["name"] for g in LRPlan(lin, 0.1).param_groups()] == ["<root>"]
    model = small()
    model.fc1.bias.requires_grad_(False)
    groups = LRPlan(model, 0.1).param_groups()
    assert [(g["name"], len(g["params"]), g["lr"], g["lr_factor"]) for g in groups] == [
        ("fc1", 1, 0.1, 1.0), ("fc2", 2, 0.1, 1.0), ("out", 2, 0.1, 1.0)
    ]  # fmt: skip
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    assert [len(g["params"]) for g in LRPlan(tied, 0.1).param_groups()] == [2, 1]
    # an optimizer over part of the model keeps only that part
    opt = torch.optim.SGD([model.fc2.weight, model.out.bias], lr=0.1)
    LRPlan(model, 0.1, ["cascade"]).attach(opt)
    assert [(g["name"], len(g["params"])) for g in opt.param_groups] == [("fc2", 1), ("out", 1)]


def test_strategies_from_names_and_dicts() -> None:
    plan = LRPlan(small(), 0.1, ["cascade", {"name": "warmup", "steps": 4, "initial": True}])
    assert [type(s).__name__ for s in plan.strategies] == ["Cascade", "Warmup"]
    assert plan.factors()["out"] == 0.25 and plan.dynamic
    assert not LRPlan(small(), 0.1, ["cascade"]).dynamic


def test_set_base_lr_updates_the_groups() -> None:
    model = small()
    plan = LRPlan(model, 0.1, ["cascade"])
    opt = torch.optim.SGD(plan.param_groups(), lr=0.1)
    plan.attach(opt)
    plan.set_base_lr(0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.5 * 0.1**0.5, 0.5])


def test_trainer_attaches_and_warms_up_a_module_added_mid_training() -> None:
    model = small()
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = LRPlan(model, 0.1, [Warmup(steps=4)])
    grow = At(2, lambda t: dynarch.attach(model, "after:act1", nn.Linear(8, 8), optimizer=opt))
    trainer = Trainer(model, opt, (x, y), batch_size=8, max_steps=4, progress=False,
                      callbacks=[plan, grow])  # fmt: skip
    trainer.fit()
    # born at step 2; the updates of steps 3 and 4 used 1/4 and 2/4
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {
        "fc1": 0.1, "act1_slot": 0.05, "act1_slot.module": 0.05, "fc2": 0.1, "out": 0.1
    }  # fmt: skip
    state = {"base_lr": 0.1, "strategies": [{"name": "warmup", "state": {}}]}
    assert trainer.state_dict()["callbacks"][0] == {"class": "LRPlan", "state": state}


def test_state_dict_round_trip_weights_only() -> None:
    model = small()
    plan = LRPlan(model, 0.1, [Cascade(), ProgressiveFreezing(every=5)])
    opt = torch.optim.SGD(plan.param_groups(), lr=0.1)
    plan.attach(opt)
    engine_state(model).step = 12
    opt.step()
    plan.set_base_lr(0.2)
    buf = io.BytesIO()
    torch.save(plan.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state == {
        "base_lr": 0.2,
        "strategies": [
            {"name": "cascade", "state": {}},
            {"name": "freeze", "state": {"frozen_at": {"fc1": 12, "fc2": 12}}},
        ],
    }
    other = LRPlan(model, 0.1, [Cascade(), ProgressiveFreezing(every=5)])
    other.load_state_dict(state)
    assert other.state_dict() == state
    engine_state(model).step = 0  # restored freezing holds even before it would be due
    assert other.factors() == pytest.approx({"fc1": 0.0, "fc2": 0.0, "out": 1.0})
    plan.detach()
    other.attach(opt)
    other.load_state_dict(state)  # attached: the groups are updated at once
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.2]


def test_checkpoint_resume_builds_the_same_groups(tmp_path) -> None:
    model = small()
    plan = LRPlan(model, 0.1, ["cascade", "pretrained"])
    opt = torch.optim.Adam(plan.param_groups())
    plan.attach(opt)
    train_step(model, opt)
    dynarch.deepen(model, "fc1", optimizer=opt)
    train_step(model, opt)
    dynarch.save(tmp_path / "ck", model, opt)
    ck = dynarch.load(tmp_path / "ck")
    plan2 = LRPlan(ck.model, 0.1, ["cascade", "pretrained"])
    opt2 = torch.optim.Adam(plan2.param_groups())
    ck.load_optimizer(opt2)
    plan2.attach(opt2)
    assert [(g["name"], g["lr"]) for g in opt2.param_groups] == [
        (g["name"], g["lr"]) for g in opt.param_groups
    ]
    torch.testing.assert_close(
        opt2.state[ck.model.act1_deep.weight]["exp_avg"],
        opt.state[model.act1_deep.weight]["exp_avg"],
    )


# ------------------------------------------------------------------------------- errors
def _bad(fn, exc: type[Exception], match: str) -> tuple:
    return pytest.param(fn, exc, match, id=match[:40])


CONSTRUCTION_ERRORS = [
    _bad(
        lambda: Cascade(decay=0),
        ValueError,
        "cascade: decay must be a finite number > 0, got 0",
    ),
    _bad(
        lambda: Cascade(slow="mid"),
        ValueError,
        "cascade: slow must be 'early' or 'late', got 'mid'",
    ),
    _bad(
        lambda: DualScaffoldPatch(scaffold=-1),
        ValueError,
        "dual: scaffold must be a finite number >= 0, got -1",
    ),
    _bad(
        lambda: DualScaffoldPatch(patch=float("nan")),
        ValueError,
        "dual: patch must be a finite number >= 0, got nan",
    ),
    _bad(
        lambda: AgeDecay(period=0),
        ValueError,
        "age: period must be an int >= 1, got 0",
    ),
    _bad(
        lambda: AgeDecay(decay=True),
        ValueError,
        "age: decay must be a finite number >= 0, got True",
    ),
    _bad(
        lambda: AgeDecay(staircase=1),
        ValueError,
        "age: staircase must be True or False, got 1",
    ),
    _bad(
        lambda: ComponentLR(components=["fc1"]),
        ValueError,
        "component: components must map module-name globs to factors, got ['fc1']",
    ),
    _bad(
        lambda: ComponentLR(components={"fc*": "x"}),
        ValueError,
        "component: components['fc*'] must be a finite number >= 0, got 'x'",
    ),
    _bad(
        lambda: ComponentLR(new=-0.5),
        ValueError,
        "component: new must be a finite number >= 0, got -0.5",
    ),
    _bad(
        lambda: PretrainedNew(adapter_ops="attach"),
        ValueError,
        "pretrained: adapter_ops must be None or a list of op names, got 'attach'",
    ),
    _bad(
        lambda: PretrainedNew(adapter_ops=[1]),
        ValueError,
        "pretrained: adapter_ops must be None or a list of op names, got [1]",
    ),
    _bad(
        lambda: PretrainedNew(pretrained=-1),
        ValueError,
        "pretrained: pretrained must be a finite number >= 0, got -1",
    ),
    _bad(
        lambda: GrowthAware(decay=-1),
        ValueError,
        "growth: decay must be a finite number >= 0, got -1",
    ),
    _bad(
        lambda: GrowthAware(ops=5),
        ValueError,
        "growth: ops must be None or a list of op names, got 5",
    ),
    _bad(
        lambda: Warmup(steps=0),
        ValueError,
        "warmup: steps must be an int >= 1, got 0",
    ),
    _bad(
        lambda: Warmup(initial="yes"),
        ValueError,
        "warmup: initial must be True or False, got 'yes'",
    ),
    _bad(
        lambda: LARS(trust=0),
        ValueError,
        "lars: trust must be a finite number > 0, got 0",
    ),
    _bad(
        lambda: LARS(eps=-1.0),
        ValueError,
        "lars: eps must be a finite number >= 0, got -1.0",
    ),
    _bad(
        lambda: ProgressiveFreezing(every=2.5),
        ValueError,
        "freeze: every must be an int >= 1, got 2.5",
    ),
    _bad(
        lambda: ProgressiveFreezing(start=-1),
        ValueError,
        "freeze: start must be an int >= 0, got -1",
    ),
    _bad(
        lambda: ProgressiveFreezing(frozen=-1),
        ValueError,
        "freeze: frozen must be a finite number >= 0, got -1",
    ),
    _bad(
        lambda: ProgressiveFreezing(keep_last=None),
        ValueError,
        "freeze: keep_last must be True or False, got None",
    ),
    _bad(
        lambda: DifferentialDecay(grown=-1),
        ValueError,
        "differential: grown must be a finite number >= 0, got -1",
    ),
    _bad(
        lambda: DifferentialDecay(ops="widen"),
        ValueError,
        "differential: ops must be None or a list of op names, got 'widen'",
    ),
    _bad(
        lambda: SparsityAware(sparse=-2),
        ValueError,
        "sparsity: sparse must be a finite number >= 0, got -2",
    ),
    _bad(
        lambda: SparsityAware(sparse_below=0.5, dense_above=0.1),
        ValueError,
        "sparsity: need 0 <= sparse_below <= dense_above <= 1, got sparse_below=0.5, "
        "dense_above=0.1",
    ),
    _bad(
        lambda: SparsityAware(dense_above=2.0),
        ValueError,
        "sparsity: need 0 <= sparse_below <= dense_above <= 1, got sparse_below=0.02, "
        "dense_above=2.0",
    ),
    _bad(
        lambda: Sedimentary(active=-1),
        ValueError,
        "sedimentary: active must be a finite number >= 0, got -1",
    ),
    _bad(
        lambda: Sedimentary(active_age=0),
        ValueError,
        "sedimentary: active_age must be an int >= 1, got 0",
    ),
    _bad(
        lambda: Sedimentary(active_age=10, geological_age=10),
        ValueError,
        "sedimentary: geological_age (10) must be greater than active_age (10)",
    ),
    _bad(
        lambda: make_strategy("cascad"),
        ValueError,
        "unknown learning-rate strategy 'cascad' (did you mean 'cascade'?); allowed: ",
    ),
    _bad(
        lambda: make_strategy("nope"),
        ValueError,
        "unknown learning-rate strategy 'nope'; allowed: ",
    ),
    _bad(
        lambda: make_strategy("warmup", step=3),
        ValueError,
        "strategy 'warmup' got unknown arguments ['step']; allowed: steps, initial",
    ),
    _bad(
        lambda: LRPlan(small(), 0),
        ValueError,
        "base_lr must be a finite number > 0, got 0",
    ),
    _bad(
        lambda: LRPlan(small(), "0.1"),
        ValueError,
        "base_lr must be a finite number > 0, got '0.1'",
    ),
    _bad(
        lambda: LRPlan(small(), 0.1, "cascade"),
        TypeError,
        "strategies must be a list of strategies, names or dicts, got 'cascade'",
    ),
    _bad(
        lambda: LRPlan(small(), 0.1, [3]),
        TypeError,
        "strategies[0] must be a Strategy, a registered name or a dict {'name': ..., "
        "**kwargs}, got 3",
    ),
    _bad(
        lambda: LRPlan("model", 0.1),
        TypeError,
        "model must be a torch.nn.Module, got str",
    ),
    _bad(
        lambda: register_strategy("x")(int),
        TypeError,
        "register_strategy('x') needs a Strategy subclass, got <class 'int'>",
    ),
    _bad(
        lambda: register_strategy("cascade")(Strategy),
        ValueError,
        "strategy name 'cascade' is already registered to Cascade; choose another name",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "match"), CONSTRUCTION_ERRORS)
def test_construction_errors(fn, exc, match) -> None:
    with pytest.raises(exc, match=re.escape(match)):
        fn()
    assert "x" not in STRATEGIES


def test_attach_and_update_errors() -> None:
    model = small()
    plan = LRPlan(model, 0.1, ["cascade"])
    with pytest.raises(
        TypeError, match=re.escape("optimizer must be a torch.optim.Optimizer, got list")
    ):
        plan.attach([])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=re.escape(
        "LRPlan.update needs an optimizer: call plan.attach(optimizer) first"
    )):  # fmt: skip
        plan.update()
    foreign = nn.Parameter(torch.zeros(3, 2))
    opt = torch.optim.SGD([*model.parameters(), foreign], lr=0.1)
    with pytest.raises(ValueError, match=re.escape(
        "the optimizer holds 1 parameter(s) that are not parameters of the model (shapes "
        "[(3, 2)]); build it on this model and pass optimizer= to every structural op so the "
        "engine replaces changed parameters"
    )):  # fmt: skip
        plan.attach(opt)
    assert plan.optimizer is None and engine_state(model).listeners == []
    plan.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=re.escape(
        "this LRPlan is already attached to another optimizer; call plan.detach() first"
    )):  # fmt: skip
        plan.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_callback_errors() -> None:
    model = small()
    data = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    other = small()
    plan = LRPlan(other, 0.1)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, max_steps=1,
                      progress=False, callbacks=[plan])  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(
        "LRPlan was built for another model than the trainer's; build it on trainer.model"
    )):  # fmt: skip
        trainer.fit()
    plan = LRPlan(model, 0.1).attach(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, max_steps=1,
                      progress=False, callbacks=[plan])  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(
        "LRPlan is attached to another optimizer than the trainer's; call plan.detach() first "
        "or attach it to trainer.optimizer"
    )):  # fmt: skip
        trainer.fit()


def test_state_errors() -> None:
    plan = LRPlan(small(), 0.1, ["cascade", "freeze"])
    with pytest.raises(ValueError, match=re.escape(
        "LRPlan state must have keys ['base_lr', 'strategies'], got ['base_lr']"
    )):  # fmt: skip
        plan.load_state_dict({"base_lr": 0.1})
    with pytest.raises(ValueError, match=re.escape(
        "saved LRPlan state has strategies ['freeze'] but this plan has ['cascade', 'freeze']; "
        "build the plan with the same strategies in the same order"
    )):  # fmt: skip
        plan.load_state_dict({"base_lr": 0.1, "strategies": [{"name": "freeze", "state": {}}]})
    good = plan.state_dict()
    with pytest.raises(ValueError, match=re.escape("base_lr must be a finite number > 0, got -1")):
        plan.load_state_dict({**good, "base_lr": -1})
    with pytest.raises(ValueError, match=re.escape(
        "ProgressiveFreezing state must have keys ['frozen_at'], got ['frozen']"
    )):  # fmt: skip
        plan.load_state_dict({**good, "strategies": [
            {"name": "cascade", "state": {}}, {"name": "freeze", "state": {"frozen": {}}}
        ]})  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("Cascade state must have keys [], got ['a']")):
        plan.load_state_dict({**good, "strategies": [
            {"name": "cascade", "state": {"a": 1}}, good["strategies"][1]
        ]})  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(
        "LRPlan strategy state must have keys ['name', 'state'], got ['name']"
    )):  # fmt: skip
        plan.load_state_dict({**good, "strategies": [{"name": "cascade"}, good["strategies"][1]]})
    assert plan.state_dict() == good  # nothing was half-loaded by a refused state


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (torch.zeros(8, 8), "module 'fc2' has a weight_patch buffer of dtype torch.float32 and "
         "shape (8, 8); it must be a bool tensor shaped like its weight (8, 8)"),
        (torch.zeros(8, 4, dtype=torch.bool), "module 'fc2' has a weight_patch buffer of dtype "
         "torch.bool and shape (8, 4); it must be a bool tensor shaped like its weight (8, 8)"),
    ],
)  # fmt: skip
def test_bad_patch_buffer(patch, message) -> None:
    model = small()
    model.fc2.register_buffer("weight_patch", patch)
    with pytest.raises(ValueError, match=re.escape(message + " (the op that changed the layer")):
        LRPlan(model, 0.1, ["dual"]).factors()


def test_attach_keeps_each_parameters_group_settings_through_growth() -> None:
    model = small()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW(
        [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.8, 0.9),
    )
    LRPlan(model, 1e-3, ["cascade"]).attach(opt)

    def layout() -> list[tuple[str, list[str], float]]:
        lookup = {id(p): n for n, p in model.named_parameters()}
        return [
            (g["name"], [lookup[id(p)] for p in g["params"]], g["weight_decay"])
            for g in opt.param_groups
        ]

    assert layout() == [
        ("fc1", ["fc1.weight"], 0.1), ("fc1", ["fc1.bias"], 0.0),
        ("fc2", ["fc2.weight"], 0.1), ("fc2", ["fc2.bias"], 0.0),
        ("out", ["out.weight"], 0.1), ("out", ["out.bias"], 0.0),
    ]  # fmt: skip
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    # both groups of a unit get the unit's learning rate
    assert [g["lr_factor"] for g in opt.param_groups] == pytest.approx(
        [0.1, 0.1, 0.1**0.5, 0.1**0.5, 1.0, 1.0]
    )
    train_step(model, opt)
    dynarch.widen(model, "fc1", 12, optimizer=opt)
    dynarch.deepen(model, "fc2", optimizer=opt)  # a new weight and bias of their own
    assert layout() == [
        ("fc1", ["fc1.weight"], 0.1), ("fc1", ["fc1.bias"], 0.0),
        ("fc2", ["fc2.weight"], 0.1), ("fc2", ["fc2.bias"], 0.0),
        ("act2_deep", ["act2_deep.weight"], 0.1), ("act2_deep", ["act2_deep.bias"], 0.0),
        ("out", ["out.weight"], 0.1), ("out", ["out.bias"], 0.0),
    ]  # fmt: skip
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups)
