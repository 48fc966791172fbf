"""dynarch.sparse: schedule, exact counts, hand-computed updates, state, resume, trainer."""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from dynarch._engine import engine_state, history, set_seed
from dynarch.masks import masked_modules, replay, sparsify
from dynarch.sparse import (
    ALGORITHMS,
    SET,
    SNFS,
    DeepR,
    IdleScheduleWarning,
    Rewirer,
    RigL,
    Schedule,
    Static,
    apportion,
    make_rewirer,
)
from dynarch.sparse._ops import grow_uniform
from dynarch.train import Trainer

# --- helpers ---------------------------------------------------------------------------


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )  # fmt: skip


def batch(arch: str, i: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(16, 6, generator=g) if arch == "mlp" else torch.randn(8, 2, 6, 6, generator=g)
    return x, torch.randint(0, 3 if arch == "mlp" else 5, (x.shape[0],), generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, arch: str, i: int) -> None:
    x, y = batch(arch, i)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


VARIANTS: dict[str, dict[str, Any]] = {
    "static": {},
    "set": {},
    "rigl": {"grad_accumulation": 2},
    "snfs": {},
    "deep_r": {},
    "deep_r_bellec": {"variant": "bellec", "noise": True, "temperature": 0.05, "l1": 1e-3},
}


def build(name: str, model: nn.Module, opt: torch.optim.Optimizer, **kw: Any) -> Rewirer:
    algo = "deep_r" if name.startswith("deep_r") else name
    extra = dict(VARIANTS[name])
    if kw.get("delta_t", 100) < 2:
        extra.pop("grad_accumulation", None)
    return make_rewirer(algo, model, opt, **{**extra, **kw})


def counts(model: nn.Module) -> dict[str, int]:
    return {n: int(m.weight_mask.sum()) for n, m in masked_modules(model).items()}


def assert_masked_zero(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for m in masked_modules(model).values():
        off = ~m.weight_mask
        assert not bool(m.weight[off].any())
        for v in opt.state.get(m.weight, {}).values():
            if torch.is_tensor(v) and v.shape == m.weight.shape:
                assert not bool(v[off].any())


def tiny(w: list[float], mask: list[int]) -> nn.Sequential:
    """A Linear(4, 2) (8 weights, flat order) with the given weights and mask."""
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    sparsify(model, sum(mask) / 8, distribution="uniform")
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(w).view(2, 4))
        model[0].weight_mask.copy_(torch.tensor(mask, dtype=torch.bool).view(2, 4))
    return model


W8 = [0.5, -0.1, 0.0, 0.3, 0.0, -0.7, 0.0, 0.0]
M8 = [1, 1, 0, 1, 0, 1, 0, 0]  # active 0, 1, 3, 5: |w| 0.5, 0.1, 0.3, 0.7


def flat_mask(model: nn.Module) -> list[int]:
    return model[0].weight_mask.view(-1).int().tolist()


# --- schedule ----------------------------------------------------------------------------


def test_schedule_values_hand_computed() -> None:
    cos = Schedule(delta_t=10, t_end=100, drop_fraction=0.4, anneal="cosine")
    assert cos.fraction(0) == 0.4 and cos.fraction(100) == 0.0 and cos.fraction(150) == 0.0
    assert cos.fraction(25) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)), abs=1e-15)
    assert cos.fraction(50) == pytest.approx(0.2, abs=1e-15)
    lin = Schedule(delta_t=10, t_end=100, drop_fraction=0.4, anneal="linear")
    assert [lin.fraction(t) for t in (0, 25, 100, 130)] == [0.4, 0.30000000000000004, 0.0, 0.0]
    const = Schedule(delta_t=10, drop_fraction=0.4, anneal="constant")
    assert const.fraction(10**9) == 0.4
    # updates at multiples of delta_t strictly before t_end
    assert [s for s in range(0, 101) if cos.is_update(s)] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert [s for s in range(0, 60) if const.is_update(s)] == [10, 20, 30, 40, 50]
    assert cos.next_update(0) == 10 and cos.next_update(11) == 20 and cos.next_update(91) is None
    with pytest.raises(ValueError, match=r"anneal='cosine' needs the training horizon: pass t_end"):
        Schedule(anneal="cosine").fraction(5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delta_t": 0}, "delta_t must be an int >= 1 (optimizer steps between updates), got 0"),
        (
            {"delta_t": 2.0},
            "delta_t must be an int >= 1 (optimizer steps between updates), got 2.0",
        ),
        ({"t_end": 0}, "t_end must be an int >= 1 (the step from which the mask stays fixed; or"),
        ({"drop_fraction": 0}, "drop_fraction must be a number in (0, 1] (the fraction of each"),
        (
            {"drop_fraction": 1.5},
            "the fraction of each layer's active weights dropped per update), got 1.5",
        ),
        ({"anneal": "exp"}, "unknown anneal 'exp'; allowed: 'constant', 'cosine', 'linear'"),
    ],
)
def test_schedule_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Schedule(**kwargs)
    model = mlp()
    with pytest.raises(ValueError, match=re.escape(message)):
        SET(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.5, **kwargs)


