"""Audit: every structural op of issues 3 and 4 survives a checkpoint and an exact resume.

For each op, on a small MLP, a small CNN (Conv2d + BatchNorm2d + MaxPool + Flatten) and a
custom ``nn.Module`` with a residual add (where the op supports it), with SGD momentum and
with Adam: the model is trained a little, the op is applied with the optimizer, one more
step is taken, and the model and optimizer are saved with :func:`dynarch.save` and loaded
with :func:`dynarch.load` (the base rebuilt from ``arch.json``, the events replayed). The
loaded copy must have bitwise the same weights, masks and ``weight_patch`` buffers, outputs,
history, engine generator and optimizer state (groups and hyperparameters included), and
one further optimizer step must give bitwise the same parameters and state in both.

Then short :class:`~dynarch.train.Trainer` runs with growth callbacks (grow-as-needed widen
and patches, a grow/prune cycle, a rewirer, an :class:`~dynarch.lr.LRPlan`; and a second
mix: tournament, slots with a scheduled alpha, branches, dropout, a credit economy) are
checkpointed at a mid-epoch step, resumed from the checkpoint on a freshly loaded model
with fresh callbacks, and must give the uninterrupted run's losses float for float (the
same in separate processes: tests/test_resume.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynarch._engine import engine_state, history, set_seed
from dynarch.callbacks import Callback
from dynarch.checkpoint import Checkpoint, CheckpointError, load, save
from dynarch.graph import UnsupportedModelError
from dynarch.growth import (
    IndefiniteGrowth,
    MultiScale,
    Tournament,
    TournamentCallback,
    add_patches,
    add_skip,
    clone_units,
    connect,
    grow_proportional,
    highways,
)
from dynarch.growth.candidates import sparsify_inserted
from dynarch.insert import attach, deepen, detach
from dynarch.lr import LRPlan
from dynarch.masks import enforce, is_sparse, sparsify
from dynarch.models import mlp as make_mlp
from dynarch.nn import BranchableLayer
from dynarch.prune import structured_prune
from dynarch.schedules import Embargo, GrowAsNeeded, GrowPruneCycle
from dynarch.slots import LinearRamp, SlottedNetwork, SlotTopology, topology_of
from dynarch.sparse import SET, RigL
from dynarch.surgery import shrink, widen
from dynarch.train import Trainer
from dynarch.triggers import CreditEconomy, Every
from models import Custom

# ---------------------------------------------------------------- models and data


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    )  # fmt: skip


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 3),
    )  # fmt: skip


X = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
XI = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))


class Kind:
    """A model kind: factory, class to pass to ``load`` (custom only), input, layer names."""

    def __init__(
        self,
        make: Callable[[], nn.Module],
        cls: type[nn.Module] | None,
        x: Tensor,
        layers: list[str],
        skip: tuple[str, str],
        width: int,
    ) -> None:
        self.make, self.cls, self.x, self.layers, self.skip = make, cls, x, layers, skip
        self.width = width  # units of layers[0]

    def block(self) -> nn.Module:
        """A module that maps the output of ``layers[0]`` to its own shape."""
        if self.x.dim() == 4:
            return nn.Conv2d(self.width, self.width, 3, padding=1)
        return nn.Linear(self.width, self.width)


KINDS = {
    "mlp": Kind(mlp, None, X, ["0", "2"], ("1", "4"), 16),
    "cnn": Kind(cnn, None, XI, ["0", "3"], ("2", "5"), 6),
    "custom": Kind(Custom, Custom, X, ["stem", "block.fc1"], ("act", "head.1"), 16),
}


def make_opt(params: Any, kind: str) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor) -> None:
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), Y).backward()
    opt.step()


def named_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: dict(opt.state[p]) for g in opt.param_groups for p in g["params"]}


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key, value in sa.items():
        assert value.dtype == sb[key].dtype and torch.equal(value, sb[key]), key


def assert_same_optimizer(
    a: nn.Module, oa: torch.optim.Optimizer, b: nn.Module, ob: torch.optim.Optimizer
) -> None:
    sa, sb = named_state(a, oa), named_state(b, ob)
    assert list(sa) == list(sb)
    for name, state in sa.items():
        assert list(state) == list(sb[name]), name
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[name][key])), (name, key)
    groups = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
              for o in (oa, ob)]  # fmt: skip
    assert groups[0] == groups[1]


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested plain data, tensors compared bitwise."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def outputs(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        out: Tensor = model(x)
    return out


def round_trip(
    tmp: Path, model: nn.Module, opt: torch.optim.Optimizer, cls: type[nn.Module] | None, x: Tensor
) -> tuple[Checkpoint, torch.optim.Optimizer]:
    """Save, load (fresh base + replayed events), rebuild the optimizer from the saved
    groups and check everything is bitwise the same, then one more step on both."""
    ck = load(save(tmp / "ckpt", model, opt), model=cls)
    loaded = ck.model
    opt2 = ck.load_optimizer(type(opt)(ck.param_groups(), lr=1.0))
    if is_sparse(loaded):
        enforce(loaded, opt2)  # what the Trainer does at fit start
    assert str(loaded) == str(model)
    assert_same_state(loaded, model)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    assert history(loaded) == history(model)
    assert torch.equal(engine_state(loaded).generator.get_state(),
                       engine_state(model).generator.get_state())  # fmt: skip
    assert_same_optimizer(model, opt, loaded, opt2)
    train_step(model, opt, x)
    train_step(loaded, opt2, x)
    assert_same_state(loaded, model)
    assert_same_optimizer(model, opt, loaded, opt2)
    return ck, opt2


def trained(kind: Kind, opt_kind: str, density: float | None = None) -> tuple[nn.Module, Any]:
    model = kind.make()
    set_seed(model, 3)
    opt = make_opt(model.parameters(), opt_kind)
    train_step(model, opt, kind.x)
    if density is not None:
        sparsify(model, density, optimizer=opt)
        train_step(model, opt, kind.x)
    return model, opt


def buffers(model: nn.Module, suffix: str) -> list[str]:
    return [k for k in model.state_dict() if k.endswith(suffix)]


# ---------------------------------------------------------------- one op at a time
# Each op: (density to sparsify to first or None, kinds it supports, fn(model, opt, kind)
# returning the state_dict suffixes it must have produced).
OpFn = Callable[[nn.Module, torch.optim.Optimizer, Kind], list[str]]


def _sparsify(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
    sparsify(m, 0.4, optimizer=opt)
    return ["weight_mask"]


def _shrink(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
    structured_prune(m, k.layers[1], 3, optimizer=opt)
    return []


def _widen(init: str) -> OpFn:
    def fn(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
        widen(m, k.layers[0], k.width + 3, optimizer=opt, init=init)
        return ["weight_mask"] if init == "zero" else []

    return fn


def _deepen(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
    deepen(m, k.layers[0], optimizer=opt)
    return ["_deep.weight"]


def _attach(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
    attach(m, "after:" + k.layers[0], k.block(), optimizer=opt, alpha=0.3)
    return ["_slot.alpha"]


def _connect(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
    mask = m.get_submodule(k.layers[1]).weight_mask
    connect(m, k.layers[1], (~mask).reshape(-1).nonzero().squeeze(1)[:5], optimizer=opt,
            init="random")  # fmt: skip
    return ["weight_mask", "weight_patch"]


def _patches(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
    add_patches(m, {k.layers[0]: [0, 3]}, optimizer=opt, patch_size=4)
    return ["weight_mask", "weight_patch"]


def _clone(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
    clone_units(m, k.layers[0], [1, 2, 2], optimizer=opt, noise=0.1)
    return []


def _skip(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
    add_skip(m, *k.skip, optimizer=opt, density=0.5)
    return ["skip.proj.weight", "skip.proj.weight_mask"]


def _highways(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
    (event,) = highways(m, {k.layers[0]: [0, 1]}, optimizer=opt)
    assert event.op == "highway"
    return ["skip.proj.weight_mask"]


def _proportional(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
    ops = [e.op for e in grow_proportional(m, 0.1, optimizer=opt)]
    assert ops[-1] == "proportional"
    return ["weight_patch"]


def _indefinite(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
    with torch.no_grad():
        m.get_submodule(k.layers[0]).bias.fill_(-100.0)  # every unit dead: the bottleneck

    def train_fn(model: nn.Module, o: torch.optim.Optimizer | None) -> float:
        assert o is not None
        train_step(model, o, k.x)
        return 0.5

    grow = IndefiniteGrowth(m, train_fn, data=(k.x, None), optimizer=opt, max_rounds=1,
                            density=0.3)  # fmt: skip
    assert [r.layer for r in grow.run()] == [None, k.layers[0]]
    return ["_deep.weight_mask"]


def _slots(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[str]:
    net = SlottedNetwork(m, SlotTopology(1, 2), optimizer=opt, alpha_schedule=LinearRamp(3))
    net.add_module_to_slot("r0c0", k.block())
    net.update(1)
    train_step(m, opt, k.x)
    net.update(2)
    return ["_slot.alpha"]


OPS: dict[str, tuple[float | None, tuple[str, ...], OpFn]] = {
    "sparsify": (None, ("mlp", "cnn", "custom"), _sparsify),
    "structured_prune": (None, ("mlp", "cnn", "custom"), _shrink),
    "widen-net2net": (None, ("mlp", "cnn", "custom"), _widen("net2net")),
    "widen-zero": (0.5, ("mlp", "cnn", "custom"), _widen("zero")),
    "widen-random": (None, ("mlp", "cnn", "custom"), _widen("random")),
    "deepen": (None, ("mlp", "cnn", "custom"), _deepen),
    "attach": (None, ("mlp", "cnn", "custom"), _attach),
    "connect": (0.3, ("mlp", "cnn", "custom"), _connect),
    "add_patches": (0.2, ("mlp", "cnn", "custom"), _patches),
    "clone_units": (None, ("mlp", "cnn", "custom"), _clone),
    "add_skip": (None, ("mlp", "cnn", "custom"), _skip),
    "highways": (0.5, ("mlp", "cnn"), _highways),  # custom: its units are coupled (below)
    "grow_proportional": (0.3, ("mlp", "cnn", "custom"), _proportional),
    "indefinite_growth": (None, ("mlp", "cnn", "custom"), _indefinite),
    "slotted_network": (None, ("mlp", "cnn", "custom"), _slots),
}
OP_CASES = [
    pytest.param(op, kind, o, id=f"{op}-{kind}-{o}")
    for op, (_, kinds, _) in OPS.items()
    for kind in kinds
    for o in ("sgd", "adam")
]


@pytest.mark.parametrize(("op", "kind", "opt_kind"), OP_CASES)
def test_op_survives_a_round_trip(op: str, kind: str, opt_kind: str, tmp_path: Path) -> None:
    density, _, fn = OPS[op]
    k = KINDS[kind]
    model, opt = trained(k, opt_kind, density)
    produced = fn(model, opt, k)
    train_step(model, opt, k.x)
    for suffix in produced:
        assert buffers(model, suffix), suffix
    ck, _ = round_trip(tmp_path, model, opt, k.cls, k.x)
    if op == "slotted_network":  # the slot states come back with the checkpoint
        topo, saved = topology_of(ck.model), topology_of(model)
        assert topo is not None and saved is not None and topo.state_dict() == saved.state_dict()


def test_highways_refuse_the_coupled_custom_model() -> None:
    model, opt = trained(KINDS["custom"], "sgd", 0.5)
    with pytest.raises(UnsupportedModelError, match="its units are shared with"):
        highways(model, {"stem": [0, 1]}, optimizer=opt)


@pytest.mark.parametrize("candidate", ["patch", "insert", "widen", "skip"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "custom"])
def test_tournament_candidate_survives_a_round_trip(
    kind: str, candidate: str, tmp_path: Path
) -> None:
    k = KINDS[kind]
    model, opt = trained(k, "adam" if kind == "cnn" else "sgd", 0.3)
    tour = Tournament(model, data=(k.x, Y), candidates=(candidate,), probe_steps=2, seed=0,
                      insert_density=0.5)  # fmt: skip
    event = tour.run(opt)
    assert event is not None and event.details["chosen"].startswith(candidate)
    train_step(model, opt, k.x)
    round_trip(tmp_path, model, opt, k.cls, k.x)


@pytest.mark.parametrize("algorithm", [SET, RigL])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "custom"])
def test_rewirer_update_and_state_survive_a_round_trip(
    kind: str, algorithm: type[SET], tmp_path: Path
) -> None:
    k = KINDS[kind]
    model, opt = trained(k, "sgd" if kind == "custom" else "adam")
    extra = {"grad_accumulation": 2} if algorithm is RigL else {}
    rw = algorithm(model, opt, density=0.4, delta_t=2, t_end=50, **extra)
    events = []
    for _ in range(3):  # updates at steps 2 (and captures at 1, 3 for RigL)
        train_step(model, opt, k.x)
        events.append(rw.step())
    assert [e is not None and e.op for e in events] == [False, "rewire", False]
    ck = load(save(tmp_path / "ck", model, opt, rewirer=rw.state_dict()), model=k.cls)
    opt2 = ck.load_optimizer(type(opt)(ck.param_groups(), lr=1.0))
    rw2 = algorithm(ck.model, opt2, density=0.4, delta_t=2, t_end=50, **extra)
    rw2.load_state_dict(ck.state["rewirer"])
    assert_same_state(ck.model, model)
    for m, o, r in ((model, opt, rw), (ck.model, opt2, rw2)):
        train_step(m, o, k.x)
        event = r.step()
        assert event is not None and event.op == "rewire"
    assert_same_state(ck.model, model)
    assert_same_optimizer(model, opt, ck.model, opt2)


# ---------------------------------------------------------------- ops in sequence


def _skip_then_resize(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> None:
    add_skip(m, *k.skip, optimizer=opt, density=0.5)
    train_step(m, opt, k.x)
    widen(m, k.layers[0], k.width + 4, optimizer=opt)  # re-indexes the skip's input
    train_step(m, opt, k.x)
    shrink(m, k.layers[0], [0, 2, 4, 5], optimizer=opt)


def _patches_then_resize(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> None:
    sparsify(m, 0.3, optimizer=opt)
    add_patches(m, {k.layers[0]: [0, 3]}, optimizer=opt, patch_size=4)
    train_step(m, opt, k.x)
    widen(m, k.layers[0], k.width + 3, optimizer=opt)  # re-indexes weight_patch
    clone_units(m, k.layers[0], [0, 3], optimizer=opt)
    train_step(m, opt, k.x)
    shrink(m, k.layers[0], [0, 1, 2, 3, 5, 8], optimizer=opt)


def _sparse_insert(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> None:
    event = deepen(m, k.layers[0], optimizer=opt)
    sparsify_inserted(m, event, 0.3, optimizer=opt)
    new = event.details["inserted"][0]
    train_step(m, opt, k.x)
    add_patches(m, {new: [1]}, optimizer=opt, patch_size=3)
    widen(m, new, k.width + 3, optimizer=opt)


def _attach_sparse_detach(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> None:
    block = nn.Sequential(k.block(), nn.ReLU())
    attach(m, "after:" + k.layers[0], block, optimizer=opt, alpha=0.5)
    sparsify(m, 0.5, optimizer=opt)
    train_step(m, opt, k.x)
    detach(m, "after:" + k.layers[0], optimizer=opt)
    # attached again already sparse: its masks are enforced and rebuilt by load
    attach(m, "after:" + k.layers[0], copy.deepcopy(block), optimizer=opt, alpha=0.2)


def _highway_proportional_connect(m: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> None:
    sparsify(m, 0.4, optimizer=opt)
    highways(m, {k.layers[0]: [0, 1]}, optimizer=opt)
    train_step(m, opt, k.x)
    widen(m, k.layers[0], k.width + 3, optimizer=opt)
    grow_proportional(m, 0.1, optimizer=opt)
    train_step(m, opt, k.x)
    name = next(n for n in buffers(m, "skip.proj.weight_mask"))
    layer = name.removesuffix(".weight_mask")
    off = (~m.get_submodule(layer).weight_mask).reshape(-1).nonzero().squeeze(1)[:3]
    connect(m, layer, off, optimizer=opt, init="random")


SEQUENCES = {
    "skip_then_resize": (_skip_then_resize, ("mlp", "cnn", "custom")),
    "patches_then_resize": (_patches_then_resize, ("mlp", "cnn", "custom")),
    "sparse_insert": (_sparse_insert, ("mlp", "cnn", "custom")),
    "attach_sparse_detach": (_attach_sparse_detach, ("mlp", "cnn", "custom")),
    "highway_proportional_connect": (_highway_proportional_connect, ("mlp", "cnn")),
}


@pytest.mark.parametrize(
    ("seq", "kind"),
    [pytest.param(s, kind, id=f"{s}-{kind}") for s, (_, kinds) in SEQUENCES.items()
     for kind in kinds],
)  # fmt: skip
def test_ops_in_sequence_survive_a_round_trip(seq: str, kind: str, tmp_path: Path) -> None:
    k = KINDS[kind]
    model, opt = trained(k, "adam" if kind == "mlp" else "sgd")
    SEQUENCES[seq][0](model, opt, k)
    train_step(model, opt, k.x)
    round_trip(tmp_path, model, opt, k.cls, k.x)


def test_a_module_attached_already_sparse_keeps_its_masks(tmp_path: Path) -> None:
    model, opt = trained(KINDS["mlp"], "sgd")
    block = nn.Linear(16, 16)
    sparsify(block, 0.25, distribution="uniform")
    attach(model, "after:1", block, optimizer=opt, alpha=0.5)
    for _ in range(2):
        train_step(model, opt, X)
    mask = block.weight_mask
    assert int(mask.sum()) == 64 and torch.equal(block.weight.detach() * ~mask, torch.zeros(16, 16))
    ck, _ = round_trip(tmp_path, model, opt, None, X)
    assert torch.equal(ck.model.get_submodule("1_slot.module").weight_mask, mask)


# ---------------------------------------------------------------- branches, multi-scale


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 16)
        self.mid = BranchableLayer(nn.Linear(16, 16))
        self.out = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        return self.out(torch.relu(self.mid(h)) + h)


def _branchy_seq() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), BranchableLayer(nn.Linear(16, 16)),
                         nn.ReLU(), nn.Linear(16, 3))  # fmt: skip


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize(
    ("make", "cls", "name"), [(_branchy_seq, None, "2"), (Branchy, Branchy, "mid")]
)
def test_branchable_layer_add_branch_survives_a_round_trip(
    make: Callable[[], nn.Module], cls: Any, name: str, opt_kind: str, tmp_path: Path
) -> None:
    model = make()
    opt = make_opt(model.parameters(), opt_kind)
    train_step(model, opt, X)
    layer = model.get_submodule(name)
    assert isinstance(layer, BranchableLayer)
    layer.add_branch(nn.Sequential(nn.Linear(16, 16), nn.Tanh()), model=model, optimizer=opt)
    train_step(model, opt, X)
    assert float(layer.branch_gates.detach()[1]) != 0.0  # the new branch trains
    ck, _ = round_trip(tmp_path, model, opt, cls, X)
    assert len(ck.model.get_submodule(name).branches) == 2


@pytest.mark.parametrize("init", ["hierarchical", "decisive"])
def test_multiscale_model_survives_a_round_trip(init: str, tmp_path: Path) -> None:
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    ms = MultiScale([4, 8], lambda s: make_mlp(s * s, [8], 3), init=init, top_k=2)
    model = ms.run(((x, Y), (x, Y))).model
    assert [e.op for e in history(model)] == (["sparsify"] if init == "decisive" else [])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if is_sparse(model):
        enforce(model, opt)
    train_step(model, opt, x)
    round_trip(tmp_path, model, opt, None, x)


# ---------------------------------------------------------------- the saved param groups


def test_param_groups_rebuild_an_lr_plan_optimizer_holding_a_frozen_alpha(tmp_path: Path) -> None:
    model = mlp()
    net = SlottedNetwork(model, SlotTopology(1, 1), alpha_schedule=LinearRamp(4))
    plan = LRPlan(model, 0.05, ["pretrained", "dual"])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    plan.attach(opt)
    net.optimizer = opt
    net.add_module_to_slot("r0c0", nn.Linear(16, 16))  # alpha: frozen, but in the optimizer
    train_step(model, opt, X)
    ck = load(save(tmp_path / "ck", model, opt))
    fresh = LRPlan(ck.model, 0.05, ["pretrained", "dual"]).param_groups()
    assert len(fresh) == len(opt.param_groups) - 1  # the frozen alpha is not trainable
    with pytest.raises(CheckpointError, match="the optimizer has 4 param groups but the"):
        ck.load_optimizer(torch.optim.Adam(fresh))
    groups = ck.param_groups()
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in opt.param_groups]
    opt2 = ck.load_optimizer(torch.optim.Adam(groups))
    LRPlan(ck.model, 0.05, ["pretrained", "dual"]).attach(opt2)
    assert_same_optimizer(model, opt, ck.model, opt2)
    train_step(model, opt, X)
    train_step(ck.model, opt2, X)
    assert_same_state(ck.model, model)


def test_param_groups_errors(tmp_path: Path) -> None:
    model = mlp()
    ck = load(save(tmp_path / "ck", model))
    with pytest.raises(CheckpointError, match="this checkpoint was saved without an optimizer"):
        ck.param_groups()
    ck = load(save(tmp_path / "ck2", model, torch.optim.SGD(model.parameters(), lr=0.1)))
    ck.optimizer_state["param_groups"][0]["param_names"][0] = "9.weight"
    with pytest.raises(CheckpointError, match=r"group 0 of the checkpoint holds \['9.weight'\]"):
        ck.param_groups()


# ---------------------------------------------------------------- trainer resume


class Recorder(Callback):
    """Records each step's loss; with ``save_at``, checkpoints the run after that step's
    hooks (it is the last callback) while the run goes on."""

    def __init__(self, save_at: int | None = None, path: Path | None = None) -> None:
        self.losses: list[float] = []
        self.save_at, self.path = save_at, path

    def on_step_end(self, trainer: Trainer) -> None:
        assert trainer.last_loss is not None
        self.losses.append(float(trainer.last_loss))
        if trainer.step == self.save_at and self.path is not None:
            save(self.path, trainer.model, trainer.optimizer, trainer=trainer.state_dict())


STEPS = 26  # not a multiple of an epoch: the evaluation at step 24 is not the last step


def _growth_callbacks(model: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[Callback]:
    return [
        RigL(model, opt, density=0.4, delta_t=3, grad_accumulation=2),
        GrowAsNeeded(Every(2), "widen", layers=[k.layers[0]], amount=2, max_growths=2),
        GrowAsNeeded(Every(1), "patches", amount=0.2, patch_size=4, sample=16, max_growths=3),
        GrowPruneCycle(
            5,
            3,
            3,
            grow={"name": "widen", "layers": [k.layers[1]], "amount": 1},
            prune={"name": "magnitude_prune", "sparsity": 0.5},
            embargo=Embargo(model, steps=4),
        ),
        LRPlan(model, 0.05, ["cascade", "dual", {"name": "warmup", "steps": 4}]),
    ]


class Mixed(nn.Module):
    """Dropout (global RNG), a BranchableLayer and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 16)
        self.act1 = nn.ReLU()
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 12)
        self.act2 = nn.ReLU()
        self.mid = BranchableLayer(nn.Linear(12, 12))
        self.out = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act2(self.fc2(self.drop(self.act1(self.fc1(x)))))
        return self.out(torch.relu(self.mid(h)) + h)


