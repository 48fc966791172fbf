"""Tests of dynarch.prune importance: gradient importance and counterfactual contribution."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import dynarch
from dynarch.callbacks import LambdaCallback
from dynarch.prune import GradientImportance, contribution, contributions, structured_prune
from dynarch.train import Trainer
from models import mlp

INPUTS = [[[1.0, 1.0]], [[2.0, -1.0]], [[-3.0, 0.5]]]
WEIGHTS = [[[1.0, -2.0]], [[0.5, 1.0]], [[-1.0, 4.0]]]


def test_grad_and_taylor_equal_hand_sums_over_three_steps() -> None:
    layer = nn.Linear(2, 1, bias=False)
    grad, taylor = GradientImportance(layer, "grad"), GradientImportance(layer, "taylor")
    for x, w in zip(INPUTS, WEIGHTS):
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(w))
        layer.zero_grad()
        layer(torch.tensor(x)).sum().backward()  # grad = x
        grad.accumulate()
        taylor.accumulate()
    # |x1| + |x2| + |x3| and |w1 x1| + |w2 x2| + |w3 x3|
    assert grad.scores()[""].tolist() == [[6.0, 2.5]]
    assert taylor.scores()[""].tolist() == [[5.0, 5.0]]
    assert grad.steps == taylor.steps == 3
    assert grad.scores()[""].dtype == torch.float32


def test_works_as_trainer_callback() -> None:
    model = mlp()
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    seen: list[dict[str, Tensor]] = []

    def record(trainer: Trainer) -> None:
        layers = {n: trainer.model.get_submodule(n) for n in ("0", "2", "4")}
        seen.append({n: (m.weight.grad * m.weight).abs().clone() for n, m in layers.items()})

    imp = GradientImportance(model, "taylor", exclude=["4"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cbs = [LambdaCallback(on_after_backward=record), imp]
    Trainer(model, opt, (x, y), batch_size=8, epochs=1, callbacks=cbs, progress=False).fit()
    assert imp.steps == 3 and sorted(imp.scores()) == ["0", "2"]
    for name in ("0", "2"):
        expected = seen[0][name] + seen[1][name] + seen[2][name]
        assert torch.allclose(imp.scores()[name], expected, rtol=1e-6, atol=0)
    event = imp.prune(0.5, scope="global", optimizer=opt)
    assert event.details["method"] == "taylor_importance" and event.reason == "taylor importance"
    flat = torch.cat([imp.scores()[n].reshape(-1) for n in ("0", "2")])
    masks = torch.cat([model.get_submodule(n).weight_mask.reshape(-1) for n in ("0", "2")])
    assert int(masks.sum()) == 90  # 180 weights, half kept
    assert float(flat[masks].min()) >= float(flat[~masks].max())  # the highest scores stay


def test_state_dict_round_trip_and_reset() -> None:
    model = mlp()
    imp = GradientImportance(model, "grad")
    model(torch.randn(4, 6)).sum().backward()
    imp.accumulate()
    buf = io.BytesIO()
    torch.save(imp.state_dict(), buf)
    buf.seek(0)
    other = GradientImportance(model, "grad")
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.steps == 1
    assert all(torch.equal(other.scores()[n], s) for n, s in imp.scores().items())
    assert sorted(other.scores()) == ["0", "2", "4"]
    with pytest.raises(ValueError, match="saved with mode 'grad' but this callback uses mode"):
        GradientImportance(model, "taylor").load_state_dict(imp.state_dict())
    with pytest.raises(ValueError, match=r"GradientImportance state must have keys \['mode',"):
        other.load_state_dict({"steps": 1})
    other.reset()
    assert other.scores() == {} and other.steps == 0


def test_layers_that_change_shape_restart() -> None:
    model = mlp()
    imp = GradientImportance(model, "grad")
    model(torch.randn(4, 6)).sum().backward()
    imp.accumulate()
    structured_prune(model, "0", 4)
    with pytest.raises(ValueError, match=r"layers \['0', '2'\] changed shape since their"):
        imp.prune(0.5)
    model.zero_grad()
    model(torch.randn(4, 6)).sum().backward()
    imp.accumulate()
    assert torch.equal(imp.scores()["0"], model[0].weight.grad.abs())  # fresh start
    imp.prune(0.5)
    assert model[0].weight_mask.shape == (6, 6)


def test_importance_errors() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"unknown mode 'hessian'; allowed: 'grad', 'taylor'"):
        GradientImportance(model, "hessian")
    imp = GradientImportance(model)
    with pytest.raises(ValueError, match=r"no gradient importance accumulated for layers \['0'"):
        imp.prune(0.5)
    imp.accumulate()  # no grads yet: counts the step, scores nothing
    assert imp.steps == 1 and imp.scores() == {}
    assert dynarch.history(model) == []


# --- contribution ----------------------------------------------------------------------


def two_linear() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))


def mean_out(model: nn.Module, data: Tensor) -> Tensor:
    return model(data).mean()


def test_contribution_equals_hand_difference() -> None:
    model = two_linear()
    x = torch.randn(5, 3)
    with torch.no_grad():
        with_ = float(model.eval()(x).mean())
        without_first = float(model[2].bias.mean())  # layer 2 sees zeros: only its bias
        without_last = 0.0
    model.train()
    assert contribution(model, "0", mean_out, x) == with_ - without_first
    assert contribution(model, "0", mean_out, x, mode="min") == without_first - with_
    assert contributions(model, ["0", "2"], mean_out, x) == {
        "0": with_ - without_first,
        "2": with_ - without_last,
    }


def test_contribution_leaves_model_unchanged() -> None:
    model = two_linear()
    model.train()
    model[1].eval()  # mixed flags are restored one by one
    params = {n: p.clone() for n, p in model.state_dict().items()}
    calls = []

    def metric(m: nn.Module, d: Tensor) -> float:
        calls.append(m.training)
        assert not torch.is_grad_enabled()
        return float(m(d).sum())

    contributions(model, ["0", "1", "2"], metric, torch.randn(2, 3))
    assert calls == [False] * 4  # one baseline, then one per module
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert all(torch.equal(p, params[n]) for n, p in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())
    assert "forward" not in vars(model[0])  # never monkeypatched

    def failing(m: nn.Module, d: Tensor) -> float:
        if m[0]._forward_hooks:
            raise RuntimeError("metric failed")
        return 0.0

    with pytest.raises(RuntimeError, match="metric failed"):
        contribution(model, "0", failing, torch.randn(2, 3))
    assert all(not m._forward_hooks for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]


class Pair(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor]]:
        return x + 1, (x * 2,)


class Both(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()

    def forward(self, x: Tensor) -> Tensor:
        a, (b,) = self.pair(x)
        return a + b + 1


def test_contribution_zeroes_tuple_outputs() -> None:
    x = torch.ones(2, 2)
    # with: (1+1) + 2 + 1 = 5 per entry; without: 0 + 0 + 1.
    assert contribution(Both(), "pair", lambda m, d: m(d).mean(), x) == 4.0


class Dict(nn.Module):
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"x": x}


def test_contribution_errors() -> None:
    model = two_linear()
    x = torch.randn(2, 3)
    with pytest.raises(KeyError, match="model has no submodule named 'fc'"):
        contribution(model, "fc", mean_out, x)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'up'"):
        contribution(model, "0", mean_out, x, mode="up")
    bad: Any = lambda m, d: m(d)  # noqa: E731
    with pytest.raises(TypeError, match="metric_fn must return a number or a one-element tensor"):
        contribution(model, "0", bad, x)
    wrapped = nn.Sequential(Dict())
    with pytest.raises(TypeError, match="cannot zero the output of Dict: it returned a dict"):
        contribution(wrapped, "0", lambda m, d: float(m(d)["x"].sum()), x)
    assert all(not m._forward_hooks for m in wrapped.modules())
