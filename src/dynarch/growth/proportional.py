"""Proportional growth with forward skips, at constant sparsity.

:func:`grow_proportional` adds ``n = round(fraction × A)`` connections, ``A`` the number of
active connections over all masked layers, and prunes the ``n`` weakest existing ones, so
the number of active connections is exactly unchanged:

* with ``prefer_skips`` (default), first every pair ``(P, Q)`` of the traced forward chain
  where ``Q`` is two layers after ``P`` (``P → R → Q``, each read by one layer) and no skip
  joins them gets a new sparse skip from ``P``'s post-activation output to ``Q``'s output,
  with every connection off (one ``"skip"`` event each, :mod:`dynarch.growth.skip`); the
  ``n`` new connections are then drawn uniformly at random among the inactive positions of
  all skip projections, and only what does not fit there goes to the other masked layers;
* without, they are drawn uniformly among the inactive positions of all masked layers;
* the ``n`` pruned connections are the active ones (before the growth) with the smallest
  ``|w|`` over all masked layers (ties: engine generator).

New connections start at zero (so growth alone keeps the function; the pruning changes it)
with zero optimizer state and are flagged in ``weight_patch``; pruned ones get zero weight
and state. New skips add masked (inactive) positions, so the density over masked layers
drops slightly when one is created; the active count is what stays constant. Dense
layers are neither counted nor changed.

Example:
    >>> import torch, torch.nn as nn
    >>> from dynarch.masks import sparsify
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
    ...                       nn.Linear(8, 2))
    >>> _ = sparsify(model, 0.25, distribution="uniform")
    >>> events = grow_proportional(model, 0.1)
    >>> [e.op for e in events], events[-1].details["grown"], events[-1].details["pruned"]
    (['skip', 'proportional'], 4, 4)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._enforce import _weight
from .._engine import engine_state, transaction
from .._validate import check_optimizer
from ..activity import forward_layers, post_activation, try_analyse
from ..events import Event
from ..graph import ModelGraph, UnsupportedModelError
from ..masks import MASK, masked_modules
from ..replay import register_replay
from ..select import topk_mask
from ..sparse._ops import drop_lowest
from ._units import check_reason
from .connect import _layer_facts, replay_patches, turn_off, turn_on
from .highways import chain
from .skip import _details, _join, _skip_replay, build_skip, plan_skip, skips

__all__ = ["grow_proportional", "skip_pairs"]


def skip_pairs(model: nn.Module, graph: ModelGraph) -> list[tuple[str, str]]:
    """``(source, target)`` for every layer two steps ahead of another along single-reader
    chains, with no skip joining them yet; ``source`` is the post-activation module.

    Example:
        >>> from dynarch.graph import analyse
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(),
        ...                     nn.Linear(3, 1))
        >>> skip_pairs(net, analyse(net))
        [('1', '4')]
    """
    names = {id(m): n for n, m in model.named_modules()}
    taken = {
        (names.get(id(s.__dict__.get("_source_module"))), n.rpartition(".")[0])
        for n, s in skips(model).items()
    }
    pairs = []
    for name in forward_layers(model, graph):
        try:
            target = chain(graph, name, 2)[-1]
            source = post_activation(graph, name)
            plan_skip(model, source, target, graph)
        except (UnsupportedModelError, ValueError):
            continue
        if (source, target) not in taken:
            pairs.append((source, target))
    return pairs


def _uniform(free: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Bool mask: ``k`` of the True positions of ``free``, uniformly at random."""
    if k <= 0:
        return torch.zeros_like(free)
    keys = torch.rand(free.numel(), generator=gen).masked_fill_(~free, -1.0)
    return topk_mask(keys, k, gen)


