"""Checkpoints: exact round trips of grown/pruned/sparsified models, optimizer and trainer
state, custom classes, damaged checkpoints, atomic writes, nothing pickled."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import dynarch
import dynarch.checkpoint
from dynarch._engine import engine_state, set_seed
from dynarch.checkpoint import Checkpoint, CheckpointError
from dynarch.masks import enforce
from dynarch.spec import class_path, describe


# ---------------------------------------------------------------- models and helpers
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3)
    )


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 7), nn.ReLU(), nn.Linear(7, 4),
    )  # fmt: skip


class Net(nn.Module):
    """A custom model class: named layers and a functional forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(F.dropout(h, p=0.0, training=self.training))


class OtherNet(Net):
    """Same layers, another class."""


class Gate(nn.Module):
    """A custom module to attach: ``x * w``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int = 2) -> None:
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _op(model: nn.Module, step: int, fn: Callable[[], Any]) -> None:
    engine_state(model).step = step  # distinct steps in the history
    fn()


def _grow_mlp(m: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """Every op in sequence, with training in between (the optimizer follows each op)."""
    _train(m, opt, x)
    _op(m, 1, lambda: dynarch.widen(m, "0", 14, optimizer=opt, init="net2net", noise=0.1))
    _op(m, 2, lambda: dynarch.widen(m, "2", 15, optimizer=opt, init="zero"))
    _train(m, opt, x)
    _op(m, 3, lambda: dynarch.shrink(m, "2", [0, 1, 2, 5, 7, 9, 11, 13], optimizer=opt))
    _op(m, 4, lambda: dynarch.deepen(m, "0", optimizer=opt))
    block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    _op(m, 5, lambda: dynarch.attach(m, "after:3", block, optimizer=opt, alpha=0.2))
    _train(m, opt, x)
    _op(m, 6, lambda: dynarch.detach(m, "after:3", optimizer=opt))
    lin = nn.Linear(8, 8)
    _op(m, 7, lambda: dynarch.attach(m, "3", lin, optimizer=opt, trainable_alpha=False, alpha=0.5))
    _op(m, 8, lambda: dynarch.sparsify(m, 0.5, optimizer=opt))
    _train(m, opt, x)
    engine_state(m).step = 9


def _grow_cnn(m: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    _train(m, opt, x)
    _op(m, 1, lambda: dynarch.widen(m, "0", 8, optimizer=opt))
    _op(m, 2, lambda: dynarch.widen(m, "4", 9, optimizer=opt, init="zero"))  # feeds Flatten
    _train(m, opt, x)
    _op(m, 3, lambda: dynarch.shrink(m, "9", [0, 2, 3, 5, 6], optimizer=opt))
    _op(m, 4, lambda: dynarch.deepen(m, "0", optimizer=opt))
    block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    _op(m, 5, lambda: dynarch.attach(m, "after:3", block, optimizer=opt))
    _train(m, opt, x)
    _op(m, 6, lambda: dynarch.detach(m, "after:3", optimizer=opt))
    conv = nn.Conv2d(8, 8, 1)
    _op(m, 7, lambda: dynarch.attach(m, "after:3", conv, optimizer=opt, alpha=0.3))
    _op(m, 8, lambda: dynarch.sparsify(m, 0.4, distribution="er", optimizer=opt))
    _train(m, opt, x)
    engine_state(m).step = 9


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[..., None], tuple[int, ...]]] = {
    "mlp": (_mlp, _grow_mlp, (4, 6)),
    "cnn": (_cnn, _grow_cnn, (4, 3, 8, 8)),
}


def _grown(kind: str) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    make, grow, shape = CASES[kind]
    model = make()
    set_seed(model, 7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    grow(model, opt, x)
    return model, opt, x


def _same(a: Any, b: Any) -> bool:
    """Exact structural equality (types too), tensors compared bitwise with dtype."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return _same(dict(a.state_dict()), dict(b.state_dict()))


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


