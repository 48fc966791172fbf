"""GradientVarianceSpike: hand-computed statistics, spikes, latching, state, errors."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from dynarch._engine import transaction
from dynarch.train import Trainer
from dynarch.triggers import TRIGGERS, GradientVarianceSpike, make_trigger


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))


def _grads(model: nn.Sequential, *scales: float | None) -> None:
    """Set layer i's gradient to [[a, -a], [a, -a]] (variance a**2), or None."""
    for layer, a in zip(model, scales):
        layer.weight.grad = None if a is None else torch.tensor([[a, -a], [a, -a]])


def _weights_only(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded: dict[str, Any] = torch.load(buf, weights_only=True)
    return loaded


def test_ema_statistics_and_spike_exact() -> None:
    model = _model()
    spike = GradientVarianceSpike(model, k=2.0, warmup=2, momentum=0.5)
    # layer "0" variances 1, 9, 1, 25; layer "1" constant 4.
    fired = []
    for a in (1.0, 3.0, 1.0, 5.0):
        _grads(model, a, 2.0)
        fired.append(spike.observe())
    # "0": obs1 mean 1 var 0; obs2 (warming up) d=8 -> mean 5, var .5*(0+.5*64)=16;
    # obs3: 1 > 5 + 2*4? no; d=-4 -> mean 3, var .5*(16+.5*16)=12;
    # obs4: 25 > 3 + 2*sqrt(12) -> spike, z = 22/sqrt(12); d=22 -> mean 14, var 127.
    assert fired == [False, False, False, True]
    assert spike.statistics() == {
        "0": {"count": 4, "mean": 14.0, "std": math.sqrt(127.0)},
        "1": {"count": 4, "mean": 4.0, "std": 0.0},
    }
    assert spike.update() is True
    assert spike.where() == ["0"]
    assert spike.spikes == {"0": 22 / math.sqrt(12.0)}
    # the answer is latched until the next update, which starts a new window
    assert spike.update() is False and spike.where() == [] and spike.spikes == {}


def test_welford_statistics_exact() -> None:
    model = _model()
    spike = GradientVarianceSpike(model, k=2.0, warmup=3, momentum=None)
    for a in (1.0, 3.0, 1.0):
        _grads(model, a, None)
        assert spike.observe() is False
    stats = spike.statistics()
    assert list(stats) == ["0"]  # layer "1" never had a gradient
    assert stats["0"]["count"] == 3
    assert stats["0"]["mean"] == pytest.approx(11 / 3, abs=1e-12)
    assert stats["0"]["std"] == pytest.approx(math.sqrt(128 / 9), abs=1e-12)  # population std
    _grads(model, 4.0, None)  # 16 > 11/3 + 2 * 3.77 = 11.2
    assert spike.observe() is True
    assert spike.update() is True and spike.where() == ["0"]


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_non_finite_gradients_are_skipped(momentum: float | None) -> None:
    model = _model()
    spike = GradientVarianceSpike(model, k=2.0, warmup=2, momentum=momentum)
    _grads(model, math.inf, 2.0)  # layer "0" overflows on its first observation
    assert spike.observe() is False
    assert list(spike.statistics()) == ["0", "1"]
    assert spike.statistics()["0"]["count"] == 0
    for a in (1.0, 1.0):
        _grads(model, a, 2.0)
        assert spike.observe() is False
    before = spike.statistics()
    _grads(model, math.nan, 2.0)
    assert spike.observe() is False
    assert spike.statistics() == {"0": before["0"], "1": {**before["1"], "count": 4}}
    assert before["0"] == {"count": 2, "mean": 1.0, "std": 0.0}
    _grads(model, 3.0, 2.0)  # still detected after the overflowed steps
    assert spike.observe() is True and spike.update() is True and spike.where() == ["0"]


def test_no_spike_during_warmup_and_variances() -> None:
    model = _model()
    spike = GradientVarianceSpike(model, warmup=3)
    _grads(model, 1.0, 2.0)
    assert spike.variances() == {"0": 1.0, "1": 4.0}
    assert spike.statistics() == {}  # variances() only looks
    assert [spike.observe() for _ in range(1)] == [False]
    _grads(model, 100.0, 100.0)
    assert [spike.observe(), spike.observe()] == [False, False]  # only 1 and 2 earlier observations
    assert spike.update() is False
    _grads(model, None, None)
    assert spike.observe() is False  # no gradients: nothing observed
    assert spike.statistics()["0"]["count"] == 3


def test_where_orders_by_z_and_latches_the_largest() -> None:
    model = _model()
    spike = GradientVarianceSpike(model, k=1.0, warmup=2, momentum=None)
    for a in (1.0, 3.0):  # "0": mean 5, var 16 (std 4); "1": constant 1 (std 0)
        _grads(model, a, 1.0)
        spike.observe()
    _grads(model, 3.0, 1.0)  # "0": 9 > 5 + 4 -> no (equal is not a spike)
    assert spike.observe() is False
    # "0" now mean 19/3, var pop of (1, 9, 9) = 128/9; 25 spikes with a finite z
    _grads(model, 5.0, 1.0)
    assert spike.observe() is True
    z_first = (25 - 19 / 3) / math.sqrt(128 / 9)
    _grads(model, 1.0, 2.0)  # "1": 4 > 1 + 0 -> spike with z = inf ("0" does not spike)
    assert spike.observe() is True
    assert spike.update() is True
    assert spike.where() == ["1", "0"]
    assert spike.spikes["1"] == math.inf
    assert spike.spikes["0"] == pytest.approx(z_first, rel=1e-12)


def test_layers_selection_and_structural_change() -> None:
    model = _model()
    only = GradientVarianceSpike(model, layers=["1"])
    _grads(model, 1.0, 2.0)
    only.observe()
    assert list(only.statistics()) == ["1"]
    spike = GradientVarianceSpike(model)
    spike.observe()
    assert list(spike.statistics()) == ["0", "1"]
    with transaction(model, "test_remove", "1", record=False):
        del model[1]
    _grads(model, 1.0)
    spike.observe()
    assert spike.statistics() == {"0": {"count": 2, "mean": 1.0, "std": 0.0}}


def test_reset_forgets_everything() -> None:
    model = _model()
    spike = GradientVarianceSpike(model, k=1.0, warmup=1)
    _grads(model, 1.0, 1.0)
    spike.observe()
    _grads(model, 2.0, 2.0)
    assert spike.observe() is True
    spike.reset()
    assert spike.statistics() == {} and spike.update() is False and spike.where() == []
    assert spike.state_dict() == {
        "names": [],
        "count": [],
        "mean": [],
        "var": [],
        "pending": {},
        "spikes": {},
    }


def test_state_round_trip_mid_sequence() -> None:
    model = _model()
    a = GradientVarianceSpike(model, k=1.5, warmup=2, momentum=0.8)
    for s in (1.0, 2.0, 1.5, 4.0):
        _grads(model, s, 1.0 + s)
        a.observe()
    state = _weights_only(a.state_dict())
    # both layers spiked at the 4th observation and nobody asked yet: the spikes are pending
    assert state["names"] == ["0", "1"] and sorted(state["pending"]) == ["0", "1"]
    assert state["pending"]["0"] == pytest.approx((16 - 1.73) / math.sqrt(1.2196))
    b = GradientVarianceSpike(model, k=1.5, warmup=2, momentum=0.8)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    outputs = []
    for trigger in (a, b):
        run = [trigger.update()]
        for s in (1.0, 9.0, 2.0):
            _grads(model, s, 1.0)
            run.append(trigger.observe())
        run.append(trigger.update())
        outputs.append((run, trigger.where(), trigger.state_dict()))
    assert outputs[0] == outputs[1]
    # pending spikes answered first; then only 81 (after mean 3.87, std 5.38) spikes in "0"
    assert outputs[0][0] == [True, False, True, False, True]
    assert outputs[0][1] == ["0"]


def test_callback_observes_in_the_trainer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    spike = make_trigger("gradient_variance_spike", model=model, warmup=1)
    assert isinstance(spike, GradientVarianceSpike) and TRIGGERS["gradient_variance_spike"]
    cb = spike.callback()
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Trainer(model, opt, (x, y), batch_size=4, max_steps=3, callbacks=[cb], progress=False).fit()
    assert {n: s["count"] for n, s in spike.statistics().items()} == {"0": 3, "2": 3}
    assert cb.state_dict() == spike.state_dict()
    fresh = GradientVarianceSpike(model, warmup=1)
    fresh.callback().load_state_dict(cb.state_dict())
    assert fresh.state_dict() == spike.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"k": 0}, ValueError, "k must be a finite number > 0, got 0"),
        ({"k": math.nan}, ValueError, "k must be a finite number > 0, got nan"),
        ({"warmup": 0}, ValueError, "warmup must be an int >= 1, got 0"),
        ({"momentum": 1.0}, ValueError, r"momentum must be a number in \[0, 1\) .* got 1.0"),
        ({"momentum": True}, ValueError, r"momentum must be .* or None .*, got True"),
        ({"layers": "0"}, TypeError, r"layers must be a list .* got the string '0'; write \['0'\]"),
        (
            {"layers": ["9"]},
            ValueError,
            r"GradientVarianceSpike layers: include pattern '9' matches no Linear/Conv2d module; "
            r"available: \['0', '1'\]",
        ),
    ],
)
def test_validates_arguments(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        GradientVarianceSpike(_model(), **kwargs)


def test_rejects_non_module_and_bad_state() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got int"):
        GradientVarianceSpike(3)  # type: ignore[arg-type]
    spike = GradientVarianceSpike(_model())
    with pytest.raises(ValueError, match=r"GradientVarianceSpike state must have keys \['count'"):
        spike.load_state_dict({"best": 1})
    bad = spike.state_dict() | {"names": ["0"], "count": [1], "mean": [1.0], "var": []}
    with pytest.raises(
        ValueError,
        match=r"has 1 layer names but count/mean/var of lengths \[1, 1, 0\]; the state is corrupt",
    ):
        spike.load_state_dict(bad)
