"""Contribution: exact counterfactual values, firing, state, errors."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynarch.prune import contribution
from dynarch.triggers import TRIGGERS, Contribution, make_trigger


class TwoPaths(nn.Module):
    """logits = a(x) + b(x); ``a`` outputs zeros, ``b`` is the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)
        with torch.no_grad():
            self.a.weight.zero_()
            self.a.bias.zero_()
            self.b.weight.copy_(torch.eye(2))
            self.b.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.b(x)


X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
Y = torch.tensor([0, 1, 0, 1])


def test_accuracy_contribution_exact_and_fires_below_threshold() -> None:
    model = TwoPaths()
    # without b every logit is 0 -> argmax 0 -> accuracy 0.5 instead of 1.0
    helps = Contribution(model, "b", (X, Y), threshold=0.1)
    useless = Contribution(model, "a", (X, Y), threshold=0.1)
    assert (helps.update(), helps.last, helps.where()) == (False, 0.5, [])
    assert (useless.update(), useless.last, useless.where()) == (True, 0.0, ["a"])
    accuracy = lambda m, d: (m(d[0]).argmax(1) == d[1]).float().mean()  # noqa: E731
    assert helps.last == contribution(model, "b", accuracy, (X, Y))


def test_loss_metric_is_lower_is_better() -> None:
    model = TwoPaths()
    trigger = Contribution(model, "b", (X, Y), metric="loss", threshold=0.0)
    assert trigger.update() is False
    expected = F.cross_entropy(torch.zeros(4, 2), Y) - F.cross_entropy(X, Y)  # without - with
    assert trigger.last == pytest.approx(float(expected), abs=1e-6)
    assert trigger.last == pytest.approx(math.log(2) - float(F.cross_entropy(X, Y)), abs=1e-6)


def test_callable_metric_and_mode_match_prune_contribution() -> None:
    model = TwoPaths()

    def mse(m: nn.Module, data: tuple[Tensor, Tensor]) -> Tensor:
        return (m(data[0]) - F.one_hot(data[1], 2).float()).pow(2).mean()

    trigger = Contribution(model, "b", (X, Y), metric=mse, mode="min", threshold=1.0)
    assert trigger.update() is True  # it helps, but by less than 1.0
    assert trigger.last == contribution(model, "b", mse, (X, Y), mode="min")
    assert trigger.where() == ["b"]
    higher = Contribution(model, "b", (X, Y), metric=lambda m, d: -mse(m, d))  # mode "max"
    assert higher.measure() == trigger.last


def test_module_is_looked_up_at_every_measurement_and_modes_restored() -> None:
    model = TwoPaths()
    model.train()
    trigger = Contribution(model, "b", (X, Y))
    assert trigger.measure() == 0.5
    assert model.training and model.b.training
    model.b = nn.Linear(2, 2)  # replaced, e.g. by surgery
    with torch.no_grad():
        model.b.weight.zero_()
        model.b.bias.zero_()
    assert trigger.measure() == 0.0


def test_state_round_trip_and_reset() -> None:
    model = TwoPaths()
    trigger = make_trigger("contribution", model=model, module_name="a", data=(X, Y))
    assert isinstance(trigger, Contribution) and TRIGGERS["contribution"] is Contribution
    assert trigger.state_dict() == {"last": None}
    trigger.update()
    buf = io.BytesIO()
    torch.save(trigger.state_dict(), buf)
    buf.seek(0)
    fresh = Contribution(model, "a", (X, Y), threshold=0.0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.last == 0.0 and fresh.where() == []  # 0.0 is not below threshold 0.0
    assert fresh.update() == trigger.update() is False
    fresh.reset()
    assert fresh.last is None and fresh.where() == []
    with pytest.raises(ValueError, match=r"Contribution state must have keys \['last'\]"):
        fresh.load_state_dict({})


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (("c", (X, Y)), {}, KeyError, "model has no submodule named 'c'"),
        ((3, (X, Y)), {}, TypeError, "module_name must be a submodule name .str., got 3"),
        (
            ("a", (X, Y)),
            {"metric": "f1"},
            ValueError,
            r"metric must be one of \['accuracy', 'loss'\] or a callable .*, got 'f1'",
        ),
        (
            ("a", (X, Y)),
            {"mode": "min"},
            ValueError,
            r"metric 'accuracy' is higher-is-better \(mode 'max'\); mode='min' contradicts it",
        ),
        (
            ("a", X),
            {},
            ValueError,
            r"metric 'accuracy' needs data as a held-out \(x, y\) pair .*, got a tensor of "
            r"shape \(4, 2\)",
        ),
        (
            ("a", (X, Y[:3])),
            {"metric": "loss"},
            ValueError,
            r"needs data .* same number of samples, got a tuple of \(tensor\(4, 2\), "
            r"tensor\(3,\)\)",
        ),
        (
            ("a", X),
            {"metric": lambda m, d: 0.0, "mode": "best"},
            ValueError,
            "mode must be 'min' or 'max', got 'best'",
        ),
        (("a", (X, Y)), {"threshold": math.inf}, ValueError, "threshold must be a finite number"),
    ],
)
def test_validates_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Contribution(TwoPaths(), *args, **kwargs)