# --- hand-computed updates ---------------------------------------------------------------


def test_set_drops_the_two_smallest_and_grows_seeded_random_inactive() -> None:
    seen: dict[int, int] = {}
    results = []
    for seed in range(300):
        model = tiny(W8, M8)
        set_seed(model, seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rw = SET(model, opt, drop_fraction=0.5, anneal="constant", delta_t=1)
        event = rw.update()
        mask = flat_mask(model)
        assert event.details["0"] == {"dropped": 2, "regrown": 2, "active": 4, "density": 0.5}
        assert mask[0] == 1 and mask[5] == 1  # the two largest |w| survive
        grown = {i for i in (1, 2, 3, 4, 6, 7) if mask[i]}  # 1, 3 were dropped: candidates too
        assert len(grown) == 2 and sum(mask) == 4
        w = model[0].weight.detach().view(-1).tolist()
        assert (
            w[0] == 0.5 and w[5] == pytest.approx(-0.7) and sum(map(abs, w)) == pytest.approx(1.2)
        )
        for i in grown:
            seen[i] = seen.get(i, 0) + 1
        results.append(tuple(mask))
    # uniform over the 6 candidates: each expected 300 * 2/6 = 100 times
    assert sorted(seen) == [1, 2, 3, 4, 6, 7] and all(60 <= c <= 140 for c in seen.values())
    again = tiny(W8, M8)
    set_seed(again, 7)
    SET(again, torch.optim.SGD(again.parameters(), lr=0.1), drop_fraction=0.5,
        anneal="constant").update()  # fmt: skip
    assert tuple(flat_mask(again)) == results[7]  # seeded: reproducible


def test_rigl_grows_exactly_at_the_largest_gradients_and_may_regrow_a_dropped_one() -> None:
    model = tiny(W8, M8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rw = RigL(model, opt, drop_fraction=0.5, anneal="constant", delta_t=1)
    # position 1 (|w| 0.1, dropped) has the largest gradient: RigL regrows it at zero
    model[0].weight.grad = torch.tensor([0.0, 9.0, 1.0, 0.5, 5.0, 0.2, 3.0, 0.1]).view(2, 4)
    event = rw.update()
    assert flat_mask(model) == [1, 1, 0, 0, 1, 1, 0, 0]
    assert model[0].weight.detach().view(-1).tolist() == pytest.approx(
        [0.5, 0.0, 0.0, 0.0, 0.0, -0.7, 0.0, 0.0]
    )
    assert event.details["0"] == {"dropped": 2, "regrown": 2, "active": 4, "density": 0.5}
    assert event.op == "rewire" and event.target == "*" and event.reason == "rigl"
    assert event.replay == {} and history(model)[-1] is event


def test_regrow_init_random_and_gradient_rules() -> None:
    grad = torch.tensor([0.0, 9.0, 1.0, 0.5, 5.0, 0.2, 3.0, 0.1]).view(2, 4)
    model = tiny(W8, M8)
    rw = RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), drop_fraction=0.5,
              anneal="constant", regrow_init="gradient")  # fmt: skip
    model[0].weight.grad = grad
    rw.update()
    w = model[0].weight.detach().view(-1)
    bound = 1 / math.sqrt(4)  # default-init bound of a Linear(4, 2)
    assert w[1].item() == pytest.approx(-bound) and w[4].item() == pytest.approx(-5 / 9 * bound)
    model = tiny(W8, M8)
    rw = SET(model, torch.optim.SGD(model.parameters(), lr=0.1), drop_fraction=0.5,
             anneal="constant", regrow_init="random")  # fmt: skip
    rw.update()
    w, mask = model[0].weight.detach().view(-1), model[0].weight_mask.view(-1)
    grown = [i for i in (1, 2, 3, 4, 6, 7) if mask[i]]
    assert all(0 < abs(float(w[i])) < bound for i in grown)


