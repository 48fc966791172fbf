"""SlottedNetwork: attach through the engine (function kept), alpha ramp, removal and embargo,
optimizer state, the training callback, and checkpoint round trips of slot states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynarch
from dynarch._engine import engine_state
from dynarch.optim import check_optimizer
from dynarch.slots import (
    LinearRamp,
    SlotState,
    SlottedNetwork,
    SlotTopology,
    SlotTransitionError,
    default_anchors,
    register_topology,
    topology_of,
)
from dynarch.train import fit


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


class Net(nn.Module):
    """A custom model (attaching wraps its named layers)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _randomised(n: int) -> nn.Linear:
    torch.manual_seed(n)
    return nn.Linear(8, 8)


def _set_step(model: nn.Module, step: int) -> None:
    engine_state(model).step = step


X = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------- anchors and construction
def test_default_anchors() -> None:
    assert default_anchors(_mlp()) == ["1", "3"]
    assert default_anchors(Net()) == ["act"]
    cnn = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2),
        nn.Flatten(), nn.Linear(2 * 4 * 4, 2),
    )  # fmt: skip
    assert default_anchors(cnn) == ["2", "4"]  # through BN to ReLU; BN when no activation


def test_grid_rows_take_the_first_anchors() -> None:
    net = SlottedNetwork(_mlp(), SlotTopology(1, 2))
    assert [(s.id, s.anchor) for s in net.topology] == [("r0c0", "1"), ("r0c1", "1")]
    assert topology_of(net.model) is net.topology
    net = SlottedNetwork(_mlp(), SlotTopology(2, 1, anchors=["0", "4"]))
    assert [s.anchor for s in net.topology] == ["0", "4"]


def test_slots_as_list_or_mapping() -> None:
    net = SlottedNetwork(_mlp(), ["after:1", "after:3"])
    assert [s.id for s in net.topology] == ["after:1", "after:3"]
    net = SlottedNetwork(_mlp(), {"residual_slot": "after:3"})
    assert net.topology.get_slot("residual_slot").anchor == "3"


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match="the model has no slot topology; pass a SlotTopology"):
        SlottedNetwork(_mlp())
    with pytest.raises(TypeError, match=r"topology_or_slots must be .* got int"):
        SlottedNetwork(_mlp(), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape(
        "the topology has 3 rows but the model has 2 hidden layers to anchor them at "
        "(['1', '3']); pass anchors= to SlotTopology"
    )):  # fmt: skip
        SlottedNetwork(_mlp(), SlotTopology(3, 1))
    with pytest.raises(
        KeyError, match="slot 'after:fc9' anchors at model has no submodule named 'fc9'"
    ):
        SlottedNetwork(_mlp(), ["after:fc9"])
    with pytest.raises(TypeError, match="alpha_schedule must be None or have __call__"):
        SlottedNetwork(_mlp(), ["after:1"], alpha_schedule=lambda t: 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape("model must be a torch.nn.Module, got str")):
        SlottedNetwork("net", ["after:1"])  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=re.escape("optimizer must be a torch.optim.Optimizer or None")
    ):
        SlottedNetwork(_mlp(), ["after:1"], optimizer="sgd")  # type: ignore[arg-type]
    model = _mlp()
    register_topology(model, SlotTopology(1, 1))
    with pytest.raises(ValueError, match="the model already has another slot topology"):
        SlottedNetwork(model, SlotTopology(1, 1))
    with pytest.raises(TypeError, match="topology must be a SlotTopology, got dict"):
        register_topology(model, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="LinearRamp steps must be an int >= 1, got 0"):
        LinearRamp(0)


