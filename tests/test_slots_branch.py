"""BranchableLayer: exact function preservation on add, trainable gates, optimizer state,
engine events, errors, and checkpoint replay."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynarch
from dynarch.optim import check_optimizer
from dynarch.slots import BranchableLayer, add_branch
from dynarch.spec import build, describe


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        BranchableLayer(nn.Linear(4, 6), max_branches=4), nn.ReLU(), nn.Linear(6, 3)
    )


def _branch(seed: int, n_in: int = 4, n_out: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_out), nn.Tanh())


X = torch.randn(7, 4, generator=torch.Generator().manual_seed(5))
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0])


def test_base_layer_alone_is_the_base_function() -> None:
    base = nn.Linear(4, 6)
    layer = BranchableLayer(base)
    assert torch.equal(layer(X), base(X))
    assert layer.weights().tolist() == [1.0]


def test_add_branch_preserves_output_exactly() -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):  # train a little so logits are not all equal
        opt.zero_grad()
        F.cross_entropy(net(X), Y).backward()
        opt.step()
    layer = net[0]
    for seed in (1, 2, 3):
        before = net(X)
        weights = layer.weights().detach().clone()
        event = add_branch(net, "0", _branch(seed), optimizer=opt)
        assert torch.equal(net(X), before)
        assert torch.equal(layer.weights()[:-1], weights)
        assert layer.weights()[-1].item() == 0.0
        assert (event.op, event.target, event.details["branches"]) == ("branch", "0", seed + 1)
        opt.zero_grad()
        F.cross_entropy(net(X), Y).backward()
        opt.step()
    assert len(layer.branches) == 4


def test_conv_branch_preserves_output_exactly() -> None:
    torch.manual_seed(0)
    layer = BranchableLayer(nn.Conv2d(2, 3, 3, padding=1), max_branches=3)
    x = torch.randn(2, 2, 5, 5)
    before = layer(x)
    layer.add_branch(nn.Conv2d(2, 3, 1))
    assert torch.equal(layer(x), before)
    with pytest.raises(ValueError, match=re.escape(
        "the new branch of '' returns shape (3, 6, 6) but the base branch returns (3, 8, 8)"
    )):  # fmt: skip
        layer.add_branch(nn.Conv2d(2, 3, 3))


def test_new_branch_gate_is_trainable_and_opens() -> None:
    net = _net()
    add_branch(net, "0", _branch(1))
    layer = net[0]
    loss = F.cross_entropy(net(X), Y)
    loss.backward()
    gate_grad = layer.branch_gates.grad
    assert gate_grad is not None and gate_grad[1].item() != 0.0
    branch_grad = layer.branches[1][0].weight.grad
    assert branch_grad is not None and torch.count_nonzero(branch_grad) == 0  # closed: no signal
    with torch.no_grad():
        layer.branch_gates[1] = 1.0
    w = layer.weights().detach()
    expected = torch.softmax(layer.branch_logits.detach(), 0)
    assert torch.allclose(w, expected) and torch.allclose(w.sum(), torch.tensor(1.0))
    out = w[0] * layer.branches[0](X) + w[1] * layer.branches[1](X)
    assert torch.allclose(layer(X), out)


def test_closed_gates_give_zero_not_nan() -> None:
    layer = BranchableLayer(nn.Linear(4, 6))
    with torch.no_grad():
        layer.branch_gates.fill_(-1.0)
    assert torch.equal(layer(X), torch.zeros(7, 6))


def test_optimizer_state_is_carried() -> None:
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    F.cross_entropy(net(X), Y).backward()
    opt.step()
    layer = net[0]
    old_logits = {k: v.clone() for k, v in opt.state[layer.branch_logits].items()}
    base_w = layer.branches[0].weight
    base_state = {k: v.clone() for k, v in opt.state[base_w].items()}
    add_branch(net, "0", _branch(1), optimizer=opt)
    new_state = opt.state[layer.branch_logits]
    assert torch.equal(new_state["exp_avg"], torch.cat([old_logits["exp_avg"], torch.zeros(1)]))
    assert torch.equal(
        new_state["exp_avg_sq"], torch.cat([old_logits["exp_avg_sq"], torch.zeros(1)])
    )
    assert torch.equal(new_state["step"], old_logits["step"])
    assert layer.branches[0].weight is base_w
    assert all(torch.equal(opt.state[base_w][k], v) for k, v in base_state.items())
    held = [id(p) for p in opt.param_groups[0]["params"]]
    assert held == [id(p) for p in net.parameters()]  # new branch params joined, in model order
    check_optimizer(net, opt)
    opt.zero_grad()
    F.cross_entropy(net(X), Y).backward()
    opt.step()  # the grown optimizer steps


def test_method_needs_the_model_holding_the_layer() -> None:
    net = _net()
    event = net[0].add_branch(_branch(1), model=net, reason="manual")
    assert dynarch.history(net)[-1] is event and event.reason == "manual"
    with pytest.raises(
        ValueError, match="this BranchableLayer is not a submodule of the model given"
    ):
        net[0].add_branch(_branch(2), model=nn.Linear(2, 2))


def test_errors() -> None:
    net = _net()
    with pytest.raises(TypeError, match=re.escape(
        "'2' is a Linear, not a BranchableLayer; BranchableLayers of the model: ['0']"
    )):  # fmt: skip
        add_branch(net, "2", _branch(1))
    with pytest.raises(TypeError, match=re.escape("module must be an nn.Module, got str")):
        add_branch(net, "0", "branch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape(
        "the new branch of '0' returns shape (5,) but the base branch returns (6,)"
    )):  # fmt: skip
        add_branch(net, "0", _branch(1, n_out=5))
    for seed in (1, 2, 3):
        add_branch(net, "0", _branch(seed))
    with pytest.raises(ValueError, match=re.escape(
        "BranchableLayer '0' already has 4 branches (max_branches=4); "
        "build it with a larger max_branches"
    )):  # fmt: skip
        add_branch(net, "0", _branch(4))
    assert len(dynarch.history(net)) == 3
    with pytest.raises(ValueError, match="max_branches must be an int >= 1, got 0"):
        BranchableLayer(nn.Linear(2, 2), max_branches=0)
    with pytest.raises(TypeError, match=re.escape("base_layer must be an nn.Module, got int")):
        BranchableLayer(3)  # type: ignore[arg-type]


def test_spec_round_trip() -> None:
    net = _net()
    add_branch(net, "0", _branch(1))
    spec = describe(net)
    assert spec is not None and spec["children"][0][1]["type"] == "BranchableLayer"
    rebuilt = build(spec)
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(X), net(X))


def test_checkpoint_replays_branches(tmp_path: Path) -> None:
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    add_branch(net, "0", _branch(1), optimizer=opt)
    add_branch(net, "0", _branch(2), optimizer=opt)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(X), Y).backward()
        opt.step()
    path = dynarch.save(tmp_path / "ckpt", net, opt)
    ckpt = dynarch.load(path)
    assert len(ckpt.model[0].branches) == 3
    assert torch.equal(ckpt.model(X), net(X))
    assert [e.op for e in ckpt.events] == ["branch", "branch"]
    opt2 = ckpt.load_optimizer(torch.optim.Adam(ckpt.model.parameters(), lr=1e-2))
    for p, q in zip(net.parameters(), ckpt.model.parameters(), strict=True):
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])


class Odd(nn.Module):
    """A custom branch class (needs modules= to be rebuilt)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * 2


