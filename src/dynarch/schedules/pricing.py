"""What a widening adds: :func:`widen_cost`, the price a budget or a credit economy charges.

>>> from dynarch.models import mlp
>>> widen_cost(mlp(8, [16], 3), "fc1", 18)  # 2 new units: 8 inputs + bias + 3 outputs each
24
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..graph import ModelGraph, analyse, resolve
from ..remap import out_units

if TYPE_CHECKING:
    from .actions import Action

__all__ = ["counts_dense", "counts_flops", "fits", "price", "widen_cost", "widen_plan"]

_LAYERS = (nn.Linear, nn.Conv2d)


def widen_cost(
    model: nn.Module,
    target: str,
    width: int,
    graph: ModelGraph | None = None,
    init: str = "net2net",
) -> int:
    """Number of parameters :func:`dynarch.widen` adds when ``target`` gets ``width``
    output units: rows of every coupled producer, the matching input columns of every
    consumer (blocks after a Flatten) and the entries of every norm over those units. Exact
    for dense layers. In a masked layer (``weight_mask``) only the active new weights count
    (the currency of a :class:`~dynarch.triggers.Budget` over active parameters), priced as
    ``widen`` turns them on: exactly for ``init`` zero/random (``max(1, round(density ×
    slice))`` per new row or column), and at the densest existing row/column for net2net
    (whose new units copy rows and columns chosen at random), so never below what is added.

    Example:
        >>> from dynarch.models import mlp
        >>> widen_cost(mlp(8, [16], 3, batchnorm=True), "fc1", 20)  # 4 * (8 + 1 + 2 + 3)
        56
    """
    weights, others = widen_plan(model, target, width, graph, init)
    return sum(weights.values()) + others


def _masked_added(mask: Tensor, role: set[str], extra: int, block: int, init: str) -> int:
    """Active weights widening adds to a masked layer (see :func:`widen_cost`)."""
    rows, cols = mask.shape[0], mask.shape[1]
    per = math.prod(mask.shape[2:])
    flat_rows = mask.reshape(rows, -1)
    density = float(mask.float().mean())
    added, rows_now, density_now = 0, rows, density
    if "out" in role and extra:
        if init == "net2net":  # copies of existing rows
            per_row = int(flat_rows.sum(1).max())
        else:
            per_row = max(1, round(density * cols * per))
        added += extra * per_row
        rows_now = rows + extra
        density_now = (int(mask.sum()) + extra * per_row) / (rows_now * cols * per)
    if role & {"in", "flat"} and extra:
        if init == "net2net":  # copies of existing columns (grown by the new rows' copies)
            col_counts = mask.transpose(0, 1).reshape(cols, -1).sum(1)
            per_col = int(col_counts.max()) + (extra * per if "out" in role else 0)
        else:
            per_col = max(1, round(density_now * rows_now * per))
        added += extra * block * per_col
    return added


def widen_plan(
    model: nn.Module,
    target: str,
    width: int,
    graph: ModelGraph | None = None,
    init: str = "net2net",
    *,
    dense: bool = False,
) -> tuple[dict[str, int], int]:
    """What widening ``target`` to ``width`` adds, per layer: ``({Linear/Conv2d name: weights
    added}, biases and norm entries added)``. Weights count as in :func:`widen_cost` (a masked
    layer: its active new weights), or with ``dense`` every new weight position, active or
    not (the currency of ``Budget(count_masked=True)``). A layer's multiply-adds grow by its
    added weights times the positions it is applied at (widening changes no spatial size),
    which is how a FLOP budget prices a widening exactly.

    Example:
        >>> from dynarch.models import mlp
        >>> widen_plan(mlp(8, [16], 3), "fc1", 18)  # fc1: 2 rows of 8; out: 2 columns of 3
        ({'fc1': 16, 'out': 6}, 2)
    """
    resolve(model, target, _LAYERS)
    graph = analyse(model) if graph is None else graph
    group = graph.group(target)
    old = out_units(graph.modules[group.producers[0]])
    extra = width - old
    if not isinstance(width, int) or isinstance(width, bool) or extra < 0:
        raise ValueError(
            f"widen_cost: width of '{target}' must be an int >= its current width {old}, "
            f"got {width!r}"
        )
    roles: dict[str, set[str]] = {}
    for name in group.producers:
        roles.setdefault(name, set()).add("out")
    for name, flat in group.consumers:
        roles.setdefault(name, set()).add("flat" if flat else "in")
    weights: dict[str, int] = {}
    others = 0
    for name, role in roles.items():
        layer = graph.modules[name]
        assert isinstance(layer, nn.Linear | nn.Conv2d)
        shape = list(layer.weight.shape)
        per = math.prod(shape[2:])
        rows = shape[0] + (extra if "out" in role else 0)
        block = shape[1] // old if "flat" in role else 1
        cols = shape[1] + (extra * block if role & {"in", "flat"} else 0)
        added = (rows * cols - shape[0] * shape[1]) * per
        mask = layer._buffers.get("weight_mask")
        if mask is not None and not dense:  # only the new rows/columns' active entries count
            added = _masked_added(mask, role, extra, block, init)
        weights[name] = added
        if layer.bias is not None and "out" in role:
            others += extra
    for name in group.norms:
        dim = group.norm_dims[name]
        for p in graph.modules[name].parameters(recurse=False):
            others += p.numel() // p.shape[dim] * extra
    return weights, others


def counts_flops(budget: object) -> bool:
    """Whether ``budget`` limits multiply-adds (a ``max_flops`` that is not None)."""
    return budget is not None and getattr(budget, "max_flops", None) is not None


def counts_dense(budget: object) -> bool:
    """Whether ``budget`` counts masked-off weights too (``count_masked=True``)."""
    return budget is not None and getattr(budget, "count_masked", False) is True


def price(action: Action, model: nn.Module, target: str, budget: Any) -> tuple[int, int]:
    """``(parameters, multiply-adds)`` the change at ``target`` adds, as ``budget`` counts
    them: :meth:`Action.cost`, or from :meth:`Action.weights_added` when the budget counts
    FLOPs (each added weight times the positions its layer is applied at, from
    ``budget.positions(model)``) or masked-off weights (``count_masked=True``)."""
    flops, dense = counts_flops(budget), counts_dense(budget)
    if not (flops or dense):
        return action.cost(model, target), 0
    weights, others = action.weights_added(model, target, dense=dense)
    params = sum(weights.values()) + others if dense else action.cost(model, target)
    if not flops:
        return params, 0
    positions = budget.positions(model)
    return params, sum(positions.get(name, 0) * n for name, n in weights.items())


def fits(budget: Any, model: nn.Module, params: int, flops: int) -> bool:
    """``budget.can_grow`` for ``params`` more parameters (and ``flops`` more multiply-adds
    when it counts them)."""
    if counts_flops(budget):
        return bool(budget.can_grow(model, params, flops=flops))
    return bool(budget.can_grow(model, params))
