"""``GradientVarianceSpike``: a layer's gradient variance jumped k standard deviations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .._engine import engine_state
from .._validate import check_int, check_model
from ..masks import select_layers
from .base import Trigger, check_number, check_state, register_trigger

if TYPE_CHECKING:
    from ..callbacks import Callback

__all__ = ["GradientVarianceSpike"]

_KEYS = {"names", "count", "mean", "var", "pending", "spikes"}


@register_trigger("gradient_variance_spike")
class GradientVarianceSpike(Trigger):
    """Fires when some layer's gradient variance spikes ``k`` standard deviations above normal.

    **Observing.** :meth:`observe` (call it after ``loss.backward()``, or let the Trainer do it
    with ``callbacks=[spike.callback()]``, which observes in ``on_after_backward``) computes,
    for each watched layer whose weight has a gradient, the variance of that gradient's
    entries (population variance, all entries of ``weight.grad``, masked positions too), for
    all layers at once with a single host sync. Each value ``v`` is compared with that layer's
    running statistics *before* ``v`` joins them: it spikes when the layer has at least
    ``warmup`` earlier observations and ``v > mean + k * std``; its score is
    ``z = (v - mean) / std`` (``inf`` when ``std`` is 0). Then ``v`` is folded in (spikes
    too, so a lasting change becomes the new normal): an exponential moving mean/variance
    with ``momentum`` (``d = v - mean; mean += (1 - momentum) * d;
    var = momentum * (var + (1 - momentum) * d**2)``), or with ``momentum=None`` the exact
    mean/population variance of all observations (Welford). A layer's first observation sets
    ``mean = v, var = 0``. A non-finite ``v`` (an overflowed mixed-precision step, which
    ``GradScaler`` skips) neither spikes nor joins the statistics.

    **Asking.** :meth:`update` answers whether any observation since the previous ``update``
    (or :meth:`reset`) spiked, and :meth:`where` then names the spiking layers, largest ``z``
    first (a layer's ``z`` is its largest over those observations). ``value`` is ignored, so a
    composite can pass its metric to every child. Poll once per step for "this step" or once
    per epoch for "during this epoch".

    ``layers`` are fnmatch patterns of Linear/Conv2d module names (default: all of them);
    the selection follows structural changes. Call :meth:`reset` after growing the network:
    a widened layer's gradients have a new scale.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> spike = GradientVarianceSpike(model, k=3.0, warmup=5)
        >>> for _ in range(3):
        ...     model.zero_grad()
        ...     model(torch.randn(8, 2)).pow(2).mean().backward()
        ...     _ = spike.observe()
        >>> spike.update(), spike.where()  # still warming up
        (False, [])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        k: float = 3.0,
        warmup: int = 10,
        momentum: float | None = 0.9,
        layers: Sequence[str] | None = None,
    ) -> None:
        self.model = check_model(model)
        self.k = check_number("k", k, low=0, strict=True)
        self.warmup = check_int("warmup", warmup, 1)
        if momentum is not None and (
            isinstance(momentum, bool)
            or not isinstance(momentum, int | float)
            or not 0 <= momentum < 1
        ):
            raise ValueError(
                f"momentum must be a number in [0, 1) (weight of the past in the moving "
                f"statistics) or None (exact statistics of all observations), got {momentum!r}"
            )
        self.momentum = None if momentum is None else float(momentum)
        if isinstance(layers, str):
            raise TypeError(
                f"layers must be a list of module names or fnmatch patterns, got the string "
                f"{layers!r}; write [{layers!r}]"
            )
        self.layers = None if layers is None else list(layers)
        self._cache: tuple[int, dict[str, nn.Module]] | None = None
        self._names: list[str] = []
        self._count = torch.zeros(0, dtype=torch.int64)
        self._mean = torch.zeros(0, dtype=torch.float64)
        self._var = torch.zeros(0, dtype=torch.float64)
        self._pending: dict[str, float] = {}
        self._spikes: dict[str, float] = {}
        self._watched()  # bad patterns fail now, not at the first backward

    def _watched(self) -> dict[str, nn.Module]:
        version = engine_state(self.model).version
        if self._cache is None or self._cache[0] != version:
            try:
                found = select_layers(self.model, self.layers, purpose="watch")
            except ValueError as exc:
                raise ValueError(f"GradientVarianceSpike layers: {exc}") from None
            self._cache = (version, found)
            keep = [i for i, n in enumerate(self._names) if n in found]
            if len(keep) != len(self._names):  # layers removed by surgery: drop their stats
                index = torch.tensor(keep, dtype=torch.int64)
                self._names = [self._names[i] for i in keep]
                self._count, self._mean, self._var = (
                    t[index] for t in (self._count, self._mean, self._var)
                )
        return self._cache[1]

    def _index(self, names: list[str]) -> Tensor:
        """Positions of ``names`` in the statistics (new layers start with count 0)."""
        new = [n for n in names if n not in self._names]
        if new:
            self._names.extend(new)
            self._count = torch.cat([self._count, torch.zeros(len(new), dtype=torch.int64)])
            self._mean = torch.cat([self._mean, torch.zeros(len(new), dtype=torch.float64)])
            self._var = torch.cat([self._var, torch.zeros(len(new), dtype=torch.float64)])
        position = {n: i for i, n in enumerate(self._names)}
        return torch.tensor([position[n] for n in names], dtype=torch.int64)

    @torch.no_grad()
    def variances(self) -> dict[str, float]:
        """This moment's gradient variance of each watched layer that has a gradient.

        Example:
            >>> layer = nn.Linear(2, 1, bias=False)
            >>> layer.weight.grad = torch.tensor([[1.0, 3.0]])
            >>> GradientVarianceSpike(layer).variances()
            {'': 1.0}
        """
        names, values = self._measure()
        return dict(zip(names, values.tolist()))

    def _measure(self) -> tuple[list[str], Tensor]:
        names, grads = [], []
        for name, layer in self._watched().items():
            weight = layer.weight
            grad = weight.grad if isinstance(weight, Tensor) else None
            if grad is not None:
                names.append(name)
                grads.append(grad)
        if not grads:
            return [], torch.zeros(0, dtype=torch.float64)
        per_layer = [g.detach().float().var(correction=0).to(grads[0].device) for g in grads]
        return names, torch.stack(per_layer).to("cpu", torch.float64)  # the one sync

    @torch.no_grad()
    def observe(self) -> bool:
        """Read the current gradients once; True when some layer spiked in this observation.

        Example:
            >>> layer = nn.Linear(2, 1, bias=False)
            >>> spike = GradientVarianceSpike(layer, warmup=1, momentum=None)
            >>> for g in ([1.0, -1.0], [1.0, -1.0], [5.0, -5.0]):
            ...     layer.weight.grad = torch.tensor([g])
            ...     print(spike.observe())
            False
            False
            True
        """
        names, v = self._measure()
        if not names:
            return False
        index = self._index(names)
        count, mean, var = self._count[index], self._mean[index], self._var[index]
        ok = torch.isfinite(v)  # an overflowed (fp16) step: skipped, like GradScaler does
        v = torch.where(ok, v, mean)
        std = var.sqrt()
        spiked = ok & (count >= self.warmup) & (v > mean + self.k * std)
        z = torch.where(std > 0, (v - mean) / std, torch.full_like(v, math.inf))
        d = v - mean
        if self.momentum is None:
            n = (count + 1).to(torch.float64)
            new_mean = mean + d / n
            new_var = (var * count + d * (v - new_mean)) / n
        else:
            new_mean = mean + (1 - self.momentum) * d
            new_var = self.momentum * (var + (1 - self.momentum) * d * d)
        first = count == 0
        self._mean[index] = torch.where(ok, torch.where(first, v, new_mean), mean)
        self._var[index] = torch.where(ok, torch.where(first, torch.zeros_like(v), new_var), var)
        self._count[index] = count + ok.to(count.dtype)
        hits = spiked.nonzero().flatten().tolist()
        for i, score in zip(hits, z[spiked].tolist()):
            self._pending[names[i]] = max(score, self._pending.get(names[i], -math.inf))
        return bool(hits)

    def update(self, value: float | None = None) -> bool:
        """True when an observation since the previous ``update`` spiked (``value`` ignored)."""
        self._spikes = dict(sorted(self._pending.items(), key=lambda kv: (-kv[1], kv[0])))
        self._pending = {}
        return bool(self._spikes)

    def discard_pending(self) -> None:
        """Forget the spikes observed since the previous :meth:`update` (the running
        statistics keep them), so the next :meth:`update` answers only for later observations.

        Example:
            >>> layer = nn.Linear(2, 1, bias=False)
            >>> spike = GradientVarianceSpike(layer, warmup=1, momentum=None)
            >>> for g in ([1.0, -1.0], [1.0, -1.0], [5.0, -5.0]):
            ...     layer.weight.grad = torch.tensor([g])
            ...     _ = spike.observe()
            >>> spike.discard_pending(); spike.update()
            False
        """
        self._pending = {}

    def where(self) -> list[str]:
        """The layers that spiked, as answered by the last :meth:`update`, largest ``z`` first."""
        return list(self._spikes)

    @property
    def spikes(self) -> dict[str, float]:
        """``{layer: z}`` behind the last :meth:`update`'s answer (largest ``z`` first)."""
        return dict(self._spikes)

    def statistics(self) -> dict[str, dict[str, float]]:
        """Running ``{"count", "mean", "std"}`` of each layer's gradient variance.

        Example:
            >>> GradientVarianceSpike(nn.Linear(2, 1)).statistics()
            {}
        """
        rows = zip(self._names, self._count.tolist(), self._mean.tolist(), self._var.tolist())
        return {n: {"count": c, "mean": m, "std": math.sqrt(v)} for n, c, m, v in rows}

    def callback(self) -> Callback:
        """A Trainer callback calling :meth:`observe` in ``on_after_backward``.

        Its ``state_dict`` is this trigger's, so a checkpointed run resumes the statistics.

        Example:
            >>> spike = GradientVarianceSpike(nn.Linear(2, 2))
            >>> spike.callback().trigger is spike
            True
        """
        from ._callbacks import ObserveGradients  # lazy: dynarch.callbacks imports triggers

        return ObserveGradients(self)

    def reset(self) -> None:
        """Forget all statistics and spikes (call it after growing the network)."""
        self._names = []
        self._count = torch.zeros(0, dtype=torch.int64)
        self._mean = torch.zeros(0, dtype=torch.float64)
        self._var = torch.zeros(0, dtype=torch.float64)
        self._pending, self._spikes = {}, {}

    def state_dict(self) -> dict[str, Any]:
        """Plain lists/dicts: layer ``names`` with their ``count``/``mean``/``var``, and the
        ``pending`` (not yet asked) and last answered ``spikes`` as ``{layer: z}``."""
        return {
            "names": list(self._names),
            "count": self._count.tolist(),
            "mean": self._mean.tolist(),
            "var": self._var.tolist(),
            "pending": dict(self._pending),
            "spikes": dict(self._spikes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        check_state("GradientVarianceSpike", state, _KEYS)
        n = len(state["names"])
        lengths = [len(state[key]) for key in ("count", "mean", "var")]
        if lengths != [n] * 3:
            raise ValueError(
                f"GradientVarianceSpike state has {n} layer names but count/mean/var of "
                f"lengths {lengths}; the state is corrupt"
            )
        self._names = [str(name) for name in state["names"]]
        self._count = torch.tensor(state["count"], dtype=torch.int64).reshape(n)
        self._mean = torch.tensor(state["mean"], dtype=torch.float64).reshape(n)
        self._var = torch.tensor(state["var"], dtype=torch.float64).reshape(n)
        self._pending = {str(k): float(v) for k, v in state["pending"].items()}
        self._spikes = {str(k): float(v) for k, v in state["spikes"].items()}
        self._cache = None  # re-check which stored layers still exist
