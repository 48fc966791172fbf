"""The built-in actions: ``"widen"``, ``"magnitude_prune"`` and ``"structured_prune"``.

>>> from dynarch.models import mlp
>>> widen_cost(mlp(8, [16], 3), "fc1", 18)  # 2 new units: 8 inputs + bias + 3 outputs each
24
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from .._engine import engine_state
from ..events import Event
from ..graph import ModelGraph, UnsupportedModelError, analyse, resolve
from ..models import hidden_layer_names
from ..remap import out_units
from .actions import Action, register_action
from .pricing import widen_cost, widen_plan

if TYPE_CHECKING:
    from ..train import Trainer

__all__ = ["MagnitudePruneAction", "StructuredPruneAction", "WidenAction", "widen_cost"]

_LAYERS = (nn.Linear, nn.Conv2d)


def _graph(model: nn.Module, cache: dict[int, tuple[int, ModelGraph]]) -> ModelGraph:
    """``analyse(model)``, cached until the model's structure version changes."""
    version = engine_state(model).version
    hit = cache.get(id(model))
    if hit is None or hit[0] != version:
        cache.clear()
        cache[id(model)] = hit = (version, analyse(model))
    return hit[1]


@register_action("widen")
class WidenAction(Action):
    """Widen layers with :func:`dynarch.widen` (optimizer state carried over).

    Each target grows by ``amount`` units, or to ``max(width + 1, ceil(width * factor))``
    (default ``factor=1.5``), capped at ``max_width`` (a layer already there is not a
    target). ``layers=None`` widens where the trigger points (its ``where()``: only the
    layers there that can be widened, e.g. not the output layer) or else every hidden layer
    that can be widened. Coupled layers (a residual add) widen together, so a group is
    widened once even when several of its layers are named. Named ``layers`` that cannot
    be widened (the model's output layer; a LayerNorm over their units unless
    ``init="random"``) are refused by :meth:`check`, before training. ``init``/``noise``
    are passed to :func:`dynarch.widen`.

    Example:
        >>> from dynarch.models import mlp
        >>> act = WidenAction(["fc1", "fc2"], factor=2.0, max_width=24)
        >>> model = mlp(8, [16, 24], 3)
        >>> act.targets(model), act.new_width(model, "fc1")
        (['fc1'], 24)
    """

    sequential: ClassVar[bool] = True  # widening fc1 makes fc2's widening cost more

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        *,
        amount: int | None = None,
        factor: float | None = None,
        init: str = "net2net",
        noise: float = 0.0,
        max_width: int | None = None,
    ) -> None:
        from ..surgery import INITS

        if layers is not None and (
            isinstance(layers, str)
            or not isinstance(layers, Sequence)
            or not layers
            or not all(isinstance(n, str) and n for n in layers)
        ):
            raise ValueError(
                f"widen: layers must be None or a non-empty list of module names, got {layers!r}"
            )
        if amount is not None and factor is not None:
            raise ValueError(
                f"widen: give amount (units to add) or factor (width multiplier), not both; "
                f"got amount={amount!r}, factor={factor!r}"
            )
        if amount is not None and (
            not isinstance(amount, int) or isinstance(amount, bool) or amount < 1
        ):
            raise ValueError(f"widen: amount must be a positive int (units added), got {amount!r}")
        if factor is not None and (
            not isinstance(factor, int | float)
            or isinstance(factor, bool)
            or not math.isfinite(factor)
            or factor <= 1
        ):
            raise ValueError(f"widen: factor must be a finite number > 1, got {factor!r}")
        if init not in INITS:
            raise ValueError(f"widen: unknown init {init!r}; allowed: {', '.join(INITS)}")
        if not isinstance(noise, int | float) or not math.isfinite(noise) or noise < 0:
            raise ValueError(f"widen: noise must be a finite number >= 0, got {noise!r}")
        if max_width is not None and (
            not isinstance(max_width, int) or isinstance(max_width, bool) or max_width < 1
        ):
            raise ValueError(f"widen: max_width must be None or a positive int, got {max_width!r}")
        self.layers = None if layers is None else list(layers)
        self.amount = amount
        self.factor = 1.5 if amount is None and factor is None else factor
        self.init = init
        self.noise = float(noise)
        self.max_width = max_width
        self._cache: dict[int, tuple[int, ModelGraph]] = {}

    def check(self, model: nn.Module) -> None:
        """Every named layer is a Linear/Conv2d of ``model`` that can be widened (without
        ``layers``: some hidden layer can be)."""
        for name in self.layers or []:
            resolve(model, name, _LAYERS)
        if self.layers is None and not self._widenable(model, hidden_layer_names(model)):
            hidden = hidden_layer_names(model)
            graph = _graph(model, self._cache)
            whys = [f"'{n}': {self._why_not(model, graph, n)}" for n in hidden]
            raise ValueError(
                f"widen: no hidden layer of the model can be widened with init={self.init!r}: "
                + ("; ".join(whys) if whys else "the model has no hidden layer")
            )
        graph = _graph(model, self._cache)
        for name in self.layers or []:
            why = self._blocker(graph, name)
            if why is not None:
                raise UnsupportedModelError(f"widen: cannot widen '{name}': {why}")

    def _blocker(self, graph: ModelGraph, name: str) -> str | None:
        """Why layer ``name`` cannot be widened with this action's ``init`` (None: it can)."""
        group = graph.group(name)
        if group.problems:
            return "; ".join(group.problems) + f" (coupled layers: {group.producers})"
        if group.layernorm_over_channels and self.init != "random":
            return (
                f"LayerNorm '{group.layernorm_over_channels[0]}' normalises over its units, so "
                f"init={self.init!r} cannot preserve the function; use init='random'"
            )
        return None

    def _why_not(self, model: nn.Module, graph: ModelGraph, name: str) -> str:
        """Why hidden layer ``name`` is not widenable (see :meth:`check`)."""
        if not isinstance(model.get_submodule(name), _LAYERS):
            return "not a Linear/Conv2d"
        if name not in graph.group_of:
            return "not reached by the traced forward pass"
        return self._blocker(graph, name) or "unknown"

    def _widenable(self, model: nn.Module, names: Sequence[str]) -> list[str]:
        """The Linear/Conv2d layers among ``names`` that can be widened now."""
        modules = dict(model.named_modules())
        layers = [n for n in names if isinstance(modules.get(n), _LAYERS)]
        if not layers:
            return []
        graph = _graph(model, self._cache)
        return [n for n in layers if n in graph.group_of and self._blocker(graph, n) is None]

    def new_width(self, model: nn.Module, target: str) -> int:
        """The width ``target`` would get now."""
        old = out_units(resolve(model, target, _LAYERS))
        if self.amount is not None:
            new = old + self.amount
        else:
            assert self.factor is not None
            new = max(old + 1, math.ceil(old * self.factor - 1e-9))  # 10 * 1.1 -> 11
        return new if self.max_width is None else min(new, self.max_width)

    def targets(self, model: nn.Module, hint: Sequence[str] | None = None) -> list[str]:
        """The layers to widen now (those below ``max_width``, one per coupled group)."""
        if self.layers is not None:
            names = list(self.layers)
        else:
            names = self._widenable(model, list(dict.fromkeys(hint or [])))
            names = names or self._widenable(model, hidden_layer_names(model))
        chosen: list[str] = []
        covered: set[str] = set()
        for name in names:
            if name in covered:
                continue
            if self.new_width(model, name) > out_units(model.get_submodule(name)):
                chosen.append(name)
                covered.update(self.places(model, name))
        return chosen

    def places(self, model: nn.Module, target: str) -> list[str]:
        """``target`` and every layer coupled to it (they widen together)."""
        return list(_graph(model, self._cache).group(target).producers)

    def cost(self, model: nn.Module, target: str) -> int:
        """Parameters added by widening ``target`` to :meth:`new_width`."""
        graph = _graph(model, self._cache)
        return widen_cost(model, target, self.new_width(model, target), graph, self.init)

    def adds(self, model: nn.Module, target: str) -> tuple[int, int]:
        """``(connections, units)`` widening ``target`` adds: the new Linear/Conv2d weights
        (:meth:`cost` without biases and norm entries) and the new units of every coupled
        layer.

        Example:
            >>> from dynarch.models import mlp
            >>> WidenAction(amount=2).adds(mlp(8, [10, 6], 3), "fc1")  # 2 * (8 + 6), 2
            (28, 2)
        """
        graph = _graph(model, self._cache)
        width = self.new_width(model, target)
        extra = width - out_units(model.get_submodule(target))
        weights, _ = widen_plan(model, target, width, graph, self.init)
        return sum(weights.values()), extra * len(graph.group(target).producers)

    def weights_added(
        self, model: nn.Module, target: str, *, dense: bool = False
    ) -> tuple[dict[str, int], int]:
        """Weights widening ``target`` to :meth:`new_width` adds to each coupled layer and
        consumer, and the biases and norm entries it adds (see
        :func:`~dynarch.schedules.pricing.widen_plan`): exact for dense layers and, with
        ``dense``, for masked ones.

        Example:
            >>> from dynarch.models import mlp
            >>> WidenAction(amount=2).weights_added(mlp(8, [10, 6], 3), "fc1")
            ({'fc1': 16, 'fc2': 12}, 2)
        """
        graph = _graph(model, self._cache)
        width = self.new_width(model, target)
        return widen_plan(model, target, width, graph, self.init, dense=dense)

    def apply(self, trainer: Trainer, targets: list[str], reason: str) -> list[Event]:
        """Widen each target; one ``widen`` event each."""
        from ..surgery import widen  # lazy: surgery imports much of the package

        model = trainer.model
        return [
            widen(
                model,
                name,
                self.new_width(model, name),
                optimizer=trainer.optimizer,
                init=self.init,
                noise=self.noise,
                reason=reason,
            )
            for name in targets
        ]


