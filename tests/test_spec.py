"""Architecture specs: ``describe``/``build`` round trips, custom models, bad specs."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn

from dynarch.nn import Residual
from dynarch.sparse import DynamicSparseLinear
from dynarch.spec import _SIMPLE_ARGS, build, class_path, describe, describe_model, import_class

# One instance per supported layer type, every constructor argument away from its default.
LAYERS: list[nn.Module] = [
    nn.Linear(3, 5, bias=False),
    nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=2, groups=2, bias=False,
              padding_mode="reflect"),
    nn.BatchNorm1d(7, eps=1e-3, momentum=None, affine=False, track_running_stats=False),
    nn.BatchNorm2d(5, eps=1e-4, momentum=0.3, affine=True, track_running_stats=False),
    nn.LayerNorm((4, 6), eps=1e-3, elementwise_affine=True, bias=False),
    nn.ReLU(inplace=True), nn.ReLU6(inplace=True), nn.SiLU(inplace=True), nn.Mish(inplace=True),
    nn.LeakyReLU(0.2, inplace=True), nn.ELU(alpha=0.7, inplace=True),
    nn.CELU(alpha=1.5, inplace=True), nn.SELU(inplace=True), nn.GELU(approximate="tanh"),
    nn.Tanh(), nn.Sigmoid(), nn.Hardswish(inplace=True), nn.Hardsigmoid(inplace=True),
    nn.Hardtanh(-2.0, 3.0, inplace=True), nn.Softplus(beta=2.0, threshold=10.0), nn.Softsign(),
    nn.Identity(),
    nn.Dropout(0.3, inplace=True), nn.Dropout2d(0.4, inplace=True),
    nn.AlphaDropout(0.2, inplace=True),
    nn.Flatten(2, -2),
    nn.MaxPool2d((3, 2), stride=1, padding=1, dilation=(1, 2), return_indices=True,
                 ceil_mode=True),
    nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False,
                 divisor_override=5),
    nn.AdaptiveAvgPool2d((None, 3)), nn.AdaptiveMaxPool2d(4, return_indices=True),
    DynamicSparseLinear(6, 4, 0.25, bias=False),
    nn.GroupNorm(2, 6, eps=1e-3, affine=False),
    nn.InstanceNorm1d(5, eps=1e-3, momentum=0.2, affine=True, track_running_stats=True),
    nn.InstanceNorm2d(4, eps=1e-4, momentum=None, affine=False, track_running_stats=True),
    nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, bias=False,
              padding_mode="reflect"),
    nn.Embedding(10, 4, padding_idx=1, max_norm=2.0, norm_type=1.0, scale_grad_by_freq=True,
                 sparse=True),
    nn.PReLU(num_parameters=3), nn.Dropout1d(0.3, inplace=True),
]  # fmt: skip


def _config(module: nn.Module) -> dict[str, Any]:
    """Every public plain attribute (the constructor's arguments as torch stores them)."""
    out = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}
    out["params"] = {n: (tuple(p.shape), p.requires_grad) for n, p in module.named_parameters()}
    out["buffers"] = {n: tuple(b.shape) for n, b in module.named_buffers()}
    return out


def _via_json(spec: Any) -> Any:
    return json.loads(json.dumps(spec))


def test_every_supported_layer_type_has_a_case() -> None:
    assert {type(m) for m in LAYERS} == set(_SIMPLE_ARGS)


@pytest.mark.parametrize("layer", LAYERS, ids=lambda m: type(m).__name__)
def test_describe_build_round_trip_keeps_every_constructor_argument(layer: nn.Module) -> None:
    spec = describe(layer)
    assert spec is not None and spec["type"] == type(layer).__name__
    rebuilt = build(_via_json(spec))
    assert type(rebuilt) is type(layer)
    assert _config(rebuilt) == _config(layer)
    assert describe(rebuilt) == spec


def test_spec_values_are_json_and_exact() -> None:
    conv = nn.Conv2d(4, 6, (3, 5), padding="same", padding_mode="circular")
    assert describe(conv) == {
        "type": "Conv2d",
        "args": {
            "in_channels": 4, "out_channels": 6, "kernel_size": [3, 5], "stride": [1, 1],
            "padding": "same", "dilation": [1, 1], "groups": 1, "padding_mode": "circular",
            "bias": True,
        },
    }  # fmt: skip
    assert describe(nn.GELU()) == {"type": "GELU", "args": {"approximate": "none"}}
    assert describe(nn.Tanh()) == {"type": "Tanh", "args": {}}
    assert _config(build(_via_json(describe(conv)))) == _config(conv)


