"""Audit 10 fixes of insert/nn/slots: dtypes, Sequentials iterated by forward, hook-free
activation copies, branch optimizer groups and LR history, the slotted network's optimizer,
never-called anchors, alpha validation and input errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynarch
from dynarch._engine import history
from dynarch.activity import Extrema
from dynarch.graph import UnsupportedModelError
from dynarch.growth import add_skip
from dynarch.lr.history import created_modules, grown_modules
from dynarch.nn import Residual
from dynarch.optim import check_optimizer
from dynarch.slots import BranchableLayer, LinearRamp, SlottedNetwork, SlotTopology, add_branch
from dynarch.train import fit


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)


# ------------------------------------------------------------------------ 1. dtypes
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("module_dtype", ["model", "float32"])
def test_attach_on_a_non_float32_model(dtype: torch.dtype, module_dtype: str) -> None:
    model = _mlp(dtype)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    before = model(x)
    module = nn.Linear(8, 8, dtype=dtype if module_dtype == "model" else torch.float32)
    dynarch.attach(model, "after:1", module)
    res = model[2]
    assert isinstance(res, Residual)
    assert res.alpha.dtype == dtype and res.module.weight.dtype == dtype
    assert module.weight.dtype == dtype  # moved in place
    assert torch.equal(model(x), before)  # exactly the same at alpha 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("conv", [False, True])
def test_add_branch_on_a_non_float32_model(dtype: torch.dtype, conv: bool) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(3, 6, 3, padding=1) if conv else nn.Linear(4, 3)
    model = nn.Sequential(BranchableLayer(base), nn.ReLU()).to(dtype)
    x = torch.randn(2, 3, 5, 5) if conv else torch.randn(2, 4)
    x = x.to(dtype)
    before = model(x)
    new = nn.Conv2d(3, 6, 3, padding=1) if conv else nn.Linear(4, 3)  # float32
    model[0].add_branch(new, model=model)
    assert new.weight.dtype == dtype
    assert model[0].weights().tolist() == [1.0, 0.0]
    assert torch.equal(model(x), before)


def test_slotted_network_on_a_float64_model() -> None:
    model = _mlp(torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    before = model(x)
    net = SlottedNetwork(model, SlotTopology(1, 1))
    net.add_module_to_slot("r0c0", nn.Linear(8, 8))
    res = net.residual("r0c0")
    assert res is not None and res.alpha.dtype == torch.float64
    assert torch.equal(model(x), before)


def test_residual_alpha_takes_the_module_dtype() -> None:
    assert Residual(nn.Linear(2, 2).double()).alpha.dtype == torch.float64
    assert Residual(nn.ReLU()).alpha.dtype == torch.float32  # no parameters: float32


# ----------------------------------------------- 2. Sequentials iterated or indexed by forward
class _Iterated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for blk in self.blocks:  # a residual around each block
            h = h + F.relu(blk(h))
        return self.out(h)


class _Indexed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[2](self.layers[1](self.layers[0](x)))


class _Whole(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _OwnForward(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for m in self:
            x = x + m(x)
        return x


X = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("make", "after", "inserted"),
    [
        (_Iterated, "blocks.0", ["blocks.0.0_deep"]),
        (_Indexed, "layers.0", ["layers.1.1_deep", "layers.1.1_deep_act"]),
        (_Whole, "body.0", ["body.1_deep", "body.1_deep_act"]),  # a sibling: called whole
    ],
)
def test_deepen_keeps_the_function_of_a_sequential_used_by_forward(
    make: type[nn.Module], after: str, inserted: list[str]
) -> None:
    model = make()
    before = model(X)
    event = dynarch.deepen(model, after)
    assert event.details["inserted"] == inserted
    assert torch.equal(model(X), before)


@pytest.mark.parametrize(
    ("make", "slot", "name"),
    [
        (_Iterated, "after:blocks.0", "blocks.0.0_slot"),
        (_Indexed, "after:layers.1", "layers.1.1_slot"),
        (_Whole, "after:body.1", "body.1_slot"),
    ],
)
def test_attach_and_detach_keep_the_function_of_a_sequential_used_by_forward(
    make: type[nn.Module], slot: str, name: str
) -> None:
    model = make()
    keys = list(model.state_dict())
    before = model(X)
    assert dynarch.attach(model, slot, nn.Linear(8, 8)).details["module"] == name
    assert torch.equal(model(X), before)
    dynarch.detach(model, slot)
    assert list(model.state_dict()) == keys
    assert torch.equal(model(X), before)


def test_a_sequential_with_its_own_forward_is_wrapped() -> None:
    torch.manual_seed(0)
    model = _OwnForward(nn.Linear(4, 4), nn.Linear(4, 4))
    x = torch.randn(5, 4)
    before = model(x)
    assert dynarch.deepen(model, "0").details["inserted"] == ["0.0_deep"]
    assert len(model) == 2
    assert torch.equal(model(x), before)


def test_wrapped_deepen_and_attach_replay_from_a_checkpoint(tmp_path: Path) -> None:
    model = _Iterated()
    dynarch.deepen(model, "blocks.1")
    dynarch.attach(model, "after:blocks.0", nn.Linear(8, 8), alpha=0.5)
    loaded = dynarch.load(dynarch.save(tmp_path / "ck", model), _Iterated).model
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert torch.equal(loaded(X), model(X))


# ------------------------------------------------ 3. deepen copies the activation hook-free
def test_deepen_copies_the_activation_without_its_hooks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    add_skip(model, "1", "4")
    x = torch.randn(8, 6)
    before = model(x)
    dynarch.deepen(model, "0")
    act = model.get_submodule("1_deep_act")
    assert isinstance(act, nn.ReLU)
    assert len(model[1]._forward_hooks) == 1  # the skip's tap stays on the original
    hooks = [k for k, v in vars(act).items() if k.endswith("_hooks") and isinstance(v, dict)]
    assert hooks and all(len(getattr(act, k)) == 0 for k in hooks)
    assert torch.equal(model(x), before)
    model(x).sum().backward()
    copy.deepcopy(model)  # no phantom tap holding an autograd graph


def test_deepen_keeps_extrema_counts() -> None:
    model = _mlp()
    ex = Extrema(model)
    ex.start()
    model(torch.randn(10, 4))
    dynarch.deepen(model, "0")
    model(torch.randn(10, 4))
    assert ex._count == {"0": 20}
    ex.stop()


# ------------------------------------------------------------ 4/5. branches: groups, history
def _branchy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(BranchableLayer(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 2))


def test_a_new_branch_joins_the_groups_of_its_kind() -> None:
    model = _branchy()
    named = list(model.named_parameters())
    decay = [p for n, p in named if n.endswith("weight")]
    rest = [p for n, p in named if not n.endswith("weight")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    )
    model[0].add_branch(nn.Linear(4, 8), model=model, optimizer=opt)
    dynarch.attach(model, "after:1", nn.Linear(8, 8), optimizer=opt)
    check_optimizer(model, opt)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    assert groups[0] == ["0.branches.0.weight", "0.branches.1.weight",
                         "1_slot.module.weight", "2.weight"]  # fmt: skip
    assert groups[1] == ["0.branch_logits", "0.branch_gates", "0.branches.0.bias",
                         "0.branches.1.bias", "1_slot.alpha", "1_slot.module.bias",
                         "2.bias"]  # fmt: skip


def test_the_branch_event_names_what_it_created_and_grew() -> None:
    model = _branchy()
    event = add_branch(model, "0", nn.Linear(4, 8))
    assert event.details == {
        "branches": 2, "type": "Linear", "created": ["0.branches.1"], "layer": "0"
    }  # fmt: skip
    assert created_modules(event) == ["0.branches.1"]
    assert grown_modules(event) == ["0.branches.1", "0"]
    root = BranchableLayer(nn.Linear(2, 2))
    assert created_modules(root.add_branch(nn.Linear(2, 2))) == ["branches.1"]


def test_lr_strategies_treat_a_branch_as_new() -> None:
    from dynarch._engine import engine_state
    from dynarch.lr import LRPlan

    model = _branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    LRPlan(model, 0.1, ["pretrained", {"name": "warmup", "steps": 10}]).attach(opt)
    engine_state(model).step = 50
    model[0].add_branch(nn.Linear(4, 8), model=model, optimizer=opt)
    factors = {g["name"]: g["lr_factor"] for g in opt.param_groups}
    assert factors["0.branches.1"] > factors["0.branches.0"]  # new, not pretrained


# --------------------------------------------------- 6. the slotted network's optimizer
def test_slotted_network_follows_each_trainers_optimizer() -> None:
    model = _mlp()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1))
    net = SlottedNetwork(model, SlotTopology(1, 1), alpha_schedule=LinearRamp(2))
    opt1 = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(model, opt1, (x, y), batch_size=32, max_steps=2, callbacks=[net], progress=False)
    assert net.optimizer is opt1
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    fit(model, opt2, (x, y), batch_size=32, max_steps=3, callbacks=[net], progress=False)
    assert net.optimizer is opt2
    net.add_module_to_slot("r0c0", nn.Linear(8, 8))
    new = model.get_submodule("1_slot.module").weight
    assert any(p is new for g in opt2.param_groups for p in g["params"])
    assert not any(p is new for g in opt1.param_groups for p in g["params"])
    check_optimizer(model, opt2)


# ------------------------------------------------------ 7. anchors forward never calls
def test_attach_refuses_a_module_forward_never_calls() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), nn.Linear(16, 2)
    )
    keys = list(model.state_dict())
    with pytest.raises(UnsupportedModelError, match=r"'1.linear1' is never called in forward"):
        dynarch.attach(model, "after:1.linear1", nn.Linear(32, 32))
    assert list(model.state_dict()) == keys and history(model) == []


def test_attach_after_a_composite_module_called_once() -> None:
    model = _Whole()
    before = model(X)
    event = dynarch.attach(model, "after:body", nn.Linear(8, 8))  # a custom parent: wrapped
    assert event.details["module"] == "body.body_slot"
    assert torch.equal(model(X), before)


# ---------------------------------------------------------------------- 8. alpha
@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_attach_refuses_a_non_finite_alpha(alpha: float) -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=r"alpha must be a finite number, got (nan|-?inf)"):
        dynarch.attach(model, "after:1", nn.Linear(8, 8), alpha=alpha)
    assert len(model) == 3 and history(model) == []


def test_alpha_must_be_a_number() -> None:
    with pytest.raises(TypeError, match="alpha must be a finite number, got str '1'"):
        dynarch.attach(_mlp(), "after:1", nn.Linear(8, 8), alpha="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha must be a finite number, got nan"):
        Residual(nn.Linear(2, 2), alpha=float("nan"))
    assert float(Residual(nn.Linear(2, 2), alpha=torch.tensor(0.5)).alpha.detach()) == 0.5


# ----------------------------------------------------------------- 9. input errors
def test_topology_names_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match=r"names must be a mapping \{functional name: slot id\}"):
        SlotTopology(1, 1, names=["head"])  # type: ignore[arg-type]


def test_a_name_for_an_unknown_slot_hints_at_the_after_prefix() -> None:
    with pytest.raises(KeyError, match=r"names unknown slot '1'.*did you mean 'after:1'\?"):
        SlottedNetwork(_mlp(), {"head": "1"})
    with pytest.raises(KeyError, match=r"unknown slot 'r5c0'.*known: \['r0c0'\]\)\"$"):
        SlotTopology(1, 1, names={"head": "r5c0"})
    topo = SlotTopology(1, 1, names={"head": "after:1", "alias": "head"})
    assert topo.resolve("alias") == "after:1"