def test_apportion_hand_computed() -> None:
    assert apportion(10, [1.0, 1.0, 2.0], [10, 1, 10], fallback=[4, 3, 3]) == [3, 1, 6]
    assert apportion(7, [1.0, 1.0, 1.0], [5, 5, 5], fallback=[0, 0, 7]) == [3, 2, 2]
    assert apportion(6, [0.0, 0.0], [5, 5], fallback=[1, 5]) == [1, 5]
    assert apportion(6, [math.nan, 1.0], [5, 5], fallback=[2, 4]) == [2, 4]
    assert apportion(9, [1.0, 100.0, 1.0], [4, 2, 4], fallback=[3, 3, 3]) == [4, 2, 3]


def test_apportion_floors_and_errors() -> None:
    assert apportion(10, [0.0, 1.0, 2.0], [10, 1, 10], fallback=[4, 3, 3], floors=[1, 0, 0]) == [
        1, 1, 8,
    ]  # fmt: skip
    assert apportion(3, [0.0, 0.0], [5, 5], fallback=[0, 3], floors=[1, 1]) == [1, 2]
    with pytest.raises(ValueError, match=re.escape(
        "cannot split 5 between floors [0, 0] and caps [2, 2]: need 0 <= floor <= cap per "
        "layer and sum(floors) <= total <= sum(caps)"
    )):  # fmt: skip
        apportion(5, [1.0, 1.0], [2, 2], fallback=[3, 2])
    with pytest.raises(ValueError, match=re.escape("cannot split 1 between floors [1, 1]")):
        apportion(1, [1.0, 1.0], [2, 2], fallback=[1, 0], floors=[1, 1])
    with pytest.raises(ValueError, match="must have one entry per layer, got lengths 2, 3, 2, 3"):
        apportion(1, [1.0, 1.0], [2, 2, 2], fallback=[1, 0])


