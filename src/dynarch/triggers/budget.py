"""``Budget``: parameter and FLOP limits (may we grow? must we prune? how much room is left?)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._engine import engine_state
from .._validate import check_int, check_model
from ..masks import MASK
from .base import Trigger, check_state, register_trigger

__all__ = ["Budget"]

_LAYERS = (nn.Linear, nn.Conv2d)


def _limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")
    return value


def _mask(module: nn.Module) -> Tensor:
    mask = module._buffers[MASK]
    assert mask is not None
    return mask


def _masked(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding a ``weight_mask`` (a plain walk: no engine state is attached to a module
    that is only being priced)."""
    return {n: m for n, m in model.named_modules() if m._buffers.get(MASK) is not None}


def _active(modules: list[nn.Module]) -> list[Tensor]:
    """Active weight count of each masked module (0-dim tensors, not yet synced)."""
    return [_mask(m).sum() for m in modules]


@register_trigger("budget")
class Budget(Trigger):
    """A parameter budget and/or a FLOP budget: ``can_grow``, ``must_prune``, ``headroom``.

    **Parameters** (:meth:`count`) are all of the model's parameters, except that a masked
    layer's weight (a ``weight_mask`` buffer, see :mod:`dynarch.masks`) counts only its
    active positions; with ``count_masked=True`` masked-off positions count too (the dense,
    memory-footprint view).

    **FLOPs** (:meth:`flops`) are the multiply-adds of every Linear and Conv2d in one forward
    pass of one sample (one multiply-add counts 1; double it for a floating-point-operation
    count): each layer's active weights (all weights with ``count_masked=True``) times the
    positions it is applied at (1 for a Linear on a vector, ``H_out * W_out`` for a Conv2d),
    found with forward hooks on a zero input shaped ``(1, *input_shape)`` (eval mode, no
    grad; re-run only after a structural change). Biases, activations and norms are not
    counted.

    ``can_grow(model, module_or_n)`` is True when adding ``module_or_n`` (a module: its
    :meth:`count`; an int: that many parameters) keeps the model within ``max_params``, and
    the model with ``flops`` more multiply-adds stays within ``max_flops``; budgets not
    given are not checked. ``must_prune`` is True when the model is over a budget.

    **The model.** Built with ``model=``, every method may leave the model out:
    ``budget.can_grow(module)``, ``budget.must_prune()``, ``budget.headroom()``,
    ``budget.count()`` and ``budget.flops()`` then price that model.

    **As a trigger.** ``update(value)`` (``value`` ignored) fires when
    :meth:`must_prune` of the ``model`` given to the constructor; it has no state.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> budget = Budget(max_params=100, max_flops=64, input_shape=(4,))
        >>> budget.count(model), budget.flops(model), budget.headroom(model)
        (58, 48, {'params': 42, 'flops': 16})
        >>> budget.can_grow(model, nn.Linear(8, 4)), budget.can_grow(model, 43)
        (True, False)
        >>> own = Budget(max_params=100, model=model)
        >>> own.can_grow(nn.Linear(8, 4)), own.must_prune(), own.headroom()
        (True, False, {'params': 42})
    """

    def __init__(
        self,
        max_params: int | None = None,
        max_flops: int | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        count_masked: bool = False,
        model: nn.Module | None = None,
    ) -> None:
        self.max_params = _limit("max_params", max_params)
        self.max_flops = _limit("max_flops", max_flops)
        if max_params is None and max_flops is None:
            raise ValueError(
                "Budget needs max_params and/or max_flops; both are None, so nothing is limited"
            )
        if input_shape is not None and (
            isinstance(input_shape, str)
            or not isinstance(input_shape, Sequence)
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape
            )
        ):
            raise ValueError(
                f"input_shape must be the shape of one sample without the batch dimension, "
                f"a sequence of positive ints such as (784,) or (1, 28, 28); got {input_shape!r}"
            )
        if max_flops is not None and input_shape is None:
            raise ValueError(
                "max_flops needs input_shape (the shape of one sample without the batch "
                "dimension, e.g. (784,) or (1, 28, 28)) to count FLOPs with a dummy forward pass"
            )
        if not isinstance(count_masked, bool):
            raise ValueError(f"count_masked must be True or False, got {count_masked!r}")
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.count_masked = count_masked
        self.model = None if model is None else check_model(model)
        self._positions: tuple[int, int, dict[str, int]] | None = None

    def _model(self, model: nn.Module | None, method: str) -> nn.Module:
        """``model``, or the constructor's model when it is left out (a clear error if none)."""
        if model is not None:
            return check_model(model)
        if self.model is None:
            raise ValueError(
                f"Budget.{method} needs the model to price: pass it (budget.{method}(model, ...)) "
                "or build the budget with Budget(..., model=model)"
            )
        return self.model

    def count(self, model: nn.Module | None = None) -> int:
        """Parameters of ``model`` (masked-off weights excluded unless ``count_masked``).

        Example:
            >>> Budget(max_params=10).count(nn.Linear(3, 2))
            8
        """
        model = self._model(model, "count")
        total = sum(p.numel() for p in model.parameters())
        masked = list(_masked(model).values())
        if self.count_masked or not masked:
            return total
        active = int(torch.stack(_active(masked)).sum())  # one sync for all layers
        return total - sum(_mask(m).numel() for m in masked) + active

    def _layer_positions(self, model: nn.Module) -> dict[str, int]:
        """Positions each Linear/Conv2d is applied at for one sample (cached per structure)."""
        key = (id(model), engine_state(model).version)
        if self._positions is not None and self._positions[:2] == key:
            return self._positions[2]
        assert self.input_shape is not None
        first = next(model.parameters(), None)
        dtype = first.dtype if first is not None and first.is_floating_point() else None
        device = None if first is None else first.device
        x = torch.zeros((1, *self.input_shape), dtype=dtype, device=device)
        positions: dict[str, int] = {}

        def record(name: str, width: int) -> Any:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                positions[name] = positions.get(name, 0) + out.numel() // width

            return hook

        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
        handles = [
            m.register_forward_hook(
                record(n, m.out_features if isinstance(m, nn.Linear) else m.out_channels)
            )
            for n, m in layers
        ]
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                model(x)
        except Exception as exc:
            raise ValueError(
                f"Budget could not count FLOPs: a forward pass of one zero sample shaped "
                f"input_shape={self.input_shape} failed ({type(exc).__name__}: {exc}); give "
                "input_shape as the shape of one model input without the batch dimension"
            ) from exc
        finally:
            for h in handles:
                h.remove()
            for m, flag in flags:
                m.training = flag
        self._positions = (*key, positions)
        return positions

    def positions(self, model: nn.Module | None = None) -> dict[str, int]:
        """``{layer: positions}``: how many times each Linear/Conv2d of ``model`` is applied
        for one sample (``H_out * W_out`` for a Conv2d, summed over calls), found as in
        :meth:`flops`; one more active weight in ``layer`` costs ``positions[layer]``
        multiply-adds (a layer the forward pass does not reach is absent: it costs none).

        Example:
            >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 1))
            >>> Budget(max_flops=10**6, input_shape=(1, 4, 4)).positions(model)
            {'0': 4, '2': 1}
        """
        model = self._model(model, "positions")
        if self.input_shape is None:
            raise ValueError(
                "Budget.positions needs input_shape (the shape of one sample without the batch "
                "dimension, e.g. (784,)); pass it to Budget(...)"
            )
        return dict(self._layer_positions(model))

    def flops(self, model: nn.Module | None = None) -> int:
        """Multiply-adds of ``model``'s Linear/Conv2d layers for one sample (see the class doc).

        Example:
            >>> Budget(max_flops=10**6, input_shape=(3, 8, 8)).flops(nn.Conv2d(3, 4, 3))
            3888
        """
        model = self._model(model, "flops")
        if self.input_shape is None:
            raise ValueError(
                "Budget.flops needs input_shape (the shape of one sample without the batch "
                "dimension, e.g. (784,)); pass it to Budget(...)"
            )
        positions = self._layer_positions(model)
        modules = dict(model.named_modules())
        layers = {n: modules[n] for n in positions if n in modules}
        masked = {} if self.count_masked else _masked(model)
        dense = sum(p * layers[n].weight.numel() for n, p in positions.items() if n not in masked)
        sparse = [n for n in positions if n in masked]
        if not sparse:
            return int(dense)
        counts = torch.stack(_active([masked[n] for n in sparse]))
        scale = torch.tensor([positions[n] for n in sparse], device=counts.device)
        return int(dense) + int((counts * scale).sum())  # one sync for all masked layers

    def headroom(self, model: nn.Module | None = None) -> dict[str, int]:
        """Room left under each given budget (``"params"``, ``"flops"``; negative when over).

        Example:
            >>> Budget(max_params=10).headroom(nn.Linear(2, 2))
            {'params': 4}
        """
        model = self._model(model, "headroom")
        room = {}
        if self.max_params is not None:
            room["params"] = self.max_params - self.count(model)
        if self.max_flops is not None:
            room["flops"] = self.max_flops - self.flops(model)
        return room

    def can_grow(
        self,
        model: nn.Module | int,
        module_or_n: nn.Module | int | None = None,
        *,
        flops: int = 0,
    ) -> bool:
        """Whether adding ``module_or_n`` (and ``flops`` multiply-adds) to ``model`` stays
        within budget. ``can_grow(module_or_n)`` (one argument) prices the constructor's model.

        Example:
            >>> Budget(max_params=12).can_grow(nn.Linear(2, 2), nn.Linear(2, 2))
            True
            >>> Budget(max_params=12, model=nn.Linear(2, 2)).can_grow(7)
            False
        """
        if module_or_n is None:
            module_or_n, model = model, self._model(None, "can_grow")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Budget.can_grow(model, module_or_n): model must be a torch.nn.Module, got "
                f"{type(model).__name__}"
            )
        if isinstance(module_or_n, nn.Module):
            extra = self.count(module_or_n)
        elif (
            isinstance(module_or_n, int) and not isinstance(module_or_n, bool) and module_or_n >= 0
        ):
            extra = module_or_n
        else:
            raise ValueError(
                "can_grow needs the module to add or a number of new parameters (an int >= 0), "
                f"got {module_or_n!r}"
            )
        check_int("flops", flops, 0)
        room = self.headroom(model)
        return room.get("params", extra) >= extra and room.get("flops", flops) >= flops

    def must_prune(self, model: nn.Module | None = None) -> bool:
        """Whether ``model`` is over a budget (more parameters or FLOPs than allowed).

        Example:
            >>> Budget(max_params=5).must_prune(nn.Linear(2, 2))
            True
        """
        model = self._model(model, "must_prune")
        return any(room < 0 for room in self.headroom(model).values())

    def update(self, value: float | None = None) -> bool:
        """True when the constructor's ``model`` is over budget (``value`` is ignored)."""
        if self.model is None:
            raise ValueError(
                "Budget.update needs the model to check: build Budget(..., model=model), or "
                "call must_prune(model) directly"
            )
        return self.must_prune(self.model)

    def reset(self) -> None:
        """Nothing to forget: a budget has no state."""

    def state_dict(self) -> dict[str, Any]:
        """``{}`` (a budget has no state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accept :meth:`state_dict` output (an empty dict)."""
        check_state("Budget", state, set())
