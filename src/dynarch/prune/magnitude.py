"""Magnitude pruning: unstructured (masks) and structured (units physically removed).

>>> import torch, torch.nn as nn
>>> from dynarch.masks import global_density
>>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
>>> event = magnitude_prune(model, 0.75, scope="global")
>>> event.details["pruned"], event.details["total"], global_density(model)
(144, 192, 0.25)
>>> event = structured_prune(model, "0", 4)  # drop the 4 weakest hidden units
>>> model[0].out_features, model[2].in_features
(12, 12)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._engine import engine_state
from ..events import Event
from ..graph import analyse, resolve
from ..select import topk_mask
from ..surgery import shrink
from ._core import LAYER_TYPES, as_number, prune_by_score, select_layers

__all__ = ["magnitude_prune", "structured_prune", "unit_norms"]


def magnitude_prune(
    model: nn.Module,
    sparsity: float,
    *,
    scope: str = "layer",
    optimizer: torch.optim.Optimizer | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    reason: str = "",
) -> Event:
    """Mask the smallest ``|w|`` of the Linear/Conv2d layers of ``model`` (one ``prune`` event).

    ``scope="layer"`` prunes every selected layer to ``round(sparsity * numel)`` masked
    weights; ``scope="global"`` ranks all selected weights together and masks exactly
    ``round(sparsity * total)`` of them (layers end up with different sparsities). Weights
    that are already masked stay masked (pruning never un-prunes): a layer already sparser
    than the target is left as it is. ``include``/``exclude`` are fnmatch patterns on module
    names. With ``optimizer`` the masks are enforced after every step (weights and optimizer
    state stay exactly zero). Ties are broken by the engine generator.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -5, 3, 0.5], [-2, 8, -0.1, 4]]))
        >>> _ = magnitude_prune(model, 0.5)
        >>> model.weight_mask
        tensor([[False,  True,  True, False],
                [False,  True, False,  True]])
    """
    layers = select_layers(model, include, exclude)
    scores = {name: layer.weight.detach().abs() for name, layer in layers.items()}
    return prune_by_score(
        model,
        scores,
        sparsity,
        scope=scope,
        optimizer=optimizer,
        reason=reason,
        method="magnitude",
    )


def _check_norm(norm: object) -> float:
    norm = as_number(norm)
    if (
        isinstance(norm, bool)
        or not isinstance(norm, int | float)
        or math.isnan(norm)
        or not norm > 0
    ):
        raise ValueError(f"norm must be a number > 0 (e.g. 1, 2 or math.inf), got {norm!r}")
    return float(norm)


def unit_norms(model: nn.Module, target: str, norm: float = 2) -> Tensor:
    """Norm of the incoming weights of each output unit of ``target`` (a Linear/Conv2d).

    Layers coupled to ``target`` (their outputs are added through a residual, so they lose
    the same units) count too: a unit's score is the ``norm`` of all its incoming weights in
    every coupled layer. Masked weights are zero, so they do not count.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
        >>> unit_norms(model, "0").tolist()
        [5.0, 1.0]
    """
    norm = _check_norm(norm)
    resolve(model, target, LAYER_TYPES)
    graph = analyse(model)
    rows = []
    for name in graph.group(target).producers:
        weight = graph.modules[name].weight
        assert isinstance(weight, Tensor)
        w = weight.detach().reshape(weight.shape[0], -1).float()
        rows.append(torch.linalg.vector_norm(w, ord=norm, dim=1))
    return torch.linalg.vector_norm(torch.stack(rows), ord=norm, dim=0)


def _count(amount: object, width: int, target: str) -> int:
    given, amount = amount, as_number(amount)
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise ValueError(
            f"amount must be an int (units to remove) or a float in [0, 1) (fraction of "
            f"units), got {given!r}"
        )
    if isinstance(amount, float):
        if not 0 <= amount < 1:
            raise ValueError(f"amount as a fraction must be in [0, 1), got {amount!r}")
        count = round(amount * width)
    else:
        count = amount
    if not 0 <= count < width:
        raise ValueError(
            f"cannot remove {count} of the {width} units of {target!r}: amount must leave at "
            f"least one unit (1 <= amount <= {width - 1})"
        )
    if count == 0:
        rounded = f" (round({amount!r} * {width}) = 0)" if isinstance(amount, float) else ""
        raise ValueError(
            f"amount {given!r} removes no unit of the {width} units of {target!r}{rounded}; "
            "give at least 1 unit (or a fraction of at least one unit)"
        )
    return count


def structured_prune(
    model: nn.Module,
    target: str,
    amount: int | float,
    *,
    norm: float = 2,
    scores: Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    reason: str = "",
) -> Event:
    """Physically remove the ``amount`` weakest output units of ``target`` (one ``shrink`` event).

    Units are ranked by :func:`unit_norms` (the ``norm`` of their incoming weights, over
    every coupled layer) or by ``scores`` (one value per unit, higher = keep); ties are
    broken by the engine generator. ``amount`` is a count (int) or a fraction of the units
    (float in [0, 1), rounded); NumPy scalars and 0-d tensors are accepted. An amount that
    removes no unit (0, or a fraction rounding to 0) is refused (no event: the result is
    always the ``shrink`` event of a real removal). Removal goes through
    :func:`dynarch.shrink`, so consumers, BatchNorms, coupled residual layers, masks and
    ``optimizer`` state all follow.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> event = structured_prune(model, "0", 0.25)
        >>> event.op, model[0].out_features, model[2].in_features
        ('shrink', 6, 6)
    """
    layer = resolve(model, target, LAYER_TYPES)
    assert isinstance(layer, nn.Linear | nn.Conv2d)
    width = layer.weight.shape[0]
    count = _count(amount, width, target)
    if scores is None:
        keys = unit_norms(model, target, norm)
    else:
        _check_norm(norm)
        if not isinstance(scores, Tensor) or scores.shape != (width,):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(
                f"scores must be a 1-D tensor with one value per unit of {target!r} "
                f"({width}), got {got}"
            )
        keys = scores.detach().float()
        if not bool(torch.isfinite(keys).all()):
            raise ValueError("scores hold NaN or infinite values")
    keep = topk_mask(keys.cpu(), width - count, engine_state(model).generator)
    return shrink(
        model,
        target,
        keep.nonzero().squeeze(1),
        optimizer=optimizer,
        reason=reason or "structured prune",
    )