def test_custom_branch_class_needs_modules(tmp_path: Path) -> None:
    net = _net()
    add_branch(net, "0", Odd())
    path = dynarch.save(tmp_path / "ckpt", net)
    name = f"{Odd.__module__}.Odd"
    with pytest.raises(
        dynarch.CheckpointError, match=re.escape(f"a custom branch '{name}' was added")
    ):
        dynarch.load(path)
    ckpt = dynarch.load(path, modules={name: Odd})
    assert torch.equal(ckpt.model(X), net(X))


def test_a_branch_added_already_sparse_keeps_its_masked_weights_zero() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), BranchableLayer(nn.Linear(8, 8)), nn.Linear(8, 2)
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    branch = nn.Sequential(nn.Linear(8, 8))
    dynarch.sparsify(branch, 0.25, distribution="uniform")
    add_branch(net, "2", branch, optimizer=opt)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).sum().backward()
        opt.step()
    lin = net[2].branches[1][0]
    assert int(lin.weight_mask.sum()) == 16
    assert int((lin.weight[~lin.weight_mask] != 0).sum()) == 0
    assert int((lin.weight[lin.weight_mask] != 0).sum()) == 16


def test_save_refuses_a_branch_recorded_on_the_layer_alone(tmp_path: Path) -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net[0].add_branch(_branch(1), optimizer=opt)  # before the model has history: in its base
    net[0].add_branch(_branch(2), model=net, optimizer=opt)
    loaded = dynarch.load(dynarch.save(tmp_path / "ok", net, opt))
    assert torch.equal(loaded.model(X), net(X))
    net[0].add_branch(_branch(3), optimizer=opt)  # after: the model's events cannot replay it
    with pytest.raises(
        dynarch.checkpoint.CheckpointError,
        match=re.escape(
            "submodule '0' has structural changes ['branch'] recorded on its own "
            "history, not on the model's, so the checkpoint could not rebuild them; make changes "
            "through the model (e.g. BranchableLayer.add_branch(..., model=model)"
        ),
    ):
        dynarch.save(tmp_path / "lost", net, opt)
    assert not (tmp_path / "lost").exists() and list(tmp_path.iterdir()) == [tmp_path / "ok"]
