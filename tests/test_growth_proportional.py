"""Proportional growth with forward skips at a constant number of active connections."""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch import nn

import dynarch
from dynarch.graph import analyse
from dynarch.growth import grow_proportional, skips
from dynarch.growth.proportional import skip_pairs
from dynarch.masks import global_density, masked_modules, sparsify
from dynarch.models import mlp

X = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))


def sparse_net(density: float = 0.3) -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp(6, [8, 8, 8], 3)
    sparsify(model, density, distribution="uniform")
    return model


def active(model: nn.Module) -> dict[str, int]:
    return {n: int(m.weight_mask.sum()) for n, m in masked_modules(model).items()}


def test_grows_into_new_skips_and_prunes_the_weakest() -> None:
    model = sparse_net()
    before = active(model)
    total = sum(before.values())
    n = round(0.1 * total)
    weights = {n_: m.weight.detach().abs().clone() for n_, m in masked_modules(model).items()}
    masks = {n_: m.weight_mask.clone() for n_, m in masked_modules(model).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    events = grow_proportional(model, 0.1, optimizer=opt, reason="grow")
    assert [e.op for e in events] == ["skip", "skip", "proportional"]
    assert [e.details["target"] for e in events[:2]] == ["fc3", "out"]
    assert [e.details["active"] for e in events[:2]] == [0, 0]
    event = events[-1]
    assert event.details["grown"] == event.details["pruned"] == n
    assert event.details["active"] == total == sum(active(model).values())
    grown_in_skips = sum(int(s.proj.weight_mask.sum()) for s in skips(model).values())
    assert grown_in_skips == n  # the skips have room for all of them
    assert sum(v["grown"] for v in event.details["layers"].values()) == n
    assert sum(v["pruned"] for v in event.details["layers"].values()) == n
    # the pruned ones are exactly the n smallest |w| among the active connections before
    scores = torch.cat([weights[k][masks[k]] for k in masks])
    threshold = scores.sort().values[n - 1]
    lost = torch.cat([weights[k][masks[k] & ~model.get_submodule(k).weight_mask] for k in masks])
    assert lost.numel() == n and bool((lost <= threshold).all())
    for s in skips(model).values():
        assert torch.equal(s.proj.weight_patch, s.proj.weight_mask)
        assert id(s.proj.weight) in [id(p) for p in opt.param_groups[0]["params"]]


def test_without_skips_density_is_exactly_constant() -> None:
    model = sparse_net()
    density = global_density(model)
    total = sum(active(model).values())
    (event,) = grow_proportional(model, 0.25, prefer_skips=False)
    assert not skips(model)
    assert event.details["grown"] == round(0.25 * total)
    assert global_density(model) == density
    flagged = sum(int(m.weight_patch.sum()) for m in masked_modules(model).values()
                  if hasattr(m, "weight_patch"))  # fmt: skip
    assert flagged == round(0.25 * total)


def test_overflow_goes_to_the_other_layers() -> None:
    model = sparse_net(0.5)
    grow_proportional(model, 0.05)  # creates the skips
    room = sum(int((~s.proj.weight_mask).sum()) for s in skips(model).values())
    total = sum(active(model).values())
    events = grow_proportional(model, 1.0)
    assert [e.op for e in events] == ["proportional"]  # no new pair: skips exist
    layers = events[0].details["layers"]
    in_skips = sum(v["grown"] for k, v in layers.items() if ".skip." in k)
    assert round(1.0 * total) == total > room == in_skips == 83
    assert sum(v["grown"] for k, v in layers.items() if ".skip." not in k) == total - room
    assert sum(active(model).values()) == total


def test_skip_pairs_and_empty_growth() -> None:
    model = sparse_net()
    assert skip_pairs(model, analyse(model)) == [("act1", "fc3"), ("act2", "out")]
    tiny = nn.Sequential(nn.Linear(4, 4))
    sparsify(tiny, 0.5, distribution="uniform")
    assert grow_proportional(tiny, 0.05) == []  # round(0.05 * 8) = 0
    assert not [e for e in dynarch.history(tiny) if e.op == "proportional"]


def test_checkpoint_round_trip() -> None:
    model = sparse_net()
    grow_proportional(model, 0.2)
    with torch.no_grad():
        for s in skips(model).values():
            s.proj.weight.copy_(s.proj.weight_mask.float() * 0.3)
    path = dynarch.save(tempfile.mkdtemp() + "/ck", model)
    loaded = dynarch.load(path).model
    assert torch.equal(loaded(X), model(X))


def test_errors() -> None:
    model = sparse_net()
    with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\], got 0"):
        grow_proportional(model, 0)
    with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\], got 1.5"):
        grow_proportional(model, 1.5)
    with pytest.raises(ValueError, match="model has no masked layer; sparsify it first"):
        grow_proportional(mlp(4, [4], 2), 0.1)
    full = nn.Sequential(nn.Linear(4, 4))
    sparsify(full, 1.0, distribution="uniform")
    with pytest.raises(
        ValueError, match="cannot grow 16 connections: the masked layers have only 0 inac"
    ):
        grow_proportional(full, 1.0)


def test_no_skip_across_a_pooling_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 2 * 2, 3),
    )  # fmt: skip
    sparsify(model, 0.3)
    assert skip_pairs(model, analyse(model)) == [("1", "4")]  # not 3 -> 7 or 5 -> 10: pooled
    events = grow_proportional(model, 0.1)
    assert [(e.op, e.details.get("source")) for e in events] == [
        ("skip", "1"),
        ("proportional", None),
    ]
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