@register_action("magnitude_prune")
class MagnitudePruneAction(Action):
    """Prune by weight magnitude to ``sparsity`` with :func:`dynarch.prune.magnitude_prune`
    (one ``prune`` event; pruning never un-prunes, so repeating it only prunes what grew).

    Example:
        >>> MagnitudePruneAction(0.5, include=["fc*"]).sparsity
        0.5
    """

    def __init__(
        self,
        sparsity: float,
        *,
        scope: str = "layer",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        from ..prune._core import SCOPES, check_choice, check_sparsity

        self.sparsity = check_sparsity(sparsity)
        self.scope = check_choice("scope", scope, SCOPES)
        self.include = include
        self.exclude = exclude

    def check(self, model: nn.Module) -> None:
        """The include/exclude patterns select at least one layer."""
        self.targets(model)

    def targets(self, model: nn.Module, hint: Sequence[str] | None = None) -> list[str]:
        """The selected Linear/Conv2d layers."""
        from ..prune._core import select_layers

        return list(select_layers(model, self.include, self.exclude))

    def apply(self, trainer: Trainer, targets: list[str], reason: str) -> list[Event]:
        """Prune the selected layers; one ``prune`` event."""
        from ..prune import magnitude_prune

        return [
            magnitude_prune(
                trainer.model,
                self.sparsity,
                scope=self.scope,
                optimizer=trainer.optimizer,
                include=self.include,
                exclude=self.exclude,
                reason=reason,
            )
        ]


@register_action("structured_prune")
class StructuredPruneAction(Action):
    """Remove the ``amount`` weakest units (a count, or a fraction in [0, 1)) of each layer
    with :func:`dynarch.prune.structured_prune` (one ``shrink`` event per layer).

    Example:
        >>> StructuredPruneAction(["fc1"], 0.25).amount
        0.25
    """

    def __init__(self, layers: Sequence[str], amount: int | float, *, norm: float = 2) -> None:
        if (
            isinstance(layers, str)
            or not isinstance(layers, Sequence)
            or not layers
            or not all(isinstance(n, str) and n for n in layers)
        ):
            raise ValueError(
                f"structured_prune: layers must be a non-empty list of module names, got {layers!r}"
            )
        if (
            isinstance(amount, bool)
            or not isinstance(amount, int | float)
            or (isinstance(amount, int) and amount < 1)
            or (isinstance(amount, float) and not 0 < amount < 1)
        ):
            raise ValueError(
                f"structured_prune: amount must be a unit count (int >= 1) or a fraction in "
                f"(0, 1), got {amount!r}"
            )
        from ..prune.magnitude import _check_norm

        try:
            _check_norm(norm)
        except ValueError as exc:
            raise ValueError(f"structured_prune: {exc}") from None
        self.layers = list(layers)
        self.amount = amount
        self.norm = norm

    def check(self, model: nn.Module) -> None:
        """Every named layer is a Linear/Conv2d of ``model``."""
        for name in self.layers:
            resolve(model, name, _LAYERS)

    def count(self, model: nn.Module, target: str) -> int:
        """Units that would be removed from ``target`` now."""
        width = out_units(resolve(model, target, _LAYERS))
        return round(self.amount * width) if isinstance(self.amount, float) else self.amount

    def targets(self, model: nn.Module, hint: Sequence[str] | None = None) -> list[str]:
        """The named layers that can lose :meth:`count` units and keep at least one."""
        return [
            n
            for n in self.layers
            if 0 < self.count(model, n) < out_units(resolve(model, n, _LAYERS))
        ]

    def apply(self, trainer: Trainer, targets: list[str], reason: str) -> list[Event]:
        """Shrink each target; one ``shrink`` event each."""
        from ..prune import structured_prune

        return [
            structured_prune(
                trainer.model,
                name,
                self.count(trainer.model, name),
                norm=self.norm,
                optimizer=trainer.optimizer,
                reason=reason,
            )
            for name in targets
        ]
