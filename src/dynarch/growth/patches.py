"""Extrema-guided patches: dense blocks of connections around chosen units, in the masks.

For every chosen unit ``u`` of a masked layer ``L`` (``out`` units reading ``in`` inputs),
:func:`add_patches` turns on, in ``L``'s own mask, a *window* of ``p = min(patch_size, in)``
consecutive inputs centred on the input that corresponds to ``u`` by position,
``c = floor((u + 0.5) · in / out)``; the window is ``[c - p // 2, c - p // 2 + p)`` shifted to
lie inside ``[0, in)`` (conv: every kernel position of those input channels). In each
*masked* consumer of ``L``'s units (the layers reading them, from the traced graph) it turns
on ``u``'s input column (a block of columns after a ``Flatten``) for a window of
``min(patch_size, rows)`` consecutive output units centred the same way. The patch is the
union of those positions; positions already active are left alone, so the number of
connections added (``details["added"]``) is exactly the number of *inactive* positions in
the union (capped by ``max_connections``: then a uniformly random subset of exactly that
many, engine generator). Dense consumers are skipped (already connected).

New weights start at zero (``init="zero"``: the function is unchanged) or fan-in uniform;
their optimizer state starts at zero; they are flagged in ``weight_patch``.

Example:
    >>> import torch, torch.nn as nn
    >>> from dynarch.masks import sparsify
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> _ = sparsify(model, 0.1, distribution="uniform")
    >>> event = add_patches(model, {"0": torch.tensor([3])}, patch_size=4)
    >>> sorted(event.details["layers"]), event.details["added"] <= 4 + 4
    (['0', '2'], True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._engine import engine_state, transaction
from .._validate import check_int, check_optimizer
from ..activity import Extrema, try_analyse
from ..events import Event
from ..masks import MASK
from ..remap import out_units
from ..select import topk_mask
from ._units import check_reason, get_layer, unit_indices
from .connect import INITS, _layer_facts, _masked, turn_on

__all__ = ["add_patches", "patch_positions"]


def _windows(centres: Tensor, size: int, length: int) -> Tensor:
    """``(len(centres), min(size, length))`` indices: windows centred on ``centres`` inside
    ``[0, length)``."""
    p = min(size, length)
    start = (centres - p // 2).clamp(0, length - p)
    return start[:, None] + torch.arange(p)


def _centres(units: Tensor, n_units: int, length: int) -> Tensor:
    return torch.div((2 * units + 1) * length, 2 * n_units, rounding_mode="floor")


def patch_positions(
    model: nn.Module, units: Mapping[str, Tensor], patch_size: int
) -> dict[str, Tensor]:
    """Bool masks (shaped like each weight) of the patch positions around ``units``
    (``{layer: unit indices}``), by layer name: incoming windows in each layer, outgoing
    windows in each masked consumer (see the module doc). Active positions included.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 2))
        >>> patch_positions(model, {"0": torch.tensor([1])}, 2)["0"].int().tolist()
        [[0, 0, 0, 0], [0, 0, 1, 1]]
    """
    graph = try_analyse(model)
    found: dict[str, Tensor] = {}

    def weight(name: str) -> Tensor:
        w = model.get_submodule(name).weight
        assert isinstance(w, Tensor)
        return w

    def mark(name: str, rows: Tensor, cols: Tensor) -> None:
        if name not in found:
            found[name] = torch.zeros(weight(name).shape[:2], dtype=torch.bool)
        found[name][rows, cols] = True

    for name, idx in units.items():
        width = out_units(model.get_submodule(name))
        n_in = weight(name).shape[1]
        mark(name, idx[:, None], _windows(_centres(idx, width, n_in), patch_size, n_in))
        if graph is None or name not in graph.group_of:
            continue
        for consumer, flat in graph.group(name).consumers:
            if graph.modules[consumer]._buffers.get(MASK) is None:
                continue
            rows_n, cols_n = weight(consumer).shape[:2]
            groups = int(getattr(graph.modules[consumer], "groups", 1))
            if groups > 1 and not flat:  # grouped conv: unit u feeds only its group's rows
                out_per = rows_n // groups
                local = idx % cols_n  # u's input column within its group
                rows = (idx // cols_n)[:, None] * out_per + _windows(
                    _centres(local, cols_n, out_per), patch_size, out_per
                )
                mark(consumer, rows, local[:, None].expand_as(rows))
                continue
            rows = _windows(_centres(idx, width, rows_n), patch_size, rows_n)
            block = cols_n // width if flat else 1
            cols = idx[:, None] * block + torch.arange(block)  # (units, block)
            mark(consumer, rows[:, :, None], cols[:, None, :])
    out = {}
    for name, grid in found.items():
        w = weight(name)
        out[name] = grid.view(*grid.shape, *([1] * (w.dim() - 2))).expand(w.shape).to(w.device)
    return out


def _units_of(model: nn.Module, units: Any) -> dict[str, Tensor]:
    if isinstance(units, Extrema):
        if units.model is not model:
            raise ValueError("the Extrema given watches another model than the one to patch")
        chosen = {n: units.extrema_units(n) for n in units.layers}
    elif isinstance(units, Mapping):
        chosen = {}
        for name, idx in units.items():
            module = get_layer(model, name)
            chosen[name] = unit_indices(idx, module, name)
    else:
        raise TypeError(
            f"units must be {{layer name: unit indices}} or an Extrema, got {type(units).__name__}"
        )
    chosen = {n: t for n, t in chosen.items() if t.numel()}
    if not chosen and isinstance(units, Extrema):
        raise ValueError(
            "no units to patch (the Extrema found no dead or saturated unit: observe data "
            "first, or lower its thresholds)"
        )
    if not chosen:
        given = f"every layer given ({sorted(units)}) has no units" if units else "no layer given"
        raise ValueError(f"no units to patch: {given}; name at least one unit of a layer")
    for name in chosen:
        _masked(model.get_submodule(name), name)
    return chosen


def add_patches(
    model: nn.Module,
    units: Mapping[str, Tensor | Sequence[int]] | Extrema,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    patch_size: int = 8,
    init: str = "zero",
    max_connections: int | None = None,
    reason: str = "",
) -> Event:
    """Turn on a dense patch of connections around each chosen unit (one ``"patch"`` event).

    ``units`` is ``{layer: unit indices}`` or an :class:`~dynarch.activity.Extrema` (its dead
    ∪ saturated units of every watched layer). Every layer named must be masked. The patch
    geometry and the exact count are defined in the module doc. The event's details:
    ``units`` (per layer, the units patched), ``patch_size``, ``init``, ``added`` (total) and
    ``layers`` (``{name: {"added", "active", "density"}}`` for every layer that gained
    connections).

    Example:
        >>> from dynarch.masks import sparsify
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> _ = sparsify(model, 0.25, distribution="uniform")
        >>> add_patches(model, {"0": [0]}, patch_size=4, max_connections=2).details["added"]
        2
    """
    check_optimizer(optimizer, optional=True)
    check_int("patch_size", patch_size, 1)
    if max_connections is not None:
        check_int("max_connections", max_connections, 1)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r} for patches; allowed: {', '.join(INITS)}")
    check_reason(reason)
    chosen = _units_of(model, units)
    wanted = patch_positions(model, chosen, patch_size)
    new = {n: w & ~model.get_submodule(n)._buffers[MASK] for n, w in wanted.items()}  # type: ignore[operator]
    names = list(new)
    flat = torch.cat([new[n].reshape(-1).cpu() for n in names])
    gen = engine_state(model).generator
    if max_connections is not None and int(flat.sum()) > max_connections:
        keys = torch.rand(flat.numel(), generator=gen).masked_fill_(~flat, -1.0)
        flat = topk_mask(keys, max_connections, gen)
    parts = flat.split([new[n].numel() for n in names])
    target = next(iter(chosen)) if len(chosen) == 1 else "*"
    with transaction(model, "patch", target, reason=reason) as tx:
        layers: dict[str, Any] = {}
        for name, part in zip(names, parts, strict=True):
            idx = part.nonzero().squeeze(1)
            if idx.numel():
                module = model.get_submodule(name)
                turn_on(module, idx.to(module.weight.device), optimizer=optimizer, init=init,
                        gen=gen)  # fmt: skip
                layers[name] = idx.numel()
        facts = _layer_facts({n: model.get_submodule(n) for n in layers}, layers)
        tx.details = {
            "units": {n: t.tolist() for n, t in chosen.items()},
            "patch_size": patch_size,
            "init": init,
            "added": sum(layers.values()),
            "layers": facts,
        }
        tx.replay = {"layers": list(layers)}
    assert tx.event is not None
    return tx.event
