"""Tests of dynarch.masks: budgets, selection, in-place masks, optimizer enforcement."""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from dynarch._engine import engine_state, set_seed
from dynarch.masks import (
    apply_masks,
    clip_grad_norm_,
    enforce,
    get_enforcer,
    global_density,
    is_sparse,
    layer_budgets,
    layer_density,
    masked_modules,
    replay,
    sparsify,
)

SHAPES = {"a": (8, 4), "b": (2, 8), "c": (4, 2, 3, 3)}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    )


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )


def reference_shares(
    shapes: dict[str, tuple[int, ...]], total: int, distribution: str
) -> dict[str, float]:
    """Float RigL-style ER/ERK shares (independent of the integer implementation)."""
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    if distribution == "uniform":
        raw = {k: 1.0 for k in shapes}
    elif distribution == "er":
        raw = {k: (s[0] + s[1]) / (s[0] * s[1]) for k, s in shapes.items()}
    else:
        raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    dense: set[str] = set()
    while True:
        rest = total - sum(sizes[k] for k in dense)
        free = [k for k in shapes if k not in dense]
        eps = rest / sum(raw[k] * sizes[k] for k in free) if free else 0.0
        over = {k for k in free if eps * raw[k] > 1 + 1e-12}
        if not over:
            break
        dense |= over
    return {k: float(sizes[k]) if k in dense else eps * raw[k] * sizes[k] for k in shapes}


# --- budgets ---------------------------------------------------------------------------


def test_budgets_hand_computed() -> None:
    # ERK weights sum(shape): a 12, b 10, c 12 -> T=60; b's share 60*10/34 > 16: dense,
    # then a and c split 44 evenly.
    assert layer_budgets(SHAPES, 0.5, "erk") == {"a": 22, "b": 16, "c": 22}
    # ER weights (out+in)*kernel: 12, 10, 54 -> shares 720/76, 600/76, 3240/76 = 9.47,
    # 7.89, 42.63; floors 9+7+42 = 58, the two largest remainders (b, c) get +1.
    assert layer_budgets(SHAPES, 0.5, "er") == {"a": 9, "b": 8, "c": 43}
    assert layer_budgets(SHAPES, 0.5, "uniform") == {"a": 16, "b": 8, "c": 36}
    assert layer_budgets(SHAPES, 1.0, "erk") == {"a": 32, "b": 16, "c": 72}
    # Remainder ties go to the first layer: 3 weights over two equal 4-weight layers.
    assert layer_budgets({"x": (2, 2), "y": (2, 2)}, 3 / 8, "uniform") == {"x": 2, "y": 1}


def test_uniform_exact_per_layer() -> None:
    shapes = {"a": (10, 10), "b": (20, 5), "c": (7, 3, 2, 2)}
    assert layer_budgets(shapes, 0.3, "uniform") == {"a": 30, "b": 30, "c": 25}
    assert layer_budgets(shapes, 0.25, "uniform") == {"a": 25, "b": 25, "c": 21}


shape_st = st.one_of(
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 3]), st.integers(1, 5)),
)


