"""Audit of the issue-3 public API (dynarch.sparse, dynarch.prune) on user-style models.

Models: an ``nn.Sequential`` MLP, a CNN (Conv2d/BatchNorm2d/pooling/Flatten/Linear), a custom
module with nested submodules and a residual add, a model holding modules that must be left
alone (Embedding, LayerNorm, a bias-free Linear) and models with tied weights. Every rewiring
algorithm is used by hand (``loss.backward(); opt.step(); rw.step()``) with SGD-momentum,
Adam and AdamW; bad inputs must fail with an error naming the bad value.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from dynarch._engine import engine_state, set_seed
from dynarch.budgets import layer_budgets
from dynarch.masks import enforce, global_density, layer_density, masked_modules
from dynarch.prune import (
    GradientImportance,
    GradualMagnitudePruning,
    LotteryTicket,
    OverparameterizeThenPrune,
    contribution,
    contributions,
    magnitude_prune,
    structured_prune,
)
from dynarch.sparse import SET, SNFS, DeepR, DynamicSparseLinear, Rewirer, RigL, Static

# --- models ------------------------------------------------------------------------------


class CNN(nn.Module):
    """Conv/BN/ReLU/MaxPool, Conv/BN/ReLU/AdaptiveAvgPool, Flatten, Linear; input (N, 3, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Residual(nn.Module):
    """``out(h + block(h))`` with ``h = relu(inp(x))``: ``inp`` and ``block.fc2`` are coupled."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.block = Block(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        return self.out(h + self.block(h))


class Mixed(nn.Module):
    """Embedding -> LayerNorm -> mean over tokens -> bias-free Linear -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 16, bias=False)
        self.out = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.fc(self.norm(self.emb(x)).mean(1))))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x)))


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Tensor]]] = {
    "mlp": (mlp, lambda g: torch.randn(8, 10, generator=g)),
    "cnn": (CNN, lambda g: torch.randn(4, 3, 8, 8, generator=g)),
    "residual": (Residual, lambda g: torch.randn(8, 6, generator=g)),
    "mixed": (Mixed, lambda g: torch.randint(0, 20, (8, 5), generator=g)),
}
LAYERS = {
    "mlp": ["0", "2", "4"],
    "cnn": ["features.0", "features.4", "head.1"],
    "residual": ["inp", "block.fc1", "block.fc2", "out"],
    "mixed": ["fc", "out"],
}
ALGS: dict[str, tuple[type[Rewirer], dict[str, Any]]] = {
    "set": (SET, {}),
    "deep_r": (DeepR, {}),
    "bellec": (DeepR, {"variant": "bellec"}),
    "rigl": (RigL, {}),
    "snfs": (SNFS, {}),
    "static": (Static, {}),
}
OPTS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}
DISTS = ("erk", "er", "uniform")


def build(
    model_name: str, alg: str, opt: str, dist: str, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, torch.optim.Optimizer, Rewirer]:
    torch.manual_seed(0)
    model = MODELS[model_name][0]().to(dtype)
    set_seed(model, 0)
    optimizer = OPTS[opt](model.parameters())
    cls, kw = ALGS[alg]
    rw = cls(model, optimizer, density=0.3, distribution=dist, delta_t=2, t_end=None,
             drop_fraction=0.3, anneal="constant", **kw)  # fmt: skip
    return model, optimizer, rw


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rw: Rewirer,
    batches: list[Tensor],
) -> list[Any]:
    events = []
    for x in batches:
        model(x).pow(2).mean().backward()
        optimizer.step()
        events.append(rw.step())
        optimizer.zero_grad()
    return events