STATE: dict[str, Any] = {
    "epoch": 3,
    "trainer": {
        "best": 0.125,
        "history": [1, 2.5, None, True, "text", torch.arange(3)],
        "nested": {"t": torch.ones(2, 2, dtype=torch.float64), "empty": {}, "flag": False},
        "pair": (1, "a"),
    },
    "nothing": None,
    "ids": {0: "zero", 1: "one"},
}


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", list(CASES))
def test_round_trip_after_every_op_is_exact(kind: str, tmp_path: Path) -> None:
    model, opt, x = _grown(kind)
    path = dynarch.save(tmp_path / "ckpt", model, opt, **STATE)
    assert path == tmp_path / "ckpt"
    ck = dynarch.load(path)
    assert isinstance(ck, Checkpoint)
    loaded = ck.model
    assert str(loaded) == str(model)
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert _same_weights(loaded, model)
    assert any(k.endswith("weight_mask") for k in loaded.state_dict())
    assert [(n, p.requires_grad) for n, p in loaded.named_parameters()] == [
        (n, p.requires_grad) for n, p in model.named_parameters()
    ]
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))
    # History, step, seed and the extra state round-trip exactly.
    assert dynarch.history(loaded) == dynarch.history(model)
    assert [(e.op, e.target, e.step) for e in dynarch.history(loaded)] == [
        ("widen", "0", 1), ("widen", "4" if kind == "cnn" else "2", 2),
        ("shrink", "9" if kind == "cnn" else "2", 3), ("deepen", "0", 4),
        ("attach", "after:3", 5), ("detach", "after:3", 6), ("attach", "after:3", 7),
        ("sparsify", "*", 8),
    ]  # fmt: skip
    assert [e.replay for e in ck.events] == [e.replay for e in dynarch.history(model)]
    assert ck.step == 9 and engine_state(loaded).step == 9
    assert engine_state(loaded).seed == 7
    assert engine_state(loaded).slots == engine_state(model).slots == {"after:3": "3_slot"}
    assert _same(ck.state, STATE)
    # Saving again from the loaded model gives a checkpoint that loads identically.
    again = dynarch.load(dynarch.save(tmp_path / "again", loaded, **ck.state))
    assert _same_weights(again.model, model)
    assert dynarch.history(again.model) == dynarch.history(model)
    assert torch.equal(_outputs(again.model, x), _outputs(model, x))
    assert _same(again.state, STATE)
    arch = json.loads((tmp_path / "ckpt" / "arch.json").read_text())
    arch2 = json.loads((tmp_path / "again" / "arch.json").read_text())
    assert (arch2["base"], arch2["events"]) == (arch["base"], arch["events"])


def test_loaded_model_keeps_growing_like_the_original(tmp_path: Path) -> None:
    """The engine generator is restored: the next random structural choice is identical."""
    model, _, x = _grown("mlp")
    ck = dynarch.load(dynarch.save(tmp_path / "ckpt", model))
    gen_a, gen_b = engine_state(model).generator, engine_state(ck.model).generator
    assert gen_a is not gen_b and torch.equal(gen_a.get_state(), gen_b.get_state())
    branch = nn.Linear(11, 11)
    for m in (model, ck.model):
        dynarch.widen(m, "1_deep", 20, init="net2net")
        dynarch.widen(m, "2", 11, init="random")
        dynarch.detach(m, "after:3")  # the slot table was rebuilt by the replay
        dynarch.attach(m, "after:3", copy.deepcopy(branch), alpha=0.5)
    assert _same_weights(ck.model, model)
    assert torch.equal(_outputs(ck.model, x), _outputs(model, x))
    facts = [(e.op, e.target, e.step, e.details, e.replay) for e in dynarch.history(model)]
    assert [
        (e.op, e.target, e.step, e.details, e.replay) for e in dynarch.history(ck.model)
    ] == facts