@settings(max_examples=150, deadline=None)
@given(
    shapes=st.lists(shape_st, min_size=1, max_size=6),
    density=st.floats(0.01, 1.0),
    distribution=st.sampled_from(["uniform", "er", "erk"]),
)
def test_budgets_property(shapes: list[tuple[int, ...]], density: float, distribution: str) -> None:
    named = {f"l{i}": s for i, s in enumerate(shapes)}
    sizes = {k: math.prod(s) for k, s in named.items()}
    total = round(density * sum(sizes.values()))
    try:
        budgets = layer_budgets(named, density, distribution)
    except ValueError as err:
        assert "would get 0 active weights" in str(err)
        return
    assert sum(budgets.values()) == total
    shares = reference_shares(named, total, distribution)
    for k, b in budgets.items():
        assert 1 <= b <= sizes[k]
        assert abs(b - shares[k]) < 1 + 1e-9  # floor or ceil of the exact share


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(shape_st, min_size=1, max_size=4),
    density=st.floats(0.2, 1.0),
    distribution=st.sampled_from(["uniform", "er", "erk"]),
    score=st.sampled_from(["magnitude", "random"]),
)
def test_sparsify_counts_property(
    shapes: list[tuple[int, ...]], density: float, distribution: str, score: str
) -> None:
    layers: list[nn.Module] = [
        nn.Linear(s[1], s[0]) if len(s) == 2 else nn.Conv2d(s[1], s[0], s[2:]) for s in shapes
    ]
    model = nn.Sequential(*layers)
    named = {str(i): tuple(m.weight.shape) for i, m in enumerate(layers)}
    try:
        budgets = layer_budgets(named, density, distribution)
    except ValueError:
        return
    original = [m.weight.detach().abs() for m in layers]
    event = sparsify(model, density, distribution=distribution, score=score)
    counts = {n: int(m.weight_mask.sum()) for n, m in masked_modules(model).items()}
    assert counts == budgets
    total = sum(m.weight.numel() for m in layers)
    assert sum(counts.values()) == round(density * total)
    for n, m in masked_modules(model).items():
        off = ~m.weight_mask
        assert torch.equal(m.weight[off], torch.zeros(int(off.sum())))
        assert event.details[n]["active"] == budgets[n]
        if score == "magnitude" and bool(off.any()):  # every kept |w| >= every dropped |w|
            w = original[int(n)]
            assert float(w[m.weight_mask].min()) >= float(w[off].max())


def test_capacity_error_names_layer_and_minimal_density() -> None:
    shapes = {"big": (1000, 1000), "tiny": (1, 2)}
    with pytest.raises(
        ValueError,
        # the 2-weight layer's share (0.5 weights at density 1/4) must round up: ties go to
        # the first layer, so one more weight is needed
        match=re.escape(
            "layer 'tiny' (2 weights, shape (1, 2)) would get 0 active weights at density "
            "0.0001 with distribution 'uniform'; the minimal density that works is 0.2500005"
        ),
    ) as info:
        layer_budgets(shapes, 0.0001, "uniform")
    minimal = float(str(info.value).rsplit(" ", 1)[1])
    assert layer_budgets(shapes, minimal, "uniform")["tiny"] == 1
    n = 1_000_002
    below = (round(minimal * n) - 1) / n
    with pytest.raises(ValueError, match="would get 0 active weights"):
        layer_budgets(shapes, below, "uniform")
    with pytest.raises(ValueError, match=r"layer 'a' \(32 weights"):
        layer_budgets(SHAPES, 1e-9, "erk")


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), True, "0.5", None])
def test_density_errors(bad: object) -> None:
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\], got "):
        layer_budgets(SHAPES, bad, "erk")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=re.escape(f"density must be a number in (0, 1], got {bad!r}"),
    ):
        sparsify(mlp(), bad)  # type: ignore[arg-type]


def test_choice_and_shape_errors() -> None:
    with pytest.raises(
        ValueError, match="unknown distribution 'erdos'; allowed: 'uniform', 'er', 'erk'"
    ):
        layer_budgets(SHAPES, 0.5, "erdos")
    with pytest.raises(
        ValueError, match="unknown distribution 'ERK'; allowed: 'uniform', 'er', 'erk'"
    ):
        sparsify(mlp(), 0.5, distribution="ERK")
    with pytest.raises(ValueError, match="unknown score 'grad'; allowed: 'magnitude', 'random'"):
        sparsify(mlp(), 0.5, score="grad")
    with pytest.raises(ValueError, match="shapes is empty: give at least one layer"):
        layer_budgets({}, 0.5, "erk")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "shape of layer 'v' must be a tuple of at least 2 positive ints (out, in, *kernel), "
            "got (5,)"
        ),
    ):
        layer_budgets({"v": (5,)}, 0.5, "uniform")
    with pytest.raises(ValueError, match=r"shape of layer 'z' must be .*, got \(3, 0\)"):
        layer_budgets({"z": (3, 0)}, 0.5, "uniform")


# --- selection -------------------------------------------------------------------------


