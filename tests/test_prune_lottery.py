"""Tests of dynarch.prune.LotteryTicket: iterative magnitude pruning with rewinding."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import Tensor, nn

import dynarch
from dynarch.callbacks import LambdaCallback
from dynarch.prune import LotteryTicket, structured_prune
from dynarch.train import Trainer
from models import mlp

LAYERS = ("0", "2", "4")
TOTAL = 60 + 120 + 36


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(steps)
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def masks(model: nn.Module) -> dict[str, Tensor]:
    return {n: model.get_submodule(n).weight_mask.clone() for n in LAYERS}


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_rewound(model: nn.Module, saved: dict[str, Tensor]) -> None:
    for name, p in model.named_parameters():
        layer = model.get_submodule(name.rsplit(".", 1)[0])
        mask = layer._buffers.get("weight_mask")
        if name.endswith("weight") and mask is not None:
            assert torch.equal(p[mask], saved[name][mask])
            assert bool((p[~mask] == 0).all())
        else:
            assert torch.equal(p, saved[name])


def test_rewind_to_init_exactly_at_unpruned_positions() -> None:
    model = mlp()
    init = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ticket = LotteryTicket(model, opt, final_sparsity=0.75, rounds=2)
    train_steps(model, opt)
    trained = torch.cat([model.get_submodule(n).weight.detach().abs().reshape(-1) for n in LAYERS])
    event = ticket.prune_round()
    assert event.op == "prune" and event.reason == "lottery ticket round 1/2"
    assert event.details["scope"] == "global" and event.details["pruned"] == round(0.5 * TOTAL)
    kept = torch.cat([m.reshape(-1) for m in masks(model).values()])
    assert float(trained[kept].min()) > float(trained[~kept].max())  # pruned by trained |w|
    assert_rewound(model, init)
    assert opt.state == {}  # rewinding clears momentum
    train_steps(model, opt)  # masked weights stay zero while training
    assert all(
        bool((model.get_submodule(n).weight[~m] == 0).all()) for n, m in masks(model).items()
    )


def test_rewind_to_step_k_with_trainer() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ticket = LotteryTicket(model, opt, 0.5, rounds=1, rewind=2, scope="layer")
    assert ticket.saved is None
    at_k: dict[str, Tensor] = {}

    def record(trainer: Trainer) -> None:
        if trainer.step == 2:
            at_k.update(snapshot(trainer.model))

    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    cbs = [ticket, LambdaCallback(on_step_end=record)]
    Trainer(model, opt, (x, y), batch_size=8, callbacks=cbs, progress=False).fit()
    assert not torch.equal(model[0].weight, at_k["0.weight"])  # trained past step 2
    event = ticket.prune_round()
    assert {n: d["pruned"] for n, d in event.details["layers"].items()} == {
        "0": 30, "2": 60, "4": 18,
    }  # fmt: skip
    assert_rewound(model, at_k)
    # A second pass through step 2 (next round's training) does not move the rewind point.
    Trainer(model, opt, (x, y), batch_size=8, callbacks=[ticket], progress=False).fit()
    assert all(torch.equal(ticket.saved[n], at_k[n]) for n in at_k)  # type: ignore[index]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_iterative_rounds_hit_target_and_never_unprune(scope: str) -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ticket = LotteryTicket(model, opt, 0.9, rounds=3, scope=scope)
    calls: list[int] = []
    seen: list[dict[str, Tensor]] = []

    def train(m: nn.Module) -> None:
        calls.append(ticket.rounds_done)
        if ticket.rounds_done:
            seen.append({n: ~mask for n, mask in masks(m).items()})
        train_steps(m, opt, steps=4)

    events = ticket.run(train)
    assert calls == [0, 1, 2, 3]  # three rounds, then the final training
    counts = [e.details["pruned"] for e in events]
    for r, count in enumerate(counts, start=1):
        if scope == "global":
            assert count == round(ticket.sparsity_after(r) * TOTAL)
        assert abs(count - ticket.sparsity_after(r) * TOTAL) <= 1.5
    assert counts == sorted(counts)
    final = TOTAL - sum(int(m.sum()) for m in masks(model).values())
    assert abs(final - 0.9 * TOTAL) <= 1
    assert ticket.rounds_done == 3
    for a, b in itertools.pairwise(seen):  # the pruned sets only grow
        assert all(bool((a[n] <= b[n]).all()) for n in LAYERS)


def test_pruned_set_only_grows_across_rounds() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ticket = LotteryTicket(model, opt, 0.95, rounds=4)
    seen: list[dict[str, Tensor]] = []
    for _ in range(4):
        with torch.no_grad():  # shuffle magnitudes so old masked positions would rank high
            for p in model.parameters():
                p.copy_(torch.randn(p.shape) * 5)
        ticket.prune_round()
        seen.append({n: ~m for n, m in masks(model).items()})
    for a, b in itertools.pairwise(seen):
        assert all(bool((a[n] <= b[n]).all()) for n in LAYERS)
    assert sum(int(m.sum()) for m in seen[-1].values()) == round(0.95 * TOTAL)


def test_schedule_values() -> None:
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ticket = LotteryTicket(model, opt, 0.936, rounds=3)
    assert ticket.per_round == pytest.approx(0.6)  # 0.4 ** 3 = 0.064
    assert [ticket.sparsity_after(r) for r in (0, 1, 2, 3, 4)] == [0.0, 0.6, 0.84, 0.936, 0.936]
    events = ticket.run(lambda m: None, final_train=False)
    assert [e.details["pruned"] for e in events] == [10, 13, 15]  # round(16 s_r)


def test_state_dict_round_trip() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ticket = LotteryTicket(model, opt, 0.5, rounds=2)
    ticket.prune_round()
    buf = io.BytesIO()
    torch.save(ticket.state_dict(), buf)
    buf.seek(0)
    other = LotteryTicket(model, opt, 0.5, rounds=2, rewind=3)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.rounds_done == 1 and other.saved is not None and ticket.saved is not None
    assert all(torch.equal(other.saved[n], t) for n, t in ticket.saved.items())
    with pytest.raises(ValueError, match=r"LotteryTicket state must have keys \['rounds_done',"):
        other.load_state_dict({"rounds_done": 1})
    with pytest.raises(ValueError, match=r"rounds_done must be an int in \[0, 2\], got 3"):
        other.load_state_dict({"rounds_done": 3, "saved": None})
    fresh = LotteryTicket(model, opt, 0.5, rounds=2, rewind=3)
    assert fresh.state_dict() == {"rounds_done": 0, "saved": None}


def test_lottery_errors() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got str"):
        LotteryTicket(model, "sgd", 0.5, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"final_sparsity must be a number in \[0, 1\)"):
        LotteryTicket(model, opt, 1.0, 2)
    with pytest.raises(ValueError, match="rounds must be an int >= 1, got 0"):
        LotteryTicket(model, opt, 0.5, 0)
    for bad in ("start", 0, True, 2.0):
        with pytest.raises(ValueError, match="rewind must be 'init' or a training step k >= 1"):
            LotteryTicket(model, opt, 0.5, 2, rewind=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown scope 'net'; allowed: 'layer', 'global'"):
        LotteryTicket(model, opt, 0.5, 2, scope="net")
    with pytest.raises(ValueError, match="include pattern 'fc' matches no Linear/Conv2d"):
        LotteryTicket(model, opt, 0.5, 2, include=["fc"])
    late = LotteryTicket(model, opt, 0.5, 2, rewind=5)
    with pytest.raises(RuntimeError, match="no rewind point: training never reached step 5"):
        late.prune_round()
    assert dynarch.history(model) == []  # nothing pruned
    ticket = LotteryTicket(model, opt, 0.5, 1)
    ticket.prune_round()
    with pytest.raises(RuntimeError, match="all 1 rounds are done"):
        ticket.prune_round()
    ticket = LotteryTicket(model, opt, 0.8, 2)
    structured_prune(model, "2", 2)
    with pytest.raises(RuntimeError, match=r"cannot rewind: \['2.weight', '2.bias', '4.weight'"):
        ticket.prune_round()
    assert [e.op for e in dynarch.history(model)] == ["prune", "shrink"]