def test_snfs_never_empties_a_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 2))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rw = SNFS(model, opt, density=0.05, delta_t=5, t_end=1000, drop_fraction=1.0,
              anneal="constant")  # fmt: skip
    total = sum(int(m.weight_mask.sum()) for m in masked_modules(model).values())
    lowest = total
    for i in range(150):
        x = torch.randn(16, 20, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        F.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        opt.step()
        rw.step()
        counts = [int(m.weight_mask.sum()) for m in masked_modules(model).values()]
        assert sum(counts) == total
        lowest = min(lowest, *counts)
    assert lowest >= 1


def test_a_layer_without_gradient_in_the_window_counts_as_zero() -> None:
    """A two-head model trained one head per batch: the idle head has no gradient."""
    for name in ("rigl", "deep_r", "snfs"):
        torch.manual_seed(0)
        trunk, heads = nn.Linear(6, 16), nn.ModuleList([nn.Linear(16, 3), nn.Linear(16, 3)])
        model = nn.ModuleDict({"trunk": trunk, "heads": heads})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rw = make_rewirer(name, model, opt, density=0.5, delta_t=2, t_end=20, anneal="constant")
        counts = {n: int(m.weight_mask.sum()) for n, m in masked_modules(model).items()}
        for i in range(8):
            x, y = batch("mlp", i)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(heads[0](torch.relu(trunk(x))), y).backward()
            opt.step()
            rw.step()
        after = {n: int(m.weight_mask.sum()) for n, m in masked_modules(model).items()}
        assert sum(after.values()) == sum(counts.values())
        if name != "snfs":
            assert after == counts


def test_frozen_layers_are_refused_unless_the_mask_is_static() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=re.escape(
        "SET: layers ['0'] are frozen (weight.requires_grad is False): rewiring would drop "
        "their trained weights and regrow zeros that never train; leave them out "
        "(exclude=['0']) or unfreeze them"
    )):  # fmt: skip
        SET(model, opt, density=0.5)
    assert not masked_modules(model)  # refused before anything changed
    SET(model, opt, density=0.5, exclude=["0"])
    assert list(masked_modules(model)) == ["2", "4"]
    frozen = mlp().requires_grad_(False)
    Static(frozen, torch.optim.SGD(frozen.parameters(), lr=0.1), density=0.5)  # fixed: fine
    assert list(masked_modules(frozen)) == ["0", "2", "4"]


def test_grow_uniform_is_exact_and_falls_back_when_nearly_full() -> None:
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[:100] = True
    g = torch.Generator().manual_seed(0)
    for k in (1, 50, 899, 900):
        picked = grow_uniform(mask, 900, k, g)
        assert picked.numel() == k and picked.unique().numel() == k and not bool(mask[picked].any())


def test_deep_r_bellec_hand_computed() -> None:
    model = tiny(W8, M8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = DeepR(model, opt, variant="bellec", l1=1.0)
    assert rw.signs["0"].view(-1)[[0, 1, 3, 5]].tolist() == [1, -1, 1, -1]
    with torch.no_grad():
        model[0].weight.view(-1)[0] = -0.05  # crosses zero: after l1 shrink still negative
    event = rw.step()
    assert event is not None and event.details["0"] == {
        "dropped": 1, "regrown": 1, "active": 4, "density": 0.5,
    }  # fmt: skip
    w, mask = model[0].weight.detach().view(-1), flat_mask(model)
    assert mask[1] == 1 and mask[3] == 1 and mask[5] == 1 and sum(mask) == 4
    # l1 shrinks active weights by lr * l1 = 0.1 toward zero; -0.1 reaches 0 and stays
    assert [float(w[1]), float(w[3]), float(w[5])] == pytest.approx([0.0, 0.2, -0.6])
    reborn = [i for i in (0, 2, 4, 6, 7) if mask[i]]
    assert len(reborn) == 1 and float(w[reborn[0]]) == 0.0
    rw.l1 = 0.0
    assert rw.step() is None  # nothing crossed: no event
    assert rw.update().details["0"]["dropped"] == 0  # an explicit update always reports


# --- exactness on every algorithm, distribution and layer type ---------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_counts_exact_and_masked_state_zero(name: str, distribution: str, arch: str) -> None:
    model = mlp() if arch == "mlp" else cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rw = build(name, model, opt, density=0.3, distribution=distribution, delta_t=2, t_end=40,
               drop_fraction=0.5)  # fmt: skip
    start = counts(model)
    sizes = {n: m.weight.numel() for n, m in masked_modules(model).items()}
    events = 0
    for i in range(8):
        train_step(model, opt, arch, i)
        before = {n: m.weight_mask.clone() for n, m in masked_modules(model).items()}
        event = rw.step()
        now = counts(model)
        if name == "snfs":
            assert sum(now.values()) == sum(start.values())
            assert all(0 <= now[n] <= sizes[n] for n in now)
        else:
            assert now == start
        assert_masked_zero(model, opt)
        if event is None:
            continue
        events += 1
        assert set(event.details) == set(start)
        for n, m in masked_modules(model).items():
            d = event.details[n]
            assert d["active"] == now[n] and d["density"] == now[n] / sizes[n]
            grown = m.weight_mask & ~before[n]
            for v in opt.state[m.weight].values():  # regrown weights start with zero state
                if torch.is_tensor(v) and v.shape == m.weight.shape:
                    assert not bool(v[grown].any())
    if name == "deep_r_bellec":  # an event on every step where a connection crossed zero
        assert events >= 1 and len(history(model)) == 1 + events
    else:
        assert events == 4  # steps 2, 4, 6, 8


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(list(VARIANTS)),
    density=st.floats(0.05, 0.9),
    fraction=st.floats(0.05, 1.0),
    optimizer=st.sampled_from(["sgd", "adam"]),
    seed=st.integers(0, 1000),
)
def test_counts_property(
    name: str, density: float, fraction: float, optimizer: str, seed: int
) -> None:
    model = mlp()
    set_seed(model, seed)
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    rw = build(name, model, opt, density=density, delta_t=1, anneal="constant",
               drop_fraction=fraction)  # fmt: skip
    start = counts(model)
    for i in range(3):
        train_step(model, opt, "mlp", i)
        rw.step()
        now = counts(model)
        assert sum(now.values()) == sum(start.values())
        assert name == "snfs" or now == start
        assert_masked_zero(model, opt)


