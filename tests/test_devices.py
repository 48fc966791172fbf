"""The main paths on every device this machine has: CPU always, CUDA when available.

Each test builds its model on the device before the optimizer, as users do, and checks the
results and that every tensor (parameters, masks, optimizer state, outputs) stays on it.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dynarch
from dynarch.callbacks import LambdaCallback
from dynarch.growth import (
    Tournament,
    add_patches,
    add_skip,
    clone_units,
    grow_proportional,
    highways,
    layer_mi,
)  # fmt: skip
from dynarch.masks import sparsify
from dynarch.prune import (
    GradientImportance,
    GradualMagnitudePruning,
    LotteryTicket,
    magnitude_prune,
    structured_prune,
)  # fmt: skip
from dynarch.schedules import GrowAsNeeded
from dynarch.sparse import ALGORITHMS, DynamicSparseLinear, make_rewirer
from dynarch.train import Trainer
from dynarch.triggers import Budget, Extrema, GradientVarianceSpike, Plateau, Utilization

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def _mlp(device: torch.device, widths: tuple[int, ...] = (6, 12, 10, 3)) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers).to(device)


def _cnn(device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3),
    ).to(device)  # fmt: skip


def get_mask(module: nn.Module) -> Tensor | None:
    return getattr(module, "weight_mask", None)


def _data(device: torch.device, n: int = 64, d: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    return x.to(device), ((x[:, 0] > 0).long() + (x[:, 1] > 0).long()).to(device)


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _on(device: torch.device, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
    """Every parameter, buffer and optimizer-state tensor of ``model`` is on ``device``."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device.type == device.type, name
    for p, state in opt.state.items() if opt is not None else ():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != "step":
                assert value.device.type == device.type, key
        assert p.device.type == device.type


def test_surgery_preserves_function_and_keeps_state_on_device(device: torch.device) -> None:
    x, y = _data(device)
    model = _mlp(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, x, y, 2)
    model.eval()
    before = model(x).detach()
    dynarch.widen(model, "0", 16, optimizer=opt)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    dynarch.deepen(model, "2", optimizer=opt)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert model[0].weight.shape == (16, 6) and opt.state[model[0].weight]["exp_avg"].shape == (
        16, 6,
    )  # fmt: skip
    dynarch.shrink(model, "0", [0, 2, 4, 6, 8, 10], optimizer=opt)
    assert model[0].weight.shape == (6, 6)
    _on(device, model, opt)
    model.train()
    _train(model, opt, x, y, 1)
    _on(device, model, opt)


def test_attach_at_zero_alpha_preserves_the_cnn(device: torch.device) -> None:
    model = _cnn(device)
    x = torch.randn(4, 3, 8, 8).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, x, torch.tensor([0, 1, 2, 0], device=device), 2)
    model.eval()
    before = model(x).detach()
    dynarch.attach(model, "after:2", nn.Conv2d(6, 6, 3, padding=1).to(device), optimizer=opt)
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
    dynarch.widen(model, "0", 9, optimizer=opt)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    _on(device, model, opt)


