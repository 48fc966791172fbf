"""Activity statistics: Extrema (dead / saturated units) and Utilization triggers.

Exact per-unit statistics on hand-made layers, each saturation rule, firing thresholds,
post-activation taps, collection modes (observe / start-stop), width changes, state
round trips and every error message.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynarch
from dynarch.activity import Extrema, Utilization, post_activation, try_analyse
from dynarch.models import mlp
from dynarch.triggers import TRIGGERS, make_trigger


def two_units() -> nn.Sequential:
    """``relu([x, -x])`` then a head: unit 0 is active for x > 0, unit 1 for x < 0."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[0].bias.zero_()
    return model


X = torch.tensor([[1.0], [2.0], [-1.0], [-3.0], [0.5]])


def dead_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp(6, [8, 8], 3)
    with torch.no_grad():
        model.fc1.bias[[1, 3]] = -100.0
        model.fc2.bias[[0, 2, 4, 6]] = -100.0
    return model


def test_statistics_are_exact_per_unit() -> None:
    ex = Extrema(two_units())
    ex.observe(X)
    s = ex.statistics("0")
    assert s is not None
    assert float(s["count"]) == 5
    torch.testing.assert_close(s["mean"], torch.tensor([3.5 / 5, 4.0 / 5], dtype=torch.float64))
    torch.testing.assert_close(s["active"], torch.tensor([0.6, 0.4], dtype=torch.float64))
    torch.testing.assert_close(s["nonzero"], torch.tensor([0.6, 0.4], dtype=torch.float64))
    ex.observe(X)  # accumulates
    s2 = ex.statistics("0")
    assert s2 is not None and float(s2["count"]) == 10
    torch.testing.assert_close(s2["mean"], s["mean"])


def test_conv_counts_samples_and_positions() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 1, 1))
    ex = Extrema(model)
    x = torch.randn(4, 2, 5, 5)
    ex.observe(x)
    s = ex.statistics("0")
    assert s is not None and float(s["count"]) == 4 * 5 * 5
    out = torch.relu(model[0](x))
    expected = (out > 0).double().mean(dim=(0, 2, 3))
    torch.testing.assert_close(s["active"], expected)


def test_dead_units_fractions_update_and_where() -> None:
    model = dead_mlp()
    ex = Extrema(model, eps=0.01, fire_fraction=0.5)
    assert ex.layers == ["fc1", "fc2"]
    assert ex.taps == {"fc1": "act1", "fc2": "act2"}
    assert not ex.update()  # nothing observed yet
    assert ex.where() == []
    assert ex.fractions() == {
        "fc1": {"dead": 0.0, "saturated": 0.0},
        "fc2": {"dead": 0.0, "saturated": 0.0},
    }
    ex.observe(torch.randn(64, 6))
    assert ex.dead_units("fc1").tolist() == [1, 3]
    assert ex.dead_units("fc2").tolist() == [0, 2, 4, 6]
    assert ex.saturated_units("fc1").tolist() == []
    assert ex.fractions() == {
        "fc1": {"dead": 0.25, "saturated": 0.0},
        "fc2": {"dead": 0.5, "saturated": 0.0},
    }
    assert ex.where() == ["fc2"]  # only the layer that fires: fc1's 0.25 < 0.5
    assert ex.update()  # fc2: 0.5 >= 0.5
    assert ex.update(123.0)  # the value is ignored
    ex.fire_fraction = 0.25
    assert ex.where() == ["fc2", "fc1"]  # both fire, the larger fraction first
    ex.fire_fraction = 0.51
    assert not ex.update() and ex.where() == []
    ex.reset()
    assert ex.statistics("fc1") is None and not ex.update()


def test_bounded_saturation_counts_both_signs() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.fill_(0.01)
        model[0].bias.copy_(torch.tensor([30.0, -30.0, 0.0, 0.5]))
    ex = Extrema(model, saturation="bounded", eps=0.05)
    ex.observe(torch.randn(10, 2))
    assert ex.saturated_units("0").tolist() == [0, 1]
    assert ex.dead_units("0").tolist() == [1]  # tanh(-30) is never > 0
    assert ex.extrema_units("0").tolist() == [0, 1]
    assert ex.fractions()["0"] == {"dead": 0.25, "saturated": 0.5}
    assert ex.where() == ["0"]


def test_bounded_uses_the_activation_bound() -> None:
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU6(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([5.95, 5.0]))
    ex = Extrema(model, saturation="bounded", eps=0.01)  # 6 * 0.99 = 5.94
    ex.observe(torch.zeros(3, 1))
    assert ex.saturated_units("0").tolist() == [0]


def test_quantile_saturation() -> None:
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    ex = Extrema(model, quantile=0.75)  # 0.75-quantile of [1, 2, 3, 10] = 4.75
    assert ex.saturation == "quantile"
    ex.observe(torch.zeros(2, 1))
    assert ex.saturated_units("0").tolist() == [3]
    with torch.no_grad():
        model[0].bias.fill_(2.0)
    ex.reset()
    ex.observe(torch.zeros(2, 1))
    assert ex.saturated_units("0").tolist() == []  # equal means: none stands out


