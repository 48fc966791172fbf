"""Vectorised per-layer primitives of a mask update (shared by every algorithm and layer).

All positions are flat (row-major) indices into a weight. Selection goes through
:func:`dynarch.select.topk_indices` (exact count, seeded tie-breaking); every random draw
comes from the generator passed in (the engine generator), made on the CPU and moved.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..select import topk_indices

__all__ = [
    "GROW_INITS", "active_indices", "drop_lowest", "fan_in_bound", "grow_highest",
    "grow_uniform", "gumbel_scores", "init_values", "put", "rewire_layer", "state_tensors",
]  # fmt: skip

GROW_INITS = ("zero", "random", "gradient")
_TINY = torch.finfo(torch.float32).tiny


def active_indices(mask: Tensor) -> Tensor:
    """Flat indices of the True positions of a bool mask, ascending."""
    return mask.reshape(-1).nonzero().squeeze(1)


def drop_lowest(scores: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Indices into ``scores`` of the ``k`` lowest (ties: seeded draws)."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return topk_indices(scores.float().neg(), k, gen)


def grow_highest(
    scores: Tensor, active: Tensor, drop: Tensor, k: int, gen: torch.Generator
) -> Tensor:
    """The ``k`` positions with the highest ``scores`` among those not in ``active`` or in
    ``drop`` (the just-dropped, a subset of ``active``). ``scores`` is full-size and is
    overwritten when it is float32 (pass a fresh tensor); NaN scores rank lowest."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    keys = scores.reshape(-1)
    keys = keys if keys.dtype == torch.float32 else keys.float()
    kept = keys.index_select(0, drop)
    keys.index_fill_(0, active, -math.inf).index_copy_(0, drop, kept)
    return topk_indices(keys, k, gen)


def grow_uniform(mask: Tensor, free: int, k: int, gen: torch.Generator) -> Tensor:
    """``k`` inactive positions of ``mask`` (``free`` of them) uniformly without replacement.

    Equivalent to ranking i.i.d. uniform scores, but costs O(k) draws instead of one per
    weight: positions are drawn uniformly from the whole layer, active ones rejected, and the
    first ``k`` distinct survivors kept (the first ``k`` distinct values of an i.i.d. uniform
    sequence form a uniform random ``k``-subset). When that would need many draws (``k``
    close to ``free``) it ranks uniform scores instead.
    """
    flat = mask.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=mask.device)
    if k >= free:
        return (~flat).nonzero().squeeze(1)
    expected = n * math.log(free / (free - k))  # draws until k distinct free positions
    draws = int(1.2 * expected + 6 * math.sqrt(expected) + 64)
    while 4 * draws < n:
        picks = torch.randint(0, n, (draws,), generator=gen).to(mask.device)
        picks = picks[~flat.index_select(0, picks)]
        order = torch.arange(picks.numel(), dtype=torch.int32, device=picks.device)
        first = torch.full((n,), picks.numel(), dtype=torch.int32, device=picks.device)
        first.scatter_reduce_(0, picks, order, reduce="amin")  # first draw of each position
        picks = picks[first.index_select(0, picks) == order]  # distinct, in draw order
        if picks.numel() >= k:
            return picks[:k]
        draws *= 2  # a rare miss: draw afresh (still uniform given success)
    scores = torch.rand(n, generator=gen).to(mask.device)
    active = (flat).nonzero().squeeze(1)
    return grow_highest(scores, active, active[:0], k, gen)


def fan_in_bound(weight: Tensor) -> float:
    """PyTorch's default-init bound ``1 / sqrt(fan_in)`` of a Linear/Conv weight."""
    return 1.0 / math.sqrt(max(1, weight[0].numel()))