def test_global_rng_states_are_saved_and_restored(tmp_path: Path) -> None:
    model = _grown("cnn")[0]
    torch.manual_seed(11), np.random.seed(12), random.seed(13)
    torch.randn(5), np.random.rand(), random.random()  # move off the seeds
    path = dynarch.save(tmp_path / "ckpt", model)
    before = torch.get_rng_state()
    ck = dynarch.load(path, map_location="cpu")
    assert torch.equal(torch.get_rng_state(), before)  # building layers did not consume it
    expected = (torch.rand(4), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ck.restore_rng()
    got = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_float64_model_keeps_its_dtype(tmp_path: Path) -> None:
    model = _mlp().double()
    dynarch.widen(model, "0", 13)
    x = torch.randn(3, 6, dtype=torch.float64)
    ck = dynarch.load(dynarch.save(tmp_path / "ckpt", model))
    assert {p.dtype for p in ck.model.parameters()} == {torch.float64}
    assert _same_weights(ck.model, model)
    assert torch.equal(_outputs(ck.model, x), _outputs(model, x))


def test_unchanged_model_round_trips_without_events(tmp_path: Path) -> None:
    model = _cnn()
    path = dynarch.save(tmp_path / "ckpt", model)
    arch = json.loads((path / "arch.json").read_text())
    assert arch["events"] == [] and arch["base"] == {"kind": "spec", "module": describe(_cnn())}
    ck = dynarch.load(path)
    assert _same_weights(ck.model, model) and dynarch.history(ck.model) == []
    assert ck.state == {} and ck.step == 0


# ---------------------------------------------------------------- custom classes
def _grown_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    dynarch.widen(net, "fc1", 12)
    dynarch.deepen(net, "fc1")  # wraps 'act': Sequential('0': act, 'act_deep', 'act_deep_act')
    dynarch.attach(net, "after:act.act_deep_act", nn.Linear(12, 12), alpha=0.25)
    dynarch.sparsify(net, 0.6)
    return net


def test_custom_class_needs_the_class_and_loads_with_class_factory_or_instance(
    tmp_path: Path,
) -> None:
    net = _grown_net()
    x = torch.randn(4, 5)
    path = dynarch.save(tmp_path / "ckpt", net)
    wanted = class_path(Net)
    arch = json.loads((path / "arch.json").read_text())
    assert arch["base"] == {"kind": "class", "class": wanted} and arch["model_class"] == wanted
    with pytest.raises(CheckpointError, match=rf"custom class '{wanted}'; pass it: .*model=Net\)"):
        dynarch.load(path)
    fresh = Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    for given in (Net, lambda: Net(), fresh):
        ck = dynarch.load(path, model=given)
        assert type(ck.model) is Net and ck.model is not fresh
        assert _same_weights(ck.model, net)
        assert torch.equal(_outputs(ck.model, x), _outputs(net, x))
        assert dynarch.history(ck.model) == dynarch.history(net)
    # The instance given was copied, never modified (not even given engine state).
    assert _same(dict(fresh.state_dict()), before) and "_dynarch_engine" not in vars(fresh)
    assert [n for n, _ in fresh.named_modules()] == ["", "fc1", "act", "fc2"]


def test_custom_class_mismatch_and_used_instance_are_refused(tmp_path: Path) -> None:
    net = _grown_net()
    path = dynarch.save(tmp_path / "ckpt", net)
    msg = rf"made from '{class_path(Net)}', but the model given is '{class_path(OtherNet)}'"
    with pytest.raises(CheckpointError, match=msg):
        dynarch.load(path, model=OtherNet)
    with pytest.raises(CheckpointError, match=msg):
        dynarch.load(path, model=OtherNet())
    with pytest.raises(CheckpointError, match="already changed by dynarch; pass a freshly"):
        dynarch.load(path, model=net)
    # A checkpoint that fails half-way through the rebuild leaves the instance given untouched.
    _edit_arch(lambda a: a["events"][0]["replay"].update(width=13))(path)
    fresh = Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(
        CheckpointError, match=r"cannot replay event 'step 0 attach after:act\.act_deep_act"
    ):
        dynarch.load(path, model=fresh)
    assert _same(dict(fresh.state_dict()), before) and "_dynarch_engine" not in vars(fresh)


def test_attached_custom_module_needs_modules_mapping(tmp_path: Path) -> None:
    model = _mlp()
    dynarch.attach(model, "after:1", Gate(10), alpha=0.5)
    with torch.no_grad():
        model[2].module.w.mul_(3)  # type: ignore[union-attr, operator]
    path = dynarch.save(tmp_path / "ckpt", model)
    gate = class_path(Gate)
    event = json.loads((path / "arch.json").read_text())["events"][0]
    assert event["replay"] == {
        "slot": "after:1", "module": {"class": gate}, "alpha": 0.5, "trainable_alpha": True,
    }  # fmt: skip
    msg = rf"cannot replay event 'step 0 attach after:1.*custom module '{gate}' was attached; "
    with pytest.raises(CheckpointError, match=msg + rf"pass modules=\{{'{gate}': <the class>\}}"):
        dynarch.load(path)
    ck = dynarch.load(path, modules={gate: lambda: Gate(10)})  # type: ignore[dict-item]
    assert _same_weights(ck.model, model)
    # The default constructor builds a width-8 gate: it cannot be attached there.
    with pytest.raises(CheckpointError, match=r"cannot replay .*module cannot read the output"):
        dynarch.load(path, modules={gate: Gate})


# ---------------------------------------------------------------- optimizer
def _per_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {n: dict(opt.state[p]) for n, p in model.named_parameters() if p in opt.state}


def test_optimizer_state_is_saved_in_model_order_and_reloads_per_name(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.Adam(list(model.parameters())[::-1], lr=1e-2)  # not model order
    x = torch.randn(4, 6)
    _grow_mlp(model, opt, x)
    names = [n for n, _ in model.named_parameters()]
    in_opt = [
        names[[id(q) for q in model.parameters()].index(id(p))]
        for p in opt.param_groups[0]["params"]
    ]
    assert in_opt[:2] == ["4.bias", "4.weight"] and sorted(in_opt) == sorted(names)
    path = dynarch.save(tmp_path / "ckpt", model, opt)
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    assert saved["param_groups"][0]["param_names"] == names
    assert saved["param_groups"][0]["params"] == list(range(len(names)))
    ck = dynarch.load(path)
    new = torch.optim.Adam(ck.model.parameters(), lr=0.5)
    assert ck.load_optimizer(new) is new
    assert new.param_groups[0]["lr"] == 1e-2 and "param_names" not in new.param_groups[0]
    expected, got = _per_name(model, opt), _per_name(ck.model, new)
    assert list(got) == list(expected) and len(got) == len(names) - 1  # the frozen alpha
    assert all(_same(got[n], expected[n]) for n in expected)
    # Training continues identically (masks enforced on both optimizers).
    enforce(ck.model, new)
    _train(model, opt, x, steps=1)
    _train(ck.model, new, x, steps=1)
    assert _same_weights(ck.model, model)
    new.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})  # torch accepts it


