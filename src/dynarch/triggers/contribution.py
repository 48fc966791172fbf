"""``Contribution``: does a module help on held-out data (metric with vs without it)?"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_model
from ..graph import resolve
from .base import Trigger, check_mode, check_number, check_state, register_trigger

__all__ = ["CONTRIBUTION_METRICS", "Contribution"]

Metric = Callable[[nn.Module, Any], float | Tensor]


def _accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> Tensor:
    x, y = data
    return (model(x).argmax(dim=1) == y).float().mean()


def _loss(model: nn.Module, data: tuple[Tensor, Tensor]) -> Tensor:
    x, y = data
    return F.cross_entropy(model(x), y)


CONTRIBUTION_METRICS: dict[str, tuple[Metric, str]] = {
    "accuracy": (_accuracy, "max"),
    "loss": (_loss, "min"),
}
"""Named metrics on ``(x, y)`` data with their direction: classification accuracy
(``argmax(dim=1) == y``, higher is better) and cross-entropy loss (lower is better)."""


@register_trigger("contribution")
class Contribution(Trigger):
    """Fires when module ``module_name`` contributes less than ``threshold`` to a metric.

    The contribution is the counterfactual of :func:`dynarch.prune.contribution`: the metric
    on ``data`` with the model intact minus the metric with the module's output replaced by
    zeros (sign flipped for lower-is-better metrics), so a positive value means the module
    helps. Firing means the module is a prune candidate. ``metric`` is ``"accuracy"`` or
    ``"loss"`` (``data`` is then a held-out ``(x, y)`` pair, evaluated in one forward pass)
    or a callable ``metric(model, data) -> number`` that is higher-is-better unless
    ``mode="min"``. Named metrics know their direction; ``mode`` only applies to callables.

    **As a trigger.** ``update(value)`` (``value`` ignored) measures the contribution now,
    stores it in :attr:`last` and fires when ``last < threshold``; :meth:`where` is then
    ``[module_name]``. The module is looked up by name at every measurement, so it may be
    replaced by surgery in between.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
        >>> trigger = Contribution(model, "0", (x, y), metric="loss", threshold=0.0)
        >>> fired = trigger.update()
        >>> fired == (trigger.last < 0.0)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        module_name: str,
        data: Any,
        *,
        metric: str | Metric = "accuracy",
        mode: str | None = None,
        threshold: float = 0.0,
    ) -> None:
        self.model = check_model(model)
        if not isinstance(module_name, str):
            raise TypeError(f"module_name must be a submodule name (str), got {module_name!r}")
        resolve(model, module_name)
        if callable(metric):
            self.metric_fn: Metric = metric
            self.mode = "max" if mode is None else mode
            check_mode(self.mode)
        elif isinstance(metric, str) and metric in CONTRIBUTION_METRICS:
            self.metric_fn, self.mode = CONTRIBUTION_METRICS[metric]
            if mode is not None and mode != self.mode:
                raise ValueError(
                    f"metric {metric!r} is {'higher' if self.mode == 'max' else 'lower'}"
                    f"-is-better (mode {self.mode!r}); mode={mode!r} contradicts it, leave "
                    "mode out (it only applies to callable metrics)"
                )
            if not (
                isinstance(data, tuple | list)
                and len(data) == 2
                and all(isinstance(t, Tensor) for t in data)
                and data[0].shape[:1] == data[1].shape[:1]
            ):
                raise ValueError(
                    f"metric {metric!r} needs data as a held-out (x, y) pair of tensors with "
                    f"the same number of samples, got {_describe(data)}"
                )
        else:
            raise ValueError(
                f"metric must be one of {sorted(CONTRIBUTION_METRICS)} or a callable "
                f"metric(model, data) -> number, got {metric!r}"
            )
        self.module_name = module_name
        self.data = data
        self.threshold = check_number("threshold", threshold)
        self.last: float | None = None

    def measure(self) -> float:
        """Measure the contribution now (also stored in :attr:`last`).

        Example:
            >>> import torch
            >>> model = nn.Sequential(nn.Linear(2, 2), nn.Identity())
            >>> flat = lambda m, d: 1.0 + 0 * m(d).sum()  # ignores the model
            >>> Contribution(model, "1", torch.ones(1, 2), metric=flat).measure()
            0.0
        """
        from ..prune.importance import contribution  # lazy: dynarch.prune imports callbacks

        self.last = contribution(
            self.model, self.module_name, self.metric_fn, self.data, mode=self.mode
        )
        return self.last

    def update(self, value: float | None = None) -> bool:
        """Measure; True when the contribution is below ``threshold`` (``value`` ignored)."""
        return self.measure() < self.threshold

    def where(self) -> list[str]:
        """``[module_name]`` when the last measurement is below ``threshold``, else ``[]``."""
        fired = self.last is not None and self.last < self.threshold
        return [self.module_name] if fired else []

    def reset(self) -> None:
        """Forget the last measurement."""
        self.last = None

    def state_dict(self) -> dict[str, Any]:
        """``{"last": float | None}``."""
        return {"last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        check_state("Contribution", state, {"last"})
        self.last = None if state["last"] is None else float(state["last"])


def _describe(data: object) -> str:
    if isinstance(data, tuple | list):
        parts = [
            f"tensor{tuple(d.shape)}" if isinstance(d, Tensor) else type(d).__name__ for d in data
        ]
        return f"a {type(data).__name__} of ({', '.join(parts)})"
    if isinstance(data, Tensor):
        return f"a tensor of shape {tuple(data.shape)}"
    return f"a {type(data).__name__}"
