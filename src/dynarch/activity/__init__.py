"""Activity statistics of units: which units are dead, saturated or unused (:class:`Extrema`,
:class:`Utilization`).

Both triggers watch the *post-activation* output of chosen ``Linear``/``Conv2d`` layers (each
keyed by the producer's name): the output of the activation module that follows the layer
(through a BatchNorm/LayerNorm) in the traced forward (when that module is shared, called at
several places as torchvision's ``self.relu``, the output before it with the activation
applied: :func:`activation_tap`), or the layer's own output when no activation module
follows (functional activations, an untraceable model). Forward hooks
accumulate, per unit, over every observed sample (conv: every sample and position), the sum
of activations, of their absolute values, the number of positive (*active*) and of non-zero
values: a few vectorised reductions per forward, no per-element loops.

Collect with :meth:`~Extrema.observe` (one held-out batch in eval mode without gradients,
restoring each module's mode) or between :meth:`~Extrema.start` and :meth:`~Extrema.stop`
during training (call ``stop()`` before deep-copying the model: hooks hold the trigger).
When a layer's width changes (``widen``/``shrink``/``clone_units``) its statistics no longer
fit and are discarded: the layer reads as unobserved until it is observed again.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> with torch.no_grad():
    ...     model[0].bias[:3] = -100.0  # three units that never fire
    >>> ex = Extrema(model, eps=0.01, fire_fraction=0.25)
    >>> ex.observe(torch.randn(64, 4))
    >>> ex.dead_units("0").tolist(), ex.update()
    ([0, 1, 2], True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..triggers import register_trigger
from ._base import _Activity, _bound, _fraction
from ._taps import activation_tap, carrier, forward_layers, post_activation, try_analyse

__all__ = [
    "SATURATION", "Extrema", "Utilization", "activation_tap", "carrier", "forward_layers",
    "post_activation", "try_analyse",
]  # fmt: skip

SATURATION = ("bounded", "quantile")


@register_trigger("extrema")
class Extrema(_Activity):
    """Dead and saturated units per layer; fires when some layer has too many of them.

    A unit is **dead** when it is active (post-activation ``> 0``) on fewer than ``eps`` of
    the observations. It is **saturated** by the rule chosen with ``saturation``:

    * ``None`` (default, no ``quantile``): never (only dead units count);
    * ``"bounded"``: it sits at the bounds of the bounded activation that follows the layer
      (Sigmoid/Hardsigmoid ``[0, 1]``, Tanh/Softsign ``[-1, 1]``, ReLU6 ``[0, 6]``, Hardtanh
      ``[min_val, max_val]``): the mean of ``a / upper`` over its positive activations plus
      ``a / lower`` over its negative ones (each bound checked on its own side; 0 and 1 for
      a unit pinned at 0 or at a bound) exceeds ``1 - eps``. With symmetric bounds ``±b``
      this is a mean ``|activation|`` above ``(1 - eps) × b``. A layer with an unbounded
      activation is refused;
    * ``"quantile"`` (implied by giving ``quantile=q``): its mean activation is *strictly*
      above the ``q``-quantile (linear interpolation) of the layer's unit means: the
      relatively most active units, at most a ``1 - q`` share of them (none when all means
      are equal).

    A unit that is both counts once. :meth:`update` fires when some layer's extrema
    (dead ∪ saturated) fraction is ``>= fire_fraction``; ``value`` is ignored.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 1))
        >>> with torch.no_grad():
        ...     model[0].bias[0] = 50.0  # always ~1: saturated
        >>> ex = Extrema(model, saturation="bounded")
        >>> ex.observe(torch.randn(32, 4))
        >>> ex.saturated_units("0").tolist(), ex.fractions()["0"]["saturated"]
        ([0], 0.16666666666666666)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        *,
        eps: float = 0.01,
        saturation: str | None = None,
        quantile: float | None = None,
        fire_fraction: float = 0.1,
    ) -> None:
        self.eps = _fraction("eps", eps)
        self.fire_fraction = _fraction("fire_fraction", fire_fraction, closed=True)
        if saturation is None and quantile is not None:
            saturation = "quantile"
        if saturation is not None and saturation not in SATURATION:
            raise ValueError(
                f"unknown saturation rule {saturation!r}; allowed: None, 'bounded', 'quantile'"
            )
        if saturation == "quantile" and quantile is None:
            raise ValueError("saturation='quantile' needs quantile=q with q in (0, 1)")
        if saturation == "bounded" and quantile is not None:
            raise ValueError("quantile= only applies to saturation='quantile', not 'bounded'")
        self.quantile = None if quantile is None else _fraction("quantile", quantile)
        self.saturation = saturation
        super().__init__(model, layers)
        if saturation == "bounded":
            for name, tap in self.taps.items():
                act = self.model.get_submodule(tap)
                if _bound(act) is None:
                    what = "no activation module" if tap == name else type(act).__name__
                    raise ValueError(
                        f"saturation='bounded' needs a bounded activation after each layer, but "
                        f"'{name}' is followed by {what}; use saturation='quantile' with "
                        "quantile=q, or watch other layers"
                    )

    def _masks(self, layer: str) -> tuple[Tensor, Tensor] | None:
        s = self.statistics(layer)
        if s is None:
            return None
        dead = s["active"] < self.eps
        if self.saturation == "bounded":
            bounds = _bound(self.model.get_submodule(self.taps[layer]))
            assert bounds is not None
            lower, upper = bounds
            # mean positive and negative parts, each as a share of the bound on its side
            pos, neg = (s["mean_abs"] + s["mean"]) / 2, (s["mean_abs"] - s["mean"]) / 2
            share = pos / upper if upper > 0 else torch.zeros_like(pos)
            if lower < 0:
                share = share + neg / -lower
            sat = share > 1 - self.eps
        elif self.saturation == "quantile":
            assert self.quantile is not None
            mean = s["mean"]
            sat = mean > torch.quantile(mean, self.quantile)
        else:
            sat = torch.zeros_like(dead)
        return dead, sat

    def dead_units(self, layer: str) -> Tensor:
        """Indices of the dead units of ``layer`` (ascending; empty when unobserved)."""
        masks = self._masks(layer)
        return torch.zeros(0, dtype=torch.long) if masks is None else masks[0].nonzero()[:, 0]

    def saturated_units(self, layer: str) -> Tensor:
        """Indices of the saturated units of ``layer`` (ascending; empty when unobserved)."""
        masks = self._masks(layer)
        return torch.zeros(0, dtype=torch.long) if masks is None else masks[1].nonzero()[:, 0]

    def extrema_units(self, layer: str) -> Tensor:
        """Indices of the dead or saturated units of ``layer`` (ascending)."""
        masks = self._masks(layer)
        if masks is None:
            return torch.zeros(0, dtype=torch.long)
        return (masks[0] | masks[1]).nonzero()[:, 0]

    def _counts(self) -> dict[str, list[float]]:
        """``layer -> [dead, saturated, extrema]`` fractions of the observed layers."""
        rows: dict[str, Tensor] = {}
        for name in self.layers:
            masks = self._masks(name)
            if masks is not None:
                dead, sat = masks
                counts = torch.stack([dead.sum(), sat.sum(), (dead | sat).sum()])
                rows[name] = counts.double() / dead.numel()
        if not rows:
            return {}
        values = torch.stack([r.cpu() for r in rows.values()]).tolist()  # one sync
        return dict(zip(rows, values, strict=True))

    def fractions(self) -> dict[str, dict[str, float]]:
        """``{layer: {"dead": f, "saturated": f}}`` for every watched layer (0.0 when it has no
        observations)."""
        counts = self._counts()
        zero = [0.0, 0.0, 0.0]
        return {n: dict(zip(("dead", "saturated"), counts.get(n, zero)[:2])) for n in self.layers}

    def where(self) -> list[str]:
        """The layers that fire: those whose extrema (dead ∪ saturated) fraction is
        ``>= fire_fraction``, largest fraction first (ties: model order); ``[]`` when
        :meth:`update` would not fire. Like every trigger's ``where()``, it names only the
        places where the firing condition holds, so a schedule acting on it (e.g.
        :class:`~dynarch.schedules.GrowAsNeeded` widening there) leaves healthy layers alone;
        :meth:`fractions` has every layer's numbers.

        Example:
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
            ...                       nn.Linear(8, 2))
            >>> with torch.no_grad():
            ...     model[0].bias[:4] = -100.0  # half of the first layer never fires
            >>> ex = Extrema(model, fire_fraction=0.4)
            >>> ex.observe(torch.randn(64, 4))
            >>> ex.fractions()["0"]["dead"], ex.where()
            (0.5, ['0'])
        """
        counts = self._counts()
        firing = [n for n in counts if counts[n][2] >= self.fire_fraction]
        return sorted(firing, key=lambda n: -counts[n][2])

    def update(self, value: float | None = None) -> bool:
        """True when some layer's extrema fraction is ``>= fire_fraction`` (``value`` is
        ignored: the statistics are the observation)."""
        return any(c[2] >= self.fire_fraction for c in self._counts().values())