def test_dense_layers_are_left_alone_and_snfs_redistributes() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rw = SNFS(model, opt, density=0.5, distribution="erk", delta_t=1, anneal="constant")
    assert counts(model)["4"] == 48  # ERK makes the 16x3 layer dense: nothing to rewire
    start = counts(model)
    drifted = False
    for i in range(6):
        train_step(model, opt, "mlp", i)
        details = rw.step().details  # type: ignore[union-attr]
        assert details["4"]["dropped"] == 0 and details["4"]["active"] == 48
        assert sum(d["regrown"] for d in details.values()) == sum(
            d["dropped"] for d in details.values()
        )
        drifted = drifted or counts(model) != start
    assert drifted and sum(counts(model).values()) == sum(start.values())


# --- randomness, determinism, state -----------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_no_global_rng_and_determinism(name: str) -> None:
    def run(seed: int) -> list[Tensor]:
        model = mlp()
        set_seed(model, seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        train_step(model, opt, "mlp", 0)
        rng = torch.get_rng_state()
        rw = build(name, model, opt, density=0.3, delta_t=1, anneal="constant")
        rw.step()
        rw.update()
        assert torch.equal(torch.get_rng_state(), rng)  # never the global RNG
        return [m.weight_mask.clone() for m in masked_modules(model).values()]

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert name == "static" or not all(torch.equal(x, y) for x, y in zip(a, c))


def roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exact_resume(name: str) -> None:
    kw = {"density": 0.3, "delta_t": 3, "t_end": 30, "regrow_init": "random"}
    if name == "deep_r_bellec":
        kw.pop("regrow_init")

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp()
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, opt = fresh()
    rw = build(name, model, opt, **kw)
    for i in range(11):
        train_step(model, opt, "mlp", i)
        rw.step()
    full = [t.clone() for t in model.state_dict().values()]
    # first half, then everything saved and restored into new objects
    model, opt = fresh()
    rw = build(name, model, opt, **kw)
    sparsify_event = history(model)[0]
    for i in range(5):
        train_step(model, opt, "mlp", i)
        rw.step()
    saved = roundtrip(
        {"model": model.state_dict(), "opt": opt.state_dict(), "rw": rw.state_dict(),
         "gen": engine_state(model).generator.get_state()}
    )  # fmt: skip
    model, opt = fresh()
    replay(model, sparsify_event.replay)  # what dynarch.load does: masks, then weights
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    engine_state(model).generator.set_state(saved["gen"])
    rw = build(name, model, opt, **kw)  # already sparse: draws nothing
    rw.load_state_dict(saved["rw"])
    for i in range(5, 11):
        train_step(model, opt, "mlp", i)
        rw.step()
    resumed = list(model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))