def batches(model_name: str, n: int, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = [MODELS[model_name][1](g) for _ in range(n)]
    return [x.to(dtype) if x.is_floating_point() else x for x in xs]


def mask_of(module: nn.Module) -> Tensor:
    found = module._buffers["weight_mask"]
    assert found is not None
    return found


def weight_of(module: nn.Module) -> Tensor:
    found = module.weight
    assert isinstance(found, Tensor)
    return found


def active_counts(model: nn.Module) -> dict[str, int]:
    return {n: int(mask_of(m).sum()) for n, m in masked_modules(model).items()}


def assert_masked_zero(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    layers = masked_modules(model)
    assert sum(int((~mask_of(m)).sum()) for m in layers.values()) > 0
    for name, m in layers.items():
        off = ~mask_of(m)
        assert torch.count_nonzero(weight_of(m).detach()[off]) == 0, name
        for key, value in optimizer.state[weight_of(m)].items():
            if isinstance(value, Tensor) and value.shape == weight_of(m).shape:
                assert torch.count_nonzero(value[off]) == 0, (name, key)


def save_load(state: Any) -> Any:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- every algorithm x model x optimizer, by hand ----------------------------------------


@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("alg", list(ALGS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_by_hand_updates_keep_density_and_zeros(model_name: str, alg: str, opt: str) -> None:
    dist = DISTS[(list(MODELS).index(model_name) + list(OPTS).index(opt)) % 3]
    model, optimizer, rw = build(model_name, alg, opt, dist)
    assert sorted(masked_modules(model)) == sorted(LAYERS[model_name])  # nothing else masked
    shapes = {n: tuple(weight_of(m).shape) for n, m in masked_modules(model).items()}
    budgets = layer_budgets(shapes, 0.3, dist)
    assert active_counts(model) == budgets
    events = train(model, optimizer, rw, batches(model_name, 4))
    if alg == "bellec":  # rewires after every step that flipped a sign
        assert all(e is None or e.op == "rewire" for e in events)
    else:
        assert [e is not None for e in events] == [False, True, False, True]
    updates = [e for e in events if e is not None]
    if alg not in ("static", "bellec"):
        assert all(sum(d["dropped"] for d in e.details.values()) > 0 for e in updates)
    counts = active_counts(model)
    if alg == "snfs":  # redistributes across layers; the total is preserved
        assert sum(counts.values()) == sum(budgets.values())
    else:
        assert counts == budgets
        for e in updates:
            assert {n: d["active"] for n, d in e.details.items()} == budgets
    assert_masked_zero(model, optimizer)
    # untouched modules hold no mask and keep their dense weights
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            assert "weight_mask" not in module._buffers, name
        if isinstance(module, nn.Embedding | nn.LayerNorm | nn.BatchNorm2d):
            assert torch.count_nonzero(weight_of(module)) == weight_of(module).numel(), name
    # the model still trains
    out = model(batches(model_name, 1)[0])
    out.pow(2).mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("alg", list(ALGS))
@pytest.mark.parametrize("opt", list(OPTS))
def test_resume_through_torch_save_is_exact(alg: str, opt: str) -> None:
    """Uninterrupted 8 steps == 3 steps, save (weights_only load), fresh objects, 5 steps."""
    xs = batches("residual", 8)
    model, optimizer, rw = build("residual", alg, opt, "erk")
    train(model, optimizer, rw, xs)
    expected = model.state_dict()

    model, optimizer, rw = build("residual", alg, opt, "erk")
    train(model, optimizer, rw, xs[:3])
    saved = save_load({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "rewirer": rw.state_dict(), "generator": engine_state(model).generator.get_state(),
    })  # fmt: skip
    torch.manual_seed(123)  # a different init and mask: everything must come from `saved`
    model = Residual()
    optimizer = OPTS[opt](model.parameters())
    cls, kw = ALGS[alg]
    rw = cls(model, optimizer, density=0.3, delta_t=2, anneal="constant", **kw)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    rw.load_state_dict(saved["rewirer"])
    engine_state(model).generator.set_state(saved["generator"])
    assert rw.current_step == 3
    train(model, optimizer, rw, xs[3:])
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("alg", list(ALGS))
def test_float64_eval_mode_cnn(alg: str) -> None:
    model, optimizer, rw = build("cnn", alg, "adamw", "er", dtype=torch.float64)
    model.eval()
    budgets = active_counts(model)
    train(model, optimizer, rw, batches("cnn", 4, torch.float64))
    assert not model.training
    assert all(p.dtype == torch.float64 for p in model.parameters())
    if alg != "snfs":
        assert active_counts(model) == budgets
    assert_masked_zero(model, optimizer)


@pytest.mark.parametrize("regrow_init", ["random", "gradient"])
@pytest.mark.parametrize("alg", ["set", "rigl", "snfs", "deep_r"])
def test_regrow_init_float64(alg: str, regrow_init: str) -> None:
    torch.manual_seed(0)
    model = CNN().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cls, kw = ALGS[alg]
    rw = cls(model, opt, density=0.3, delta_t=1, t_end=5, regrow_init=regrow_init, **kw)
    events = train(model, opt, rw, batches("cnn", 3, torch.float64))
    assert all(e is not None for e in events)
    assert_masked_zero(model, opt)


def test_snfs_density_moves_but_total_is_exact() -> None:
    model, optimizer, rw = build("cnn", "snfs", "sgd", "erk")
    before = active_counts(model)
    events = train(model, optimizer, rw, batches("cnn", 4))
    after = active_counts(model)
    assert sum(after.values()) == sum(before.values())
    assert after != before  # redistributed (documented)
    last = next(e for e in reversed(events) if e is not None)
    assert {n: d["active"] for n, d in last.details.items()} == after


def test_cosine_without_horizon_by_hand_fails_clearly_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = RigL(model, opt, density=0.3, delta_t=1, t_end=None, anneal="cosine")
    masks = {n: mask_of(m).clone() for n, m in masked_modules(model).items()}
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match=r"anneal='cosine' needs the training horizon: pass t_end"):
        rw.step()
    assert all(torch.equal(mask_of(m), masks[n]) for n, m in masked_modules(model).items())


def test_density_one_never_drops() -> None:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = SET(model, opt, density=1.0, delta_t=1, anneal="constant")
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    event = rw.step()
    assert event is not None
    assert {d["dropped"] for d in event.details.values()} == {0}
    assert layer_density(model) == {"0": 1.0, "2": 1.0, "4": 1.0}


# --- regressions found by this audit ------------------------------------------------------


def test_exclude_at_construction_on_a_dense_model() -> None:
    # was: "exclude pattern '4' matches no masked layer" (patterns checked after masking)
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = SET(model, opt, density=0.5, delta_t=1, anneal="constant", exclude=["4"])
    assert rw.layer_names == ["0", "2"]
    assert sorted(masked_modules(model)) == ["0", "2"]
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    event = rw.step()
    assert event is not None and sorted(event.details) == ["0", "2"]


def test_tied_weights_refused_clearly_unless_one_is_excluded() -> None:
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="layers 'a' and 'b' share one weight tensor; exclude one"):
        SET(model, opt, density=0.5)
    with pytest.raises(ValueError, match="layers 'a' and 'b' share one weight tensor"):
        magnitude_prune(model, 0.5)
    assert masked_modules(model) == {}
    rw = SET(model, opt, density=0.5, exclude=["b"], delta_t=1, anneal="constant")
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    event = rw.step()
    assert event is not None and event.details["a"]["active"] == 32
    assert torch.count_nonzero(model.b.weight.detach()[~mask_of(model.a)]) == 0  # same tensor


@pytest.mark.parametrize("alg", list(ALGS))
def test_optimizer_without_the_models_weights_is_refused(alg: str) -> None:
    cls, kw = ALGS[alg]
    model = mlp()
    foreign = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"the optimizer does not hold the weights of layers \['0', '2', '4'\]"
    ):
        cls(model, foreign, density=0.5, **kw)
    assert masked_modules(model) == {}  # refused before anything changed
    partial = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"layers \['2', '4'\]; build it .* or exclude those"):
        cls(model, partial, density=0.5, **kw)
    rw = cls(model, partial, density=0.5, include=["0"], **kw)  # what the message suggests
    assert rw.layer_names == ["0"]