# ---------------------------------------------------------------- attach keeps the function
def test_attach_preserves_function_and_germinates() -> None:
    model = _mlp()
    before = model(X)
    net = SlottedNetwork(model, SlotTopology(2, 2, names={"res": "after:4"}))
    _set_step(model, 6)
    events = [
        net.add_module_to_slot("r0c0", _randomised(1)),
        net.add_module_to_slot("r0c1", _randomised(2), reason="plateau"),
        net.add_module_to_slot("r1c0", _randomised(3)),
        net.add_module_to_slot("res", nn.Linear(3, 3)),
    ]
    assert (model(X) - before).abs().max() <= 1e-6
    assert torch.equal(model(X), before)
    assert [(e.op, e.target, e.reason, e.step) for e in events] == [
        ("attach", "after:1", "slot r0c0", 6),
        ("attach", "after:1_slot", "plateau; slot r0c1", 6),  # columns chain on one anchor
        ("attach", "after:3", "slot r1c0", 6),
        ("attach", "after:4", "slot after:4", 6),
    ]
    assert list(model._modules) == [
        "0",
        "1",
        "1_slot",
        "1_slot_slot",
        "2",
        "3",
        "3_slot",
        "4",
        "4_slot",
    ]
    assert net.topology.states() == {
        "r0c0": SlotState.GERMINATED, "r0c1": SlotState.GERMINATED,
        "r1c0": SlotState.GERMINATED, "r1c1": SlotState.DORMANT, "after:4": SlotState.GERMINATED,
    }  # fmt: skip
    assert net.residual("r0c1") is model.get_submodule("1_slot_slot")
    assert net.residual("r1c1") is None
    assert dynarch.history(model)[-1] is events[-1]


def test_attach_in_a_custom_model_wraps_and_keeps_function() -> None:
    model = Net()
    before = model(X)
    net = SlottedNetwork(model, SlotTopology(1, 2))
    net.add_module_to_slot("r0c0", nn.Linear(6, 6))
    net.add_module_to_slot("r0c1", nn.Linear(6, 6))
    assert torch.equal(model(X), before)
    assert list(model.act._modules) == ["0", "act_slot", "act_slot_slot"]


def test_add_to_occupied_or_wrong_state_slot() -> None:
    net = SlottedNetwork(_mlp(), SlotTopology(1, 1))
    net.add_module_to_slot("r0c0", _randomised(1))
    with pytest.raises(SlotTransitionError, match=re.escape(
        "illegal transition of slot 'r0c0' to 'germinated': slot 'r0c0' is 'germinated'; "
        "allowed: 'training'"
    )):  # fmt: skip
        net.add_module_to_slot("r0c0", _randomised(2))
    with pytest.raises(KeyError, match="unknown slot 'r9c9'"):
        net.add_module_to_slot("r9c9", _randomised(2))
    assert len(dynarch.history(net.model)) == 1  # nothing attached by the refused calls


def test_bad_module_shape_leaves_slot_dormant() -> None:
    net = SlottedNetwork(_mlp(), SlotTopology(1, 1))
    with pytest.raises(ValueError, match="it must return its input's shape"):
        net.add_module_to_slot("r0c0", nn.Linear(8, 5))
    assert net.topology.get_slot("r0c0").state is SlotState.DORMANT


# ---------------------------------------------------------------- alpha schedule
def test_alpha_ramp_values_at_exact_steps() -> None:
    model = _mlp()
    net = SlottedNetwork(model, SlotTopology(1, 1), alpha_schedule=LinearRamp(4))
    _set_step(model, 10)
    net.add_module_to_slot("r0c0", _randomised(1))
    res = net.residual("r0c0")
    assert res is not None and not res.alpha.requires_grad  # the schedule owns alpha
    seen = []
    for step in range(10, 16):
        net.update(step)
        seen.append((step, float(res.alpha), net.topology.get_slot("r0c0").state.value))
    assert seen == [
        (10, 0.0, "training"), (11, 0.25, "training"), (12, 0.5, "training"),
        (13, 0.75, "training"), (14, 1.0, "integrated"), (15, 1.0, "integrated"),
    ]  # fmt: skip
    slot = net.topology.get_slot("r0c0")
    assert slot.since == 14
    with pytest.raises(SlotTransitionError, match="'integrated'; allowed: none"):
        net.remove_module_from_slot("r0c0")


def test_no_schedule_alpha_is_trainable_and_integration_is_manual() -> None:
    model = _mlp()
    net = SlottedNetwork(model, ["after:1"], alpha_schedule=None)
    net.add_module_to_slot("after:1", _randomised(1))
    for step in range(50):
        net.update(step)
    res = net.residual("after:1")
    assert res is not None and res.alpha.requires_grad and float(res.alpha.detach()) == 0.0
    assert net.topology.get_slot("after:1").state is SlotState.TRAINING
    net.integrate("after:1", step=50)
    assert net.topology.get_slot("after:1").state is SlotState.INTEGRATED


