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

import torch
from torch import Tensor

__all__ = ["topk_mask"]

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


def _bracketed(flat: Tensor, k: int, gen: torch.Generator) -> Tensor | None:
    n = flat.numel()
    idx = torch.randint(0, n, (SAMPLE,), generator=gen).to(flat.device)
    sample = flat[idx].sort(descending=True).values
    q = k / n * SAMPLE
    margin = 5 * math.sqrt(SAMPLE * (k / n) * (1 - k / n)) + 8
    hi_rank, lo_rank = int(q - margin), int(q + margin)
    if hi_rank < 0 or lo_rank >= SAMPLE:
        return None
    hi, lo = sample[hi_rank], sample[lo_rank]
    out = flat > hi
    candidates = ((flat >= lo) & ~out).nonzero().squeeze(1)
    need = k - int(out.sum())
    if need < 0 or need > candidates.numel():
        return None
    out[candidates[_exact(flat[candidates], need, gen)]] = True
    return out


def topk_mask(scores: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Bool tensor shaped like ``scores`` with exactly ``k`` True at the largest scores.

    Values tied with the k-th largest are chosen uniformly at random with ``gen`` (a CPU
    generator), so the result is exact and reproducible whatever the ties.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    out = _bracketed(flat, k, gen) if n >= SAMPLED_ABOVE else None
    if out is None:
        out = _exact(flat, k, gen)
    return out.view_as(scores)
