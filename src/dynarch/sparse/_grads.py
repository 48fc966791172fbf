"""Dense gradients kept for mask updates: a mean over a window of steps, or a momentum.

Example:
    >>> import torch
    >>> buf = GradientBuffer()
    >>> buf.add({"a": torch.ones(2)}, step=9, target=10)
    >>> buf.add({"a": 3 * torch.ones(2)}, step=10, target=10)
    >>> buf.get("a", torch.Size([2]))
    tensor([2., 2.])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..triggers import check_state

__all__ = ["GradientBuffer"]

_KEYS = {"captured", "target", "count", "grads"}


class GradientBuffer:
    """Per-layer dense gradients captured for the next update.

    ``momentum=None``: the mean of the gradients added for the same ``target`` update step
    (a new target starts afresh). ``momentum=b``: ``m <- b * m + (1 - b) * grad`` on every
    add, kept across updates (sparse momentum's buffer).

    Example:
        >>> buf = GradientBuffer(momentum=0.5)
        >>> buf.add({"a": torch.ones(1)}, step=1, target=None)
        >>> buf.get("a", torch.Size([1]))
        tensor([0.5000])
    """

    def __init__(self, momentum: float | None = None) -> None:
        self.momentum = momentum
        self.captured = 0  # last step whose gradients were added
        self.target: int | None = None  # the update step the mean feeds
        self.count = 0
        self.grads: dict[str, Tensor] = {}

    def add(self, grads: dict[str, Tensor | None], step: int, target: int | None) -> None:
        """Add one step's gradients (``None``: a layer without gradient, counted as 0)."""
        if self.momentum is None and target != self.target:
            self.clear()
            self.target = target
        with torch.no_grad():
            for name, grad in grads.items():
                if grad is None:
                    continue
                acc = self.grads.get(name)
                if acc is not None and acc.shape != grad.shape:
                    acc = None  # the layer changed shape: start again
                if self.momentum is None:
                    if acc is None:
                        self.grads[name] = grad.detach().clone()
                    else:
                        acc.add_(grad)
                elif acc is None:
                    self.grads[name] = grad.detach().mul(1 - self.momentum)
                else:
                    acc.mul_(self.momentum).add_(grad, alpha=1 - self.momentum)
        self.count += 1
        self.captured = step

    def get(self, name: str, shape: torch.Size) -> Tensor | None:
        """The mean (or momentum) of ``name``, if one of this ``shape`` was captured."""
        acc = self.grads.get(name)
        if acc is None or acc.shape != shape:
            return None
        if self.momentum is None and self.count > 1:
            for t in self.grads.values():
                t.div_(self.count)
            self.count = 1
        return acc

    def clear(self) -> None:
        """Forget the captured gradients (the mean's window restarts)."""
        self.grads, self.count, self.target = {}, 0, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "captured": self.captured,
            "target": self.target,
            "count": self.count,
            "grads": {n: t.detach().clone() for n, t in self.grads.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state("GradientBuffer", state, _KEYS)
        self.captured, self.target = int(state["captured"]), state["target"]
        self.count = int(state["count"])
        self.grads = {n: t.clone() for n, t in state["grads"].items()}
