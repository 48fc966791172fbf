"""Trainer callbacks that feed triggers from the training loop.

Imported lazily (``trigger.callback()``): :mod:`dynarch.callbacks` imports
:mod:`dynarch.triggers`, so the triggers cannot import the callbacks at module level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..callbacks import Callback

if TYPE_CHECKING:
    from ..train import Trainer
    from .credit import CreditEconomy
    from .gradients import GradientVarianceSpike

__all__ = ["EarnCredits", "ObserveGradients"]


class ObserveGradients(Callback):
    """Calls ``trigger.observe()`` after every backward pass; its state is the trigger's.

    Example:
        >>> from torch import nn
        >>> from dynarch.triggers.gradients import GradientVarianceSpike
        >>> cb = ObserveGradients(GradientVarianceSpike(nn.Linear(2, 2)))
    """

    def __init__(self, trigger: GradientVarianceSpike) -> None:
        self.trigger = trigger

    def on_after_backward(self, trainer: Trainer) -> None:
        self.trigger.observe()

    def state_dict(self) -> dict[str, Any]:
        return self.trigger.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trigger.load_state_dict(state)


class EarnCredits(Callback):
    """Earns credits for every correct prediction of each training batch (``on_step_end``).

    A prediction is ``trainer.last_output.argmax(dim=1)`` (class scores ``(N, C, ...)``),
    correct when it equals ``trainer.last_target`` (class indices ``(N, ...)``). Its state is
    the economy's.

    Example:
        >>> from dynarch.triggers.credit import CreditEconomy
        >>> cb = EarnCredits(CreditEconomy())
    """

    def __init__(self, economy: CreditEconomy) -> None:
        self.trigger = economy

    def on_step_end(self, trainer: Trainer) -> None:
        out, target = trainer.last_output, trainer.last_target
        if out is None or target is None:
            return
        if (
            out.dim() < 2
            or target.is_floating_point()
            or tuple(target.shape) != (out.shape[0], *out.shape[2:])
        ):
            raise ValueError(
                "CreditEconomy earns from classification batches: outputs of class scores "
                "shaped (N, C, ...) and integer class targets shaped (N, ...); got output "
                f"{tuple(out.shape)} and target {tuple(target.shape)} of dtype {target.dtype}"
            )
        self.trigger.earn(out.argmax(dim=1) == target)

    def state_dict(self) -> dict[str, Any]:
        return self.trigger.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trigger.load_state_dict(state)
