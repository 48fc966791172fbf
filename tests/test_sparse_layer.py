"""DynamicSparseLinear: the design document's per-layer API on the shared engine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynarch._engine import history, set_seed
from dynarch.masks import enforce, get_enforcer, is_sparse, masked_modules
from dynarch.sparse import DynamicSparseLinear, RigL


def layer(density: float = 0.2, seed: int = 0) -> DynamicSparseLinear:
    torch.manual_seed(seed)
    return DynamicSparseLinear(20, 10, density=density)


def backward(lin: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    F.mse_loss(lin(torch.randn(8, 20, generator=g)), torch.randn(8, 10, generator=g)).backward()


def test_is_a_masked_linear_with_exact_count() -> None:
    lin = layer(0.2)
    assert isinstance(lin, nn.Linear) and is_sparse(lin) and list(masked_modules(lin)) == [""]
    assert int(lin.weight_mask.sum()) == 40 and lin.get_sparsity() == 0.8
    assert not bool(lin.weight[~lin.weight_mask].any())
    assert lin.weight_mask.dtype == torch.bool and "weight_mask" in lin.state_dict()
    assert (
        repr(lin) == "DynamicSparseLinear(in_features=20, out_features=10, bias=True, density=0.2)"
    )
    assert DynamicSparseLinear(3, 1, density=0.01, bias=False).weight_mask.sum() == 1  # >= 1
    torch.manual_seed(1)
    a = DynamicSparseLinear(20, 10, density=0.2)
    torch.manual_seed(1)
    b = DynamicSparseLinear(20, 10, density=0.2)
    assert torch.equal(a.weight_mask, b.weight_mask)  # torch.manual_seed controls the mask


def test_forward_rezeroes_weights_a_plain_optimizer_moved() -> None:
    lin = layer()
    opt = torch.optim.SGD(lin.parameters(), lr=0.5, momentum=0.9)  # no enforce
    backward(lin)
    opt.step()
    assert bool(lin.weight[~lin.weight_mask].any())  # dense update landed on masked weights
    out = lin(torch.ones(1, 20))
    assert not bool(lin.weight[~lin.weight_mask].any())
    assert torch.allclose(out, F.linear(torch.ones(1, 20), lin.weight * lin.weight_mask, lin.bias))
    assert lin.weight.grad is not None and bool(lin.weight.grad[~lin.weight_mask].any())  # dense


def test_store_gradients_and_rewire_set() -> None:
    lin = layer()
    with pytest.raises(ValueError, match=r"store_gradients: weight.grad is None; call loss.back"):
        lin.store_gradients()
    backward(lin)
    lin.store_gradients()
    assert lin.stored_grad is not None and torch.equal(lin.stored_grad, lin.weight.grad)
    assert lin.stored_grad is not lin.weight.grad
    w = lin.weight.detach().clone()
    active = w[lin.weight_mask].abs().sort().values
    event = lin.rewire("set", prune_rate=0.25)
    assert event.details[""] == {"dropped": 10, "regrown": 10, "active": 40, "density": 0.2}
    assert history(lin)[-1] is event and event.reason == "set"
    survivors = lin.weight_mask & (lin.weight != 0)
    assert int(lin.weight_mask.sum()) == 40 and int(survivors.sum()) == 30
    assert float(lin.weight.detach()[survivors].abs().min()) >= float(active[9])  # 10 smallest gone


def test_rewire_deep_r_follows_the_gradient_at_low_temperature() -> None:
    lin = layer()
    backward(lin)
    grad = torch.zeros(10, 20)
    inactive = (~lin.weight_mask).nonzero()
    for rank, (i, j) in enumerate(inactive[:5].tolist()):
        grad[i, j] = 100.0 + rank  # five standout gradients at inactive positions
    lin.weight.grad = grad
    lin.store_gradients()
    lin.weight.grad = None  # rewire uses the stored copy
    lin.rewire("deep_r", prune_rate=0.125, temperature=1e-3)
    assert all(bool(lin.weight_mask[i, j]) for i, j in inactive[:5].tolist())
    assert int(lin.weight_mask.sum()) == 40


def test_rewire_resets_optimizer_state_and_resyncs_the_enforcer() -> None:
    lin = layer()
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    enforce(lin, opt)
    for s in range(3):
        opt.zero_grad()
        backward(lin, s)
        opt.step()
    before = lin.weight_mask.clone()
    set_seed(lin, 5)
    lin.rewire("set", prune_rate=0.5, optimizer=opt, regrow_init="random")
    changed = lin.weight_mask ^ before
    for v in opt.state[lin.weight].values():
        if v.shape == lin.weight.shape:
            assert not bool(v[changed | ~lin.weight_mask].any())
    grown = lin.weight_mask & ~before
    assert bool((lin.weight.detach()[grown] != 0).all())  # random init, within the default bound
    assert float(lin.weight.detach()[grown].abs().max()) < 1 / 20**0.5
    enforcer = get_enforcer(lin, opt)
    assert enforcer is not None
    opt.zero_grad()
    backward(lin, 9)
    opt.step()
    assert not bool(lin.weight[~lin.weight_mask].any())


def test_works_inside_a_model_with_a_rewirer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        DynamicSparseLinear(20, 32, 0.3), nn.ReLU(), DynamicSparseLinear(32, 10, 0.5)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rw = RigL(model, opt, delta_t=1, anneal="constant")  # uses the layers' own masks
    assert rw.layer_names == ["0", "2"]
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(torch.randn(8, 20)), torch.randn(8, 10)).backward()
        opt.step()
        rw.step()
    assert [int(m.weight_mask.sum()) for m in (model[0], model[2])] == [192, 160]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "rigl"}, "unknown method 'rigl'; allowed: 'set', 'deep_r'"),
        ({"prune_rate": 1.5}, "prune_rate must be a number in [0, 1], got 1.5"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
        (
            {"regrow_init": "one"},
            "unknown regrow_init 'one'; allowed: 'zero', 'random', 'gradient'",
        ),
        ({"method": "deep_r"}, "rewire(method='deep_r', regrow_init='zero') needs a gradient"),
    ],
)
def test_rewire_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        layer().rewire(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape("density must be a number in (0, 1], got 0")):
        DynamicSparseLinear(2, 2, density=0)


def test_a_stored_gradient_serves_the_next_rewire_only() -> None:
    layer = DynamicSparseLinear(6, 5, density=0.4)
    layer.weight.grad = torch.ones_like(layer.weight)
    layer.store_gradients()
    layer.rewire("deep_r", prune_rate=0.5)
    assert layer.stored_grad is None
    layer.weight.grad = None
    with pytest.raises(ValueError, match=r"needs a gradient: call loss.backward\(\)"):
        layer.rewire("deep_r")  # the copy was used: nothing stale is reused


def test_rewires_inside_a_trained_model_are_the_models_events(tmp_path: Path) -> None:
    import dynarch
    from dynarch.callbacks import LambdaCallback

    torch.manual_seed(0)
    model = nn.Sequential(DynamicSparseLinear(6, 4, 0.5), nn.ReLU(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    cb = LambdaCallback(on_step_end=lambda t: model[0].rewire("set", optimizer=opt))
    dynarch.fit(model, opt, (x, y), epochs=1, batch_size=8, callbacks=[cb], run_dir=tmp_path,
                progress=False)  # fmt: skip
    events = [e for e in dynarch.history(model) if e.op == "rewire"]
    assert [(e.step, e.target, list(e.details)) for e in events] == [
        (1, "0", ["0"]),
        (2, "0", ["0"]),
    ]
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["op"] for line in lines] == ["rewire", "rewire"]
    other = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not a submodule of the model given; pass the model"):
        model[0].rewire("set", model=other)
    alone = DynamicSparseLinear(4, 4, 0.5)
    assert alone.rewire("set").target == "*" and len(dynarch.history(alone)) == 1