def test_frozen_layer_must_be_excluded() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match=r"RigL: the optimizer does not hold .* \['0'\]"):
        RigL(model, opt, density=0.5, t_end=1000)
    assert RigL(model, opt, density=0.5, t_end=1000, exclude=["0"]).layer_names == ["2", "4"]


def test_pruning_with_a_foreign_optimizer_is_refused() -> None:
    model = CNN()
    foreign = torch.optim.SGD(mlp().parameters(), lr=0.1)
    layers = r"\['features.0', 'features.4', 'head.1'\]"
    with pytest.raises(ValueError, match=f"magnitude pruning: the optimizer does not .*{layers}"):
        magnitude_prune(model, 0.5, optimizer=foreign)
    with pytest.raises(ValueError, match=f"GradualMagnitudePruning: the optimizer .*{layers}"):
        GradualMagnitudePruning(model, foreign, 0.9, 0, 10, 2)
    with pytest.raises(ValueError, match=f"LotteryTicket: the optimizer does not .*{layers}"):
        LotteryTicket(model, foreign, 0.8, 2)
    with pytest.raises(ValueError, match="GradualMagnitudePruning: the optimizer does not"):
        OverparameterizeThenPrune(model, foreign, 0.9, 50)
    assert masked_modules(model) == {}
    layer = DynamicSparseLinear(4, 4, 0.5)
    with pytest.raises(ValueError, match=r"rewire: the optimizer does not .*\['this layer'\]"):
        layer.rewire("set", optimizer=foreign)