def test_optimizer_param_groups_round_trip(tmp_path: Path) -> None:
    def groups(m: nn.Module) -> list[dict[str, Any]]:
        ps = list(m.named_parameters())
        return [
            {"params": [p for n, p in ps if n.endswith("weight")]},
            {"params": [p for n, p in ps if not n.endswith("weight")], "lr": 1e-3},
        ]

    model = _mlp()
    opt = torch.optim.SGD(groups(model), lr=0.1, momentum=0.9)
    _train(model, opt, torch.randn(4, 6))
    dynarch.widen(model, "2", 16, optimizer=opt)
    ck = dynarch.load(dynarch.save(tmp_path / "ckpt", model, opt))
    new = ck.load_optimizer(torch.optim.SGD(groups(ck.model), lr=0.5, momentum=0.9))
    assert [g["lr"] for g in new.param_groups] == [0.1, 1e-3]
    got, expected = _per_name(ck.model, new), _per_name(model, opt)
    assert list(got) == list(expected) and all(_same(got[n], expected[n]) for n in expected)
    with pytest.raises(
        CheckpointError, match="optimizer has 1 param groups but the checkpoint saved 2"
    ):
        ck.load_optimizer(torch.optim.SGD(ck.model.parameters(), lr=0.1))


def test_mismatched_or_missing_optimizer_is_an_error(tmp_path: Path) -> None:
    model, opt, _ = _grown("mlp")
    ck = dynarch.load(dynarch.save(tmp_path / "ckpt", model, opt))
    reversed_opt = torch.optim.Adam(list(ck.model.parameters())[::-1])
    with pytest.raises(
        CheckpointError,
        match=r"optimizer group 0 holds \['4\.bias', '4\.weight', .*but the checkpoint saved "
        r"\['0\.weight', '0\.bias', .*build it on the loaded model's parameters in order",
    ):
        ck.load_optimizer(reversed_opt)
    assert reversed_opt.state == {}  # nothing loaded
    bare = dynarch.load(dynarch.save(tmp_path / "bare", model))
    assert bare.optimizer_state == {}
    with pytest.raises(CheckpointError, match="this checkpoint was saved without an optimizer"):
        bare.load_optimizer(torch.optim.Adam(bare.model.parameters()))
    foreign = torch.optim.SGD([*model.parameters(), nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(
        CheckpointError, match=r"optimizer holds a parameter of shape \(2,\) that the model"
    ):
        dynarch.save(tmp_path / "foreign", model, foreign)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "ckpt"]


# ---------------------------------------------------------------- files
def test_files_are_plain_data(tmp_path: Path) -> None:
    model, opt, _ = _grown("cnn")
    path = dynarch.save(tmp_path / "ckpt", model, opt, **STATE)
    assert sorted(p.name for p in path.iterdir()) == [
        "arch.json", "model.safetensors", "optimizer.pt", "state.pt",
    ]  # fmt: skip
    arch = json.loads((path / "arch.json").read_text())
    assert {"format", "version", "base", "events", "files"} <= set(arch)
    assert (arch["format"], arch["version"]) == ("dynarch-checkpoint", 1)
    assert arch["base"] == {"kind": "spec", "module": describe(_cnn())}
    assert arch["events"] == [e.to_dict() for e in dynarch.history(model)]
    assert arch["engine"] == {"seed": 7, "step": 9}
    assert arch["optimizer_class"] == "torch.optim.adam.Adam"
    for name in ("model.safetensors", "optimizer.pt", "state.pt"):
        data = (path / name).read_bytes()
        digest = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        assert arch["files"][name] == digest
        for word in (b"torch.nn", b"dynarch.", b"Sequential", b"Linear", b"__main__"):
            assert word not in data  # no pickled module or class
    tensors = load_file(str(path / "model.safetensors"))
    assert set(tensors) == set(model.state_dict())
    assert {"0.weight_mask", "9.weight_mask", "3_slot.module.weight_mask"} <= set(tensors)
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())
    state = torch.load(path / "state.pt", weights_only=True)
    assert set(state) == {"step", "rng", "engine_generator", "user"}
    assert state["step"] == 9 and _same(state["user"], STATE)
    assert torch.equal(state["engine_generator"], engine_state(model).generator.get_state())
    optim = torch.load(path / "optimizer.pt", weights_only=True)
    assert set(optim) == {"state", "param_groups"}


