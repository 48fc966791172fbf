"""Modules the engine inserts into models."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Residual"]


class Residual(nn.Module):
    """``x + alpha * module(x)``: a module attached in a slot, blended in by ``alpha``.

    ``alpha`` starts at 0 by default, so attaching leaves the function unchanged; it is a
    0-dim parameter (trainable unless ``trainable_alpha=False``) that a blending schedule
    may also set directly.

    Example:
        >>> r = Residual(nn.Linear(4, 4))
        >>> x = torch.randn(2, 4)
        >>> torch.equal(r(x), x)
        True
    """

    def __init__(self, module: nn.Module, alpha: float = 0.0, *, trainable_alpha: bool = True):
        super().__init__()
        self.module = module
        self.alpha = nn.Parameter(torch.tensor(float(alpha)), requires_grad=trainable_alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.module(x)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha.detach()):.4g}"
