"""Argument checks shared by the loop, the rewirers and the pruners (one wording each)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["check_int", "check_model", "check_optimizer"]


def check_int(name: str, value: object, low: int) -> int:
    """``value`` if it is an int >= ``low``, else a clear error.

    Example:
        >>> check_int("epochs", 3, 0)
        3
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_model(model: object) -> nn.Module:
    """``model`` if it is an ``nn.Module``, else a TypeError naming what was given."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_optimizer(optimizer: object, *, optional: bool = False) -> None:
    """Refuse anything but a ``torch.optim.Optimizer`` (or ``None`` when ``optional``)."""
    if optional and optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        allowed = "a torch.optim.Optimizer or None" if optional else "a torch.optim.Optimizer"
        raise TypeError(f"optimizer must be {allowed}, got {type(optimizer).__name__}")
