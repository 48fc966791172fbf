"""Shared machinery of :mod:`dynarch.prune`: layer selection, validation, score-based masking.

:func:`prune_by_score` is the one place where masks are lowered: every unstructured method
(magnitude, gradient importance, lottery ticket, schedules) hands it a score per weight.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .._engine import engine_state, transaction
from ..events import Event
from ..masks import MASK, check_held, check_layers, zero_masked
from ..masks import select_layers as masks_select_layers
from ..select import topk_mask

__all__ = ["SCOPES", "as_number", "named_layers", "prune_by_score", "select_layers"]

SCOPES = ("layer", "global")
LAYER_TYPES = (nn.Linear, nn.Conv2d)


def as_number(value: object) -> object:
    """A real scalar as a Python ``int``/``float``, anything else unchanged (refused later).

    Integers (``numbers.Integral``: ``int``, NumPy integers) become ``int``, other reals
    (``numbers.Real``: NumPy floats of any width) ``float``, a 0-d real tensor its ``.item()``.
    Booleans (Python, NumPy or tensor) are returned as they are so that callers refuse them.

    Example:
        >>> import numpy as np
        >>> as_number(np.float32(0.5)), as_number(np.int64(3)), as_number(torch.tensor(0.25))
        (0.5, 3, 0.25)
    """
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return value
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def check_sparsity(value: object, name: str = "sparsity") -> float:
    """``value`` (a real number: int, float, NumPy scalar or 0-d tensor) as a float in [0, 1),
    or a clear error."""
    given, value = value, as_number(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value < 1
    ):
        raise ValueError(
            f"{name} must be a number in [0, 1) (the fraction of weights pruned), got {given!r}"
        )
    return float(value)


def check_choice(kind: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else a clear error."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(map(repr, allowed))}")
    return value


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, nn.Linear | nn.Conv2d]:
    """The Linear/Conv2d modules of ``model`` chosen by fnmatch ``include``/``exclude`` patterns
    (:func:`dynarch.masks.select_layers`).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> list(select_layers(model, exclude=["2"]))
        ['0']
    """
    chosen = masks_select_layers(model, include, exclude, purpose="prune")
    return {n: m for n, m in chosen.items() if isinstance(m, LAYER_TYPES)}


def named_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Linear | nn.Conv2d]:
    """The Linear/Conv2d modules called ``names``, checked to be prunable (clear errors)."""
    modules = dict(model.named_modules())
    chosen: dict[str, nn.Linear | nn.Conv2d] = {}
    for n in names:
        m = modules.get(n)
        if not isinstance(m, LAYER_TYPES):
            kind = "no module" if m is None else f"a {type(m).__name__}"
            layers = [k for k, v in modules.items() if isinstance(v, LAYER_TYPES)]
            raise ValueError(
                f"{n!r} is {kind}, not a Linear/Conv2d layer of the model; layers: {layers}"
            )
        chosen[n] = m
    check_layers(chosen)
    return chosen


def _sum_all(tensors: list[Tensor]) -> list[int]:
    """``[int(t.sum()) for t in tensors]`` with one host sync."""
    if not tensors:
        return []
    sums = [t.sum() for t in tensors]
    return [int(v) for v in torch.stack([s.to(sums[0].device) for s in sums]).tolist()]


def _check_scores(
    layers: Mapping[str, nn.Linear | nn.Conv2d], scores: Mapping[str, Tensor]
) -> list[Tensor]:
    out = []
    for name, layer in layers.items():
        s = scores[name]
        if not isinstance(s, Tensor) or s.shape != layer.weight.shape:
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(
                f"scores for layer {name!r} must be a tensor shaped like its weight "
                f"{tuple(layer.weight.shape)}, got {got}"
            )
        out.append(s.detach().to(layer.weight.device, torch.float32))
    nonfinite = _sum_all([~torch.isfinite(s).all() for s in out])  # one host sync
    bad = [n for n, f in zip(layers, nonfinite) if f]
    if bad:
        raise ValueError(f"scores of layers {bad} hold NaN or infinite values")
    return out


def prune_by_score(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: str = "layer",
    optimizer: torch.optim.Optimizer | None = None,
    reason: str = "",
    method: str = "score",
) -> Event:
    """Mask the lowest-scoring weights of the layers named in ``scores`` (one ``prune`` event).

    ``scope="layer"`` prunes each layer to ``round(sparsity * numel)`` masked weights;
    ``scope="global"`` ranks all the layers' weights together and masks
    ``round(sparsity * total)`` of them. Already-masked weights count as pruned and rank
    below every score, so they stay pruned: a mask is never un-pruned, and a layer already
    sparser than the target keeps its mask. Ties are broken by the engine generator. Masks
    (``weight_mask`` buffers) are created where absent and updated in place otherwise;
    masked weights are zeroed, and with ``optimizer`` kept zero (with their optimizer state)
    after every step via :func:`dynarch.masks.enforce`.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.arange(8.0).view(2, 4))
        >>> event = prune_by_score(model, {"0": model[0].weight.abs()}, 0.25)
        >>> model[0].weight_mask.view(-1).tolist()
        [False, False, True, True, True, True, True, True]
    """
    sparsity = check_sparsity(sparsity)
    check_choice("scope", scope, SCOPES)
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty dict {layer name: score tensor}")
    layers = named_layers(model, list(scores))
    if optimizer is not None:
        check_held(optimizer, layers, owner=f"{method} pruning")
    keys = _check_scores(layers, scores)
    olds = [layer._buffers.get(MASK) for layer in layers.values()]
    sizes = [layer.weight.numel() for layer in layers.values()]
    counted = iter(_sum_all([m for m in olds if m is not None]))
    actives = [n if m is None else next(counted) for m, n in zip(olds, sizes)]
    for i, old in enumerate(olds):
        if old is not None:  # masked positions rank last, so they stay pruned
            keys[i] = keys[i].masked_fill(~old.to(keys[i].device), -math.inf)
    gen = engine_state(model).generator
    if scope == "layer":
        keep = [min(n - round(sparsity * n), a) for n, a in zip(sizes, actives)]
        news = [topk_mask(key, k, gen) for key, k in zip(keys, keep)]
    else:
        total = sum(sizes)
        k = min(total - round(sparsity * total), sum(actives))
        device = keys[0].device
        flat = topk_mask(torch.cat([s.reshape(-1).to(device) for s in keys]), k, gen)
        news = [part.view_as(s) for part, s in zip(flat.split(sizes), keys)]
    kept = _sum_all(news)
    with transaction(model, "prune", "*", reason=reason) as tx:
        for layer, old, new in zip(layers.values(), olds, news):
            if old is None:  # a fresh tensor of its own (global scope splits one tensor)
                new = new.to(layer.weight.device, copy=True)
                layer.register_buffer(MASK, new, persistent=True)
            else:
                old.copy_(new)
        per_layer = {
            name: {"sparsity": (n - a) / n, "pruned": n - a, "total": n}
            for name, n, a in zip(layers, sizes, kept)
        }
        pruned, total = sum(sizes) - sum(kept), sum(sizes)
        tx.details = {
            "method": method,
            "scope": scope,
            "target": sparsity,
            "sparsity": pruned / total,
            "pruned": pruned,
            "total": total,
            "layers": per_layer,
        }
        tx.replay = {"layers": list(layers)}
        zero_masked(model, optimizer)
    assert tx.event is not None
    return tx.event