def grow_proportional(
    model: nn.Module,
    fraction: float,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    prefer_skips: bool = True,
    reason: str = "",
) -> list[Event]:
    """Grow ``round(fraction × active)`` connections, preferring forward skips, and prune as
    many of the weakest (see the module doc). ``fraction`` is in ``(0, 1]``.

    Returns the new skips' ``"skip"`` events, then one ``"proportional"`` event with details
    ``fraction``, ``grown``, ``pruned``, ``active`` (total, unchanged) and ``layers``
    (``{name: {"grown", "pruned", "active", "density"}}`` for every layer that changed);
    ``[]`` when ``round(fraction × active)`` is 0.

    Example:
        >>> from dynarch.masks import sparsify, global_density
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> _ = sparsify(model, 0.5, distribution="uniform")
        >>> events = grow_proportional(model, 0.25, prefer_skips=False)
        >>> events[0].details["grown"], global_density(model)
        (3, 0.5)
    """
    check_optimizer(optimizer, optional=True)
    check_reason(reason)
    ok = isinstance(fraction, int | float) and not isinstance(fraction, bool)
    if not ok or not math.isfinite(fraction) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    mods = masked_modules(model)
    if not mods:
        raise ValueError("model has no masked layer; sparsify it first (dynarch.sparsify)")
    masks = {n: m._buffers[MASK] for n, m in mods.items()}
    active = int(torch.stack([m.sum().cpu() for m in masks.values() if m is not None]).sum())
    n = round(fraction * active)
    if n == 0:
        return []
    graph = try_analyse(model) if prefer_skips else None
    pairs = skip_pairs(model, graph) if graph is not None else []
    plans = [(s, t, plan_skip(model, s, t, graph)) for s, t in pairs]
    free = sum(m.numel() for m in masks.values() if m is not None) - active
    free += sum(i * o for _, _, (_, i, o) in plans)
    if free < n:
        raise ValueError(
            f"cannot grow {n} connections: the masked layers have only {free} inactive positions"
        )
    events = []
    for source, target, (kind, n_in, n_out) in plans:
        mask = torch.zeros(n_out, n_in, *((1, 1) if kind == "Conv2d" else ()), dtype=torch.bool)
        with transaction(model, "skip", target, reason=reason) as tx:
            name, skip = build_skip(
                model, source, target, kind=kind, n_in=n_in, n_out=n_out, mask=mask
            )
            _join(model, skip, optimizer)
            tx.details = _details(name, skip, kind, n_in, n_out) | {"density": 0.0}
            tx.replay = _skip_replay(name, skip, kind, n_in, n_out)
        assert tx.event is not None
        events.append(tx.event)
    events.append(_rewire(model, n, fraction, optimizer, prefer_skips, reason))
    return events


def _rewire(
    model: nn.Module,
    n: int,
    fraction: float,
    optimizer: torch.optim.Optimizer | None,
    prefer_skips: bool,
    reason: str,
) -> Event:
    mods = masked_modules(model)
    names = list(mods)
    masks = [mods[k]._buffers[MASK] for k in names]
    flat = torch.cat([m.reshape(-1).cpu() for m in masks if m is not None])
    sizes = [m.numel() for m in masks if m is not None]
    skip_layers = {f"{k}.proj" for k in skips(model)}
    in_skip = torch.cat([torch.full((s,), k in skip_layers) for k, s in zip(names, sizes)])
    gen = engine_state(model).generator
    if prefer_skips:
        pool = ~flat & in_skip
        first = min(n, int(pool.sum()))
        grow = _uniform(pool, first, gen) | _uniform(~flat & ~in_skip, n - first, gen)
    else:
        grow = _uniform(~flat, n, gen)
    weights = [_weight(mods[k]).detach().reshape(-1).abs().float().cpu() for k in names]
    scores = torch.cat(weights).masked_fill_(~flat, math.inf)
    prune = torch.zeros_like(flat)
    prune[drop_lowest(scores, n, gen)] = True
    grown: dict[str, int] = {}
    pruned: dict[str, int] = {}
    splits = zip(names, grow.split(sizes), prune.split(sizes), strict=True)
    with transaction(model, "proportional", "*", reason=reason) as tx:
        for name, g, p in splits:
            module = mods[name]
            device = _weight(module).device
            on, off = g.nonzero().squeeze(1), p.nonzero().squeeze(1)
            if off.numel():
                turn_off(module, off.to(device), optimizer=optimizer)
            if on.numel():
                turn_on(module, on.to(device), optimizer=optimizer, init="zero", gen=gen)
            if on.numel() or off.numel():
                grown[name], pruned[name] = on.numel(), off.numel()
        facts = _layer_facts({k: mods[k] for k in grown}, grown)
        layers: dict[str, Any] = {
            k: {"grown": grown[k], "pruned": pruned[k], "active": f["active"],
                "density": f["density"]}
            for k, f in facts.items()
        }  # fmt: skip
        tx.details = {"fraction": float(fraction), "grown": n, "pruned": n,
                      "active": int(flat.sum()), "layers": layers}  # fmt: skip
        tx.replay = {"layers": [k for k in grown if grown[k]]}
    assert tx.event is not None
    return tx.event


register_replay("proportional")(replay_patches)
