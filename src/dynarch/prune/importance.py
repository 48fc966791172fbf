"""Importance of weights (accumulated gradients) and of modules (counterfactual contribution).

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
>>> imp = GradientImportance(model, mode="taylor")
>>> model(torch.randn(5, 3)).pow(2).sum().backward()
>>> imp.accumulate()
>>> imp.steps, sorted(imp.scores())
(1, ['0', '2'])
>>> _ = imp.prune(0.5)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .._engine import engine_state
from ..callbacks import Callback
from ..events import Event
from ..graph import resolve
from ..triggers import check_mode, check_state
from ._core import check_choice, named_layers, prune_by_score, select_layers

if TYPE_CHECKING:
    from ..train import Trainer

__all__ = ["IMPORTANCE_MODES", "GradientImportance", "contribution", "contributions"]

IMPORTANCE_MODES = ("grad", "taylor")
Metric = Callable[[nn.Module, Any], float | Tensor]


class GradientImportance(Callback):
    """Accumulates a per-weight importance over training steps, then prunes by it.

    After every backward pass (``on_after_backward``, or a call to :meth:`accumulate` in a
    hand-written loop) each selected layer's score grows by ``|grad|`` (``mode="grad"``) or
    by the first-order Taylor estimate ``|w * grad|`` (``mode="taylor"``). Gradients are the
    dense ones, so masked weights collect a ``"grad"`` score too (useful for regrowth).
    Scores are float32 (float64 for float64 weights). A layer whose weight changed shape
    (structural surgery) starts again from zero.

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> imp = GradientImportance(model, mode="grad")
        >>> for _ in range(3):
        ...     model.zero_grad()
        ...     model(torch.ones(1, 2)).sum().backward()
        ...     imp.accumulate()
        >>> imp.scores()[""].tolist()
        [[3.0, 3.0]]
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "taylor",
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        check_choice("mode", mode, IMPORTANCE_MODES)
        self.model = model
        self.mode = mode
        self.names = list(select_layers(model, include, exclude))
        self.steps = 0
        self._scores: dict[str, Tensor] = {}
        self._cache: tuple[int, dict[str, nn.Linear | nn.Conv2d]] | None = None

    def _layers(self) -> dict[str, nn.Linear | nn.Conv2d]:
        version = engine_state(self.model).version
        if self._cache is None or self._cache[0] != version:
            self._cache = (version, named_layers(self.model, self.names))
        return self._cache[1]

    def on_after_backward(self, trainer: Trainer) -> None:
        self.accumulate()

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add this step's ``|grad|`` / ``|w * grad|`` to the scores (layers without grad skip)."""
        names, weights, grads = [], [], []
        for name, layer in self._layers().items():
            if layer.weight.grad is not None:
                names.append(name)
                weights.append(layer.weight.detach())
                grads.append(layer.weight.grad)
        if not grads:
            self.steps += 1
            return
        if self.mode == "taylor":
            contrib = list(torch._foreach_mul(grads, weights))
            torch._foreach_abs_(contrib)
        else:
            contrib = list(torch._foreach_abs(grads))
        totals = []
        for i, (name, w) in enumerate(zip(names, weights)):
            dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
            score = self._scores.get(name)
            if score is None or score.shape != w.shape:
                score = self._scores[name] = torch.zeros(w.shape, dtype=dtype, device=w.device)
            elif score.device != w.device or score.dtype != dtype:  # e.g. a loaded state
                score = self._scores[name] = score.to(w.device, dtype)
            if contrib[i].dtype != dtype:
                contrib[i] = contrib[i].to(dtype)
            totals.append(score)
        torch._foreach_add_(totals, contrib)
        self.steps += 1

    def scores(self) -> dict[str, Tensor]:
        """Accumulated scores by layer name (copies; layers never seen with a grad are absent)."""
        return {name: s.clone() for name, s in self._scores.items()}

    def reset(self) -> None:
        """Forget all accumulated scores."""
        self._scores = {}
        self.steps = 0

    def prune(
        self,
        sparsity: float,
        *,
        scope: str = "layer",
        optimizer: torch.optim.Optimizer | None = None,
        reason: str = "",
    ) -> Event:
        """Mask the lowest-scoring weights (see :func:`dynarch.prune.prune_by_score`).

        Example:
            >>> model = nn.Linear(4, 4)
            >>> imp = GradientImportance(model)
            >>> model(torch.randn(2, 4)).sum().backward(); imp.accumulate()
            >>> imp.prune(0.25).details["pruned"]
            4
        """
        layers = self._layers()
        missing = [n for n in layers if n not in self._scores]
        if missing and self.steps == 0:
            raise ValueError(
                f"no gradient importance accumulated for layers {missing}; call accumulate() "
                "after backward (or pass this callback to the Trainer) before pruning"
            )
        if missing:
            frozen = [n for n in missing if not layers[n].weight.requires_grad]
            why = (
                "their weights do not require grad (frozen)"
                if frozen == missing
                else "their weights never had a .grad (frozen: "
                f"{frozen or 'none'}; the others unused in forward, or their grads cleared "
                "before accumulate())"
            )
            raise ValueError(
                f"no gradient importance accumulated for layers {missing} in {self.steps} "
                f"accumulated steps: {why}; leave them out with "
                f"GradientImportance(..., exclude={missing!r}) or unfreeze them"
            )
        scores = {n: self._scores[n] for n in layers}
        stale = [n for n, layer in layers.items() if scores[n].shape != layer.weight.shape]
        if stale:
            raise ValueError(
                f"layers {stale} changed shape since their importance was accumulated; "
                "accumulate at least one more step before pruning"
            )
        return prune_by_score(
            self.model,
            scores,
            sparsity,
            scope=scope,
            optimizer=optimizer,
            reason=reason or f"{self.mode} importance",
            method=f"{self.mode}_importance",
        )

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "steps": self.steps, "scores": self.scores()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state("GradientImportance", state, {"mode", "steps", "scores"})
        if state["mode"] != self.mode:
            raise ValueError(
                f"GradientImportance state was saved with mode {state['mode']!r} but this "
                f"callback uses mode {self.mode!r}"
            )
        self.steps = int(state["steps"])
        self._scores = {name: s.clone() for name, s in state["scores"].items()}