def test_containers_and_residual_round_trip_with_names_and_order() -> None:
    model = nn.Sequential(
        OrderedDict(
            [
                ("stem", nn.Conv2d(3, 4, 3, padding=1)),
                ("1_deep", nn.ReLU()),
                ("slot", Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), alpha=0.25,
                                  trainable_alpha=False)),
                ("heads", nn.ModuleDict({"b": nn.Linear(4, 2), "a": nn.Linear(4, 3)})),
                ("blocks", nn.ModuleList([nn.BatchNorm1d(4), nn.Dropout(0.1)])),
            ]
        )
    )  # fmt: skip
    spec = describe(model)
    assert spec is not None
    rebuilt = build(_via_json(spec))
    assert describe(rebuilt) == spec
    assert [n for n, _ in rebuilt.named_modules()] == [n for n, _ in model.named_modules()]
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in model.modules()]
    slot = rebuilt.get_submodule("slot")
    assert isinstance(slot, Residual)
    assert float(slot.alpha) == 0.25 and slot.alpha.requires_grad is False
    assert spec["children"][2][1] == {
        "type": "Residual",
        "args": {"alpha": 0.25, "trainable_alpha": False},
        "children": [["module", describe(model.get_submodule("slot.module"))]],
    }
    heads = rebuilt.get_submodule("heads")
    assert isinstance(heads, nn.ModuleDict) and list(heads.keys()) == ["b", "a"]


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class MyLinear(nn.Linear):
    """A subclass is not the standard layer: it must not be described as one."""


def test_describe_model_kinds() -> None:
    assert describe_model(nn.Sequential(nn.Linear(2, 3))) == {
        "kind": "spec",
        "module": {
            "type": "Sequential",
            "children": [["0", {"type": "Linear", "args": {
                "in_features": 2, "out_features": 3, "bias": True}}]],
        },
    }  # fmt: skip
    path = f"{__name__}.Custom"
    assert describe_model(Custom()) == {"kind": "class", "class": path}
    # A standard container holding anything custom is a class model as a whole.
    assert describe(nn.Sequential(nn.Linear(2, 2), Custom())) is None
    assert describe(Residual(Custom())) is None
    assert describe(MyLinear(2, 2)) is None
    assert describe_model(nn.Sequential(MyLinear(2, 2))) == {
        "kind": "class",
        "class": "torch.nn.modules.container.Sequential",
        "unknown": "0 (MyLinear)",  # named in load's error: a factory is needed for it
    }


def test_class_path_and_import_class() -> None:
    assert class_path(nn.Linear(1, 1)) == "torch.nn.modules.linear.Linear"
    assert class_path(nn.Linear) == "torch.nn.modules.linear.Linear"
    assert class_path(Custom()) == f"{__name__}.Custom"
    assert import_class("torch.nn.modules.linear.Linear") is nn.Linear
    assert import_class("torch.nn.Linear") is nn.Linear
    assert import_class("dynarch.checkpoint.Checkpoint").__name__ == "Checkpoint"
    with pytest.raises(ImportError, match=r"cannot import class 'nowhere\.Thing'; pass the class"):
        import_class("nowhere.Thing")
    with pytest.raises(ImportError, match=r"cannot import class 'torch\.nn\.NoSuchLayer'"):
        import_class("torch.nn.NoSuchLayer")
    with pytest.raises(ImportError, match=r"cannot import class 'torch\.nn\.functional\.relu'"):
        import_class("torch.nn.functional.relu")  # a function, not a class


def test_build_errors() -> None:
    with pytest.raises(
        ValueError, match=r"unknown module type 'Transformer' in spec; known: \['AdaptiveAvgPool2d'"
    ):
        build({"type": "Transformer", "args": {}})
    with pytest.raises(ValueError, match=r"not a module spec: \['Linear'\]"):
        build(["Linear"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"not a module spec: \{'args': \{\}\}"):
        build({"args": {}})
    with pytest.raises(ValueError, match=r"unknown module type 'Custom'"):
        build({"type": "Sequential", "children": [["0", {"type": "Custom"}]]})
