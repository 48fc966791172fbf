"""The indefinite growth loop: bottleneck choice, sparse identity layers, stopping rules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import dynarch
from dynarch.growth.candidates import sparsify_inserted
from dynarch.growth.indefinite import IndefiniteGrowth, converge, grow_indefinitely
from dynarch.masks import layer_density
from dynarch.models import mlp

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))


def _controlled(dead_in_fc2: int = 4) -> nn.Sequential:
    """fc1: every unit always on; fc2: ``dead_in_fc2`` of its 6 units never fire."""
    torch.manual_seed(0)
    net = mlp(4, [6, 6], 2)
    with torch.no_grad():
        net.fc1.weight.zero_()
        net.fc1.bias.fill_(1.0)
        net.fc2.bias.fill_(1.0)
        net.fc2.bias[:dead_in_fc2] = -100.0
    return net


def _scripted(*accuracies: float) -> tuple[list, object]:
    calls: list = []
    it: Iterator[float] = iter(accuracies)

    def train_fn(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> float:
        calls.append(optimizer)
        return next(it)

    return calls, train_fn


def test_adds_sparse_layers_where_extrema_are_highest_until_max_rounds() -> None:
    net = _controlled()
    before = net(X)
    _, train_fn = _scripted(0.5, 0.6, 0.7)
    grow = IndefiniteGrowth(net, train_fn, data=(X, None), max_rounds=2, density=0.1)
    rows = grow.run()
    got = [(r.round, r.layer, r.inserted, r.params, r.accuracy) for r in rows]
    assert got == [
        (0, None, None, 86, 0.5),
        (1, "fc2", "act2_deep", 98, 0.6),  # 6 diagonal weights (density floor 1/6) + 6 biases
        (2, "fc2", "act2_deep2", 110, 0.7),  # fc2 and its identity copy tie: model order
    ]
    assert rows[1].extrema == pytest.approx(4 / 6)
    assert grow.stop_reason == "max_rounds"
    assert torch.equal(net(X), before)
    density = layer_density(net)
    assert density == {"act2_deep": 1 / 6, "act2_deep2": 1 / 6}
    assert bool(net.act2_deep.weight_mask.diagonal().all())
    assert [e.op for e in dynarch.history(net)] == ["deepen", "sparsify"] * 2


def test_bottleneck_moves_with_the_extrema() -> None:
    net = _controlled(dead_in_fc2=0)
    with torch.no_grad():
        net.fc1.bias[:5] = -100.0  # now fc1 is the bottleneck
    grow = IndefiniteGrowth(net, lambda m, o: 0.5, data=(X, None), max_rounds=1)
    assert grow.bottleneck() == ("fc1", pytest.approx(5 / 6))
    grow.run()
    assert grow.rows[1].layer == "fc1" and grow.rows[1].inserted == "act1_deep"


def test_stops_when_the_extrema_fraction_is_below_threshold() -> None:
    grow = grow_indefinitely(_controlled(dead_in_fc2=0), lambda m, o: 0.9, data=(X, None))
    assert [r.round for r in grow.rows] == [0]
    assert grow.stop_reason == "extrema fraction 0 of 'fc1' < 0.2"


def test_stops_without_accuracy_gain_keeping_that_layer() -> None:
    _, train_fn = _scripted(0.5, 0.505, 0.9)
    grow = grow_indefinitely(_controlled(), train_fn, data=(X, None), min_gain=0.01)
    assert [r.round for r in grow.rows] == [0, 1]
    assert grow.stop_reason == "accuracy gain 0.005 < min_gain 0.01"
    assert hasattr(grow.model, "act2_deep")


def test_stops_at_the_parameter_budget_without_changing_the_model() -> None:
    net = _controlled()
    grow = grow_indefinitely(net, lambda m, o: 0.5, data=(X, None), max_params=97)
    assert grow.stop_reason == "a layer after 'fc2' exceeds max_params"
    assert dynarch.history(net) == [] and len(grow.rows) == 1


def test_optimizer_is_passed_and_receives_new_layers() -> None:
    net = _controlled()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    calls, train_fn = _scripted(0.5, 0.6)
    IndefiniteGrowth(net, train_fn, data=(X, None), optimizer=opt, max_rounds=1).run()
    assert calls == [opt, opt]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in net.parameters()}


def test_table_and_dicts() -> None:
    _, train_fn = _scripted(0.5, 0.625)
    grow = grow_indefinitely(_controlled(), train_fn, data=(X, None), max_rounds=1)
    assert grow.table() == (
        "| round | layer | inserted | extrema | params | accuracy |\n"
        "|---|---|---|---|---|---|\n"
        "| 0 |  |  |  | 86 | 0.5000 |\n"
        "| 1 | fc2 | act2_deep | 0.667 | 98 | 0.6250 |"
    )
    assert [d["inserted"] for d in grow.to_dicts()] == [None, "act2_deep"]


def test_converge_trains_with_early_stopping_end_to_end() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    net = mlp(4, [8], 2)
    train_fn = converge((x, y), (x, y), max_epochs=4, patience=1, lr=1e-2, batch_size=64)
    grow = grow_indefinitely(net, train_fn, data=(x, y), max_rounds=1, threshold=0.0)
    assert len(grow.rows) == 2 and grow.rows[1].layer == "fc1"
    assert grow.rows[1].accuracy > 0.8


def test_sparsify_inserted_errors() -> None:
    net = mlp(4, [6], 2)
    event = dynarch.widen(net, "fc1", 8)
    with pytest.raises(ValueError, match=r"expected the event of a dynarch.deepen, got 'step 0"):
        sparsify_inserted(net, event, 0.5)
    deep = dynarch.deepen(net, "fc1")
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\], got 0"):
        sparsify_inserted(net, deep, 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"train_fn": 3}, TypeError, r"train_fn must be callable"),
        ({"data": X}, TypeError, r"data must be a pair \(x, y\)"),
        ({"threshold": 2}, ValueError, r"threshold must be a number in \[0, 1\], got 2"),
        ({"density": 0}, ValueError, r"density must be a number in \(0, 1\], got 0"),
        ({"max_rounds": -1}, ValueError, r"max_rounds must be an int >= 0, got -1"),
        ({"max_params": 0}, ValueError, r"max_params must be an int >= 1, got 0"),
        ({"min_gain": "x"}, ValueError, r"min_gain must be None or a number, got 'x'"),
        ({"layers": "fc1"}, TypeError, r"layers must be a list of layer names"),
        ({"optimizer": 1}, TypeError, r"optimizer must be a torch.optim.Optimizer or None"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    opts: dict = {"train_fn": lambda m, o: 0.5, "data": (X, None)}
    opts.update(kwargs)
    train_fn = opts.pop("train_fn")
    with pytest.raises(error, match=match):
        IndefiniteGrowth(_controlled(), train_fn, **opts)