def test_state_dict_errors() -> None:
    model = mlp()
    rw = SET(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.5)
    state = rw.state_dict()
    other = mlp()
    rigl = RigL(other, torch.optim.SGD(other.parameters(), lr=0.1), density=0.5)
    with pytest.raises(ValueError, match="state was saved by the 'set' rewirer, this is 'rigl'"):
        rigl.load_state_dict(state)
    with pytest.raises(ValueError, match=re.escape("SET state must have keys ['active', 'alg")):
        rw.load_state_dict({"step": 1})


# --- training-loop integration ------------------------------------------------------------


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def test_trainer_callback_events_horizon_and_capture_steps(tmp_path: Path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rw = RigL(model, opt, density=0.3, delta_t=3, grad_accumulation=2)
    captured: list[int] = []
    real = rw._capture
    rw._capture = lambda step: (captured.append(step), real(step))[1]  # type: ignore[method-assign]
    Trainer(model, opt, _data(), batch_size=16, epochs=5, callbacks=[rw], run_dir=tmp_path,
            progress=False).fit()  # fmt: skip
    assert rw.t_end == 20 and rw.current_step == 20
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    rewires = [e for e in lines if e["op"] == "rewire"]
    assert [e["step"] for e in rewires] == [3, 6, 9, 12, 15, 18]  # strictly before t_end
    assert captured == [2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]  # only the steps that feed
    assert all(e["reason"] == "rigl" and set(e["details"]) == {"0", "2", "4"} for e in rewires)


def test_trainer_resume_is_exact() -> None:
    def trainer(steps: int) -> Trainer:
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        rw = SNFS(model, opt, density=0.3, delta_t=2, t_end=14)
        return Trainer(model, opt, _data(), batch_size=16, epochs=5, max_steps=steps,
                       callbacks=[rw], progress=False, seed=3)  # fmt: skip

    full = trainer(16).fit()
    first = trainer(7).fit()
    saved = roundtrip({"model": first.model.state_dict(), "opt": first.optimizer.state_dict(),
                       "trainer": first.state_dict(),
                       "gen": engine_state(first.model).generator.get_state()})  # fmt: skip
    second = trainer(16)
    second.model.load_state_dict(saved["model"])
    second.optimizer.load_state_dict(saved["opt"])
    engine_state(second.model).generator.set_state(saved["gen"])
    second.load_state_dict(saved["trainer"])
    second.fit()
    pairs = zip(full.model.state_dict().values(), second.model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)


def test_trainer_rejects_other_model_or_optimizer() -> None:
    model, other = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = SET(model, opt, density=0.5)
    with pytest.raises(ValueError, match="SET was built for a different model than the Trainer's"):
        Trainer(other, torch.optim.SGD(other.parameters(), lr=0.1), _data(), callbacks=[rw],
                progress=False).fit()  # fmt: skip
    with pytest.raises(ValueError, match="SET was built for a different optimizer than the"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), _data(), callbacks=[rw],
                progress=False).fit()  # fmt: skip


# --- construction and validation ------------------------------------------------------------


