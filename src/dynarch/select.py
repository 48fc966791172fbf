"""Exact top-k selection with seeded random tie-breaking: the primitive behind every mask.

:func:`topk_mask` returns exactly ``k`` positions holding the largest scores. On large
tensors it avoids a full ``topk``: a seeded sample brackets the k-th largest value
between two thresholds (Floyd–Rivest style), everything above the upper one is kept,
and only the few candidates between them go through ``topk``. When the bracket misses
(rare: a margin of several standard deviations is used) it falls back to a full ``topk``,
so the result is always exact.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> topk_mask(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2, g)
    tensor([ True, False,  True, False])
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["topk_indices", "topk_mask"]

SAMPLED_ABOVE = 1 << 16  # tensors at least this large use the sampled bracket
SAMPLE = 1 << 14


def _exact(flat: Tensor, k: int, gen: torch.Generator) -> Tensor:
    threshold = flat.topk(k, sorted=False).values.min()
    out = flat > threshold
    need = k - int(out.sum())
    if need > 0:
        tied = (flat == threshold).nonzero().squeeze(1)
        order = torch.randperm(tied.numel(), generator=gen)[:need].to(tied.device)
        out[tied[order]] = True
    return out


def _at_least(flat: Tensor, lo: Tensor) -> Tensor:
    """Ascending indices of ``flat >= lo`` (through NumPy on the CPU: several times faster
    than ``torch.nonzero`` there, same result)."""
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        found = np.flatnonzero(flat.detach().numpy() >= lo.item())
        return torch.from_numpy(found.astype(np.int64, copy=False))
    return (flat >= lo).nonzero().squeeze(1)


def _bracketed(flat: Tensor, k: int, gen: torch.Generator) -> Tensor | None:
    """Flat indices of the k largest via a sampled bracket ``[lo, hi]`` (None: missed).

    Two passes over ``flat`` (``>= lo`` and its ``nonzero``); everything above ``hi`` is
    kept, the ``need`` others come from the few values inside the bracket."""
    n = flat.numel()
    idx = torch.randint(0, n, (SAMPLE,), generator=gen).to(flat.device)
    q = k / n * SAMPLE
    margin = 5 * math.sqrt(SAMPLE * (k / n) * (1 - k / n)) + 8
    hi_rank, lo_rank = int(q - margin), int(q + margin)  # ranks from the top, 0-based
    if hi_rank < 0 or lo_rank >= SAMPLE:
        return None
    sample = flat.index_select(0, idx)
    hi = sample.kthvalue(SAMPLE - hi_rank).values  # two selections, no full sort
    lo = sample.kthvalue(SAMPLE - lo_rank).values
    at_least_lo = _at_least(flat, lo)
    values = flat.index_select(0, at_least_lo)
    top = values > hi
    above, inside = at_least_lo[top], at_least_lo[~top]
    need = k - above.numel()
    if need < 0 or need > inside.numel():
        return None
    if need == 0:
        return above
    chosen = inside[_exact(values[~top], need, gen)]
    return torch.cat([above, chosen])


def topk_mask(scores: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Bool tensor shaped like ``scores`` with exactly ``k`` True at the largest scores.

    Values tied with the k-th largest are chosen uniformly at random with ``gen`` (a CPU
    generator), so the result is exact and reproducible whatever the ties.

    Example:
        >>> topk_mask(torch.tensor([[0.5, 2.0], [1.0, 0.1]]), 2, torch.Generator())
        tensor([[False,  True],
                [ True, False]])
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    picked = _bracketed(flat, k, gen) if n >= SAMPLED_ABOVE else None
    if picked is None:
        return _exact(flat, k, gen).view_as(scores)
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[picked] = True
    return out.view_as(scores)


def topk_indices(scores: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Flat indices (int64, no particular order) of exactly ``k`` largest ``scores``.

    The same selection as :func:`topk_mask` (same ties broken the same way, same draws
    from ``gen``), without building the full mask: cheaper when ``k`` is small. NaN scores
    rank below every other value, so the count stays exact.

    Example:
        >>> topk_indices(torch.tensor([3.0, 1.0, 2.0]), 2, torch.Generator()).sort().values
        tensor([0, 2])
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.arange(n, device=flat.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    picked = _select(flat, k, gen)
    if picked.numel() != k:  # NaN compares false everywhere: rank it lowest and redo
        picked = _select(torch.nan_to_num(flat, nan=-math.inf), k, gen)
    return picked


def _select(flat: Tensor, k: int, gen: torch.Generator) -> Tensor:
    picked = _bracketed(flat, k, gen) if flat.numel() >= SAMPLED_ABOVE else None
    if picked is None:
        picked = _exact(flat, k, gen).nonzero().squeeze(1)
    return picked
