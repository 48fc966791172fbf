"""Growth methods as schedule actions, so grow-as-needed schedules and configs can name them.

``"patches"`` (:class:`PatchesAction`) measures activity on a sample of the training inputs
(:class:`~dynarch.activity.Extrema`) and adds extrema-guided patches
(:func:`~dynarch.growth.add_patches`), ``amount`` × the active connections of the layers at a
time, never past a budget. Use it with :class:`dynarch.schedules.GrowAsNeeded`::

    >>> import torch
    >>> from dynarch.masks import sparsify
    >>> from dynarch.models import mlp
    >>> from dynarch.schedules import make_action
    >>> model = mlp(16, [32], 4); _ = sparsify(model, 0.1, distribution="uniform")
    >>> act = make_action("patches", amount=0.5)
    >>> act.targets(model), act.cost(model, "fc1")
    (['fc1'], 26)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._engine import engine_state
from .._validate import check_int
from ..events import Event
from ..masks import MASK
from ..models import hidden_layer_names
from ..schedules.actions import Action, register_action
from ..triggers import check_number
from .patches import add_patches, patch_positions

if TYPE_CHECKING:
    from ..train import Trainer

__all__ = ["BudgetEconomy", "PatchesAction"]


def _mask(model: nn.Module, name: str) -> torch.Tensor:
    mask = model.get_submodule(name)._buffers.get(MASK)
    assert mask is not None
    return mask


def _active(model: nn.Module, name: str) -> int:
    return int(_mask(model, name).sum())


@register_action("patches")
class PatchesAction(Action):
    """Add extrema-guided patches to masked hidden layers (one ``"patch"`` event).

    Targets are the masked hidden layers (``layers=None``: every Linear/Conv2d but the output
    layer that has a ``weight_mask``). At each application ``sample`` training inputs (drawn
    with the engine generator) are observed by an :class:`~dynarch.activity.Extrema` with
    ``eps`` (dead units) and ``quantile`` (the most active units count as saturated), and
    patches ``patch_size`` wide are turned on around those units — at most ``amount`` × the
    targets' active connections, and never more than the ``budget`` (when given) has room
    for (:meth:`room`: its parameter and FLOP headroom). The cost of a target (checked by the
    schedule against its budget) is ``ceil(amount × its active connections)``, the most it
    may add; its FLOPs are that many connections times the positions the target is applied
    at (:meth:`weights_added`), an upper bound.

    Example:
        >>> PatchesAction(amount=0.25, patch_size=16).patch_size
        16
    """

    def __init__(
        self,
        amount: float = 0.5,
        patch_size: int = 32,
        *,
        layers: Sequence[str] | None = None,
        quantile: float = 0.9,
        eps: float = 0.01,
        sample: int = 1024,
        init: str = "zero",
        budget: Any = None,
    ) -> None:
        self.amount = check_number("amount", amount, low=0.0, strict=True)
        self.patch_size = check_int("patch_size", patch_size, 1)
        if not 0.0 < check_number("quantile", quantile) < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
        self.quantile = float(quantile)
        self.eps = check_number("eps", eps, low=0.0)
        self.sample = check_int("sample", sample, 1)
        if layers is not None and (isinstance(layers, str) or not list(layers)):
            raise ValueError(f"patches: layers must be None or a list of names, got {layers!r}")
        self.layers = None if layers is None else list(layers)
        if init not in ("zero", "random"):
            raise ValueError(f"patches: init must be 'zero' or 'random', got {init!r}")
        self.init = init
        if budget is not None and not callable(getattr(budget, "headroom", None)):
            raise TypeError(f"patches: budget needs a headroom(model) method, got {budget!r}")
        if getattr(budget, "max_flops", None) is not None and not callable(
            getattr(budget, "positions", None)
        ):
            raise TypeError(
                "patches: a budget with max_flops needs a positions(model) method (FLOPs of "
                f"one weight per layer, as dynarch.triggers.Budget has), got {budget!r}"
            )
        self.budget = budget

    def check(self, model: nn.Module) -> None:
        """Refuse unknown ``layers`` and a model without masked hidden layers (patches live
        in masks)."""
        modules = dict(model.named_modules())
        for name in self.layers or []:
            if not isinstance(modules.get(name), nn.Linear | nn.Conv2d):
                raise ValueError(
                    f"patches: layers: {name!r} is not a Linear/Conv2d of the model; hidden "
                    f"layers: {', '.join(hidden_layer_names(model))}"
                )
        if not self.targets(model):
            raise ValueError(
                "patches: no masked hidden layer to patch; sparsify the model first "
                "(config: a sparsity: section)"
            )

    def targets(self, model: nn.Module, hint: Sequence[str] | None = None) -> list[str]:
        """Masked hidden layers (``layers`` if given), in model order."""
        names = self.layers if self.layers is not None else hidden_layer_names(model)
        return [n for n in names if model.get_submodule(n)._buffers.get(MASK) is not None]

    def cost(self, model: nn.Module, target: str) -> int:
        """The most connections a growth adds at ``target``: ``ceil(amount × active)``, and
        with a ``budget`` no more than its headroom (so the last growth fills the budget
        instead of being refused for overshooting it; see :meth:`room`)."""
        wanted = math.ceil(self.amount * _active(model, target))
        room = self.room(model, [target])
        return wanted if room is None else min(wanted, room)

    def room(self, model: nn.Module, targets: Sequence[str]) -> int | None:
        """The most connections ``budget`` leaves room for at ``targets`` (None: no limit):
        its ``"params"`` headroom, and its ``"flops"`` headroom divided by the most
        multiply-adds one connection costs in a target (the positions it is applied at,
        ``budget.positions(model)``). A ``count_masked=True`` budget already counts the
        masked-off positions patches turn on, so it sets no limit.

        Example:
            >>> from dynarch.masks import sparsify
            >>> from dynarch.models import mlp
            >>> from dynarch.triggers import Budget
            >>> model = mlp(16, [32], 4); _ = sparsify(model, 0.1, distribution="uniform")
            >>> budget = Budget(max_flops=100, input_shape=(16,))
            >>> budget.headroom(model), PatchesAction(budget=budget).room(model, ["fc1"])
            ({'flops': 36}, 36)
        """
        if self.budget is None or getattr(self.budget, "count_masked", False) is True:
            return None
        headroom = self.budget.headroom(model)
        limits = [int(headroom["params"])] if "params" in headroom else []
        if "flops" in headroom:
            positions = self.budget.positions(model)
            per = max((positions.get(t, 0) for t in targets), default=0)
            if per > 0:
                limits.append(int(headroom["flops"]) // per)
        return max(min(limits), 0) if limits else None

    def weights_added(
        self, model: nn.Module, target: str, *, dense: bool = False
    ) -> tuple[dict[str, int], int]:
        """``({target: cost(model, target)}, 0)``: patches turn on masked-off positions of
        ``target`` only, at most :meth:`cost` of them (with ``dense``: ``({target: 0}, 0)``,
        the positions were already counted)."""
        return {target: 0 if dense else self.cost(model, target)}, 0

    def _inputs(self, trainer: Trainer) -> torch.Tensor:
        x = trainer.train_data[0]
        n = min(self.sample, x.shape[0])
        gen = engine_state(trainer.model).generator
        idx = torch.randperm(x.shape[0], generator=gen)[:n]
        device = next(trainer.model.parameters()).device
        return x[idx.to(x.device)].to(device)

    def apply(self, trainer: Trainer, targets: list[str], reason: str) -> list[Event]:
        """Observe a training sample, then patch around the extrema units of ``targets``."""
        from ..activity import Extrema

        model = trainer.model
        limit = sum(self.cost(model, t) for t in targets)
        room = self.room(model, targets)
        if room is not None:
            limit = min(limit, room)
        if limit <= 0 or not targets:
            return []
        extrema = Extrema(model, targets, eps=self.eps, quantile=self.quantile)
        extrema.observe(self._inputs(trainer))
        units = {n: u for n in targets if (u := extrema.extrema_units(n)).numel()}
        if not units:
            return []
        # every position of the patches already on: no event (it would change nothing)
        wanted = patch_positions(model, units, self.patch_size)
        new = [(w & ~_mask(model, n)).any() for n, w in wanted.items()]
        if not bool(torch.stack(new).any()):  # one sync for all layers
            return []
        event = add_patches(
            model, units, optimizer=trainer.optimizer, patch_size=self.patch_size,
            init=self.init, max_connections=limit, reason=reason,
        )  # fmt: skip
        return [event]


class BudgetEconomy:
    """A :class:`~dynarch.triggers.Budget` seen as a growth economy (``can_afford``/``spend``)
    so a :class:`~dynarch.growth.Tournament` stays within a parameter budget. A candidate
    adding ``connections`` weights and ``units`` units is priced ``connections + units`` (one
    bias per new unit: exact for widened or inserted Linear layers without norms, and for
    bias-free skips and patches) and is affordable when ``budget.can_grow(model, price)``.
    Spending changes nothing: the tournament pays *after* applying the candidate and the
    budget counts the grown model itself.

    Example:
        >>> from dynarch.triggers import Budget
        >>> model = nn.Linear(4, 4)
        >>> eco = BudgetEconomy(Budget(max_params=30), model)
        >>> eco.can_afford(connections=10), eco.can_afford(connections=8, units=3)
        (True, False)
        >>> eco.spend(connections=10)
        0.0
    """

    def __init__(self, budget: Any, model: nn.Module) -> None:
        if not callable(getattr(budget, "can_grow", None)):
            raise TypeError(f"BudgetEconomy needs a budget with can_grow(), got {budget!r}")
        self.budget, self.model = budget, model

    @staticmethod
    def _price(connections: int, units: int) -> int:
        for name, value in (("connections", connections), ("units", units)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"BudgetEconomy: {name} must be an int >= 0, got {value!r}")
        return connections + units

    def can_afford(self, connections: int = 0, units: int = 0) -> bool:
        """Whether ``connections + units`` more parameters fit the budget."""
        return bool(self.budget.can_grow(self.model, self._price(connections, units)))

    def spend(self, connections: int = 0, units: int = 0) -> float:
        """Nothing to pay (the budget counts the grown model itself); returns 0.0. Called
        after the candidate was applied, so affordability is not checked again."""
        self._price(connections, units)
        return 0.0