def test_registry_static_and_existing_masks() -> None:
    assert sorted(ALGORITHMS) == ["deep_r", "rigl", "set", "snfs", "static"]
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify(model, 0.4, distribution="uniform", include=["0", "2"])
    before = [m.weight_mask.clone() for m in masked_modules(model).values()]
    rw = make_rewirer("static", model, opt, density=0.9, exclude=["2"])  # existing masks kept
    assert isinstance(rw, Static) and rw.layer_names == ["0"] and rw.name == "static"
    event = rw.update()
    assert event.details == {
        "0": {"dropped": 0, "regrown": 0, "active": 58, "density": 0.4027777777777778}
    }
    assert all(
        torch.equal(a, m.weight_mask) for a, m in zip(before, masked_modules(model).values())
    )


Factory = Callable[[nn.Module, torch.optim.Optimizer], Any]
M5 = {"density": 0.5}
CASES: list[tuple[Factory, type[Exception], str]] = [
    (lambda m, o: SET(m, o), ValueError,
     "SET: the model has no masked layer yet, so density is required (the fraction of weights "
     "kept, e.g. density=0.1)"),
    (lambda m, o: SET(m, o, density=0), ValueError, "density must be a number in (0, 1], got 0"),
    (lambda m, o: SET(m, o, **M5, distribution="x"), ValueError,
     "unknown distribution 'x'; allowed: 'uniform', 'er', 'erk'"),
    (lambda m, o: SET(m, o, **M5, regrow_init="ones"), ValueError,
     "unknown regrow_init 'ones'; allowed: 'zero', 'random', 'gradient'"),
    (lambda m, o: SET(m, o, **M5, include="0"), TypeError,
     "include must be a list of fnmatch patterns, got the string '0'"),
    (lambda m, o: SET(m, o, **M5, exclude=["9"]), ValueError,
     "exclude pattern '9' matches no Linear/Conv2d module"),
    (lambda m, o: SET(nn.ReLU(), o, **M5), ValueError, "no Linear/Conv2d layer left to sparsify"),
    (lambda m, o: SET("net", o, **M5), TypeError, "model must be a torch.nn.Module, got str"),
    (lambda m, o: SET(m, {}, **M5), TypeError,
     "optimizer must be a torch.optim.Optimizer, got dict"),
    (lambda m, o: RigL(m, o, **M5, grad_accumulation=0), ValueError,
     "grad_accumulation must be an int >= 1 (steps of gradients averaged per update), got 0"),
    (lambda m, o: RigL(m, o, **M5, delta_t=4, grad_accumulation=5), ValueError,
     "grad_accumulation=5 exceeds delta_t=4; it must be <= delta_t"),
    (lambda m, o: SNFS(m, o, **M5, momentum=1.0), ValueError,
     "momentum must be a number in [0, 1), got 1.0"),
    (lambda m, o: DeepR(m, o, **M5, temperature=0), ValueError,
     "temperature must be a finite number > 0 (softmax / noise scale), got 0"),
    (lambda m, o: DeepR(m, o, **M5, variant="x"), ValueError,
     "unknown variant 'x'; allowed: 'design', 'bellec'"),
    (lambda m, o: DeepR(m, o, **M5, variant="bellec", noise=1), ValueError,
     "noise must be True or False (bellec variant), got 1"),
    (lambda m, o: DeepR(m, o, **M5, variant="bellec", l1=-1), ValueError,
     "l1 must be a finite number >= 0, got -1"),
    (lambda m, o: DeepR(m, o, **M5, noise=True), ValueError,
     "noise and l1 apply to variant='bellec' only"),
    (lambda m, o: DeepR(m, o, **M5, variant="bellec", regrow_init="random"), ValueError,
     "variant='bellec' reactivates connections at zero magnitude; regrow_init must be 'zero', "
     "got 'random'"),
    (lambda m, o: make_rewirer("mest", m, o, **M5), ValueError,
     "unknown rewirer 'mest'; allowed: 'static', 'set', 'rigl', 'snfs', 'deep_r'"),
]  # fmt: skip