def init_values(
    kind: str, weight: Tensor, grow: Tensor, grad: Tensor | None, gen: torch.Generator
) -> Tensor | None:
    """Values of regrown weights at flat positions ``grow`` (``None``: leave them zero).

    ``"zero"``: 0. ``"random"``: ``U(-b, b)`` with the default-init bound
    ``b = 1/sqrt(fan_in)``. ``"gradient"``: ``-g * b / max|g|`` over the regrown positions
    (the steepest-descent direction, the largest at the default-init bound; 0 if ``g`` is 0).
    """
    k = grow.numel()
    if kind == "zero" or k == 0:
        return None
    bound = fan_in_bound(weight)
    if kind == "random":
        values = torch.rand(k, generator=gen).mul_(2 * bound).sub_(bound)
        return values.to(device=weight.device, dtype=weight.dtype)
    assert grad is not None
    g = grad.reshape(-1).index_select(0, grow).float()
    scale = bound / g.abs().max().clamp_min(_TINY)
    return (-g * scale).to(weight.dtype)


def put(t: Tensor, idx: Tensor, value: Tensor | float) -> None:
    """``t.flat[idx] = value`` in place (also for non-contiguous tensors)."""
    if not t.is_contiguous():
        t[torch.unravel_index(idx, t.shape)] = value
    elif isinstance(value, Tensor):
        t.view(-1).index_copy_(0, idx, value.to(t.dtype))
    else:
        t.view(-1).index_fill_(0, idx, value)


def state_tensors(optimizer: torch.optim.Optimizer | None, weight: Tensor) -> list[Tensor]:
    """The optimizer-state tensors of ``weight`` shaped like it (momentum, moments, ...)."""
    if optimizer is None:
        return []
    state = optimizer.state.get(weight, {}).values()
    return [v for v in state if isinstance(v, Tensor) and v.shape == weight.shape]


def gumbel_scores(grad: Tensor, temperature: float, gen: torch.Generator) -> Tensor:
    """``|grad| / temperature + Gumbel(0, 1)`` (flat): ranking them samples positions without
    replacement with probability ``softmax(|grad| / temperature)`` (Gumbel-top-k)."""
    u = torch.rand(grad.numel(), generator=gen).clamp_(min=1e-20).to(grad.device)
    gumbel = u.log_().neg_().log_().neg_()
    return gumbel.add_(grad.reshape(-1).abs().float() / temperature)


def rewire_layer(
    mask: Tensor,
    weight: Tensor,
    active: Tensor,
    counts: tuple[int, int],
    drop_scores: Callable[[Tensor], Tensor],
    grow_scores: Callable[[], Tensor | None],
    init: str,
    gradient: Callable[[], Tensor | None],
    states: list[Tensor],
    gen: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """One update of one layer, in place (call under ``torch.no_grad()``).

    ``active`` holds the flat positions of the mask's True entries (each once, any order).
    Drops the ``counts[0]`` of them with the lowest ``drop_scores(active)``, then grows
    ``counts[1]`` positions among all now-inactive ones (the just-dropped included) with the
    highest ``grow_scores()`` (a fresh full-size tensor, overwritten; ``None``: uniformly at
    random). Dropped weights become 0, regrown ones ``init_values(init, ...)``; ``states``
    (optimizer-state tensors shaped like the weight) are zeroed at both. Returns the flat
    ``(dropped, grown, new active)`` positions (the new list: survivors in order, then the
    grown).
    """
    n_drop, n_grow = counts
    drop = grow = torch.zeros(0, dtype=torch.long, device=mask.device)
    if n_drop <= 0 and n_grow <= 0:
        return drop, grow, active
    kept = active
    if n_drop > 0:
        picked = drop_lowest(drop_scores(active), n_drop, gen)
        drop = active.index_select(0, picked)
        keep = torch.ones(active.numel(), dtype=torch.bool, device=active.device)
        kept = active[keep.index_fill_(0, picked, False)]
        put(mask, drop, False)
    values = None
    if n_grow > 0:
        scores = grow_scores()
        if scores is None:
            free = mask.numel() - active.numel() + n_drop
            grow = grow_uniform(mask, free, n_grow, gen)
        else:
            grow = grow_highest(scores, active, drop, n_grow, gen)
        put(mask, grow, True)
        grad = gradient() if init == "gradient" else None
        values = init_values(init, weight, grow, grad, gen)
    changed = torch.cat([drop, grow])
    put(weight, changed, 0.0)
    if values is not None:
        put(weight, grow, values)
    for state in states:
        put(state, changed, 0)
    return drop, grow, torch.cat([kept, grow])