def _mixed_callbacks(model: nn.Module, opt: torch.optim.Optimizer, k: Kind) -> list[Callback]:
    economy = CreditEconomy(earn_per_correct=1.0)
    slots = SlottedNetwork(model, topology_of(model) or SlotTopology(1, 2),
                           alpha_schedule=LinearRamp(4))  # fmt: skip
    tour = Tournament(model, data=(X, Y), candidates=("widen", "skip", "insert"), probe_steps=2,
                      economy=economy)  # fmt: skip

    def branch(t: Trainer, reason: str = "") -> list[Any]:
        layer = t.model.get_submodule("mid")
        assert isinstance(layer, BranchableLayer)
        new = nn.Sequential(nn.Linear(12, 12), nn.Tanh())
        return [layer.add_branch(new, model=t.model, optimizer=t.optimizer, reason=reason)]

    def slot(t: Trainer, reason: str = "") -> list[Any]:
        free = [s.id for s in slots.topology if s.state.value == "dormant"]
        return [slots.add_module_to_slot(free[0], nn.Linear(16, 16))] if free else []

    return [
        economy.callback(),
        TournamentCallback(tour, every=2, max_rounds=2),
        GrowAsNeeded(Every(2), branch, max_growths=2),
        GrowPruneCycle(5, 2, 3, grow=slot, prune=None),
        slots,
        LRPlan(model, 0.02, ["pretrained", {"name": "warmup", "steps": 4}, "age"]),
    ]