def test_weight_norm_layer_is_refused_not_silently_left_dense() -> None:
    # was: magnitude_prune reported 50% sparsity while every weight stayed nonzero
    torch.manual_seed(0)
    model = mlp()
    weight_norm(model[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    msg = r"layer '0' computes its weight from other parameters \(a parametrization"
    with pytest.raises(ValueError, match=msg):
        magnitude_prune(model, 0.5)
    with pytest.raises(ValueError, match=msg):
        SET(model, opt, density=0.5)
    rw = SET(model, opt, density=0.5, exclude=["0"])
    assert rw.layer_names == ["2", "4"]


def test_bellec_signs_follow_a_structural_shrink() -> None:
    # was: RuntimeError "size of tensor a (6) must match the size of tensor b (8)"
    model, optimizer, rw = build("cnn", "bellec", "sgd", "erk")
    train(model, optimizer, rw, batches("cnn", 2))
    structured_prune(model, "features.0", 2, optimizer=optimizer)
    before = active_counts(model)
    train(model, optimizer, rw, batches("cnn", 3))
    assert active_counts(model) == before
    assert isinstance(rw, DeepR) and rw.signs["features.0"].shape == (6, 3, 3, 3)
    assert_masked_zero(model, optimizer)


@pytest.mark.parametrize("alg", ["set", "rigl", "snfs", "deep_r", "static"])
def test_rewirers_survive_a_structural_shrink(alg: str) -> None:
    model, optimizer, rw = build("cnn", alg, "sgd", "erk")
    train(model, optimizer, rw, batches("cnn", 2))
    structured_prune(model, "features.0", 2, optimizer=optimizer)
    assert mask_of(model.get_submodule("features.0")).shape == (6, 3, 3, 3)
    total = sum(active_counts(model).values())
    events = train(model, optimizer, rw, batches("cnn", 2))
    assert events[1] is not None and sum(active_counts(model).values()) == total
    assert_masked_zero(model, optimizer)


def test_loaded_state_from_another_model_is_recomputed_not_crashing() -> None:
    # was: index out of range when the saved positions exceed this model's layer
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 4))
    opt_big = torch.optim.SGD(big.parameters(), lr=0.1)
    rw_big = SET(big, opt_big, density=0.5, distribution="uniform", delta_t=1, anneal="constant")
    big(torch.randn(2, 10)).sum().backward()
    opt_big.step()
    rw_big.step()
    small = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    rw = SET(small, opt, density=0.5, distribution="uniform", delta_t=1, anneal="constant")
    state = rw_big.state_dict()
    state["active"]["0"] = state["active"]["0"][-160:]  # right count, positions out of range
    rw.load_state_dict(save_load(state))
    small(torch.randn(2, 10)).sum().backward()
    opt.step()
    event = rw.step()
    assert event is not None and event.details["0"]["active"] == 160
    assert active_counts(small) == {"0": 160, "2": 64}


