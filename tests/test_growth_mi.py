"""Mutual-information estimators of dynarch.growth.mi: known values, bias, hooks, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynarch.growth.mi import layer_mi, mutual_information, probe_mi


def _noise(n: int = 4000, d: int = 16, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _balanced(classes: int = 10, per: int = 100) -> torch.Tensor:
    return torch.arange(classes).repeat(per)


def test_independent_binned_is_near_zero_and_plugin_bias_matches_theory() -> None:
    a, y = _noise()
    corrected = mutual_information(a, y)
    plugin = mutual_information(a, y, bias_correction=False)
    assert 0.0 <= corrected < 0.002
    # plug-in bias for independent variables ~ (B-1)(C-1) / (2 N ln 2) bits
    assert plugin == pytest.approx(81 / (2 * 4000 * math.log(2)), rel=0.1)


def test_deterministic_copy_gives_label_entropy_exactly() -> None:
    y = _balanced()
    copy = y.float().unsqueeze(1)
    assert mutual_information(copy, y, bias_correction=False) == pytest.approx(math.log2(10))
    # Miller-Madow adds (C - 1) / (2 N ln 2) here (the correction of H(Y) itself), which
    # would exceed log2(10), the most 10 classes can carry: the estimate is capped there
    assert mutual_information(copy, y) == pytest.approx(math.log2(10), abs=1e-12)
    skewed = (torch.arange(1000) % 10 == 0).long()  # H(Y) = 0.469: far below the cap
    h = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    expected = h + 1 / (2 * 1000 * math.log(2))
    assert mutual_information(skewed.float().unsqueeze(1), skewed) == pytest.approx(expected)


def test_binary_copy_is_one_bit_and_mean_over_units() -> None:
    y = torch.tensor([0, 1] * 50)
    both = torch.stack([y.float(), torch.zeros(100)], 1)  # informative unit + dead unit
    assert mutual_information(y.float().unsqueeze(1), y, bias_correction=False) == 1.0
    assert mutual_information(both, y, bias_correction=False) == 0.5


def test_constant_unit_is_exactly_zero_with_and_without_correction() -> None:
    y = _balanced()
    dead = torch.zeros(1000, 3)
    assert mutual_information(dead, y) == 0.0
    assert mutual_information(dead, y, bias_correction=False) == 0.0


def test_binned_is_invariant_to_monotone_transforms() -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (600,), generator=g)
    a = y.float().unsqueeze(1) + torch.randn(600, 2, generator=g)
    assert mutual_information(torch.exp(a), y) == pytest.approx(mutual_information(a, y))


def test_more_separated_classes_carry_more_information() -> None:
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 2, (2000,), generator=g)
    noise = torch.randn(2000, 1, generator=g)
    values = [mutual_information(y.float().unsqueeze(1) * s + noise, y) for s in (0.5, 1, 2, 4)]
    assert values == sorted(values)
    assert values[-1] > 0.8


def test_probe_bound_recovers_label_entropy_and_zero_for_noise() -> None:
    y = _balanced()
    onehot = F.one_hot(y).float()
    assert mutual_information(onehot, y, method="probe") == pytest.approx(math.log2(10), abs=0.05)
    a, y2 = _noise(n=1000)
    assert mutual_information(a, y2, method="probe") == 0.0


def test_estimates_are_deterministic() -> None:
    a, y = _noise(n=500)
    assert mutual_information(a, y) == mutual_information(a.clone(), y.clone())
    first = mutual_information(a, y, method="probe")
    assert mutual_information(a, y, method="probe") == first


def test_conv_maps_are_flattened_for_mutual_information() -> None:
    y = torch.tensor([0, 1] * 20)
    maps = y.float().view(40, 1, 1, 1).expand(40, 2, 3, 3)
    assert mutual_information(maps, y, bias_correction=False) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "knn"}, ValueError, r"unknown MI method 'knn'; allowed: binned, probe"),
        ({"bins": 1}, ValueError, r"bins must be an int >= 2, got 1"),
        ({"steps": 0}, ValueError, r"steps must be an int >= 1, got 0"),
    ],
)
def test_bad_options(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        mutual_information(torch.zeros(4, 1), torch.tensor([0, 1, 0, 1]), **kwargs)


def test_bad_inputs() -> None:
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(TypeError, match=r"must be torch tensors, got list and Tensor"):
        mutual_information([1, 2, 3, 4], y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"labels must be a 1-D integer tensor .* torch.float32"):
        mutual_information(torch.zeros(4, 1), y.float())
    with pytest.raises(ValueError, match=r"same first dimension"):
        mutual_information(torch.zeros(3, 1), y)
    with pytest.raises(ValueError, match=r"at least 2 samples .* got 1"):
        mutual_information(torch.zeros(1, 1), y[:1])
    with pytest.raises(ValueError, match=r"labels must be >= 0, got a minimum of -1"):
        mutual_information(torch.zeros(4, 1), torch.tensor([0, -1, 0, 1]))
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        mutual_information(torch.tensor([[0.0], [math.nan], [1.0], [2.0]]), y)
    with pytest.raises(ValueError, match=r"activations have no features"):
        mutual_information(torch.zeros(4, 0), y)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_layer_mi_hooks_default_layers_and_restores_modes() -> None:
    net = _net()
    x = torch.randn(200, 4)
    y = (x[:, 0] > 0).long()
    net.train()
    result = layer_mi(net, x, y)
    assert sorted(result) == ["0", "2"]
    assert net.training and all(m.training for m in net.modules())
    assert not net[0]._forward_hooks
    with torch.no_grad():
        direct = mutual_information(net[1](net[0](x)), y)
    assert layer_mi(net, x, y, ["1"])["1"] == pytest.approx(direct)
    assert layer_mi(net, x, y, [""])[""] == pytest.approx(mutual_information(net(x).detach(), y))


def test_layer_mi_pools_conv_maps_per_channel() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1))
    x = torch.randn(50, 1, 4, 4)
    y = torch.randint(0, 2, (50,))
    with torch.no_grad():
        pooled = conv(x).mean((2, 3))
    assert layer_mi(conv, x, y)["0"] == pytest.approx(mutual_information(pooled, y))


def test_layer_mi_errors() -> None:
    net = _net()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match=r"layers \['fc9'\] are not modules of the model"):
        layer_mi(net, x, y, ["fc9"])
    with pytest.raises(TypeError, match=r"got the string '0'"):
        layer_mi(net, x, y, "0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no Linear/Conv2d layer"):
        layer_mi(nn.Sequential(nn.ReLU()), x, y)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    with pytest.raises(ValueError, match=r"module 'fc' produced 2 tensor outputs"):
        layer_mi(Twice(), x, y)


def test_probe_mi_trains_in_place_deterministically_and_keeps_global_rng() -> None:
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(3))
    y = (x[:, 0] + x[:, 1] > 0).long()
    train, held = (x[:128], y[:128]), (x[128:], y[128:])
    a, b = _net(), _net()
    before = mutual_information(a(held[0]).detach(), held[1])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = probe_mi(a, train, held, steps=30, lr=0.2, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert probe_mi(b, train, held, steps=30, lr=0.2, seed=5) == first
    assert first > before
    assert probe_mi(_net(), train, held, steps=0) == pytest.approx(before)
    with pytest.raises(ValueError, match=r"steps must be an int >= 0, got -1"):
        probe_mi(a, train, held, steps=-1)


@pytest.mark.parametrize("n", [3, 5, 8, 13])
def test_tiny_samples_stay_within_the_entropy_bound(n: int) -> None:
    acts = torch.randn(n, 4, generator=torch.Generator().manual_seed(n))
    y = torch.arange(n) % 2
    for bins in (2, 100):
        assert 0.0 <= mutual_information(acts, y, bins=bins) <= 1.0  # log2 of 2 classes
