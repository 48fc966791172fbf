"""Mask growth: ``connect`` and extrema-guided ``add_patches``.

Function preservation with zero init, exact counts and positions, ``weight_patch`` flags,
optimizer state reset at new positions only (SGD momentum, Adam), trainability under the
mask enforcer, events, checkpoint round trips (also through a later widen) and errors.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch import Tensor, nn

import dynarch
from dynarch.activity import Extrema
from dynarch.growth import add_patches, connect, patch_positions
from dynarch.growth.connect import replay_patches
from dynarch.masks import enforce, sparsify
from dynarch.models import mlp


def sparse_mlp(density: float = 0.25, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = mlp(6, [8, 8], 3)
    sparsify(model, density, distribution="uniform")
    return model


def inactive(layer: nn.Module, k: int) -> Tensor:
    return (~layer.weight_mask).reshape(-1).nonzero().squeeze(1)[:k]


X = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))


def test_connect_zero_preserves_function_and_flags_positions() -> None:
    model = sparse_mlp()
    before = model(X)
    idx = inactive(model.fc2, 5)
    active = int(model.fc2.weight_mask.sum())
    event = connect(model, "fc2", idx, reason="manual")
    assert torch.equal(model(X), before)
    flat = model.fc2.weight_mask.reshape(-1)
    assert bool(flat[idx].all()) and int(flat.sum()) == active + 5
    assert model.fc2.weight_patch.reshape(-1).nonzero().squeeze(1).tolist() == idx.tolist()
    assert event.op == "connect" and event.target == "fc2" and event.reason == "manual"
    assert event.details == {"layer": "fc2", "added": 5, "active": active + 5,
                             "density": (active + 5) / 64, "init": "zero"}  # fmt: skip
    assert event.replay == {"layers": ["fc2"]}
    assert dynarch.history(model)[-1] is event


def test_connect_bool_mask_and_random_init() -> None:
    a, b = sparse_mlp(), sparse_mlp()
    for m in (a, b):
        dynarch.set_seed(m, 5)
    rng = torch.get_rng_state()
    positions = ~a.fc1.weight_mask
    n = int(positions.sum())
    event = connect(a, "fc1", positions, init="random")
    connect(b, "fc1", ~b.fc1.weight_mask, init="random")
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not consumed
    assert event.details["added"] == n and event.details["density"] == 1.0
    new = a.fc1.weight[positions]
    bound = 1 / 6**0.5
    assert bool((new.abs() <= bound).all()) and bool((new != 0).all())
    assert torch.equal(a.fc1.weight, b.fc1.weight)  # engine generator: reproducible


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_state_reset_at_new_positions_only(kind: str) -> None:
    model = sparse_mlp()
    if kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(X).sum().backward()
    opt.step()
    states = [v for v in opt.state[model.fc2.weight].values() if v.shape == (8, 8)]
    assert states
    for s in states:
        s.fill_(1.0)
    idx = inactive(model.fc2, 4)
    connect(model, "fc2", idx, optimizer=opt)
    for s in states:
        flat = s.reshape(-1)
        assert bool((flat[idx] == 0).all())
        assert int((flat == 1).sum()) == 64 - 4


def test_new_positions_train_under_the_enforcer() -> None:
    model = sparse_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    enforce(model, opt)
    idx = inactive(model.fc2, 6)
    connect(model, "fc2", idx, optimizer=opt)
    for _ in range(2):
        opt.zero_grad()
        model(X).pow(2).sum().backward()
        opt.step()
    w = model.fc2.weight.detach().reshape(-1)
    assert int((w[idx] != 0).sum()) > 0
    assert bool((model.fc2.weight[~model.fc2.weight_mask] == 0).all())


def test_widen_remaps_weight_patch_and_checkpoint_round_trip() -> None:
    model = sparse_mlp()
    idx = inactive(model.fc1, 3)
    connect(model, "fc1", idx)
    connect(model, "fc2", inactive(model.fc2, 2))
    patch_rows = model.fc1.weight_patch.clone()
    dynarch.widen(model, "fc1", 10)
    assert model.fc1.weight_patch.shape == (10, 6)
    assert torch.equal(model.fc1.weight_patch[:8], patch_rows)
    assert model.fc2.weight_patch.shape == (8, 10)
    dynarch.widen(model, "fc1", 11, init="zero")  # fresh units start unflagged
    assert not bool(model.fc1.weight_patch[10:].any())
    assert not bool(model.fc2.weight_patch[:, 10:].any())
    path = dynarch.save(tempfile.mkdtemp() + "/ck", model)
    loaded = dynarch.load(path).model
    assert torch.equal(loaded(X), model(X))
    assert torch.equal(loaded.fc1.weight_patch, model.fc1.weight_patch)
    assert torch.equal(loaded.fc2.weight_mask, model.fc2.weight_mask)


def test_widen_copies_patch_flags_of_cloned_units() -> None:
    model = sparse_mlp()
    rows = torch.zeros(8, 6, dtype=torch.bool)
    rows[2] = ~model.fc1.weight_mask[2]
    cols = torch.zeros(8, 8, dtype=torch.bool)
    cols[:, 2] = ~model.fc2.weight_mask[:, 2]
    connect(model, "fc1", rows)
    connect(model, "fc2", cols)
    assert bool(model.fc1.weight_patch[2].any()) and bool(model.fc2.weight_patch[:, 2].any())
    dynarch.widen(model, "fc1", 9, sources=[2])
    assert torch.equal(model.fc1.weight_patch[8], model.fc1.weight_patch[2])
    assert torch.equal(model.fc2.weight_patch[:, 8], model.fc2.weight_patch[:, 2])


def test_connect_errors() -> None:
    model = sparse_mlp()
    dense = mlp(6, [8], 3)
    with pytest.raises(ValueError, match=r"layer 'fc1' is dense \(it has no weight_mask\)"):
        connect(dense, "fc1", torch.tensor([0]))
    on = model.fc1.weight_mask.reshape(-1).nonzero().squeeze(1)[:2]
    off = inactive(model.fc1, 1)
    with pytest.raises(ValueError, match="2 of the 3 positions given for 'fc1' are already active"):
        connect(model, "fc1", torch.cat([on, off]))
    with pytest.raises(ValueError, match="positions for 'fc1' hold 1 duplicate indices"):
        connect(model, "fc1", torch.cat([off, off]))
    with pytest.raises(ValueError, match=r"flat indices in \[0, 48\), got min 0 and max 48"):
        connect(model, "fc1", torch.tensor([0, 48]))
    with pytest.raises(ValueError, match=r"must have the weight's shape \(8, 6\), got \(6, 8\)"):
        connect(model, "fc1", torch.zeros(6, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="1-D integer tensor of flat indices or a bool mask"):
        connect(model, "fc1", torch.tensor([1.0]))
    with pytest.raises(ValueError, match="no positions given for 'fc1'; nothing to connect"):
        connect(model, "fc1", torch.zeros(8, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown init 'gradient' for new connections; allowed"):
        connect(model, "fc1", off, init="gradient")
    with pytest.raises(KeyError, match="model has no submodule named 'fc7'"):
        connect(model, "fc7", off)
    with pytest.raises(TypeError, match="'act1' is a ReLU; expected one of: Linear, Conv2d"):
        connect(model, "act1", off)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer or None"):
        connect(model, "fc1", off, optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replay args need 'layers'"):
        replay_patches(model, {"layer": "fc1"})
    assert len(dynarch.history(model)) == 1  # only the sparsify: nothing was recorded


# -- patches ------------------------------------------------------------------------------


def test_patch_positions_geometry() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 6))
    sparsify(model, 0.1, distribution="uniform")
    found = patch_positions(model, {"0": torch.tensor([0, 3])}, 3)
    # unit u of 4 reading 8 inputs: centre floor((u + .5) * 2) -> 1 and 7; window of 3
    expected_in = torch.zeros(4, 8, dtype=torch.bool)
    expected_in[0, 0:3] = True
    expected_in[3, 5:8] = True
    assert torch.equal(found["0"], expected_in)
    # consumer (6 rows): centre floor((u + .5) * 1.5) -> 0 and 5
    expected_out = torch.zeros(6, 4, dtype=torch.bool)
    expected_out[0:3, 0] = True
    expected_out[3:6, 3] = True
    assert torch.equal(found["2"], expected_out)


def test_patch_positions_conv_and_flatten_blocks() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 2)
    )
    sparsify(model, 0.1, distribution="uniform")
    found = patch_positions(model, {"0": torch.tensor([1])}, 1)
    assert found["0"].shape == (3, 2, 3, 3)
    # unit 1 of 3 reading 2 channels: centre floor(1.5 * 2 / 3) = 1, every kernel position
    assert int(found["0"].sum()) == 9 and bool(found["0"][1, 1].all())
    expected = torch.zeros(2, 12, dtype=torch.bool)
    expected[1, 4:8] = True  # unit 1 is the block of columns 4..7
    assert torch.equal(found["3"], expected)


def test_add_patches_counts_exactly_and_preserves_function() -> None:
    model = sparse_mlp(0.2)
    before = model(X)
    units = {"fc1": torch.tensor([1, 5]), "fc2": [0]}
    wanted = patch_positions(model, {k: torch.as_tensor(v) for k, v in units.items()}, 4)
    expected = {k: int((w & ~model.get_submodule(k).weight_mask).sum()) for k, w in wanted.items()}
    event = add_patches(model, units, patch_size=4, reason="extrema")
    assert torch.equal(model(X), before)
    assert event.op == "patch" and event.target == "*"
    assert event.details["added"] == sum(expected.values())
    assert {k: v["added"] for k, v in event.details["layers"].items()} == {
        k: v for k, v in expected.items() if v
    }
    assert event.details["units"] == {"fc1": [1, 5], "fc2": [0]}
    for name, w in wanted.items():
        mod = model.get_submodule(name)
        assert bool(mod.weight_mask[w].all())
        assert int(mod.weight_patch.sum()) == expected[name]


def test_add_patches_cap_and_extrema_input() -> None:
    model = sparse_mlp(0.2)
    with torch.no_grad():
        model.fc1.bias[[2, 6]] = -100.0
    ex = Extrema(model, layers=["fc1"])
    ex.observe(X)
    units = ex.extrema_units("fc1").tolist()
    assert {2, 6} <= set(units)  # (a sparse row may leave another unit dead too)
    event = add_patches(model, ex, patch_size=6, max_connections=5)
    assert event.details["added"] == 5 and event.target == "fc1"
    assert event.details["units"] == {"fc1": units}
    total = sum(int(m.weight_patch.sum()) for m in (model.fc1, model.fc2))
    assert total == 5


def test_add_patches_skips_dense_consumers_and_round_trips() -> None:
    torch.manual_seed(0)
    model = mlp(6, [8, 8], 3)
    sparsify(model, 0.2, distribution="uniform", include=["fc1"])
    event = add_patches(model, {"fc1": [3]}, patch_size=2)
    assert list(event.details["layers"]) == ["fc1"]
    assert not hasattr(model.fc2, "weight_patch")
    path = dynarch.save(tempfile.mkdtemp() + "/ck", model)
    loaded = dynarch.load(path).model
    assert torch.equal(loaded(X), model(X))
    assert torch.equal(loaded.fc1.weight_patch, model.fc1.weight_patch)


def test_add_patches_errors() -> None:
    model = sparse_mlp()
    with pytest.raises(ValueError, match="no units to patch"):
        add_patches(model, {"fc1": []})
    with pytest.raises(ValueError, match=r"units of 'fc1' must lie in \[0, 8\)"):
        add_patches(model, {"fc1": [8]})
    with pytest.raises(TypeError, match=r"units must be \{layer name: unit indices\} or an"):
        add_patches(model, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="patch_size must be an int >= 1, got 0"):
        add_patches(model, {"fc1": [1]}, patch_size=0)
    with pytest.raises(ValueError, match="max_connections must be an int >= 1, got 0"):
        add_patches(model, {"fc1": [1]}, max_connections=0)
    with pytest.raises(ValueError, match="unknown init 'one' for patches"):
        add_patches(model, {"fc1": [1]}, init="one")
    with pytest.raises(ValueError, match="the Extrema given watches another model"):
        add_patches(model, Extrema(sparse_mlp()))
    dense = mlp(6, [8], 3)
    with pytest.raises(ValueError, match="layer 'fc1' is dense"):
        add_patches(dense, {"fc1": [1]})


def test_patch_positions_in_a_grouped_conv_consumer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1, groups=4))
    sparsify(model, 0.3)
    grid = patch_positions(model, {"0": torch.tensor([0, 5])}, 2)["2"]
    assert grid.shape == (12, 2, 3, 3)
    # 2 inputs and 3 outputs per group: unit 0 is input 0 of group 0 (rows 0-2), unit 5
    # input 1 of group 2 (rows 6-8); each gets a 2-row window of its own group, whole kernels
    rows, cols = grid[:, :, 0, 0].nonzero().t().tolist()
    assert list(zip(rows, cols)) == [(0, 0), (1, 0), (7, 1), (8, 1)]
    assert bool(grid.all(dim=(2, 3)).eq(grid.any(dim=(2, 3))).all())


def test_patches_around_a_unit_read_by_a_depthwise_conv() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify(model, 0.3, optimizer=opt)
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    event = add_patches(model, {"0": [5]}, optimizer=opt, patch_size=2)
    assert torch.equal(model(x), before)  # new connections start at zero
    on = model[2].weight_mask
    assert bool(on[5].all()) and int(on.sum()) == int(event.details["layers"]["2"]["active"])