# --- bad inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"density": 0}, ValueError, r"density must be a number in \(0, 1\], got 0"),
        ({"density": 1.5}, ValueError, r"density must be a number in \(0, 1\], got 1.5"),
        ({"density": math.nan}, ValueError, r"density must be a number in \(0, 1\], got nan"),
        ({"density": 0.5, "distribution": "ERK"}, ValueError,
         "unknown distribution 'ERK'; allowed: 'uniform', 'er', 'erk'"),
        ({"density": 0.5, "anneal": "exp"}, ValueError,
         "unknown anneal 'exp'; allowed: 'constant', 'cosine', 'linear'"),
        ({"density": 0.5, "delta_t": 0}, ValueError,
         r"delta_t must be an int >= 1 \(optimizer steps between updates\), got 0"),
        ({"density": 0.5, "drop_fraction": math.nan}, ValueError,
         r"drop_fraction must be a number in \(0, 1\] .*got nan"),
        ({"density": 0.5, "t_end": 0}, ValueError, "t_end must be an int >= 1 .*got 0"),
        ({"density": 0.5, "regrow_init": "normal"}, ValueError, "unknown regrow_init 'normal'"),
        ({"density": 0.001}, ValueError,
         r"layer '0' \(320 weights, shape \(32, 10\)\) would get 0 active weights at density "
         r"0.001 with distribution 'erk'; the minimal density that works is 0.00335"),
        ({}, ValueError, "the model has no masked layer yet, so density is required"),
        ({"density": 0.5, "include": "0"}, TypeError,
         r"include must be a list of fnmatch patterns, got the string '0'; write \['0'\]"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("alg", list(ALGS))
def test_bad_rewirer_arguments(
    alg: str, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    cls, kw = ALGS[alg]
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match=match):
        cls(model, opt, **{**kw, **kwargs})
    assert masked_modules(model) == {}


def test_bad_models_and_optimizers() -> None:
    no_layers = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    opt = torch.optim.SGD(no_layers.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no Linear/Conv2d layer left to sparsify"):
        SET(no_layers, opt, density=0.5)
    with pytest.raises(ValueError, match="no Linear/Conv2d layer left to prune"):
        magnitude_prune(no_layers, 0.5)
    model = mlp()
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got str"):
        SET(model, "sgd", density=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        SET("model", torch.optim.SGD(model.parameters(), lr=0.1), density=0.5)  # type: ignore[arg-type]
    lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="layer '0' has an uninitialised \\(lazy\\) weight"):
        SET(lazy, torch.optim.SGD(model.parameters(), lr=0.1), density=0.5)


def test_bad_algorithm_options() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="grad_accumulation=3 exceeds delta_t=2"):
        RigL(model, opt, density=0.5, delta_t=2, grad_accumulation=3)
    with pytest.raises(ValueError, match="unknown variant 'Bellec'; allowed: 'design', 'bellec'"):
        DeepR(model, opt, density=0.5, variant="Bellec")
    with pytest.raises(ValueError, match="noise and l1 apply to variant='bellec' only"):
        DeepR(model, opt, density=0.5, l1=0.1)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0 .*got nan"):
        DeepR(model, opt, density=0.5, temperature=math.nan)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\), got 1.0"):
        SNFS(model, opt, density=0.5, momentum=1.0)
    with pytest.raises(ValueError, match="regrow_init must be 'zero', got 'random'"):
        DeepR(model, opt, density=0.5, variant="bellec", regrow_init="random")
    assert masked_modules(model) == {}


