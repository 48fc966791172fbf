"""Budget: exact parameter and FLOP counts (masked or not), decisions, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from dynarch.masks import sparsify
from dynarch.surgery import widen
from dynarch.triggers import TRIGGERS, Budget, make_trigger


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # 40 + 18 = 58 params


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )


def test_dense_counts_and_decisions() -> None:
    model = _mlp()
    budget = Budget(max_params=60, max_flops=50, input_shape=(4,))
    assert (budget.count(model), budget.flops(model)) == (58, 32 + 16)
    assert budget.headroom(model) == {"params": 2, "flops": 2}
    assert budget.can_grow(model, 2) and not budget.can_grow(model, 3)
    assert budget.can_grow(model, nn.Linear(1, 1))  # 2 parameters
    assert not budget.can_grow(model, nn.Linear(2, 1))  # 3 parameters
    assert budget.can_grow(model, 0, flops=2) and not budget.can_grow(model, 0, flops=3)
    assert budget.must_prune(model) is False
    assert Budget(max_params=57).must_prune(model) is True
    assert Budget(max_flops=47, input_shape=(4,)).must_prune(model) is True
    assert Budget(max_params=58).headroom(model) == {"params": 0}


def test_masked_layers_count_active_positions_only() -> None:
    model = _mlp()
    sparsify(model, 0.5, distribution="uniform")  # 16 of 32 and 8 of 16 weights active
    sparse = Budget(max_params=100, max_flops=100, input_shape=(4,))
    dense = Budget(max_params=100, max_flops=100, input_shape=(4,), count_masked=True)
    assert (sparse.count(model), sparse.flops(model)) == (58 - 16 - 8, 16 + 8)
    assert (dense.count(model), dense.flops(model)) == (58, 48)
    # masks change in place (no structural change): the active counts are re-read every time
    with torch.no_grad():
        model[0].weight_mask.zero_()
    assert (sparse.count(model), sparse.flops(model)) == (58 - 32 - 8, 8)
    # a new module's masks count the same way
    new = nn.Linear(2, 2)
    sparsify(new, 0.5, distribution="uniform")
    assert (sparse.count(new), dense.count(new)) == (4, 6)


def test_conv_flops_count_output_positions() -> None:
    model = _cnn()
    budget = Budget(max_flops=10**6, input_shape=(1, 4, 4))
    # conv: 18 weights at 4*4 positions; linear: 32*3 weights once
    assert budget.flops(model) == 18 * 16 + 96
    sparsify(model, 0.5, distribution="uniform")
    assert budget.flops(model) == 9 * 16 + 48


def test_layer_applied_twice_counts_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.fc(x))

    assert Budget(max_flops=100, input_shape=(3,)).flops(Twice()) == 18


def test_structural_change_recounts() -> None:
    model = _mlp()
    budget = Budget(max_params=100, max_flops=100, input_shape=(4,))
    assert budget.headroom(model) == {"params": 42, "flops": 52}
    widen(model, "0", 10)  # 4*10+10 + 10*2+2 = 72 params, 40 + 20 flops
    assert budget.headroom(model) == {"params": 28, "flops": 40}


def test_flops_pass_restores_modes_and_leaves_state_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    before = model[1].running_mean.clone()
    assert Budget(max_flops=100, input_shape=(3,)).flops(model) == 12 + 8
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, before)
    assert all(not m._forward_hooks for m in model.modules())


def test_update_fires_when_over_budget() -> None:
    model = _mlp()
    budget = make_trigger("budget", max_params=58, model=model)
    assert isinstance(budget, Budget) and TRIGGERS["budget"] is Budget
    assert budget.update() is False
    widen(model, "0", 9)
    assert budget.update(0.5) is True  # the value is ignored
    budget.reset()  # stateless
    assert budget.state_dict() == {}
    budget.load_state_dict({})
    assert budget.update() is True
    with pytest.raises(ValueError, match=r"Budget state must have keys \[\], got \['x'\]"):
        budget.load_state_dict({"x": 1})
    with pytest.raises(
        ValueError,
        match=r"Budget.update needs the model to check: build Budget\(\.\.\., model=model\)",
    ):
        Budget(max_params=1).update()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "Budget needs max_params and/or max_flops; both are None"),
        ({"max_params": -1}, "max_params must be None or an int >= 0, got -1"),
        ({"max_params": 1.5}, "max_params must be None or an int >= 0, got 1.5"),
        ({"max_flops": -2, "input_shape": (4,)}, "max_flops must be None or an int >= 0, got -2"),
        ({"max_flops": 10}, r"max_flops needs input_shape \(the shape of one sample"),
        (
            {"max_params": 1, "input_shape": (0, 3)},
            r"input_shape must be .* such as \(784,\) or \(1, 28, 28\); got \(0, 3\)",
        ),
        ({"max_params": 1, "input_shape": "784"}, "input_shape must be .*; got '784'"),
        ({"max_params": 1, "count_masked": 1}, "count_masked must be True or False, got 1"),
    ],
)
def test_validates_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Budget(**kwargs)


def test_usage_errors() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=r"Budget.flops needs input_shape .*pass it to Budget"):
        Budget(max_params=10).flops(model)
    with pytest.raises(
        ValueError,
        match=r"a forward pass of one zero sample shaped input_shape=\(5,\) failed "
        r"\(RuntimeError: .*\); give input_shape as the shape of one model input",
    ):
        Budget(max_flops=10, input_shape=(5,)).flops(model)
    assert all(not m._forward_hooks for m in model.modules())
    budget = Budget(max_params=100)
    for bad in ("x", -1, True):
        with pytest.raises(
            ValueError,
            match=r"can_grow needs the module to add or a number of new parameters "
            rf"\(an int >= 0\), got {bad!r}",
        ):
            budget.can_grow(model, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flops must be an int >= 0, got -1"):
        budget.can_grow(model, 1, flops=-1)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        budget.count("model")  # type: ignore[arg-type]