@pytest.mark.parametrize("variant", [*ALGORITHMS, "deep_r-bellec"])
def test_rewirers_keep_counts_and_zeros(device: torch.device, variant: str) -> None:
    name, _, bellec = variant.partition("-")
    x, y = _data(device)
    kwargs = {"variant": "bellec"} if bellec else {}

    def run(steps: int, state: dict | None = None) -> tuple[nn.Module, object]:
        model = _mlp(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rw = make_rewirer(name, model, opt, density=0.3, delta_t=2, t_end=100, **kwargs)
        if state is not None:
            state = copy.deepcopy(state)  # optimizer.load_state_dict aliases state tensors
            rw.load_state_dict(state["rw"])
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        counts = {
            n: int(m.weight_mask.sum()) for n, m in model.named_modules() if get_mask(m) is not None
        }
        total = sum(counts.values())
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            rw.step()
            for n, m in model.named_modules():
                mask = get_mask(m)
                if mask is not None:
                    assert mask.device.type == device.type
                    assert name == "snfs" or int(mask.sum()) == counts[n], n
                    assert torch.all(m.weight[~mask.bool()] == 0), n
            assert sum(int(m.weight_mask.sum()) for m in model if get_mask(m) is not None) == total
        return model, (rw, opt)

    model, (rw, opt) = run(6)
    assert rw.current_step == 6  # type: ignore[attr-defined]
    _on(device, model, opt)  # type: ignore[arg-type]
    state = {"rw": rw.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}  # type: ignore[attr-defined]
    after, _ = run(4, state)
    again, _ = run(4, state)
    for (n, a), (_, b) in zip(after.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_dynamic_sparse_linear_rewires_on_device(device: torch.device) -> None:
    torch.manual_seed(0)
    layer = DynamicSparseLinear(8, 5, density=0.4, device=device)
    active = int(layer.weight_mask.sum())
    for method in ("set", "deep_r"):
        layer(torch.randn(3, 8, device=device)).sum().backward()
        layer.store_gradients()
        layer.rewire(method=method, prune_rate=0.5)
        assert (
            int(layer.weight_mask.sum()) == active and layer.weight_mask.device.type == device.type
        )
        assert torch.all(layer.weight[~layer.weight_mask.bool()] == 0)


def test_pruners_on_device(device: torch.device) -> None:
    x, y = _data(device)
    model = _mlp(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, x, y, 2)
    magnitude_prune(model, 0.5, scope="global", optimizer=opt)
    total = sum(int(get_mask(m).numel()) for m in model if get_mask(m) is not None)
    assert (
        sum(int(get_mask(m).sum()) for m in model if get_mask(m) is not None) == total - total // 2
    )
    magnitude_prune(model, 0.75, scope="layer", optimizer=opt)
    assert int(get_mask(model[0]).sum()) == 72 - 54
    structured_prune(model, "2", 4, optimizer=opt)
    assert model[2].weight.shape == (6, 12) and model[4].weight.shape == (3, 6)
    importance = GradientImportance(model)
    F.cross_entropy(model(x), y).backward()
    importance.accumulate()
    scores = importance.scores()
    assert all(s.device.type == device.type for s in scores.values())
    _train(model, opt, x, y, 1)
    _on(device, model, opt)

    model = _mlp(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ticket = LotteryTicket(model, opt, final_sparsity=0.5, rounds=2)
    events = ticket.run(lambda m: _train(m, opt, x, y, 2))
    assert [e.details["pruned"] for e in events] == [65, 111]  # 29% then 50% of 222 weights
    _on(device, model, opt)

    model = _mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gmp = GradualMagnitudePruning(model, opt, 0.8, start_step=0, end_step=6, frequency=2)
    Trainer(model, opt, (x.cpu(), y.cpu()), batch_size=16, max_steps=8, epochs=5, device=device,
            callbacks=[gmp], progress=False).fit()  # fmt: skip
    masks = [get_mask(m) for m in model if get_mask(m) is not None]
    assert sum(int(m.sum()) for m in masks) == round(0.2 * sum(m.numel() for m in masks))
    _on(device, model, opt)


def test_growth_methods_on_device(device: torch.device) -> None:
    x, y = _data(device, n=128)
    model = _mlp(device, (6, 12, 10, 10, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsify(model, 0.3, optimizer=opt)
    _train(model, opt, x, y, 3)
    model.eval()
    before = model(x).detach()
    add_patches(model, {"2": [0, 1]}, optimizer=opt, patch_size=3)
    torch.testing.assert_close(model(x), before)  # zero-initialised connections
    clone_units(model, "2", [1], optimizer=opt)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    highways(model, {"2": [0]}, optimizer=opt)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    add_skip(model, "0", "6", optimizer=opt, density=0.5)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    grow_proportional(model, 0.1, optimizer=opt)
    _on(device, model, opt)
    mi = layer_mi(model, x, y)
    assert mi and all(v >= 0 for v in mi.values())
    model.train()
    _train(model, opt, x, y, 1)
    _on(device, model, opt)

    model = _mlp(device, (6, 8, 8, 3))
    t = Tournament(model, data=(x, y), seed=0, widen_units=2, insert_density=0.25, probe_steps=2)
    event = t.run(torch.optim.Adam(model.parameters()))
    assert event is not None
    model(x)
    _on(device, model)


def test_triggers_on_device(device: torch.device) -> None:
    x, y = _data(device)
    model = _mlp(device)
    ex, util = Extrema(model), Utilization(model)
    ex.observe(x)
    util.observe(x)
    stats = ex.statistics("0")
    assert stats is not None and float(stats["count"]) == 64
    assert 0.0 <= util.utilization()["0"] <= 1.0
    spike = GradientVarianceSpike(model, warmup=1)
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        spike.observe()
    budget = Budget(max_params=1000, model=model)
    assert budget.headroom(model)["params"] == 1000 - sum(p.numel() for p in model.parameters())


def test_trainer_grows_and_rewires_then_resumes_exactly(
    device: torch.device, tmp_path: Path
) -> None:
    x, y = _data(torch.device("cpu"), n=96)

    def trainer(model: nn.Module, opt: torch.optim.Optimizer, stop: int) -> Trainer:
        rw = make_rewirer("rigl", model, opt, density=0.5, delta_t=2)
        grow = GrowAsNeeded(Plateau(patience=1, threshold=10.0), "widen", layers=["0"], amount=2)

        def halt(t: Trainer) -> None:
            t.should_stop = t.should_stop or t.step == stop

        return Trainer(model, opt, (x, y), eval=(x, y), batch_size=32, epochs=4, device=device,
                       seed=3, callbacks=[rw, grow, LambdaCallback(on_step_end=halt)],
                       progress=False)  # fmt: skip

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = _mlp(device)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, opt = build()
    full = trainer(model, opt, -1).fit()
    assert [e.op for e in dynarch.history(model)].count("widen") == 1  # it grew at step 6
    _on(device, model, opt)

    model, opt = build()
    first = trainer(model, opt, 5).fit()  # interrupted mid-epoch
    dynarch.save(tmp_path / "ck", model, opt, trainer=first.state_dict())
    ck = dynarch.load(tmp_path / "ck", map_location=device)
    resumed_opt = ck.load_optimizer(torch.optim.Adam(ck.model.parameters(), lr=1e-2))
    second = trainer(ck.model, resumed_opt, -1)
    second.load_state_dict(ck.state["trainer"])
    ck.restore_rng()
    second.fit()
    _on(device, ck.model, resumed_opt)
    assert second.step == full.step == 12
    assert [e.op for e in dynarch.history(ck.model)] == [e.op for e in dynarch.history(full.model)]
    for (n, a), (_, b) in zip(
        full.model.state_dict().items(), ck.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), n
    on_cpu = dynarch.load(tmp_path / "ck", map_location="cpu").model
    assert all(t.device.type == "cpu" for t in on_cpu.state_dict().values())


def test_compiled_sparse_model_keeps_its_graph_through_an_update(device: torch.device) -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    x, y = _data(device)
    model = _mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = make_rewirer("set", model, opt, density=0.3, delta_t=1, anneal="constant")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
        assert rw.step() is not None  # an update every step
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    torch._dynamo.reset()
