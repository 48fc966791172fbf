"""Model builders: layer layout, forward shapes, widenable layers, validation messages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynarch import models
from dynarch.models import (
    ACTIVATIONS,
    MODELS,
    build_model,
    cnn,
    hidden_layer_names,
    layer_widths,
    make_activation,
    mlp,
    register_model,
)
from dynarch.spec import build, describe_model


def test_mlp_layout_and_forward() -> None:
    net = mlp(40, [32, 16], 10)
    assert [n for n, _ in net.named_children()] == [
        "flatten", "fc1", "act1", "fc2", "act2", "out",
    ]  # fmt: skip
    assert isinstance(net, nn.Sequential)
    assert net(torch.zeros(5, 40)).shape == (5, 10)
    assert net(torch.zeros(3, 1, 5, 8)).shape == (3, 10)  # the Flatten takes images too


def test_mlp_options() -> None:
    net = mlp(4, [8], 2, activation="gelu", batchnorm=True, dropout=0.25, flatten=False)
    assert [n for n, _ in net.named_children()] == ["fc1", "bn1", "act1", "drop1", "out"]
    assert isinstance(net.act1, nn.GELU) and isinstance(net.bn1, nn.BatchNorm1d)
    assert net.drop1.p == 0.25
    ln = mlp(4, [8, 8], 2, layernorm=True)
    assert isinstance(ln.ln2, nn.LayerNorm) and ln.ln2.normalized_shape == (8,)
    assert [n for n, _ in mlp(4, [], 3).named_children()] == ["flatten", "out"]
    assert mlp(4, [], 3)(torch.zeros(2, 4)).shape == (2, 3)


def test_activations_by_name() -> None:
    expected = {
        "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU,
        "silu": nn.SiLU, "tanh": nn.Tanh, "elu": nn.ELU,
    }  # fmt: skip
    assert {name: type(make_activation(name)) for name in ACTIVATIONS} == expected
    net = mlp(4, [8, 8], 2, activation="tanh")
    assert net.act1 is not net.act2  # fresh module per layer


def test_activation_error_lists_allowed() -> None:
    with pytest.raises(
        ValueError,
        match=r"^unknown activation 'rellu' \(did you mean 'relu'\?\); "
        r"allowed: relu, leaky_relu, gelu, silu, tanh, elu$",
    ):
        mlp(4, [8], 2, activation="rellu")
    with pytest.raises(ValueError, match=r"^unknown activation 'xyz'; allowed: relu, "):
        cnn(1, 10, activation="xyz")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden": [8, 0]}, r"hidden widths must be positive integers, got \[8, 0\]"),
        ({"out_features": 0}, r"in_features/out_features must be positive integers, got \[4, 0\]"),
        (
            {"batchnorm": True, "layernorm": True},
            r"choose at most one of batchnorm=True and layernorm",
        ),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_mlp_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"in_features": 4, "hidden": [8], "out_features": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        mlp(**args)  # type: ignore[arg-type]


def test_cnn_layout_and_forward() -> None:
    net = cnn(1, 10, channels=(4, 8), hidden=16)
    names = [n for n, _ in net.named_children()]
    assert names == [
        "conv1", "bn1", "act1", "pool1", "conv2", "bn2", "act2", "pool2",
        "flatten", "fc", "act_fc", "out",
    ]  # fmt: skip
    assert net.fc.in_features == 8 * 7 * 7
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    flat = cnn(3, 5, channels=[6], batchnorm=False, hidden=0, input_size=(12, 20), kernel_size=5)
    assert [n for n, _ in flat.named_children()] == ["conv1", "act1", "pool1", "flatten", "out"]
    assert flat.conv1.padding == (2, 2)
    assert flat.out.in_features == 6 * 6 * 10
    assert flat(torch.zeros(2, 3, 12, 20)).shape == (2, 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": ()}, r"channels must name at least one convolution block, got \[\]"),
        ({"channels": (4, -1)}, r"channels must be positive integers, got \[4, -1\]"),
        ({"kernel_size": 4}, r"kernel_size must be a positive odd integer, got 4"),
        ({"hidden": -1}, r"hidden must be >= 0 \(0: no hidden layer\), got -1"),
        (
            {"input_size": 6, "channels": (2, 2, 2)},
            r"input_size 6x6 is too small for 3 pooling blocks \(each halves it\); "
            r"use at most 2 blocks",
        ),
    ],
)
def test_cnn_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cnn(1, 10, **kwargs)  # type: ignore[arg-type]


def test_build_model_derives_shapes() -> None:
    net = build_model({"kind": "mlp", "hidden": [8]}, (1, 28, 28), 10)
    assert net.fc1.in_features == 784 and net.out.out_features == 10
    conv = build_model({"kind": "cnn", "channels": [4], "hidden": 0}, (1, 28, 28), 10)
    assert conv.conv1.in_channels == 1 and conv.out.in_features == 4 * 14 * 14


def test_build_model_accepts_pydantic_configs() -> None:
    from dynarch.config import MLPConfig

    net = build_model(MLPConfig(kind="mlp", hidden=[3], activation="silu"), (40,), 10)
    assert layer_widths(net) == {"fc1": 3, "out": 10}
    assert isinstance(net.act1, nn.SiLU)


def test_build_model_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"^model kind 'cnn' needs image inputs of shape \(channels, height, width\), "
        r"got input shape \(40,\); use kind 'mlp' for this dataset$",
    ):
        build_model({"kind": "cnn"}, (40,), 10)
    with pytest.raises(
        ValueError, match=r"^unknown model kind 'mpl' \(did you mean 'mlp'\?\); allowed: mlp, cnn$"
    ):
        build_model({"kind": "mpl"}, (40,), 10)


def test_register_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "MODELS", dict(MODELS))
    monkeypatch.setattr(models, "_SHAPE_ARGS", dict(models._SHAPE_ARGS))

    def linear(n_in: int, n_out: int, bias: bool = True) -> nn.Sequential:
        return nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_out, bias=bias))

    register_model("linear", linear, lambda shape, n: {"n_in": shape[-1], "n_out": n})
    net = build_model({"kind": "linear", "bias": False}, (7,), 3)
    assert net[1].in_features == 7 and net[1].bias is None


def test_hidden_layer_names_and_widths() -> None:
    assert hidden_layer_names(mlp(40, [32, 16], 10)) == ["fc1", "fc2"]
    assert hidden_layer_names(mlp(40, [], 10)) == []
    assert hidden_layer_names(cnn(1, 10)) == ["conv1", "conv2", "fc"]
    assert hidden_layer_names(cnn(1, 10, hidden=0)) == ["conv1", "conv2"]
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), nn.Linear(3, 1))
    assert hidden_layer_names(nested) == ["0.0"]
    assert layer_widths(cnn(1, 10, channels=(4, 8), hidden=16)) == {
        "conv1": 4, "conv2": 8, "fc": 16, "out": 10,
    }  # fmt: skip


@pytest.mark.parametrize(
    "net", [mlp(40, [8, 8], 10, batchnorm=True, dropout=0.1), cnn(1, 10, channels=(4, 8))]
)
def test_models_are_plain_specs(net: nn.Sequential) -> None:
    spec = describe_model(net)
    assert spec["kind"] == "spec"  # rebuildable from JSON, no user code needed
    rebuilt = build(spec["module"])
    assert [n for n, _ in rebuilt.named_modules()] == [n for n, _ in net.named_modules()]


def test_hidden_layers_can_be_widened() -> None:
    from dynarch.surgery import widen

    torch.manual_seed(0)
    for net, shape in (
        (mlp(40, [8, 8], 10), (4, 40)),
        (cnn(1, 10, channels=(4, 8)), (2, 1, 28, 28)),
    ):
        net.eval()
        x = torch.randn(shape)
        before = net(x)
        for name in hidden_layer_names(net):
            widen(net, name, layer_widths(net)[name] + 3)
        assert all(layer_widths(net)[n] > 3 for n in hidden_layer_names(net))
        torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-4)