def _zeros(module: nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, Tensor):
        return torch.zeros_like(output)
    if isinstance(output, tuple | list):
        return type(output)(_zeros(module, args, o) for o in output)
    raise TypeError(
        f"cannot zero the output of {type(module).__name__}: it returned a "
        f"{type(output).__name__}, not a tensor or a tuple/list of tensors"
    )


def _value(metric_fn: Metric, model: nn.Module, data: Any) -> float:
    value = metric_fn(model, data)
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(
        f"metric_fn must return a number or a one-element tensor, got {type(value).__name__}"
    )


def contributions(
    model: nn.Module,
    names: Iterable[str],
    metric_fn: Metric,
    data: Any,
    *,
    mode: str = "max",
) -> dict[str, float]:
    """Counterfactual contribution of each module in ``names`` to ``metric_fn(model, data)``.

    The metric is measured once with the model intact, then once per module with that
    module's output replaced by zeros (a forward hook; nothing else is touched). The
    contribution is ``with - without`` for a higher-is-better metric (``mode="max"``, e.g.
    accuracy) and ``without - with`` for a lower-is-better one (``mode="min"``, e.g. loss),
    so a positive value always means the module helps. Runs in eval mode under
    ``torch.no_grad``; every module's training flag is restored and the hooks are removed,
    even on error.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> x = torch.randn(8, 2)
        >>> loss = lambda m, d: m(d).pow(2).mean()
        >>> sorted(contributions(model, ["0", "2"], loss, x, mode="min"))
        ['0', '2']
    """
    check_mode(mode)
    names = list(names)
    modules = [resolve(model, name) for name in names]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            base = _value(metric_fn, model, data)
            out: dict[str, float] = {}
            for name, module in zip(names, modules):
                handle = module.register_forward_hook(_zeros)
                try:
                    without = _value(metric_fn, model, data)
                finally:
                    handle.remove()
                out[name] = base - without if mode == "max" else without - base
    finally:
        for m, flag in flags:
            m.training = flag
    return out


def contribution(
    model: nn.Module, module_name: str, metric_fn: Metric, data: Any, *, mode: str = "max"
) -> float:
    """Counterfactual contribution of one module (see :func:`contributions`).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 1))
        >>> acc = lambda m, d: (m(d) > 0).float().mean()
        >>> isinstance(contribution(model, "0", acc, torch.randn(4, 2)), float)
        True
    """
    return contributions(model, [module_name], metric_fn, data, mode=mode)[module_name]
