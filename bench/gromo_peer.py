"""The peer of bench/grow_vs_static.py: ``gromo`` 0.1.0 (PyPI), its GrowingMLP grown with TINY.

How gromo grows an MLP (read from its source, ``gromo/containers/growing_mlp.py``,
``growing_container.py``, ``modules/growing_module.py`` and its examples), and how this
module drives it inside dynarch's Trainer:

* ``GrowingMLP(784, 10, hidden_size=w, number_hidden_layers=L, activation=ReLU())`` is a
  stack of ``LinearGrowingModule`` s; all hidden layers start at the same width ``w``. A
  hidden layer ``k`` grows when the *next* layer (``model.layers[k + 1]``) receives new
  input units (with matching new output units of ``model.layers[k]``).
* One growth step is gromo's own procedure: ``init_computation()``; forward/backward of a
  sum-reduced loss on a sample of training data with ``update_computation()`` after each
  batch (the statistics S, M and the projected gradient); ``compute_optimal_updates(...)``
  on each growing layer with the TINY settings of its docstring (``compute_delta=False,
  use_covariance=True, alpha_zero=False, omega_zero=False, use_projection=True,
  ignore_singular_values=False``); ``reset_computation()``; ``select_best_update()`` (the
  layer with the largest first-order loss improvement); a line search of the scaling
  factor of the new neurons over :data:`SCALES` with ``extended_forward`` on the same
  sample (0 is left out: it would add neurons with all-zero weights that never train);
  ``apply_change(extension_size=n)``.
* "Toward, not beyond, size S": each layer's ``maximum_added_neurons`` is what it still
  lacks, and a layer at its target is no longer offered (``set_growing_layers``: ``"all"``
  while every hidden layer can grow, else the first layer that can). TINY adds as many
  neurons as the statistics support (at most the rank of its bottleneck matrix, e.g. 9 per
  step for the last hidden layer of a 10-class network), so reaching S takes many steps.
* gromo replaces a layer's parameters when it grows and has no optimizer-state transfer,
  so after each growth step the optimizer is rebuilt (``make_optimizer``; momentum
  restarts), as gromo's examples do.

Example:
    >>> import torch
    >>> model = build_growing_mlp(784, [8, 8], 10)
    >>> hidden_widths(model), weight_count(model)
    ([8, 8], 6416)
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynarch.callbacks import Callback

__all__ = [
    "PEER_VERSION", "SCALES", "TINY", "GromoGrowth", "build_growing_mlp", "hidden_widths",
    "import_growing_mlp", "peer_available", "weight_count",
]  # fmt: skip

PEER_VERSION = "0.1.0"
TINY: dict[str, bool] = {
    "compute_delta": False,
    "use_covariance": True,
    "alpha_zero": False,
    "omega_zero": False,
    "use_projection": True,
    "ignore_singular_values": False,
}
"""gromo's documented settings of ``compute_optimal_updates`` for TINY."""
SCALES = (0.1, 0.25, 0.5, 1.0)
"""Scaling factors of the new neurons tried by the line search."""

MakeOptimizer = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]


def peer_available() -> bool:
    """Whether ``gromo`` can be imported here (without importing it).

    Example:
        >>> isinstance(peer_available(), bool)
        True
    """
    return importlib.util.find_spec("gromo") is not None


def import_growing_mlp() -> type:
    """``gromo.containers.growing_mlp.GrowingMLP``; a clear ImportError says how to install it.

    Example:
        >>> import_growing_mlp().__name__
        'GrowingMLP'
    """
    if not peer_available():
        raise ImportError(
            f"the peer method 'gromo' needs the PyPI package gromo=={PEER_VERSION}; install "
            f"it with `pip install gromo=={PEER_VERSION}` (or `pip install -e '.[bench]'`), "
            "or leave 'gromo' out of --methods"
        )
    from gromo.containers.growing_mlp import GrowingMLP

    return GrowingMLP


def build_growing_mlp(in_features: int, start: Sequence[int], out_features: int) -> nn.Module:
    """A ReLU ``GrowingMLP`` with hidden widths ``start`` (gromo needs them all equal).

    Example:
        >>> hidden_widths(build_growing_mlp(20, [4, 4, 4], 3))
        [4, 4, 4]
    """
    widths = list(start)
    if not widths or len(set(widths)) != 1 or widths[0] < 1:
        raise ValueError(
            f"gromo's GrowingMLP starts every hidden layer at the same positive width; got "
            f"start widths {widths}: use equal widths such as {[max(widths or [1])] * 2}"
        )
    growing_mlp = import_growing_mlp()
    model: nn.Module = growing_mlp(
        in_features, out_features, widths[0], len(widths), activation=nn.ReLU()
    )
    return model


def _layers(model: nn.Module) -> list[Any]:
    return list(model.layers)  # type: ignore[arg-type]


def hidden_widths(model: nn.Module) -> list[int]:
    """Current hidden widths of a GrowingMLP (the input widths of its layers after the first).

    Example:
        >>> hidden_widths(build_growing_mlp(6, [5, 5], 2))
        [5, 5]
    """
    return [int(layer.in_features) for layer in _layers(model)[1:]]


def weight_count(model: nn.Module) -> int:
    """Number of weight-matrix entries of a GrowingMLP (biases not counted).

    Example:
        >>> weight_count(build_growing_mlp(6, [5, 5], 2))
        65
    """
    return sum(int(layer.weight.numel()) for layer in _layers(model))