def test_magnitude_keeps_exactly_the_largest() -> None:
    layer = nn.Linear(10, 10)
    with torch.no_grad():
        # distinct magnitudes 1..100 with alternating signs
        magnitudes = torch.randperm(100, generator=torch.Generator().manual_seed(3)) + 1.0
        layer.weight.copy_((magnitudes * torch.tensor([1.0, -1.0]).repeat(50)).view(10, 10))
    original = layer.weight.detach().clone()
    sparsify(layer, 0.3, distribution="uniform")
    expected = torch.zeros(100, dtype=torch.bool)
    expected[original.abs().view(-1).topk(30).indices] = True
    assert torch.equal(layer.weight_mask.view(-1), expected)
    assert torch.equal(layer.weight, original * expected.view(10, 10))
    assert int((layer.bias != 0).sum()) == 10


def test_magnitude_ties_at_threshold_broken_randomly() -> None:
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[5.0, -1.0, 1.0, 0.5], [1.0, -1.0, 3.0, 0.0]]))
    sparsify(layer, 0.5, distribution="uniform")  # keep 5, 3 and two of the four 1s
    kept = layer.weight[layer.weight_mask]
    assert sorted(kept.abs().tolist()) == [1.0, 1.0, 3.0, 5.0]


def test_ties_deterministic_given_engine_seed() -> None:
    def masks(seed: int, score: str) -> torch.Tensor:
        layer = nn.Linear(20, 20)
        nn.init.ones_(layer.weight)
        set_seed(layer, seed)
        sparsify(layer, 0.5, distribution="uniform", score=score)
        return layer.weight_mask.clone()

    for score in ("magnitude", "random"):
        assert torch.equal(masks(1, score), masks(1, score))
        assert not torch.equal(masks(1, score), masks(2, score))
        assert int(masks(1, score).sum()) == 200


def test_no_global_rng_consumed() -> None:
    model = mlp()
    before = torch.get_rng_state()
    sparsify(model, 0.5, score="random")
    sparsify(model, 0.3)
    assert torch.equal(torch.get_rng_state(), before)


def test_never_unprunes_and_masks_stay_in_place() -> None:
    model = mlp()
    sparsify(model, 0.5, score="random")
    mods = masked_modules(model)
    objects = {n: m.weight_mask for n, m in mods.items()}
    ptrs = {n: m.weight_mask.data_ptr() for n, m in mods.items()}
    old = {n: m.clone() for n, m in objects.items()}
    with torch.no_grad():  # inactive weights made huge: magnitude must still not revive them
        for m in mods.values():
            m.weight.add_(100.0 * (~m.weight_mask))
    sparsify(model, 0.2)
    for n, m in masked_modules(model).items():
        assert m.weight_mask is objects[n] and m.weight_mask.data_ptr() == ptrs[n]
        assert not (m.weight_mask & ~old[n]).any()  # subset of the previous mask
        assert torch.equal(m.weight[~m.weight_mask], torch.zeros(int((~m.weight_mask).sum())))
    lower = {n: m.clone() for n, m in objects.items()}
    sparsify(model, 0.6)  # raising density keeps every active weight
    for n, m in masked_modules(model).items():
        assert m.weight_mask is objects[n]
        assert not (lower[n] & ~m.weight_mask).any()
    assert global_density(model) == pytest.approx(round(0.6 * 324) / 324)


def test_include_exclude() -> None:
    model = cnn()
    event = sparsify(model, 0.5, include=["0", "5"], exclude=["5"], distribution="uniform")
    assert list(masked_modules(model)) == ["0"]
    assert event.replay == {"layers": ["0"], "density": 0.5, "distribution": "uniform"}
    sparsify(model, 0.5, exclude=["[02]"])
    assert list(masked_modules(model)) == ["0", "5"]