def test_bad_state_dicts() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = SET(model, opt, density=0.5)
    with pytest.raises(ValueError, match="state was saved by the 'set' rewirer, this is 'rigl'"):
        RigL(model, opt).load_state_dict(rw.state_dict())
    with pytest.raises(ValueError, match=r"SET state must have keys \['active', .*got \['step'\]"):
        rw.load_state_dict({"step": 1})


def test_rigl_without_gradients_by_hand() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = RigL(model, opt, density=0.5, delta_t=1, t_end=10)
    with pytest.raises(ValueError, match=r"rigl needs the dense gradients of step 1, but "):
        rw.step()


# --- DynamicSparseLinear ------------------------------------------------------------------


@pytest.mark.parametrize("enforced", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["set", "deep_r"])
def test_dynamic_sparse_linear(method: str, dtype: torch.dtype, enforced: bool) -> None:
    torch.manual_seed(0)
    layer = DynamicSparseLinear(12, 5, 0.3, dtype=dtype)
    assert int(layer.mask.sum()) == 18  # round(0.3 * 60)
    assert layer.get_sparsity() == 1 - 18 / 60
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    if enforced:  # masked weights and their Adam moments stay exactly zero after every step
        enforce(layer, opt)
    for _ in range(2):
        layer(torch.randn(4, 12, dtype=dtype)).pow(2).sum().backward()
        opt.step()
    layer.store_gradients()
    event = layer.rewire(method=method, prune_rate=0.5, temperature=0.5, optimizer=opt)
    assert event.details[""] == {"dropped": 9, "regrown": 9, "active": 18, "density": 0.3}
    assert layer.get_sparsity() == 1 - 18 / 60
    off = ~layer.mask
    assert torch.count_nonzero(layer.weight.detach()[off]) == 0
    changed = (event.details[""]["dropped"], event.details[""]["regrown"])
    assert changed == (9, 9)
    if enforced:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(opt.state[layer.weight][key][off]) == 0
    else:  # without enforce, the forward re-zeroes masked weights a plain step moved
        layer(torch.randn(4, 12, dtype=dtype)).sum().backward()
        opt.step()
        assert torch.count_nonzero(layer.weight.detach()[off]) > 0
        layer(torch.randn(1, 12, dtype=dtype))
        assert torch.count_nonzero(layer.weight.detach()[off]) == 0
    fresh = DynamicSparseLinear(12, 5, 0.3, dtype=dtype)
    fresh.load_state_dict(save_load(layer.state_dict()))
    x = torch.randn(3, 12, dtype=dtype)
    assert torch.equal(fresh(x), layer(x))
    assert fresh.get_sparsity() == layer.get_sparsity()


def test_dynamic_sparse_linear_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\], got nan"):
        DynamicSparseLinear(4, 4, math.nan)
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\], got 0"):
        DynamicSparseLinear(4, 4, 0)
    layer = DynamicSparseLinear(4, 4, 0.5)
    with pytest.raises(ValueError, match=r"store_gradients: weight\.grad is None; call loss"):
        layer.store_gradients()
    with pytest.raises(ValueError, match=r"rewire\(method='deep_r', regrow_init='zero'\) needs a"):
        layer.rewire("deep_r")
    with pytest.raises(ValueError, match="unknown method 'rigl'; allowed: 'set', 'deep_r'"):
        layer.rewire("rigl")
    with pytest.raises(ValueError, match=r"prune_rate must be a number in \[0, 1\], got nan"):
        layer.rewire("set", math.nan)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        layer.rewire("set", 0.5, 0)


