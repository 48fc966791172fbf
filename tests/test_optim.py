"""Optimizer state through structural changes, against hand-built references."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import dynarch
from dynarch.optim import ParamChange, check_optimizer, index_map, transplant
from models import batch, cnn, mlp

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.95)),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True, weight_decay=0.1),
    "rmsprop-momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01),
}


def train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, shape: tuple[int, ...]
) -> float:
    loss = torch.tensor(0.0)
    for s in range(steps):
        opt.zero_grad()
        loss = model(batch(shape, seed=100 + s)).square().mean()
        loss.backward()
        opt.step()
    return float(loss.detach())


def state_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    out = {}
    for name, p in model.named_parameters():
        st = opt.state.get(p, {})
        out[name] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in st.items()}
    return out


def hyper(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def same_objects(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def assert_consistent(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    check_optimizer(model, opt)
    live = list(model.parameters())
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(live) and {id(p) for p in in_groups} == {id(p) for p in live}
    assert all(any(p is q for q in live) for p in opt.state)  # no state for dead parameters


def widen_rows(old: Tensor, new: int) -> Tensor:
    """Reference for a widened producer: kept rows, zero rows for the new units."""
    out = torch.zeros((new, *old.shape[1:]), dtype=old.dtype)
    out[: old.shape[0]] = old
    return out


def widen_cols(old: Tensor, new: int) -> Tensor:
    out = torch.zeros((old.shape[0], new, *old.shape[2:]), dtype=old.dtype)
    out[:, : old.shape[1]] = old
    return out


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_transplant_matches_reference_for_widen_and_shrink(kind: str) -> None:
    model = mlp()
    opt = OPTIMIZERS[kind](model.parameters())
    train(model, opt, 3, (8, 6))
    old, groups = state_by_name(model, opt), hyper(opt)
    dynarch.widen(model, "0", 14, optimizer=opt)
    new = state_by_name(model, opt)
    expect: dict[str, Callable[[Tensor], Tensor]] = {
        "0.weight": lambda t: widen_rows(t, 14), "0.bias": lambda t: widen_rows(t, 14),
        "2.weight": lambda t: widen_cols(t, 14),
    }  # fmt: skip
    for name, st in old.items():
        assert new[name].keys() == st.keys()
        for key, value in st.items():
            if key == "step" or name not in expect:
                assert torch.equal(new[name][key], value), (name, key)  # unchanged
            else:
                assert torch.equal(new[name][key], expect[name](value)), (name, key)
    assert hyper(opt) == groups
    assert same_objects(opt.param_groups[0]["params"], list(model.parameters()))
    assert_consistent(model, opt)

    train(model, opt, 2, (8, 6))
    old = state_by_name(model, opt)
    keep = [11, 0, 5, 2, 7]
    dynarch.shrink(model, "2", keep, optimizer=opt)
    new = state_by_name(model, opt)
    rows = sorted(keep)
    for name, st in old.items():
        for key, value in st.items():
            if key == "step" or name not in ("2.weight", "2.bias", "4.weight"):
                ref = value
            else:
                ref = value[:, rows] if name == "4.weight" else value[rows]
            assert torch.equal(new[name][key], ref), (name, key)
    assert hyper(opt) == groups
    assert same_objects(opt.param_groups[0]["params"], list(model.parameters()))
    assert_consistent(model, opt)
    assert torch.isfinite(torch.tensor(train(model, opt, 3, (8, 6))))


def test_transplant_cnn_batchnorm_and_flatten_blocks() -> None:
    model = cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, opt, 2, (4, 3, 8, 8))
    old = state_by_name(model, opt)
    dynarch.widen(model, "4", 8, optimizer=opt, init="zero")
    new = state_by_name(model, opt)
    for key in ("exp_avg", "exp_avg_sq"):
        for name in ("4.weight", "4.bias", "5.weight", "5.bias"):
            assert torch.equal(new[name][key], widen_rows(old[name][key], 8)), name
        fc = torch.zeros(7, 32)
        fc[:, :24] = old["9.weight"][key]  # 4 columns per channel: the new blocks come last
        assert torch.equal(new["9.weight"][key], fc)
        assert torch.equal(new["0.weight"][key], old["0.weight"][key])
    assert_consistent(model, opt)


def test_state_of_new_units_starts_at_zero_then_trains() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 2, (8, 6))
    dynarch.widen(model, "0", 12, optimizer=opt, init="random")
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"][10:], torch.zeros(2, 6))
    train(model, opt, 1, (8, 6))
    assert bool((opt.state[model[0].weight]["momentum_buffer"][10:] != 0).any())


def test_step_lr_scheduler_keeps_working() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(6):
        train(model, opt, 1, (8, 6))
        sched.step()
        if step == 1:
            dynarch.widen(model, "2", 15, optimizer=opt)
        if step == 3:
            dynarch.deepen(model, "0", optimizer=opt)
        assert_consistent(model, opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert sched.get_last_lr() == [pytest.approx(0.0125)]
    deep = model.get_submodule("1_deep").weight
    before = deep.detach().clone()
    assert torch.isfinite(torch.tensor(train(model, opt, 2, (8, 6))))
    assert not torch.equal(deep, before)  # the new layer is trained


def _names(model: nn.Module, params: list[Tensor]) -> list[str]:
    lookup = {id(p): n for n, p in model.named_parameters()}
    return [lookup[id(p)] for p in params]


def test_two_param_groups() -> None:
    model = mlp()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.Adam([{"params": weights}, {"params": biases, "lr": 0.01}], lr=0.1)
    train(model, opt, 2, (8, 6))
    dynarch.widen(model, "0", 13, optimizer=opt)
    groups = [_names(model, g["params"]) for g in opt.param_groups]
    assert groups == [["0.weight", "2.weight", "4.weight"], ["0.bias", "2.bias", "4.bias"]]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]

    # a new weight joins the weights' group, a new bias the biases' (in model order); the
    # slot's alpha, like no parameter, follows the parameter right before it (2.bias)
    dynarch.deepen(model, "0", optimizer=opt)
    dynarch.attach(model, "after:3", nn.Linear(12, 12), optimizer=opt)
    groups = [_names(model, g["params"]) for g in opt.param_groups]
    assert groups == [
        ["0.weight", "1_deep.weight", "2.weight", "3_slot.module.weight", "4.weight"],
        ["0.bias", "1_deep.bias", "2.bias", "3_slot.alpha", "3_slot.module.bias", "4.bias"],
    ]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert_consistent(model, opt)
    train(model, opt, 2, (8, 6))
    slot_params = list(model.get_submodule("3_slot").parameters())
    assert all(p in opt.state for p in slot_params)
    dynarch.detach(model, "after:3", optimizer=opt)
    assert not any(p in opt.state for p in slot_params)
    groups = [_names(model, g["params"]) for g in opt.param_groups]
    assert groups == [
        ["0.weight", "1_deep.weight", "2.weight", "4.weight"],
        ["0.bias", "1_deep.bias", "2.bias", "4.bias"],
    ]
    assert_consistent(model, opt)


def test_first_module_params_without_anchor_go_to_group_zero() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Linear(4, 4))
    opt = torch.optim.SGD(
        [{"params": [model[1].weight]}, {"params": [model[1].bias], "lr": 0.5}], lr=0.1
    )
    dynarch.attach(model, "after:0", nn.Identity(), optimizer=opt)
    assert _names(model, opt.param_groups[0]["params"]) == ["1.weight", "0_slot.alpha"]


def test_new_parameters_follow_a_frozen_neighbour_into_the_group_of_their_kind() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dynarch.deepen(model, "0", optimizer=opt)  # the parameters before it are frozen
    # they join the optimizer after the nearest held weight (none before them: 2.weight)
    assert _names(model, opt.param_groups[0]["params"]) == [
        "2.weight", "1_deep.weight", "1_deep.bias", "2.bias", "4.weight", "4.bias"
    ]  # fmt: skip


def test_parameters_outside_the_optimizer_stay_outside() -> None:
    model = mlp()
    opt = torch.optim.SGD(list(model[2:].parameters()), lr=0.1, momentum=0.9)
    train(model, opt, 1, (4, 6))
    dynarch.widen(model, "0", 12, optimizer=opt)
    params = opt.param_groups[0]["params"]
    assert same_objects(params, list(model[2:].parameters()))  # new 2.weight swapped in
    assert not any(p is model[0].weight for p in params)
    check_optimizer(model, opt)


def test_forgetting_the_optimizer_is_detected() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dynarch.widen(model, "0", 12)  # optimizer not passed: it still holds the old tensors
    with pytest.raises(
        RuntimeError, match=r"^param group 0 holds a dead parameter \(shape \(10, 6\)\)$"
    ):
        check_optimizer(model, opt)


def test_check_optimizer_errors() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    check_optimizer(model, opt)
    opt.param_groups[0]["params"].append(model[4].bias)
    with pytest.raises(
        RuntimeError, match=r"^param group 0 holds a parameter twice \(shape \(3,\)\)$"
    ):
        check_optimizer(model, opt)
    opt.param_groups[0]["params"].pop()
    opt.state[torch.zeros(3)] = {}
    with pytest.raises(
        RuntimeError, match=r"^optimizer state refers to a parameter not in any group \(3,\)$"
    ):
        check_optimizer(model, opt)


def test_index_map() -> None:
    t = torch.arange(6.0).view(2, 3)
    assert torch.equal(index_map(torch.tensor([1.0, 2.0, 3.0]), {0: torch.tensor([2, 0, -1])}),
                       torch.tensor([3.0, 1.0, 0.0]))  # fmt: skip
    mapped = index_map(t, {0: torch.tensor([1, -1]), 1: torch.tensor([-1, 2, 2, 0])}, fill=7.0)
    assert torch.equal(mapped, torch.tensor([[7.0, 5.0, 5.0, 3.0], [7.0, 7.0, 7.0, 7.0]]))
    copy = index_map(t, {})
    assert torch.equal(copy, t) and copy is not t


def test_transplant_unit_cases() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([a], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    step = opt.state[a]["step"]
    transplant(None, [ParamChange(a, b, {0: torch.tensor([0, 1, -1])})])  # no optimizer: no-op
    transplant(opt, [ParamChange(a, b, {0: torch.tensor([1, -1, 0])})])
    assert opt.param_groups[0]["params"] == [b] and a not in opt.state
    assert opt.state[b]["step"] is step
    assert torch.equal(opt.state[b]["exp_avg"], torch.tensor([0.1, 0.0, 0.1]))
    stranger, other = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(4))
    transplant(opt, [ParamChange(stranger, other)], removed=[stranger])  # not optimised: ignored
    assert opt.param_groups[0]["params"] == [b]
    c, d = nn.Parameter(torch.ones(5)), nn.Parameter(torch.ones(6))
    transplant(opt, added=[(c, None), (d, stranger)])  # no usable anchor: end of group 0
    assert opt.param_groups[0]["params"] == [b, c, d]
    transplant(opt, removed=[b, d])
    assert opt.param_groups[0]["params"] == [c] and b not in opt.state


def test_unmappable_state_is_reset_with_a_warning() -> None:
    old, new = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([old], lr=0.1)
    opt.state[old] = {"history": [torch.ones(2)], "step": 3}
    warning = (
        r"optimizer state 'history' of a changed parameter \(list\) cannot be index-mapped; the "
        r"parameter's optimizer state was reset"
    )
    with pytest.warns(UserWarning, match=warning):
        transplant(opt, [ParamChange(old, new, {0: torch.tensor([0, 1, -1])})])
    assert new not in opt.state and old not in opt.state
    assert opt.param_groups[0]["params"] == [new]


@pytest.mark.parametrize("init", ["net2net", "random"])
def test_sparse_training_continues_after_widen(init: str) -> None:
    from dynarch.masks import enforce, sparsify

    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsify(model, 0.5, distribution="uniform")
    enforce(model, opt)
    train(model, opt, 2, (8, 6))
    dynarch.widen(model, "0", 14, optimizer=opt, init=init)
    dynarch.shrink(model, "2", list(range(0, 12, 2)), optimizer=opt)
    assert torch.isfinite(torch.tensor(train(model, opt, 2, (8, 6))))
    assert_consistent(model, opt)
    for layer in (model[0], model[2], model[4]):
        mask = layer.weight_mask
        assert mask.shape == layer.weight.shape
        assert bool((layer.weight[~mask] == 0).all())
        for key in ("exp_avg", "exp_avg_sq"):
            assert bool((opt.state[layer.weight][key][~mask] == 0).all())