@pytest.mark.parametrize(("factory", "error", "message"), CASES)
def test_construction_errors(factory: Factory, error: type[Exception], message: str) -> None:
    model = mlp()
    with pytest.raises(error, match=re.escape(message)):
        factory(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_existing_mask_pattern_errors_and_missing_gradients() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify(model, 0.5, include=["0"])
    with pytest.raises(
        ValueError, match=r"include pattern '2' matches no masked layer; masked: \['0'\]"
    ):
        SET(model, opt, include=["2"])
    with pytest.raises(TypeError, match="exclude must be a list of fnmatch patterns, got '0'"):
        SET(model, opt, exclude="0")
    rw = RigL(model, opt, delta_t=1, anneal="constant")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "rigl: no gradient for any rewired layer ('0'); run loss.backward() before"
        ),
    ):
        rw.update()
    message = (
        "rigl needs the dense gradients of step 1, but weight.grad is None for every layer: "
        "call rw.step() after optimizer.step() and before optimizer.zero_grad(), or "
        "rw.capture() after loss.backward()"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        rw.step()
    by_hand = SET(model, opt, delta_t=1)  # cosine without a horizon
    with pytest.raises(ValueError, match="anneal='cosine' needs the training horizon"):
        by_hand.step()


def test_capture_by_hand_before_zero_grad() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rw = RigL(model, opt, density=0.3, delta_t=2, anneal="constant")
    for i in range(4):
        x, y = batch("mlp", i)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        rw.capture()  # the dense gradients of the step in progress
        opt.step()
        opt.zero_grad(set_to_none=True)  # gone before rw.step(): the capture kept them
        event = rw.step()
        assert (event is not None) == (i % 2 == 1)
    assert rw.current_step == 4 and engine_state(model).step == 4


def test_a_schedule_ending_before_the_first_update_warns() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(IdleScheduleWarning, match=re.escape(
        "SET: t_end=100 is not after the first update (step delta_t=100), so the mask will "
        "never change; give t_end > delta_t, a smaller delta_t, or use Static for a fixed mask"
    )):  # fmt: skip
        SET(model, opt, density=0.5, t_end=100)
    other = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Static(other, torch.optim.SGD(other.parameters(), lr=0.1), density=0.5, t_end=100)


class _Custom(nn.Module):
    """A custom parent: deepen/attach wrap its layers (conv1 becomes conv1.0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.out = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_the_rewired_layers_follow_renames_and_new_masked_layers() -> None:
    import dynarch
    from dynarch.growth import add_skip

    model = _Custom()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = SET(model, opt, density=0.5, delta_t=1, anneal="constant", exclude=["out"])
    assert rw.layer_names == ["fc1", "fc2"]
    dynarch.deepen(model, "fc1", optimizer=opt)  # fc1 is now fc1.0
    add_skip(model, "fc2", "out", optimizer=opt, density=0.5)  # a new masked layer
    assert rw.layer_names == ["fc1.0", "fc2", "out.skip.proj"]
    before = model.get_submodule("fc1.0").weight_mask.clone()
    x, y = batch("mlp", 0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    event = rw.step()
    assert event is not None and sorted(k for k in event.details if "." in k or "fc" in k) == [
        "fc1.0", "fc2", "out.skip.proj",
    ]  # fmt: skip
    assert not torch.equal(model.get_submodule("fc1.0").weight_mask, before)
    state = rw.state_dict()
    assert state["layers"] == ["fc1.0", "fc2", "out.skip.proj"]
    again = SET(model, opt, delta_t=1, anneal="constant")  # would pick every masked layer
    again.load_state_dict(state)
    assert again.layer_names == ["fc1.0", "fc2", "out.skip.proj"]
    with pytest.raises(ValueError, match=re.escape(
        "the saved set state rewires layers ['gone'], which have no mask in this model"
    )):  # fmt: skip
        again.load_state_dict({**state, "layers": ["gone"]})
    older = {k: v for k, v in state.items() if k != "layers"}  # a state saved before
    SET(model, opt, delta_t=1, anneal="constant").load_state_dict(older)
