"""Argument checks shared by the growth ops (one wording each)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..graph import resolve
from ..remap import out_units

__all__ = ["LAYERS", "check_reason", "get_layer", "unit_indices"]

LAYERS = (nn.Linear, nn.Conv2d)


def get_layer(model: nn.Module, name: str) -> nn.Linear | nn.Conv2d:
    """The Linear/Conv2d called ``name`` (clear errors when absent or of another kind)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"layer must be a module name (str), got {type(name).__name__}")
    mod = resolve(model, name, LAYERS)
    assert isinstance(mod, nn.Linear | nn.Conv2d)
    return mod


def unit_indices(units: Tensor | Sequence[int], module: nn.Module, name: str) -> Tensor:
    """``units`` as a sorted, duplicate-free CPU LongTensor of output units of ``module``."""
    idx = torch.as_tensor(units)
    if idx.dim() == 1 and idx.numel() == 0:
        idx = idx.long()
    if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype is torch.bool:
        raise ValueError(
            f"units of '{name}' must be a 1-D tensor or list of unit indices, got "
            f"{idx.dtype} of shape {tuple(idx.shape)}"
        )
    idx = idx.long().cpu()
    width = out_units(module)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= width):
        raise ValueError(
            f"units of '{name}' must lie in [0, {width}) (its output units), got min "
            f"{int(idx.min())} and max {int(idx.max())}"
        )
    return torch.unique(idx)


def check_reason(reason: object) -> str:
    """``reason`` if it is a string."""
    if not isinstance(reason, str):
        raise TypeError(f"reason must be a str, got {type(reason).__name__}")
    return reason
