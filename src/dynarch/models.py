"""Builders of plain, standard-layer models.

Every builder returns an :class:`torch.nn.Sequential` of named standard layers (``fc1``,
``act1``, …, ``out``), so a checkpoint of a grown or pruned model can be rebuilt from its
architecture spec without user code. :data:`MODELS` maps a config ``model.kind`` to its
builder; :func:`build_model` builds one from a config and a dataset's input shape.

Example:
    >>> import torch
    >>> from dynarch.models import mlp, hidden_layer_names
    >>> net = mlp(40, [32, 32], 10)
    >>> net(torch.zeros(5, 40)).shape
    torch.Size([5, 10])
    >>> hidden_layer_names(net)
    ['fc1', 'fc2']
"""

from __future__ import annotations

import difflib
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "build_model",
    "cnn",
    "hidden_layer_names",
    "layer_widths",
    "make_activation",
    "mlp",
    "register_model",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}

_WEIGHTED = (nn.Linear, nn.Conv2d)


def _did_you_mean(value: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATIONS`).

    Example:
        >>> make_activation("gelu")
        GELU(approximate='none')
    """
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}{_did_you_mean(str(name), list(ACTIVATIONS))}; "
            f"allowed: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]()


def _positive_widths(what: str, widths: Sequence[int]) -> list[int]:
    out = list(widths)
    bad = [w for w in out if not isinstance(w, int) or isinstance(w, bool) or w < 1]
    if bad:
        raise ValueError(f"{what} must be positive integers, got {out!r}")
    return out


def mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    *,
    activation: str = "relu",
    batchnorm: bool = False,
    layernorm: bool = False,
    dropout: float = 0.0,
    flatten: bool = True,
) -> nn.Sequential:
    """A multi-layer perceptron ``[flatten] (fcK [bnK|lnK] actK [dropK])* out``.

    Example:
        >>> net = mlp(40, [32], 10, batchnorm=True)
        >>> [name for name, _ in net.named_children()]
        ['flatten', 'fc1', 'bn1', 'act1', 'out']
    """
    (in_features, out_features) = _positive_widths(
        "in_features/out_features", [in_features, out_features]
    )
    widths = _positive_widths("hidden widths", hidden)
    if batchnorm and layernorm:
        raise ValueError("choose at most one of batchnorm=True and layernorm=True, not both")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    make_activation(activation)  # validate the name before building anything
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if flatten:
        layers["flatten"] = nn.Flatten()
    prev = in_features
    for i, width in enumerate(widths, start=1):
        layers[f"fc{i}"] = nn.Linear(prev, width)
        if batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm1d(width)
        if layernorm:
            layers[f"ln{i}"] = nn.LayerNorm(width)
        layers[f"act{i}"] = make_activation(activation)
        if dropout > 0:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        prev = width
    layers["out"] = nn.Linear(prev, out_features)
    return nn.Sequential(layers)


def cnn(
    in_channels: int,
    num_classes: int,
    *,
    channels: Sequence[int] = (16, 32),
    kernel_size: int = 3,
    batchnorm: bool = True,
    hidden: int = 64,
    input_size: int | tuple[int, int] = 28,
    activation: str = "relu",
) -> nn.Sequential:
    """A small CNN: ``(convK [bnK] actK poolK)* flatten [fc act] out``.

    Each block keeps the spatial size (``padding = kernel_size // 2``) and halves it with
    a 2x2 max-pool; ``hidden=0`` drops the hidden fully-connected layer.

    Example:
        >>> import torch
        >>> net = cnn(1, 10, channels=(4, 8), hidden=16)
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    (in_channels, num_classes) = _positive_widths(
        "in_channels/num_classes", [in_channels, num_classes]
    )
    widths = _positive_widths("channels", channels)
    if not widths:
        raise ValueError("channels must name at least one convolution block, got []")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    if hidden < 0:
        raise ValueError(f"hidden must be >= 0 (0: no hidden layer), got {hidden!r}")
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    out_h, out_w = height >> len(widths), width >> len(widths)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"input_size {height}x{width} is too small for {len(widths)} pooling blocks "
            f"(each halves it); use at most {int(math.log2(min(height, width)))} blocks"
        )
    make_activation(activation)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    prev = in_channels
    for i, ch in enumerate(widths, start=1):
        layers[f"conv{i}"] = nn.Conv2d(prev, ch, kernel_size, padding=kernel_size // 2)
        if batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm2d(ch)
        layers[f"act{i}"] = make_activation(activation)
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        prev = ch
    layers["flatten"] = nn.Flatten()
    features = prev * out_h * out_w
    if hidden:
        layers["fc"] = nn.Linear(features, hidden)
        layers["act_fc"] = make_activation(activation)
        features = hidden
    layers["out"] = nn.Linear(features, num_classes)
    return nn.Sequential(layers)


def _mlp_shape_args(input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    return {"in_features": math.prod(input_shape), "out_features": num_classes}


def _cnn_shape_args(input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model kind 'cnn' needs image inputs of shape (channels, height, width), "
            f"got input shape {tuple(input_shape)}; use kind 'mlp' for this dataset"
        )
    c, h, w = input_shape
    return {"in_channels": c, "num_classes": num_classes, "input_size": (h, w)}


MODELS: dict[str, Callable[..., nn.Sequential]] = {"mlp": mlp, "cnn": cnn}
"""Model builders by config ``kind``."""

_SHAPE_ARGS: dict[str, Callable[[tuple[int, ...], int], dict[str, Any]]] = {
    "mlp": _mlp_shape_args,
    "cnn": _cnn_shape_args,
}


def register_model(
    kind: str,
    builder: Callable[..., nn.Sequential],
    shape_args: Callable[[tuple[int, ...], int], dict[str, Any]],
) -> None:
    """Register a builder under ``kind``; ``shape_args(input_shape, num_classes)`` gives
    the builder's data-dependent keyword arguments.

    Example:
        >>> register_model("linear", lambda n_in, n_out: nn.Sequential(nn.Flatten(),
        ...     nn.Linear(n_in, n_out)), lambda shape, n: {"n_in": shape[-1], "n_out": n})
    """
    MODELS[kind] = builder
    _SHAPE_ARGS[kind] = shape_args


def build_model(
    cfg: Mapping[str, Any] | Any, input_shape: Sequence[int], num_classes: int
) -> nn.Sequential:
    """Build the model described by ``cfg`` (a mapping or a pydantic model with ``kind``).

    Example:
        >>> build_model({"kind": "mlp", "hidden": [8]}, (40,), 10)[1]
        Linear(in_features=40, out_features=8, bias=True)
    """
    fields = dict(cfg.model_dump() if hasattr(cfg, "model_dump") else cfg)
    kind = fields.pop("kind", None)
    if kind not in MODELS:
        raise ValueError(
            f"unknown model kind {kind!r}{_did_you_mean(str(kind), list(MODELS))}; "
            f"allowed: {', '.join(MODELS)}"
        )
    return MODELS[kind](**_SHAPE_ARGS[kind](tuple(input_shape), num_classes), **fields)


def hidden_layer_names(model: nn.Module) -> list[str]:
    """Names of every Linear/Conv2d except the last one: the layers that can be widened.

    Example:
        >>> hidden_layer_names(cnn(1, 10))
        ['conv1', 'conv2', 'fc']
    """
    names = [name for name, mod in model.named_modules() if isinstance(mod, _WEIGHTED)]
    return names[:-1]


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width (``out_features`` / ``out_channels``) of every Linear/Conv2d, by name.

    Example:
        >>> layer_widths(mlp(40, [32, 16], 10))
        {'fc1': 32, 'fc2': 16, 'out': 10}
    """
    widths: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            widths[name] = mod.out_features
        elif isinstance(mod, nn.Conv2d):
            widths[name] = mod.out_channels
    return widths