# the ops before and after the save: the resumed part changes the structure too
OPS_AROUND_THE_SAVE = {
    "_growth_callbacks": (
        {"sparsify", "rewire", "widen", "patch", "prune"},
        {"rewire", "widen", "patch", "prune"},
    ),
    "_mixed_callbacks": ({"attach", "branch"}, {"branch", "skip", "tournament"}),
}
MIXED = Kind(Mixed, Mixed, X, ["fc1", "fc2"], ("act1", "out"), 16)
RESUME_CASES = {
    "growth-mlp": (KINDS["mlp"], _growth_callbacks, "sgd", 11),
    "growth-cnn": (KINDS["cnn"], _growth_callbacks, "adam", 14),
    "growth-custom": (KINDS["custom"], _growth_callbacks, "sgd", 10),
    "mixed": (MIXED, _mixed_callbacks, "adam", 13),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_mid_epoch_resume_with_growth_callbacks_is_exact(case: str, tmp_path: Path) -> None:
    k, make_callbacks, opt_kind, stop = RESUME_CASES[case]
    model = k.make()
    opt = make_opt(model.parameters(), opt_kind)
    full = Recorder(stop, tmp_path / "ck")
    data = (k.x, Y)

    def trainer(m: nn.Module, o: torch.optim.Optimizer, cbs: list[Callback]) -> Trainer:
        return Trainer(m, o, data, eval=data, epochs=100, max_steps=STEPS, batch_size=6,
                       seed=5, callbacks=cbs, progress=False)  # fmt: skip

    t = trainer(model, opt, [*make_callbacks(model, opt, k), full]).fit()
    assert t.step == STEPS and stop % t.batches_per_epoch != 0  # saved mid-epoch
    ops = {e.op for e in history(model) if e.step > stop}
    before = {e.op for e in history(model) if e.step <= stop}
    assert (before, ops) == OPS_AROUND_THE_SAVE[make_callbacks.__name__]
    # resume: the model rebuilt from arch.json, the optimizer from the saved groups
    ck = load(tmp_path / "ck", model=k.cls)
    opt2 = ck.load_optimizer(make_opt(ck.param_groups(), opt_kind))
    rest = Recorder()
    t2 = trainer(ck.model, opt2, [*make_callbacks(ck.model, opt2, k), rest])
    t2.load_state_dict(ck.state["trainer"])
    ck.restore_rng()
    t2.fit()
    assert rest.losses == full.losses[stop:]  # float for float
    assert_same_state(ck.model, model)
    assert_same_optimizer(model, opt, ck.model, opt2)
    assert same(t2.state_dict(), t.state_dict())
    facts = [[(e.step, e.op, e.target, e.reason, e.details, e.replay) for e in history(m)]
             for m in (model, ck.model)]  # fmt: skip
    assert facts[0] == facts[1]