def test_selection_errors() -> None:
    with pytest.raises(
        TypeError,
        match=re.escape(
            "include must be a list of fnmatch patterns, got the string 'fc*'; write ['fc*']"
        ),
    ):
        sparsify(mlp(), 0.5, include="fc*")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "include pattern 'fc*' matches no Linear/Conv2d module; available: ['0', '2', '4']"
        ),
    ):
        sparsify(mlp(), 0.5, include=["fc*"])
    with pytest.raises(
        ValueError,
        match=r"exclude pattern '9' matches no Linear/Conv2d module; available: \['0', '2', '4'\]",
    ):
        sparsify(mlp(), 0.5, exclude=["9"])
    with pytest.raises(
        ValueError,
        match=r"no Linear/Conv2d layer left to sparsify .*Linear/Conv2d modules: \['0', '2', '4'\]",
    ):
        sparsify(mlp(), 0.5, exclude=["*"])
    with pytest.raises(
        ValueError, match=r"no Linear/Conv2d layer left to sparsify .*modules: \[\]"
    ):
        sparsify(nn.Sequential(nn.ReLU()), 0.5)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(
        ValueError, match="layers '0' and '1' share one weight tensor; exclude one of them"
    ):
        sparsify(tied, 0.5)
    with pytest.raises(
        ValueError,
        match=r"layer '0' has an uninitialised \(lazy\) weight; run one forward pass first",
    ):
        sparsify(nn.Sequential(nn.LazyLinear(3)), 0.5)
    bad = nn.Sequential(nn.Linear(4, 4))
    bad[0].register_buffer("weight_mask", torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "layer '0' has a weight_mask of dtype torch.bool and shape (3, 4) but its weight "
            "has shape (4, 4); a mask must be a torch.bool tensor shaped like the weight"
        ),
    ):
        sparsify(bad, 0.5)
    model = mlp()
    with pytest.raises(ValueError, match="would get 0 active weights"):
        sparsify(model, 1e-6)
    assert not is_sparse(model) and engine_state(model).history == []  # validated first


# --- events, queries, state_dict, replay ------------------------------------------------


def test_event_details_and_queries() -> None:
    model = mlp()
    assert not is_sparse(model) and global_density(model) == 1.0 and layer_density(model) == {}
    event = sparsify(model, 0.5, distribution="uniform", reason="manual")
    assert engine_state(model).history == [event]
    assert (event.op, event.target, event.reason) == ("sparsify", "*", "manual")
    assert event.params_before == event.params_after == 355
    assert event.details == {
        "0": {"density": 0.5, "active": 48, "total": 96},
        "2": {"density": 0.5, "active": 96, "total": 192},
        "4": {"density": 0.5, "active": 18, "total": 36},
    }
    assert event.replay == {"layers": ["0", "2", "4"], "density": 0.5, "distribution": "uniform"}
    assert event.to_json()  # JSON-serialisable
    assert is_sparse(model)
    assert layer_density(model) == {"0": 0.5, "2": 0.5, "4": 0.5}
    assert global_density(model) == 0.5
    assert list(masked_modules(model)) == ["0", "2", "4"]
    assert all(int((m.bias != 0).sum()) == m.bias.numel() for m in masked_modules(model).values())


def test_apply_masks_zeroes_weights() -> None:
    model = mlp()
    sparsify(model, 0.4)
    with torch.no_grad():
        for m in masked_modules(model).values():
            m.weight.fill_(2.0)
    apply_masks(model)
    for m in masked_modules(model).values():
        assert torch.equal(m.weight, 2.0 * m.weight_mask)


def test_state_dict_and_replay_round_trip() -> None:
    src = cnn()
    event = sparsify(src, 0.3)
    state = src.state_dict()
    assert state["0.weight_mask"].dtype == torch.bool and "5.weight_mask" in state
    dst = cnn()
    gen_before = engine_state(dst).generator.get_state()
    version = engine_state(dst).version
    replay(dst, event.replay)
    assert torch.equal(engine_state(dst).generator.get_state(), gen_before)
    assert engine_state(dst).history == [] and engine_state(dst).version == version + 2
    assert all(bool(m.weight_mask.all()) for m in masked_modules(dst).values())
    masks = {n: m.weight_mask for n, m in masked_modules(dst).items()}
    dst.load_state_dict(state)
    for n, m in masked_modules(dst).items():
        assert m.weight_mask is masks[n]
        assert torch.equal(m.weight_mask, src.get_submodule(n).weight_mask)
    assert layer_density(dst) == layer_density(src)