@register_trigger("utilization")
class Utilization(_Activity):
    """Fraction of non-zero post-activations per layer; fires when some layer uses too little.

    The question it answers: *is some layer's capacity idle?* A layer's utilization is the
    share of (unit, observation) pairs whose post-activation is non-zero; :meth:`update`
    fires when some observed layer's utilization is ``< threshold`` (``value`` is ignored).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> with torch.no_grad():
        ...     model[0].bias[:] = torch.tensor([-100.0, -100.0, -100.0, 100.0])
        >>> u = Utilization(model, threshold=0.5)
        >>> u.observe(torch.randn(16, 4))
        >>> u.utilization(), u.update(), u.where()
        ({'0': 0.25}, True, ['0'])
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[str] | None = None, *, threshold: float = 0.5
    ) -> None:
        self.threshold = _fraction("threshold", threshold, closed=True)
        super().__init__(model, layers)

    def utilization(self) -> dict[str, float]:
        """``{layer: fraction of non-zero post-activations}`` of the observed layers."""
        rows: dict[str, Tensor] = {}
        for name in self.layers:
            s = self.statistics(name)
            if s is not None:
                rows[name] = s["nonzero"].mean()
        if not rows:
            return {}
        values = torch.stack([r.cpu() for r in rows.values()]).tolist()
        return dict(zip(rows, values, strict=True))

    def where(self) -> list[str]:
        """The layers that fire: utilization below ``threshold``, least utilised first (ties:
        model order); ``[]`` when :meth:`update` would not fire."""
        util = self.utilization()
        return sorted((n for n in util if util[n] < self.threshold), key=lambda n: util[n])

    def update(self, value: float | None = None) -> bool:
        """True when some observed layer's utilization is ``< threshold``."""
        return any(u < self.threshold for u in self.utilization().values())