# ---------------------------------------------------------------- removal and embargo
def test_remove_detaches_and_embargoes() -> None:
    model = _mlp()
    before = model(X)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    net = SlottedNetwork(
        model, SlotTopology(1, 2, embargo_steps=5), optimizer=opt, alpha_schedule=LinearRamp(10)
    )
    net.add_module_to_slot("r0c0", _randomised(1))
    net.add_module_to_slot("r0c1", _randomised(2))
    with pytest.raises(
        SlotTransitionError, match="slot 'r0c0' is 'germinated'; allowed: 'training'"
    ):
        net.remove_module_from_slot("r0c0")
    net.update(0)
    net.update(3)
    assert float(net.residual("r0c1").alpha) == pytest.approx(0.3)  # type: ignore[union-attr]
    _set_step(model, 3)
    event = net.remove_module_from_slot("r0c0", reason="contribution")
    assert (event.op, event.target, event.reason) == (
        "detach",
        "after:1",
        "contribution; slot r0c0",
    )
    slot = net.topology.get_slot("r0c0")
    assert (slot.state, slot.since, slot.embargo_until, slot.key) == (
        SlotState.EMBARGOED,
        3,
        8,
        None,
    )
    assert list(model._modules) == ["0", "1", "1_slot_slot", "2", "3", "4"]
    check_optimizer(model, opt)
    _set_step(model, 7)
    with pytest.raises(
        SlotTransitionError, match="illegal transition of slot 'r0c0' to 'germinated'"
    ):
        net.add_module_to_slot("r0c0", _randomised(3))
    net.remove_module_from_slot("r0c1")  # back to the base function exactly
    assert torch.equal(model(X), before)
    _set_step(model, 8)  # embargo over: the slot is available again
    assert net.topology.available_slots(8) == ["r0c0"]
    net.add_module_to_slot("r0c0", _randomised(3))
    assert net.topology.get_slot("r0c0").key == "after:1"
    assert torch.equal(model(X), before)
    check_optimizer(model, opt)


def test_a_hand_written_loop_steps_the_slots_and_the_events() -> None:
    model = _mlp()
    net = SlottedNetwork(model, SlotTopology(2, 1, embargo_steps=2), alpha_schedule=LinearRamp(4))
    net.add_module_to_slot("r0c0", _randomised(1))
    for step in range(1, 4):
        net.update(step)
    assert engine_state(model).step == 3
    assert net.remove_module_from_slot("r0c0").step == 3
    assert net.add_module_to_slot("r1c0", _randomised(2)).step == 3
    event = net.add_module_to_slot("r0c0", _randomised(3), step=5)  # the embargo ended at 5
    assert event.step == 5 and engine_state(model).step == 5
    assert [(s.id, s.state.value, s.since) for s in net.topology] == [
        ("r0c0", "germinated", 5),
        ("r1c0", "germinated", 3),
    ]
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        net.update(-1)


# ---------------------------------------------------------------- optimizer
def test_optimizer_keeps_old_state_and_gets_new_params() -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    F.cross_entropy(model(X), torch.tensor([0, 1, 2, 0, 1])).backward()
    opt.step()
    old = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    net = SlottedNetwork(model, SlotTopology(1, 1), optimizer=opt)
    net.add_module_to_slot("r0c0", _randomised(1))
    res = net.residual("r0c0")
    assert res is not None
    held = opt.param_groups[0]["params"]
    assert [id(p) for p in held] == [id(p) for p in model.parameters()]  # model order
    for p in model.parameters():
        if id(p) in old:
            assert all(torch.equal(opt.state[p][k], v) for k, v in old[id(p)].items())
        else:
            assert p not in opt.state
    check_optimizer(model, opt)