def test_replay_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"replay args need 'layers': a list of module names, got \{'density': 0.5\}",
    ):
        replay(mlp(), {"density": 0.5})
    with pytest.raises(ValueError, match="replay: no Linear/Conv2d module named '1' in the model"):
        replay(mlp(), {"layers": ["0", "1"]})


# --- optimizer enforcement ---------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.1),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_masked_weights_and_state_stay_zero(opt_name: str, arch: str) -> None:
    model = mlp() if arch == "mlp" else cnn()
    x = torch.randn(16, 6) if arch == "mlp" else torch.randn(16, 2, 6, 6)
    y = torch.randn(16, 3 if arch == "mlp" else 5)
    optimizer = OPTIMIZERS[opt_name](list(model.parameters()))
    for _ in range(3):  # dense warm-up: optimizer state is nonzero everywhere
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    sparsify(model, 0.3, optimizer=optimizer)
    for m in masked_modules(model).values():  # state of masked positions zeroed right away
        for v in optimizer.state[m.weight].values():
            if torch.is_tensor(v) and v.shape == m.weight.shape:
                assert not bool(v[~m.weight_mask].any())
    start = {n: m.weight.detach().clone() for n, m in masked_modules(model).items()}
    for _ in range(50):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    for n, m in masked_modules(model).items():
        off = ~m.weight_mask
        zeros = torch.zeros(int(off.sum()))
        assert torch.equal(m.weight[off], zeros)
        assert m.weight.grad is not None and bool((m.weight.grad[off] != 0).any())  # dense grads
        changed = m.weight[m.weight_mask] != start[n][m.weight_mask]
        assert float(changed.float().mean()) > 0.6  # (units behind dead ReLUs may not move)
        state = [
            v
            for v in optimizer.state[m.weight].values()
            if torch.is_tensor(v) and v.shape == m.weight.shape
        ]
        assert len(state) >= 1
        for value in state:
            assert torch.equal(value[off], zeros)
            assert bool((value[m.weight_mask] != 0).any())


def test_enforce_registers_once_and_remove() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify(model, 0.5, optimizer=optimizer)
    hook = get_enforcer(model, optimizer)
    assert hook is not None
    enforce(model, optimizer)
    sparsify(model, 0.4, optimizer=optimizer)
    assert get_enforcer(model, optimizer) is hook
    assert len(optimizer._optimizer_step_post_hooks) == 1
    hook.remove()
    assert get_enforcer(model, optimizer) is None and len(optimizer._optimizer_step_post_hooks) == 0
    nn.functional.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 3)).backward()
    optimizer.step()  # no hook: masked weights receive dense updates
    first = model[0]
    assert bool((first.weight[~first.weight_mask] != 0).any())
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got dict"):
        enforce(model, {})  # type: ignore[arg-type]


def test_mask_caches_see_a_change_from_inside_the_transaction() -> None:
    # regression: is_sparse() cached "no masks" at version v; sparsify must still zero the
    # masked weights and optimizer state inside its own transaction
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    assert not is_sparse(model)  # caches an empty map at the current version
    sparsify(model, 0.3, optimizer=opt)
    for m in masked_modules(model).values():
        off = ~m.weight_mask
        assert torch.equal(m.weight[off], torch.zeros_like(m.weight[off]))
        for v in opt.state[m.weight].values():
            if v.shape == m.weight.shape:
                assert torch.equal(v[off], torch.zeros_like(v[off]))


# --- the fast enforcement paths -----------------------------------------------------------


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    nn.functional.mse_loss(
        model(torch.randn(8, 6, generator=g)), torch.randn(8, 3, generator=g)
    ).backward()
    opt.step()


