"""The collection machinery shared by :class:`~dynarch.activity.Extrema` and
:class:`~dynarch.activity.Utilization`: the :class:`_Activity` base trigger (forward hooks
accumulating per-unit sums, their state), with :func:`_bound` (a bounded activation's output
bounds) and :func:`_fraction` (an argument check)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..graph import resolve as _resolve
from ..remap import out_units
from ..triggers import Trigger, check_state
from ._taps import activation_tap, forward_layers, try_analyse

__all__: list[str] = []

_LAYERS = (nn.Linear, nn.Conv2d)
_KEYS = ("count", "sum", "abs_sum", "active", "nonzero")
_SUMS = _KEYS[1:]


def _bound(mod: nn.Module) -> tuple[float, float] | None:
    """``(lower, upper)`` output bounds of a bounded activation module (None: unbounded)."""
    if isinstance(mod, nn.Sigmoid | nn.Hardsigmoid):
        return 0.0, 1.0
    if isinstance(mod, nn.Tanh | nn.Softsign):
        return -1.0, 1.0
    if isinstance(mod, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(mod, nn.Hardtanh):
        return float(mod.min_val), float(mod.max_val)
    return None


def _fraction(name: str, value: object, *, closed: bool = False) -> float:
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else -1
    if not math.isfinite(number) or not (0 < number < 1 or (closed and number == 1)):
        interval = "(0, 1]" if closed else "(0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return number


class _Activity(Trigger):
    """Shared collection machinery of :class:`Extrema` and :class:`Utilization`."""

    def __init__(self, model: nn.Module, layers: Sequence[str] | None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        graph = try_analyse(model)
        if layers is None:
            found = forward_layers(model, graph)
            if len(found) < 2:
                raise ValueError(
                    f"model has {len(found)} Linear/Conv2d layer(s); by default every one but "
                    "the last (output) layer is watched, so pass layers=[...] explicitly"
                )
            self.layers = found[:-1]
        else:
            if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
                raise TypeError(f"layers must be a list of module names, got {layers!r}")
            if not layers:
                raise ValueError("layers is empty; name at least one Linear/Conv2d module")
            for n in layers:
                _resolve(model, n, _LAYERS)
            self.layers = list(dict.fromkeys(layers))
        self._stats: dict[str, dict[str, Tensor]] = {}  # per-unit sums
        self._count: dict[str, int] = {}  # observations per unit (a shape fact: no sync)
        self._handles: list[RemovableHandle] = []
        self._points: dict[str, tuple[str, str | None]] = {}
        self.taps: dict[str, str] = {}
        """``{layer: the activation module whose output is read}`` (the layer itself when no
        activation module follows it)."""
        self._locate(graph)

    def _locate(self, graph: Any) -> None:
        """Find each layer's tap (:func:`activation_tap`) in the traced ``graph``."""
        for name in self.layers:
            self._points[name] = point = activation_tap(graph, name)
            self.taps[name] = point[1] or point[0]

    # -- collection ------------------------------------------------------------------------

    def _hook(
        self, name: str, conv: bool, act: nn.Module | None = None
    ) -> Callable[[nn.Module, Any, Any], None]:
        copy = act is not None and bool(getattr(act, "inplace", False))

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                return
            t = output.detach()
            if act is not None:  # a shared activation: apply it here (never in place)
                t = act.forward(t.clone() if copy else t)
            dim = (1 if t.dim() == 4 else 0) if conv else t.dim() - 1
            dims = [d for d in range(t.dim()) if d != dim]
            width = t.shape[dim]
            s = self._stats.get(name)
            if s is None or s["sum"].numel() != width or s["sum"].device != t.device:
                dtype = torch.float32 if t.device.type == "mps" else torch.float64
                s = {k: torch.zeros(width, dtype=dtype, device=t.device) for k in _SUMS}
                self._stats[name], self._count[name] = s, 0
            self._count[name] += t.numel() // max(width, 1)
            s["sum"] += t.sum(dims, dtype=s["sum"].dtype)
            s["abs_sum"] += t.abs().sum(dims, dtype=s["sum"].dtype)
            s["active"] += (t > 0).sum(dims)
            s["nonzero"] += (t != 0).sum(dims)

        return hook

    def start(self) -> None:
        """Register the forward hooks (re-resolving each layer's post-activation module), so
        every forward pass from now on is counted; idempotent."""
        if self._handles:
            return
        modules = dict(self.model.named_modules())
        for name in self.layers:
            if not isinstance(modules.get(name), _LAYERS):
                raise ValueError(
                    f"layer '{name}' is no longer a Linear/Conv2d of the model; "
                    "build a new trigger for the current model"
                )
        self._locate(try_analyse(self.model))
        for name in self.layers:
            point, act = self._points[name]
            conv = isinstance(modules[name], nn.Conv2d)
            hook = self._hook(name, conv, None if act is None else modules[act])
            self._handles.append(modules[point].register_forward_hook(hook))

    def stop(self) -> None:
        """Remove the hooks (statistics are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def observe(self, *inputs: Any) -> None:
        """Forward ``model(*inputs)`` in eval mode without gradients, counting the activations;
        every module's train/eval mode is restored afterwards."""
        modes = {m: m.training for m in self.model.modules()}
        started = not self._handles
        self.start()
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(*inputs)
        finally:
            for m, mode in modes.items():
                m.training = mode
            if started:
                self.stop()

    def statistics(self, layer: str) -> dict[str, Tensor] | None:
        """Per-unit ``{"count", "mean", "mean_abs", "active", "nonzero"}`` of ``layer``
        (``active``/``nonzero``: fractions of observations), or ``None`` when it has no
        observations fitting its current width."""
        if layer not in self.layers:
            raise KeyError(f"layer '{layer}' is not watched; watched layers: {self.layers}")
        s = self._stats.get(layer)
        module = self.model.get_submodule(layer)
        n = self._count.get(layer, 0)
        if s is None or s["sum"].numel() != out_units(module) or n == 0:
            return None
        return {"count": torch.tensor(float(n), dtype=s["sum"].dtype),
                "mean": s["sum"] / n, "mean_abs": s["abs_sum"] / n,
                "active": s["active"] / n, "nonzero": s["nonzero"] / n}  # fmt: skip

    def reset(self) -> None:
        """Forget every statistic (hooks, if started, stay)."""
        self._stats, self._count = {}, {}

    def state_dict(self) -> dict[str, Any]:
        """``{"stats": {layer: {"count": int, "sum", "abs_sum", "active", "nonzero"}}}`` (the
        per-unit sums are tensors)."""
        return {
            "stats": {
                n: {"count": self._count[n]} | {k: v.clone() for k, v in s.items()}
                for n, s in self._stats.items()
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        owner = type(self).__name__
        check_state(owner, state, {"stats"})
        stats = state["stats"]
        unknown = sorted(set(stats) - set(self.layers)) if isinstance(stats, dict) else None
        if unknown is None or unknown:
            raise ValueError(
                f"{owner} state has statistics for layers {unknown}, not watched here; "
                f"watched layers: {self.layers}"
            )
        for name, s in stats.items():
            check_state(f"{owner} statistics of '{name}'", s, set(_KEYS))
        self._stats = {n: {k: s[k].clone() for k in _SUMS} for n, s in stats.items()}
        self._count = {n: int(s["count"]) for n, s in stats.items()}
