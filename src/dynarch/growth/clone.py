"""Vertical cloning: copy chosen (e.g. saturated) units into new units, function unchanged.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> x = torch.randn(5, 4); before = model(x)
    >>> event = clone_units(model, "0", [1, 4])
    >>> model[0].out_features, event.details["sources"]
    (8, [1, 4])
    >>> bool((model(x) - before).abs().max() <= 1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..events import Event
from ..remap import out_units
from ..surgery import widen
from ._units import check_reason, get_layer

__all__ = ["clone_units"]


def clone_units(
    model: nn.Module,
    layer: str,
    units: Tensor | Sequence[int],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    noise: float = 0.0,
    reason: str = "",
) -> Event:
    """Clone ``units`` of ``layer`` into new units appended after the existing ones.

    Net2Net split through :func:`dynarch.widen` (``init="net2net"``, ``sources=units``): each
    clone copies its source's incoming weights, bias and mask row (and norm entries); every
    consumer's input columns of a source are divided equally among the source and its clones
    (their mask columns copied), so the function is unchanged (exactly, up to float rounding,
    when ``noise == 0``; ``noise`` jitters the clones' incoming weights by ``noise × std``).
    A unit listed twice gets two clones. Coupled layers (residual adds) are cloned together.
    Optimizer state of existing units is carried; the clones' starts at zero.

    Returns widen's event (op ``"widen"``, ``details["sources"]`` = the cloned units, the
    clones being units ``old_width, old_width + 1, …`` in that order).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> clone_units(model, "0", torch.tensor([2])).details["new_width"]
        4
    """
    module = get_layer(model, layer)
    check_reason(reason)
    idx = torch.as_tensor(units)
    if idx.numel() == 0:
        raise ValueError(f"no units given to clone in '{layer}'")
    if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype is torch.bool:
        raise ValueError(
            f"units of '{layer}' must be a 1-D tensor or list of unit indices, got "
            f"{idx.dtype} of shape {tuple(idx.shape)}"
        )
    old = out_units(module)
    return widen(
        model,
        layer,
        old + idx.numel(),
        optimizer=optimizer,
        init="net2net",
        noise=noise,
        sources=idx,
        reason=reason,
    )