# ---------------------------------------------------------------- damage
def _edit_arch(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        arch = json.loads((path / "arch.json").read_text())
        fn(arch)
        (path / "arch.json").write_text(json.dumps(arch))

    return edit


def _truncate(path: Path) -> None:
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _flip(path: Path) -> None:
    f = path / "optimizer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _malformed(path: Path) -> None:
    (path / "arch.json").write_text('{"format": "dynarch-checkpoint", ')


def _bad_event(arch: dict[str, Any]) -> None:
    arch["events"].append(
        {"step": 9, "op": "teleport", "target": "*", "params_before": 1, "params_after": 1,
         "replay": {"to": "mars"}}
    )  # fmt: skip


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated weights": (_truncate, r"model\.safetensors' is damaged or truncated: expected"),
    "flipped byte": (_flip, r"optimizer\.pt' is damaged or truncated"),
    "missing state": (lambda p: (p / "state.pt").unlink(), r"incomplete: state\.pt is missing"),
    "missing arch": (
        lambda p: (p / "arch.json").unlink(),
        r"is not a dynarch checkpoint: arch\.json is missing",
    ),
    "foreign": (
        _edit_arch(lambda a: a.update(format="other-tool")),
        r"is not a dynarch checkpoint \(format is not 'dynarch-checkpoint'\)",
    ),
    "version": (
        _edit_arch(lambda a: a.update(version=99)),
        r"has checkpoint format version 99; this dynarch reads 1",
    ),
    "malformed json": (
        _malformed,
        r"arch\.json' is damaged: Expecting property name",
    ),
    "missing entry": (
        _edit_arch(lambda a: a.pop("events")),
        r"missing or malformed entries \['events'\]",
    ),
    "unknown op": (_edit_arch(_bad_event), r"holds a 'teleport' event this dynarch cannot rebuild"),
    "foreign event": (
        _edit_arch(lambda a: a["events"][0].update(colour="red")),
        r"malformed event: event record has unknown keys \['colour'\]",
    ),
    "tampered event": (
        _edit_arch(lambda a: a["events"][0]["replay"].update(width=15)),
        r"does not fit the rebuilt model: missing \[\], unexpected \[\], shape mismatch "
        r"\['0\.bias', '0\.weight', '0\.weight_mask', '1_deep\.bias', '1_deep\.weight'\]",
    ),
    "bad base": (
        _edit_arch(lambda a: a["base"]["module"].update(type="Transformer")),
        r"cannot build the base architecture: unknown module type 'Transformer'",
    ),
    "not a directory": (
        shutil.rmtree,
        r"no checkpoint directory at '.*ckpt'",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_raises_a_clear_error(damage: str, tmp_path: Path) -> None:
    model, opt, _ = _grown("mlp")
    path = dynarch.save(tmp_path / "ckpt", model, opt, epoch=1)
    dynarch.load(path)  # intact, it loads
    spoil, match = DAMAGE[damage]
    spoil(path)
    with pytest.raises(CheckpointError, match=match):
        dynarch.load(path)


# ---------------------------------------------------------------- atomicity
@pytest.mark.parametrize("where", ["weights", "state"])
def test_failed_save_leaves_the_old_checkpoint_intact(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, _, x = _grown("mlp")
    path = dynarch.save(tmp_path / "ckpt", old, epoch=1)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    new = _mlp()

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    if where == "weights":
        monkeypatch.setattr(dynarch.checkpoint, "save_file", boom)
    else:  # the optimizer file is written, then state.pt fails
        real, calls = torch.save, []

        def second_fails(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            calls.append(f)
            if len(calls) == 2:
                boom()
            real(obj, f, *args, **kwargs)

        monkeypatch.setattr(dynarch.checkpoint.torch, "save", second_fails)
    with pytest.raises(OSError, match="disk full"):
        dynarch.save(path, new, epoch=2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    ck = dynarch.load(path)
    assert ck.state == {"epoch": 1} and torch.equal(_outputs(ck.model, x), _outputs(old, x))
    # A successful save replaces it, again leaving nothing else behind.
    dynarch.save(path, new, epoch=2)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert dynarch.load(path).state == {"epoch": 2}


def test_unserialisable_state_is_refused_before_writing(tmp_path: Path) -> None:
    model = _mlp()
    target = tmp_path / "sub" / "ckpt"
    with pytest.raises(TypeError, match=r"state 'cfg\.inner\[1\]' is a object; checkpoints hold"):
        dynarch.save(target, model, epoch=1, cfg={"inner": [1, object()]})
    with pytest.raises(TypeError, match=r"state 'cfg' has a key of type tuple; use str or int"):
        dynarch.save(target, model, cfg={(1, 2): 3})
    with pytest.raises(TypeError, match=r"state 'layer' is a Linear; .*\(no pickled objects\)"):
        dynarch.save(target, model, layer=nn.Linear(1, 1))
    assert list(tmp_path.iterdir()) == []


def test_load_optimizer_enforces_the_masks_in_a_hand_written_loop(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dynarch.sparsify(model, 0.3, optimizer=opt)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))

    def train(m: nn.Module, o: torch.optim.Optimizer) -> None:
        for _ in range(3):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()

    train(model, opt)
    ck = dynarch.load(dynarch.save(tmp_path / "ck", model, opt))
    opt2 = ck.load_optimizer(torch.optim.Adam(ck.param_groups()))
    train(ck.model, opt2)
    train(model, opt)
    for name in ("0", "2"):
        layer = ck.model.get_submodule(name)
        assert not bool(layer.weight[~layer.weight_mask].any())
    assert torch.equal(ck.model(x), model(x))


def test_standard_layers_beyond_the_core_round_trip_without_a_factory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.PReLU(8), nn.InstanceNorm2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.Dropout1d(0.1),
    )  # fmt: skip
    seq = nn.Sequential(nn.Embedding(20, 6, padding_idx=0), nn.Conv1d(6, 4, 3, bias=False))
    for m, x in ((model, torch.randn(2, 3, 8, 8)), (seq, torch.randint(0, 20, (2, 6)))):
        m.eval()
        loaded = dynarch.load(dynarch.save(tmp_path / type(m[0]).__name__, m)).model.eval()
        assert describe(loaded) == describe(m)
        if m is seq:
            assert torch.equal(
                loaded[1](loaded[0](x).transpose(1, 2)), m[1](m[0](x).transpose(1, 2))
            )
        else:
            assert torch.equal(loaded(x), m(x))


def test_a_standard_container_holding_an_unknown_module_asks_for_a_factory(
    tmp_path: Path,
) -> None:
    class Odd(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = nn.Sequential(nn.Linear(3, 4), Odd(), nn.Linear(4, 2))
    path = dynarch.save(tmp_path / "ck", model)
    with pytest.raises(CheckpointError, match=re.escape(
        "this checkpoint holds a Sequential with a module dynarch cannot rebuild by itself "
        "(1 (Odd)); pass a factory that builds the model, or a fresh instance: "
        "dynarch.load(path, model=make_model)"
    )):  # fmt: skip
        dynarch.load(path)
    loaded = dynarch.load(path, lambda: nn.Sequential(nn.Linear(3, 4), Odd(), nn.Linear(4, 2)))
    assert torch.equal(loaded.model(torch.ones(1, 3)), model(torch.ones(1, 3)))