def test_tap_follows_norms_and_falls_back_to_the_producer() -> None:
    torch.manual_seed(0)
    assert Extrema(mlp(4, [5], 2, batchnorm=True)).taps == {"fc1": "act1"}
    plain = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    ex = Extrema(plain)
    assert ex.taps == {"0": "0"}
    x = torch.randn(4, 2)
    ex.observe(x)
    s = ex.statistics("0")
    assert s is not None
    with torch.no_grad():
        torch.testing.assert_close(s["active"], (plain[0](x) > 0).double().mean(0))
    assert post_activation(None, "x") == "x"
    assert try_analyse(plain) is not None


def test_observe_restores_modes_and_needs_no_grad() -> None:
    torch.manual_seed(0)
    model = mlp(4, [6], 2, batchnorm=True, dropout=0.5)
    model.train()
    model.bn1.eval()
    running = model.bn1.running_mean.clone()
    ex = Extrema(model)
    ex.observe(torch.randn(8, 4))
    assert model.training and model.fc1.training and not model.bn1.training
    assert torch.equal(model.bn1.running_mean, running)
    assert model.fc1.weight.grad is None
    assert not model.act1._forward_hooks  # hooks removed again


def test_start_stop_collects_training_forwards() -> None:
    model = two_units()
    ex = Extrema(model)
    ex.start()
    ex.start()  # idempotent
    model(X)
    model(X)
    ex.stop()
    model(X)
    s = ex.statistics("0")
    assert s is not None and float(s["count"]) == 10
    assert len(model[1]._forward_hooks) == 0


def test_widening_discards_statistics() -> None:
    model = dead_mlp()
    ex = Extrema(model)
    ex.observe(torch.randn(32, 6))
    dynarch.widen(model, "fc1", 10)
    assert ex.statistics("fc1") is None
    assert ex.dead_units("fc1").tolist() == []
    assert ex.fractions()["fc1"] == {"dead": 0.0, "saturated": 0.0}
    assert ex.dead_units("fc2").tolist() == [0, 2, 4, 6]  # fc2 keeps its width
    ex.observe(torch.randn(32, 6))
    s = ex.statistics("fc1")
    assert s is not None and s["mean"].numel() == 10 and float(s["count"]) == 32


def test_state_dict_round_trip() -> None:
    model = dead_mlp()
    ex = Extrema(model)
    ex.observe(torch.randn(32, 6))
    other = Extrema(model)
    other.load_state_dict(ex.state_dict())
    assert other.fractions() == ex.fractions()
    assert torch.equal(other.dead_units("fc2"), ex.dead_units("fc2"))
    with pytest.raises(ValueError, match=r"Extrema state must have keys \['stats'\], got \['x'\]"):
        other.load_state_dict({"x": 1})
    with pytest.raises(ValueError, match=r"statistics for layers \['out'\], not watched here"):
        other.load_state_dict({"stats": {"out": {}}})
    with pytest.raises(ValueError, match=r"Extrema statistics of 'fc1' state must have keys"):
        other.load_state_dict({"stats": {"fc1": {"count": 3}}})
    assert ex.state_dict()["stats"]["fc1"]["count"] == 32


def test_utilization() -> None:
    model = two_units()
    u = Utilization(model, threshold=0.5)
    u.observe(X)
    assert u.utilization() == {"0": 0.5}  # (3 + 2) non-zero of 10
    assert not u.update() and u.where() == []
    u.threshold = 0.6
    assert u.update() and u.where() == ["0"]
    assert Utilization(model).utilization() == {}


def test_registered_triggers() -> None:
    assert TRIGGERS["extrema"] is Extrema and TRIGGERS["utilization"] is Utilization
    t = make_trigger("extrema", model=two_units(), eps=0.2)
    assert isinstance(t, Extrema) and t.eps == 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": 0}, r"eps must be a number in \(0, 1\), got 0"),
        ({"eps": 1.5}, r"eps must be a number in \(0, 1\), got 1.5"),
        ({"fire_fraction": 0.0}, r"fire_fraction must be a number in \(0, 1\], got 0.0"),
        ({"saturation": "high"}, r"unknown saturation rule 'high'; allowed: None, 'bounded'"),
        ({"saturation": "quantile"}, r"saturation='quantile' needs quantile=q"),
        ({"saturation": "bounded", "quantile": 0.9}, r"quantile= only applies to saturation="),
        ({"quantile": 1.0}, r"quantile must be a number in \(0, 1\), got 1.0"),
        ({"layers": "fc1"}, r"layers must be a list of module names, got 'fc1'"),
        ({"layers": []}, r"layers is empty; name at least one Linear/Conv2d module"),
        ({"saturation": "bounded"}, r"'fc1' is followed by ReLU; use saturation='quantile'"),
    ],
)
def test_extrema_errors(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        Extrema(dead_mlp(), **kwargs)


def test_other_errors() -> None:
    with pytest.raises(KeyError, match="model has no submodule named 'fc9'"):
        Extrema(dead_mlp(), ["fc9"])
    with pytest.raises(TypeError, match="'act1' is a ReLU; expected one of: Linear, Conv2d"):
        Extrema(dead_mlp(), ["act1"])
    with pytest.raises(ValueError, match=r"model has 1 Linear/Conv2d layer\(s\); by default"):
        Extrema(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        Utilization("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\], got 2"):
        Utilization(dead_mlp(), threshold=2)
    with pytest.raises(KeyError, match=r"layer 'out' is not watched; watched layers: \['fc1'"):
        Extrema(dead_mlp()).statistics("out")
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1))
    with pytest.raises(ValueError, match="but '2' is followed by no activation module; use"):
        Extrema(model, ["0", "2"], saturation="bounded")