def test_dynamic_sparse_linear_inside_a_model_with_a_rewirer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(DynamicSparseLinear(6, 8, 0.5), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rw = RigL(model, opt, density=0.2, delta_t=1, t_end=5)  # existing mask: density ignored
    assert rw.layer_names == ["0"] and layer_density(model) == {"0": 0.5}
    train(model, opt, rw, [torch.randn(3, 6) for _ in range(2)])
    assert layer_density(model) == {"0": 0.5}
    assert_masked_zero(model, opt)


# --- pruning ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["cnn", "residual", "mixed"])
def test_magnitude_per_layer_and_global(model_name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[model_name][0]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    event = magnitude_prune(model, 0.5, optimizer=opt)
    sizes = {n: weight_of(m).numel() for n, m in masked_modules(model).items()}
    assert sorted(sizes) == sorted(LAYERS[model_name])
    assert {n: d["pruned"] for n, d in event.details["layers"].items()} == {
        n: round(0.5 * s) for n, s in sizes.items()
    }
    before = {n: mask_of(m).clone() for n, m in masked_modules(model).items()}
    event = magnitude_prune(model, 0.7, scope="global", optimizer=opt)
    assert event.details["pruned"] == round(0.7 * sum(sizes.values()))
    for n, m in masked_modules(model).items():
        assert not bool((mask_of(m) & ~before[n]).any())  # never un-prunes
    model(batches(model_name, 1)[0]).pow(2).mean().backward()
    opt.step()
    assert_masked_zero(model, opt)


def test_structured_prune_cnn_shrinks_conv_bn_and_flatten_consumer() -> None:
    torch.manual_seed(0)
    model = CNN()
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    opt.step()
    event = structured_prune(model, "features.4", 0.25, optimizer=opt)
    assert event.details["old_width"] == 16 and event.details["new_width"] == 12
    assert model.features[4].out_channels == 12 and model.features[5].num_features == 12
    assert model.head[1].in_features == 48  # 12 channels x 2 x 2 through the Flatten
    assert opt.state[weight_of(model.get_submodule("features.4"))]["exp_avg"].shape == (12, 8, 3, 3)
    structured_prune(model, "features.0", 3, optimizer=opt)
    assert model.features[1].num_features == 5 and model.features[4].in_channels == 5
    model(x).sum().backward()
    opt.step()
    assert model(x).shape == (2, 10)
    with pytest.raises(Exception, match=r"cannot shrink \'head\.1\': its output is an output of"):
        structured_prune(model, "head.1", 1)
    with pytest.raises(ValueError, match=r"cannot remove 5 of the 5 units of \'features\.0\'"):
        structured_prune(model, "features.0", 5)
    with pytest.raises(TypeError, match=r"\'features\.1\' is a BatchNorm2d; expected one of"):
        structured_prune(model, "features.1", 1)


def test_structured_prune_residual_keeps_coupled_layers_in_step() -> None:
    torch.manual_seed(0)
    model = Residual().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    event = structured_prune(model, "block.fc1", 4, optimizer=opt)
    assert event.details["producers"] == ["block.fc1"]
    assert model.block.fc1.out_features == 12 and model.block.fc2.in_features == 12
    event = structured_prune(model, "inp", 0.25, optimizer=opt)
    assert sorted(event.details["producers"]) == ["block.fc2", "inp"]
    assert model.inp.out_features == 12 and model.block.fc2.out_features == 12
    assert model.block.fc1.in_features == 12 and model.out.in_features == 12
    out = model(torch.randn(5, 6, dtype=torch.float64))
    assert out.shape == (5, 3) and out.dtype == torch.float64


@pytest.mark.parametrize("mode", ["grad", "taylor"])
@pytest.mark.parametrize("model_name", ["cnn", "residual"])
def test_gradient_importance(model_name: str, mode: str) -> None:
    torch.manual_seed(0)
    model = MODELS[model_name][0]()
    imp = GradientImportance(model, mode=mode)
    x = batches(model_name, 1)[0]
    model(x).pow(2).mean().backward()
    imp.accumulate()
    for name in LAYERS[model_name]:
        w = weight_of(model.get_submodule(name))
        assert w.grad is not None
        expected = (w.grad * w).abs() if mode == "taylor" else w.grad.abs()
        assert torch.equal(imp.scores()[name], expected.detach())
    event = imp.prune(0.6, scope="global")
    sizes = {n: weight_of(model.get_submodule(n)).numel() for n in LAYERS[model_name]}
    assert event.details["pruned"] == round(0.6 * sum(sizes.values()))
    assert event.details["method"] == f"{mode}_importance"


def test_contribution_of_a_residual_block_matches_a_hand_computation() -> None:
    torch.manual_seed(0)
    model = Residual().train()
    x = torch.randn(8, 6)

    def loss(m: nn.Module, d: Tensor) -> Tensor:
        return m(d).pow(2).mean()

    with torch.no_grad():
        with_block = loss(model, x)
        without = model.out(torch.relu(model.inp(x))).pow(2).mean()
    got = contribution(model, "block", loss, x, mode="min")
    assert got == pytest.approx(float(without - with_block), rel=1e-6)
    assert model.training  # restored
    both = contributions(model, ["block.fc1", "inp"], loss, x, mode="min")
    assert sorted(both) == ["block.fc1", "inp"]
    cnn = CNN()
    assert set(contributions(cnn, ["features.4"], loss, torch.randn(2, 3, 8, 8))) == {"features.4"}
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'up'"):
        contribution(model, "block", loss, x, mode="up")


def test_lottery_ticket_rewinds_cnn_to_init() -> None:
    torch.manual_seed(0)
    model = CNN()
    opt = torch.optim.AdamW(model.parameters())
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)

    def train_round(m: nn.Module) -> None:
        for _ in range(2):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()

    ticket = LotteryTicket(model, opt, final_sparsity=0.8, rounds=2)
    events = ticket.run(train_round, final_train=False)
    total = sum(weight_of(model.get_submodule(n)).numel() for n in LAYERS["cnn"])
    assert events[-1].details["pruned"] == round(0.8 * total)
    assert opt.state == {}
    for k, v in model.state_dict().items():
        if k.endswith("weight_mask"):
            continue
        mask = model.state_dict().get(k + "_mask")
        assert torch.equal(v, init[k] if mask is None else init[k] * mask), k


def test_lottery_ticket_rewind_to_step_k_on_residual() -> None:
    torch.manual_seed(0)
    model = Residual()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ticket = LotteryTicket(model, opt, 0.75, 2, rewind=1, scope="layer")
    with pytest.raises(RuntimeError, match="no rewind point: training never reached step 1"):
        ticket.prune_round()
    assert masked_modules(model) == {}
    ticket.capture()
    ticket.run(lambda m: (m(torch.randn(3, 6)).sum().backward(), opt.step(), opt.zero_grad()))
    for n in LAYERS["residual"]:
        m = model.get_submodule(n)
        assert int((~mask_of(m)).sum()) == round(0.75 * weight_of(m).numel())


def test_gradual_magnitude_pruning_cnn() -> None:
    torch.manual_seed(0)
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gmp = GradualMagnitudePruning(model, opt, 0.9, start_step=0, end_step=10, frequency=2)
    x = torch.randn(2, 3, 8, 8)
    for step in range(1, 13):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        event = gmp.update(step)
        assert (event is not None) == (step in (2, 4, 6, 8, 10))
        if event is not None:
            for n, d in event.details["layers"].items():
                numel = weight_of(model.get_submodule(n)).numel()
                assert d["pruned"] == round(gmp.sparsity_at(step) * numel)
    assert_masked_zero(model, opt)
    assert {n: 1 - d for n, d in layer_density(model).items()} == pytest.approx(
        {n: round(0.9 * weight_of(model.get_submodule(n)).numel())
         / weight_of(model.get_submodule(n)).numel() for n in LAYERS["cnn"]}
    )  # fmt: skip


def test_overparameterize_then_prune_residual() -> None:
    torch.manual_seed(0)
    model = Residual()
    opt = torch.optim.Adam(model.parameters())
    otp = OverparameterizeThenPrune(model, opt, 0.9, total_steps=50)
    phases = []
    for step in range(1, 51):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        otp.update(step)
        phases.append(otp.phase)
    assert phases.count("train") == 30 and phases.count("prune") == 10
    assert phases[-1] == "finetune"
    total = sum(weight_of(model.get_submodule(n)).numel() for n in LAYERS["residual"])
    assert global_density(model) == (total - round(0.9 * total)) / total
    assert_masked_zero(model, opt)