def test_grad_masking_mode_per_optimizer_and_hooks_removed() -> None:
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adagrad = torch.optim.Adagrad(model.parameters(), lr=0.1)
    sparsify(model, 0.5, optimizer=sgd)
    enforce(model, adagrad)
    fast, slow = get_enforcer(model, sgd), get_enforcer(model, adagrad)
    assert fast is not None and fast.masks_gradients
    assert slow is not None and not slow.masks_gradients
    _step(model, sgd)
    for m in masked_modules(model).values():  # the optimizer saw grad * mask, we see it dense
        off = ~m.weight_mask
        assert m.weight.grad is not None and bool(m.weight.grad[off].any()) == bool(off.any())
    fast.remove()
    hooks = (sgd._optimizer_step_pre_hooks, sgd._optimizer_step_post_hooks,
             sgd._optimizer_load_state_dict_post_hooks)  # fmt: skip
    assert all(len(h) == 0 for h in hooks)


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adagrad"])
def test_changes_outside_a_step_are_remasked(opt_name: str) -> None:
    model = mlp()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    sparsify(model, 0.5, optimizer=opt)
    _step(model, opt, 0)
    first = model[0]
    with torch.no_grad():  # a mask edited in place, by hand: one more weight off
        on = first.weight_mask.view(-1).nonzero()[0]
        first.weight_mask.view(-1)[on] = False
        model[2].weight.fill_(1.0)  # weights changed outside the optimizer
    state = copy.deepcopy(opt.state_dict())
    for v in state["state"].values():  # junk optimizer state at masked positions
        for key, t in v.items():
            if torch.is_tensor(t) and t.dim() == 2:
                v[key] = torch.ones_like(t)
    opt.load_state_dict(state)
    _step(model, opt, 1)
    for m in masked_modules(model).values():
        off = ~m.weight_mask
        assert not bool(m.weight[off].any())
        for v in opt.state[m.weight].values():
            if torch.is_tensor(v) and v.shape == m.weight.shape:
                assert not bool(v[off].any())


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "rmsprop", "adagrad"])
def test_a_step_with_a_closure_keeps_masked_weights_and_state_zero(opt_name: str) -> None:
    model = mlp()
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    optimizer = OPTIMIZERS[opt_name](list(model.parameters()))
    sparsify(model, 0.3, optimizer=optimizer)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for i in range(6):  # closures and plain steps, alternating
        if i % 2:
            optimizer.step(closure=closure)
        else:
            optimizer.step(closure)
        closure()
        optimizer.step()
    for m in masked_modules(model).values():
        off = ~m.weight_mask
        assert not bool(m.weight[off].any())
        for v in optimizer.state[m.weight].values():
            if torch.is_tensor(v) and v.shape == m.weight.shape:
                assert not bool(v[off].any()) and bool(v[m.weight_mask].any())


def test_clip_grad_norm_measures_the_applied_gradient() -> None:
    model = mlp()
    sparsify(model, 0.2)
    nn.functional.mse_loss(model(torch.randn(16, 6)), torch.randn(16, 3)).backward()
    masks = {id(m.weight): m.weight_mask for m in masked_modules(model).values()}
    dense = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    applied = [g * masks[id(p)] if id(p) in masks else g for p, g in zip(model.parameters(), dense)]
    expected = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in applied]))
    whole = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in dense]))
    assert float(expected) < float(whole)  # masked positions carry gradient too
    limit = float(expected) / 2
    assert torch.allclose(clip_grad_norm_(model, limit), expected)
    coef = limit / (float(expected) + 1e-6)
    for p, g in zip(model.parameters(), dense):
        assert p.grad is not None and torch.allclose(p.grad, g * coef)
    assert torch.allclose(clip_grad_norm_(model, limit * 10), expected * coef)  # no clipping
    for p, g in zip(model.parameters(), dense):
        assert p.grad is not None and torch.allclose(p.grad, g * coef)


def test_layers_dynarch_cannot_mask_are_named_in_a_warning() -> None:
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(24, 3))
    with pytest.warns(UserWarning, match=re.escape(
        "sparsify leaves 0 (Conv1d) dense: dynarch masks the weights of Linear and Conv2d "
        "layers only"
    )):  # fmt: skip
        sparsify(model, 0.5)
    assert list(masked_modules(model)) == ["2"]
    other = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(24, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(other, 0.5, include=["2"])  # chosen explicitly: nothing to say