# ---------------------------------------------------------------- the training callback
def test_trains_as_a_callback() -> None:
    model = _mlp()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    net = SlottedNetwork(model, SlotTopology(2, 1), alpha_schedule=LinearRamp(3))
    net.add_module_to_slot("r0c0", _randomised(1))
    net.add_module_to_slot("r1c0", _randomised(2))
    fit(model, opt, (x, y), batch_size=16, max_steps=6, callbacks=[net], progress=False)
    assert net.optimizer is opt  # adopted from the trainer
    check_optimizer(model, opt)
    assert {s.id: (s.state.value, s.since) for s in net.topology} == {
        "r0c0": ("integrated", 3), "r1c0": ("integrated", 3),
    }  # fmt: skip
    assert float(net.residual("r0c0").alpha) == 1.0  # type: ignore[union-attr]
    assert torch.equal(net(x), model(x))
    other = _mlp()  # with its own optimizer: the trainer checks the optimizer first
    with pytest.raises(ValueError, match="the trainer trains another model"):
        fit(other, torch.optim.SGD(other.parameters(), lr=0.05), (x, y), max_steps=1,
            callbacks=[net], progress=False)  # fmt: skip


def test_callback_state_round_trip() -> None:
    net = SlottedNetwork(_mlp(), SlotTopology(1, 2, embargo_steps=4))
    net.add_module_to_slot("r0c0", _randomised(1))
    net.update(2)
    state = net.state_dict()
    other = SlottedNetwork(_mlp(), SlotTopology(1, 2, embargo_steps=4))
    other.load_state_dict(state)
    assert other.topology.state_dict() == net.topology.state_dict()
    with pytest.raises(ValueError, match="SlottedNetwork state must have key 'topology'"):
        other.load_state_dict({})


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("custom", [False, True])
def test_checkpoint_round_trip(tmp_path: Path, custom: bool) -> None:
    model: nn.Module = Net() if custom else _mlp()
    width = 6 if custom else 8
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    topo = SlotTopology(1, 3, embargo_steps=20, names={"res": "r0c2"})
    net = SlottedNetwork(model, topo, optimizer=opt, alpha_schedule=LinearRamp(4))
    for i, sid in enumerate(("r0c0", "r0c1", "res")):
        torch.manual_seed(i)
        net.add_module_to_slot(sid, nn.Sequential(nn.Linear(width, width), nn.Tanh()))
    for step in (1, 2):
        net.update(step)
        _set_step(model, step)
    net.remove_module_from_slot("r0c1")
    path = dynarch.save(tmp_path / "ckpt", model, opt)
    ckpt = dynarch.load(path, model=Net if custom else None)
    loaded = topology_of(ckpt.model)
    assert loaded is not None
    assert loaded.state_dict() == topo.state_dict()
    assert loaded.get_slot("r0c1").embargo_until == 22
    assert torch.equal(ckpt.model(X), model(X))
    assert [n for n, _ in ckpt.model.named_modules()] == [n for n, _ in model.named_modules()]
    resumed = SlottedNetwork(ckpt.model, None, alpha_schedule=LinearRamp(4))
    assert resumed.topology is loaded
    res = resumed.residual("res")
    assert res is not None and float(res.alpha) == 0.25
    resumed.update(3)
    net.update(3)
    assert float(res.alpha) == float(net.residual("res").alpha) == 0.5  # type: ignore[union-attr]
    assert resumed.topology.available_slots(21) == []
    assert resumed.topology.available_slots(22) == ["r0c1"]


def test_checkpoint_without_slots_has_no_topology(tmp_path: Path) -> None:
    path = dynarch.save(tmp_path / "plain", _mlp())
    assert topology_of(dynarch.load(path).model) is None


def test_damaged_slot_states_are_refused(tmp_path: Path) -> None:
    import json

    model = _mlp()
    SlottedNetwork(model, SlotTopology(1, 1))
    path = dynarch.save(tmp_path / "ckpt", model)
    arch = json.loads((path / "arch.json").read_text())
    arch["slots"]["slots"][0]["state"] = "asleep"
    (path / "arch.json").write_text(json.dumps(arch))
    with pytest.raises(
        dynarch.CheckpointError, match="holds malformed slot states: unknown slot state 'asleep'"
    ):
        dynarch.load(path)
