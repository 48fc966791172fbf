"""Indefinite growth: train to convergence, find the bottleneck, add a sparse layer, repeat.

Each round of :class:`IndefiniteGrowth`:

1. ``train_fn(model, optimizer)`` trains to convergence (e.g. :func:`converge`: a
   :class:`~dynarch.train.Trainer` with early stopping) and returns the validation accuracy;
2. :class:`dynarch.activity.Extrema` measures, on the held-out batch, the fraction of dead
   plus saturated units of every watched layer; the *bottleneck* is the layer with the
   largest fraction;
3. if that fraction reaches ``threshold``, a sparse layer is inserted right after the
   bottleneck: :func:`dynarch.deepen` (identity weights) followed by
   :func:`sparsify_inserted` (mask to ``density``, always keeping the diagonal), so the
   function is unchanged and the optimizer receives the new parameters.

It stops at the first of: ``max_rounds`` layers added; the bottleneck's extrema fraction
below ``threshold``; the next layer would take the active parameters above ``max_params``;
a round that did not raise accuracy by at least ``min_gain`` over the best so far (that
round's layer stays). ``rows`` is the history table and ``stop_reason`` says why it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import check_int, check_model, check_optimizer
from ..events import Event
from ._units import get_layer
from .candidates import Candidate, active_params, scratch_copy, sparsify_inserted

__all__ = ["GrowthRound", "IndefiniteGrowth", "converge", "grow_indefinitely", "sparsify_inserted"]

TrainFn = Callable[[nn.Module, "torch.optim.Optimizer | None"], float]


@dataclass
class GrowthRound:
    """One row of the growth history.

    ``layer``: the bottleneck a sparse layer was inserted after (``None`` in round 0);
    ``inserted``: the new layer's name; ``extrema``: the bottleneck's dead+saturated fraction
    when chosen; ``params``: active parameters after the round; ``accuracy``: what
    ``train_fn`` returned.
    """

    round: int
    layer: str | None
    inserted: str | None
    extrema: float | None
    params: int
    accuracy: float
    seconds: float


class IndefiniteGrowth:
    """Train → analyse extrema → insert a sparse layer at the bottleneck → repeat.

    ``train_fn(model, optimizer)`` trains to convergence and returns the validation accuracy
    (``optimizer`` is the one given here, or ``None``: then ``train_fn`` builds its own each
    round). ``data=(x, y)`` is the held-out batch for the extrema analysis; ``layers`` the
    layers watched (default: the Extrema default); ``extrema`` keyword arguments for
    :class:`dynarch.activity.Extrema`. See the module docstring for the stopping rule.

    Example:
        >>> import torch
        >>> from dynarch.models import mlp
        >>> net = mlp(4, [6], 2)
        >>> x = torch.randn(32, 4)
        >>> with torch.no_grad():
        ...     _ = net.fc1.bias.fill_(-100.0)  # every unit dead: a bottleneck
        >>> grow = IndefiniteGrowth(net, lambda m, o: 0.5, data=(x, None), max_rounds=1)
        >>> [(r.round, r.layer) for r in grow.run()], grow.stop_reason
        ([(0, None), (1, 'fc1')], 'max_rounds')
    """

    def __init__(
        self,
        model: nn.Module,
        train_fn: TrainFn,
        *,
        data: tuple[Tensor, Tensor | None],
        optimizer: torch.optim.Optimizer | None = None,
        threshold: float = 0.2,
        density: float = 0.1,
        max_rounds: int = 5,
        min_gain: float | None = None,
        max_params: int | None = None,
        layers: Sequence[str] | None = None,
        extrema: dict[str, Any] | None = None,
        reason: str = "indefinite growth",
    ) -> None:
        self.model = check_model(model)
        if not callable(train_fn):
            raise TypeError(f"train_fn must be callable (model, optimizer) -> accuracy, "
                            f"got {train_fn!r}")  # fmt: skip
        check_optimizer(optimizer, optional=True)
        if not (isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor)):
            raise TypeError("data must be a pair (x, y) with x a tensor of held-out inputs")
        if isinstance(threshold, bool) or not (
            isinstance(threshold, int | float) and 0 <= threshold <= 1
        ):
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        if isinstance(density, bool) or not (isinstance(density, int | float) and 0 < density <= 1):
            raise ValueError(f"density must be a number in (0, 1], got {density!r}")
        check_int("max_rounds", max_rounds, 0)
        if max_params is not None:
            check_int("max_params", max_params, 1)
        if min_gain is not None and not isinstance(min_gain, int | float):
            raise ValueError(f"min_gain must be None or a number, got {min_gain!r}")
        if isinstance(layers, str):
            raise TypeError(f"layers must be a list of layer names, got the string {layers!r}")
        for name in layers or []:
            get_layer(model, name)  # a missing or non-Linear/Conv2d layer fails now, not later
        self.train_fn, self.x, self.optimizer = train_fn, data[0], optimizer
        self.threshold, self.density, self.max_rounds = float(threshold), float(density), max_rounds
        self.min_gain, self.max_params = min_gain, max_params
        self.layers = None if layers is None else list(layers)
        self.extrema_kwargs, self.reason = dict(extrema or {}), reason
        self.rows: list[GrowthRound] = []
        self.events: list[Event] = []
        self.stop_reason: str | None = None

    def bottleneck(self) -> tuple[str, float]:
        """The watched layer with the largest dead+saturated fraction, and that fraction
        (ties: the first in ``Extrema.where()`` order)."""
        from ..activity import Extrema

        ext = Extrema(self.model, self.layers, **self.extrema_kwargs)
        ext.observe(self.x)
        fractions, order = ext.fractions(), ext.where()
        if not fractions:
            raise ValueError("Extrema watched no layer; pass layers=[names of hidden layers]")
        total = {n: float(f["dead"]) + float(f["saturated"]) for n, f in fractions.items()}
        best = max(total.values())
        layer = next(n for n in [*order, *total] if n in total and total[n] == best)
        return layer, best

    def _train(self, rnd: int, layer: str | None, new: str | None, ext: float | None) -> float:
        t0 = time.perf_counter()
        result = self.train_fn(self.model, self.optimizer)
        if isinstance(result, bool) or not isinstance(result, int | float | Tensor):
            raise TypeError(
                f"train_fn must return the validation accuracy (a number), got {result!r}"
            )
        acc = float(result)
        params = active_params(self.model)[0]
        self.rows.append(GrowthRound(rnd, layer, new, ext, params, acc, time.perf_counter() - t0))
        return acc

    def run(self) -> list[GrowthRound]:
        """Grow until the stopping rule says stop; returns :attr:`rows`."""
        best = self._train(0, None, None, None)
        for rnd in range(1, self.max_rounds + 1):
            layer, frac = self.bottleneck()
            if frac < self.threshold:
                self.stop_reason = f"extrema fraction {frac:.3g} of '{layer}' < {self.threshold:g}"
                return self.rows
            grow = Candidate("insert", layer, {"density": self.density})
            if self.max_params is not None:
                trial = scratch_copy(self.model)
                grow.apply(trial, reason=self.reason)
                if active_params(trial)[0] > self.max_params:
                    self.stop_reason = f"a layer after '{layer}' exceeds max_params"
                    return self.rows
            events = grow.apply(self.model, self.optimizer, reason=self.reason)
            self.events.extend(events)
            acc = self._train(rnd, layer, events[0].details["inserted"][0], frac)
            if self.min_gain is not None and acc < best + self.min_gain:
                self.stop_reason = f"accuracy gain {acc - best:.4g} < min_gain {self.min_gain:g}"
                return self.rows
            best = max(best, acc)
        self.stop_reason = "max_rounds"
        return self.rows

    def table(self) -> str:
        """The history as a markdown table.

        Example:
            >>> import torch.nn as nn
            >>> x = torch.ones(1, 2)
            >>> g = IndefiniteGrowth(nn.Linear(2, 2), lambda m, o: 1.0, data=(x, None))
            >>> print(g.table())
            | round | layer | inserted | extrema | params | accuracy |
            |---|---|---|---|---|---|
        """
        lines = [
            "| round | layer | inserted | extrema | params | accuracy |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            ext = "" if r.extrema is None else f"{r.extrema:.3f}"
            lines.append(f"| {r.round} | {r.layer or ''} | {r.inserted or ''} | {ext} | "
                         f"{r.params} | {r.accuracy:.4f} |")  # fmt: skip
        return "\n".join(lines)

    def to_dicts(self) -> list[dict[str, Any]]:
        """The rows as plain dicts (JSON-able)."""
        return [asdict(r) for r in self.rows]


def grow_indefinitely(model: nn.Module, train_fn: TrainFn, **kwargs: Any) -> IndefiniteGrowth:
    """Build an :class:`IndefiniteGrowth` with ``kwargs`` and run it; returns it (``rows``,
    ``stop_reason``, ``table()``).

    Example:
        >>> import torch, torch.nn as nn
        >>> g = grow_indefinitely(nn.Linear(2, 2), lambda m, o: 1.0, data=(torch.ones(1, 2), None),
        ...                       max_rounds=0)
        >>> g.stop_reason
        'max_rounds'
    """
    grow = IndefiniteGrowth(model, train_fn, **kwargs)
    grow.run()
    return grow


def converge(
    train: object,
    eval: object = None,
    *,
    max_epochs: int = 50,
    patience: int = 3,
    min_delta: float = 0.0,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> TrainFn:
    """A ``train_fn`` training with Adam (``lr``, built each call when no optimizer is given)
    until ``val_accuracy`` has not improved by more than ``min_delta`` for ``patience``
    epochs (or ``max_epochs``); returns the final ``val_accuracy``.

    Example:
        >>> import torch
        >>> from dynarch.models import mlp
        >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        >>> acc = converge((x, y), (x, y), max_epochs=2)(mlp(4, [8], 2), None)
        >>> 0.0 <= acc <= 1.0
        True
    """
    from ..callbacks import EarlyStopping
    from ..train import Trainer

    check_int("max_epochs", max_epochs, 1)

    def train_fn(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> float:
        opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
        stop = EarlyStopping("val_accuracy", patience=patience, min_delta=min_delta, mode="max")
        trainer = Trainer(model, opt, train, eval=eval, epochs=max_epochs, batch_size=batch_size,
                          callbacks=[stop], seed=seed, progress=False)  # fmt: skip
        trainer.fit()
        if "val_accuracy" not in trainer.metrics:
            raise ValueError("converge needs classification eval data (no val_accuracy measured)")
        return trainer.metrics["val_accuracy"]

    return train_fn