class GromoGrowth(Callback):
    """Grow a GrowingMLP with gromo's TINY every ``every`` steps up to step ``until``.

    Each hidden layer grows toward ``target`` (never beyond); after each growth step the
    trainer's optimizer is replaced by ``make_optimizer(params, lr)`` with the current
    learning rate. ``samples`` training samples (drawn with a generator seeded from
    ``seed`` and the growth count) feed the statistics, in batches of ``batch``. ``log``
    holds one record per growth step.

    Example:
        >>> model = build_growing_mlp(12, [4, 4], 3)
        >>> grow = GromoGrowth(model, [8, 8], every=10, until=100, samples=64,
        ...                    make_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), seed=0)
        >>> grow.done
        False
    """

    def __init__(
        self,
        model: nn.Module,
        target: Sequence[int],
        *,
        every: int,
        until: int,
        samples: int,
        make_optimizer: MakeOptimizer,
        seed: int,
        batch: int = 256,
        scales: Iterable[float] = SCALES,
        statistical_threshold: float = 1e-3,
    ) -> None:
        self.model = model
        self.target = [int(t) for t in target]
        widths = hidden_widths(model)
        if len(self.target) != len(widths) or any(t < w for t, w in zip(self.target, widths)):
            raise ValueError(
                f"target widths {self.target} must give one width per hidden layer, each at "
                f"least the current one {widths}"
            )
        for name, value in (("every", every), ("until", until), ("samples", samples)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.every, self.until, self.samples = every, until, samples
        self.make_optimizer, self.seed, self.batch = make_optimizer, seed, batch
        self.scales = tuple(scales)
        self.statistical_threshold = statistical_threshold
        self.log: list[dict[str, Any]] = []

    @property
    def done(self) -> bool:
        """Whether every hidden layer reached its target width."""
        return hidden_widths(self.model) == self.target

    def on_step_end(self, trainer: Any) -> None:
        if trainer.step % self.every or trainer.step > self.until or self.done:
            return
        lr = float(trainer.optimizer.param_groups[0]["lr"])
        record = self.grow(trainer.train_data, step=trainer.step)
        if record["added"]:
            trainer.optimizer = self.make_optimizer(list(self.model.parameters()), lr)
        self.model.train()

    def _sample(self, train: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = train
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + len(self.log))
        idx = torch.randperm(x.shape[0], generator=gen)[: self.samples]
        return x[idx], y[idx]

    def grow(self, train: tuple[Tensor, Tensor], step: int = 0) -> dict[str, Any]:
        """One TINY growth step on a sample of ``train``; returns (and logs) its record
        ``{"step", "layer", "added", "scale", "hidden"}`` (``added`` 0: nothing grown)."""
        model, layers = self.model, _layers(self.model)
        widths = hidden_widths(model)
        open_ = [i for i, (w, t) in enumerate(zip(widths, self.target)) if w < t]
        record: dict[str, Any] = {"step": step, "layer": None, "added": 0, "scale": None}
        if open_:
            if len(open_) == len(widths):
                model.set_growing_layers(scheduling_method="all")  # type: ignore[operator]
            else:
                model.set_growing_layers(index=open_[0])  # type: ignore[operator]
                open_ = open_[:1]
            x, y = self._sample(train)
            self._statistics(x, y)
            with warnings.catch_warnings():  # "Using the pseudo-inverse": S is singular on
                warnings.simplefilter("ignore", UserWarning)  # always-black border pixels
                for i in open_:
                    layers[i + 1].compute_optimal_updates(
                        maximum_added_neurons=self.target[i] - widths[i],
                        statistical_threshold=self.statistical_threshold,
                        **TINY,
                    )
            model.reset_computation()  # type: ignore[operator]
            chosen = open_[int(model.select_best_update())]  # type: ignore[operator]
            layer = layers[chosen + 1]
            ext = layer.eigenvalues_extension
            added = 0 if ext is None else int(ext.shape[0])
            if added:
                record["scale"] = self._line_search(x, y)
                model.set_scaling_factor(record["scale"])  # type: ignore[operator]
                model.apply_change(extension_size=added)  # type: ignore[operator]
            else:
                layer.delete_update()
            record.update(layer=chosen, added=added)
            model.zero_grad(set_to_none=True)
        record["hidden"] = hidden_widths(model)
        self.log.append(record)
        return record

    def _statistics(self, x: Tensor, y: Tensor) -> None:
        """gromo's statistics pass (its ``compute_statistics`` with a sum-reduced loss)."""
        model = self.model
        model.init_computation()  # type: ignore[operator]
        model.eval()
        for i in range(0, x.shape[0], self.batch):
            model.zero_grad()
            loss = F.cross_entropy(
                model(x[i : i + self.batch]), y[i : i + self.batch], reduction="sum"
            )
            loss.backward()
            model.update_computation()  # type: ignore[operator]

    @torch.no_grad()
    def _line_search(self, x: Tensor, y: Tensor) -> float:
        """The scale in :attr:`scales` with the lowest loss of the extended network."""
        losses = []
        for scale in self.scales:
            self.model.set_scaling_factor(scale)  # type: ignore[operator]
            out = torch.cat(
                [
                    self.model.extended_forward(x[i : i + self.batch])  # type: ignore[operator]
                    for i in range(0, x.shape[0], self.batch)
                ]
            )
            losses.append(F.cross_entropy(out, y))
        best = int(torch.stack(losses).argmin())
        return float(self.scales[best]) if math.isfinite(float(losses[best])) else self.scales[0]
