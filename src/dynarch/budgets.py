"""Exact per-layer budgets of active weights for a target overall density.

Per-layer budgets (:func:`layer_budgets`) are exact integers: the total is
``T = round(density * total)`` and layer ``l`` gets ``T * w_l / sum(w)`` weights (uniform:
``w_l = numel``; ER: ``(n_out + n_in) * kernel_numel``; ERK: ``sum(shape)``), computed in exact
integer arithmetic. A layer whose share would exceed its size is made dense and the rest
re-solved. Fractional shares are rounded by the largest-remainder method (ties to the layer
that comes first), so each layer gets the floor or the ceiling of its share and the counts
add up to exactly ``T``.

Example:
    >>> layer_budgets({"a": (8, 4), "b": (2, 8)}, 0.5, "uniform")
    {'a': 16, 'b': 8}
"""

from __future__ import annotations

from collections.abc import Mapping
from math import prod

import torch

__all__ = ["DISTRIBUTIONS", "layer_budgets"]

DISTRIBUTIONS = ("uniform", "er", "erk")


def check_density(density: object) -> float:
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)


def check_choice(kind: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _weights(shapes: Mapping[str, tuple[int, ...]], distribution: str) -> dict[str, int]:
    """Integer weight ``w_l`` with layer density proportional to ``w_l / numel_l``."""
    if distribution == "uniform":
        return {k: prod(s) for k, s in shapes.items()}
    if distribution == "er":
        return {k: (s[0] + s[1]) * prod(s[2:]) for k, s in shapes.items()}
    return {k: sum(s) for k, s in shapes.items()}


def _apportion(sizes: dict[str, int], weights: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` active weights over layers in proportion to ``weights`` (exact)."""
    dense: set[str] = set()
    while True:
        rest = total - sum(sizes[k] for k in dense)
        free = [k for k in sizes if k not in dense]
        divisor = sum(weights[k] for k in free)
        # share_l = rest * w_l / divisor; a share above the layer's size makes it dense.
        over = {k for k in free if rest * weights[k] > divisor * sizes[k]}
        if not over:
            break
        dense |= over
    budgets = {k: sizes[k] for k in dense}
    remainders: list[tuple[int, int, str]] = []
    for i, k in enumerate(free):
        budgets[k], rem = divmod(rest * weights[k], divisor)
        remainders.append((-rem, i, k))
    extra = total - sum(budgets.values())
    for _, _, k in sorted(remainders)[:extra]:
        budgets[k] += 1
    return {k: budgets[k] for k in sizes}


def _min_density(sizes: dict[str, int], weights: dict[str, int], failing: int) -> float:
    """A density at which every layer gets >= 1 weight (bisection on the total count)."""
    n = sum(sizes.values())
    lo, hi = failing, n  # lo fails, hi (all dense) works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if min(_apportion(sizes, weights, mid).values()) >= 1:
            hi = mid
        else:
            lo = mid
    short = (float(f"{hi / n:.{d}g}") for d in range(3, 18))  # shortest that rounds to hi
    return next((d for d in short if round(d * n) == hi), hi / n)


def layer_budgets(
    shapes: Mapping[str, tuple[int, ...]], density: float, distribution: str
) -> dict[str, int]:
    """Exact number of active weights per layer for a target ``density`` (pure function).

    ``shapes`` maps layer names to weight shapes ``(out, in, *kernel)``. The counts add up to
    ``round(density * total)`` (see the module docstring for the rounding); a layer that
    would get no weight at all is an error naming the smallest density that works.

    Example:
        >>> layer_budgets({"a": (8, 4), "b": (2, 8), "c": (4, 2, 3, 3)}, 0.5, "erk")
        {'a': 22, 'b': 16, 'c': 22}
    """
    density = check_density(density)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if not shapes:
        raise ValueError("shapes is empty: give at least one layer {name: weight shape}")
    for name, shape in shapes.items():
        dims = tuple(shape) if isinstance(shape, tuple | list | torch.Size) else ()
        if len(dims) < 2 or not all(isinstance(d, int) and d > 0 for d in dims):
            raise ValueError(
                f"shape of layer {name!r} must be a tuple of at least 2 positive ints "
                f"(out, in, *kernel), got {shape!r}"
            )
    sizes = {k: prod(s) for k, s in shapes.items()}
    weights = _weights({k: tuple(s) for k, s in shapes.items()}, distribution)
    total = round(density * sum(sizes.values()))
    budgets = _apportion(sizes, weights, total)
    for name, k in budgets.items():
        if k == 0:
            raise ValueError(
                f"layer {name!r} ({sizes[name]} weights, shape {tuple(shapes[name])}) would get "
                f"0 active weights at density {density!r} with distribution {distribution!r}; "
                f"the minimal density that works is {_min_density(sizes, weights, total)!r}"
            )
    return budgets
