"""Callbacks: how everything plugs into the one training loop (:class:`dynarch.train.Trainer`).

Hooks, in the order the trainer calls them::

    on_fit_start
      on_epoch_start                  (not repeated when a run resumes mid-epoch)
        on_after_backward             gradients present, before optimizer.step()
        on_step_end                   after optimizer.step(); trainer.step already counts it
      on_evaluate(trainer, metrics)   after each evaluation
      on_epoch_end
    on_fit_end

Stateful callbacks return plain dicts from ``state_dict()`` (loadable with
``torch.load(weights_only=True)``) so a run resumes exactly.

    >>> import torch, torch.nn as nn
    >>> from dynarch.train import fit
    >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    >>> model = nn.Linear(4, 2)
    >>> seen = []
    >>> cb = LambdaCallback(on_epoch_end=lambda t: seen.append(t.epoch))
    >>> _ = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), epochs=2,
    ...         callbacks=[cb], progress=False)
    >>> seen
    [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .triggers import Plateau, check_mode, check_state

if TYPE_CHECKING:
    from .events import Event
    from .train import Trainer

__all__ = [
    "HOOKS", "At", "Callback", "CosineLR", "EarlyStopping", "GrowOnPlateau", "LambdaCallback",
    "training_done",
]  # fmt: skip

HOOKS = (
    "on_fit_start",
    "on_epoch_start",
    "on_after_backward",
    "on_step_end",
    "on_epoch_end",
    "on_evaluate",
    "on_fit_end",
)


class Callback:
    """Base class with no-op hooks; override the ones you need.

    Example:
        >>> class CountSteps(Callback):
        ...     def __init__(self) -> None:
        ...         self.n = 0
        ...     def on_step_end(self, trainer: Trainer) -> None:
        ...         self.n += 1
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Once, before the first step of :meth:`Trainer.fit`."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """At the start of every epoch."""

    def on_after_backward(self, trainer: Trainer) -> None:
        """Gradients are present; ``optimizer.step()`` has not run yet."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After ``optimizer.step()``; ``trainer.step`` counts this step."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """At the end of every epoch (after its evaluation, if any)."""

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After an evaluation; ``metrics`` is also ``trainer.metrics``."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Once, after training finished normally."""

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state of this callback (empty for stateless callbacks)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


def training_done(trainer: Any) -> bool:
    """Whether ``trainer`` has run every step of its fit: the evaluation after the last step
    must not grow, since no step would train what it adds (growth callbacks check this).

    Example:
        >>> from types import SimpleNamespace
        >>> training_done(SimpleNamespace(step=10, total_steps=10)), training_done(
        ...     SimpleNamespace(step=9, total_steps=10))
        (True, False)
    """
    total = getattr(trainer, "total_steps", None)
    return isinstance(total, int) and trainer.step >= total


def _monitored(owner: str, monitor: str, metrics: dict[str, float]) -> float:
    if monitor not in metrics:
        raise ValueError(
            f"{owner} monitors {monitor!r} but the evaluation produced {sorted(metrics)}; "
            "set monitor= to one of those"
        )
    return metrics[monitor]


class LambdaCallback(Callback):
    """A callback from plain functions, one per hook name.

    Example:
        >>> cb = LambdaCallback(on_step_end=lambda t: print(t.step))
    """

    def __init__(self, **hooks: Callable[..., None]) -> None:
        for name, fn in hooks.items():
            if name not in HOOKS:
                raise ValueError(
                    f"LambdaCallback got unknown hook {name!r}; allowed: {list(HOOKS)}"
                )
            if not callable(fn):
                raise TypeError(f"LambdaCallback hook {name!r} must be callable, got {fn!r}")
            setattr(self, name, fn)
        self.hooks = dict(hooks)


class At(Callback):
    """Call ``fn(trainer)`` once, right after optimizer step number ``step`` completes.

    Example:
        >>> cb = At(100, lambda t: t.optimizer.param_groups[0].update(lr=0.01))
    """

    def __init__(self, step: int, fn: Callable[[Trainer], None]) -> None:
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"At: step must be a positive int (steps count from 1), got {step!r}")
        if not callable(fn):
            raise TypeError(f"At: fn must be callable, got {fn!r}")
        self.step = step
        self.fn = fn
        self.fired = False

    def on_step_end(self, trainer: Trainer) -> None:
        if not self.fired and trainer.step == self.step:
            self.fired = True
            self.fn(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"fired": self.fired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state("At", state, {"fired"})
        self.fired = bool(state["fired"])


class EarlyStopping(Callback):
    """Stop training when ``monitor`` has not improved by more than ``min_delta`` for
    ``patience`` evaluations in a row (sets ``trainer.should_stop``).

    Example:
        >>> stop = EarlyStopping(monitor="val_accuracy", mode="max", patience=3)
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 5,
        min_delta: float = 0.0,
        mode: str = "min",
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a metric name such as 'val_loss', got {monitor!r}")
        try:
            self.plateau = Plateau(patience=patience, threshold=min_delta, mode=mode)
        except ValueError as exc:
            raise ValueError(
                f"EarlyStopping: {str(exc).replace('threshold', 'min_delta')}"
            ) from None
        self.monitor = monitor
        self.stopped_epoch: int | None = None

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.plateau.update(_monitored("EarlyStopping", self.monitor, metrics)):
            trainer.should_stop = True
            self.stopped_epoch = trainer.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"plateau": self.plateau.state_dict(), "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state("EarlyStopping", state, {"plateau", "stopped_epoch"})
        self.plateau.load_state_dict(state["plateau"])
        self.stopped_epoch = state["stopped_epoch"]


def _width(model: nn.Module, name: str) -> int:
    """Output width (``out_features`` / ``out_channels``) of the module called ``name``."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        raise ValueError(
            f"GrowOnPlateau target {name!r} is not a module of the model; "
            f"Linear/Conv2d modules: {names}"
        ) from None
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    raise ValueError(
        f"GrowOnPlateau target {name!r} is a {type(module).__name__}; only Linear and Conv2d "
        "layers can be widened"
    )


class GrowOnPlateau(Callback):
    """Widen ``targets`` by ``factor`` whenever the monitored metric plateaus.

    At each evaluation the metric feeds a :class:`~dynarch.triggers.Plateau`. When it fires
    (outside the ``cooldown`` evaluations after the last growth and while fewer than
    ``max_events`` growth rounds happened), every target below ``max_width`` is widened to
    ``min(ceil(width * factor), max_width)`` with :func:`dynarch.surgery.widen` (optimizer
    state carried over), then the trigger is reset. One growth round widens all targets.

    Example:
        >>> grow = GrowOnPlateau(["0", "2"], patience=3, factor=2.0, max_width=256)
    """

    def __init__(
        self,
        targets: list[str],
        *,
        monitor: str = "val_loss",
        mode: str = "min",
        patience: int = 2,
        threshold: float = 0.01,
        factor: float = 1.5,
        max_width: int | None = None,
        init: str = "net2net",
        noise: float = 0.0,
        max_events: int | None = None,
        cooldown: int = 0,
    ) -> None:
        if (
            isinstance(targets, str)
            or not isinstance(targets, list | tuple)
            or not targets
            or not all(isinstance(t, str) for t in targets)
        ):
            raise ValueError(f"targets must be a non-empty list of module names, got {targets!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a metric name such as 'val_loss', got {monitor!r}")
        if not isinstance(factor, int | float) or not math.isfinite(factor) or factor <= 1:
            raise ValueError(f"factor must be a finite number > 1, got {factor!r}")
        for arg, value in (("max_width", max_width), ("max_events", max_events)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"{arg} must be None or a positive int, got {value!r}")
        if not isinstance(cooldown, int) or isinstance(cooldown, bool) or cooldown < 0:
            raise ValueError(f"cooldown must be an int >= 0 (evaluations), got {cooldown!r}")
        from .surgery import INITS

        if init not in INITS:
            raise ValueError(f"unknown init {init!r} for widen; allowed: {', '.join(INITS)}")
        if not isinstance(noise, int | float) or not math.isfinite(noise) or noise < 0:
            raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
        check_mode(mode)
        self.trigger = Plateau(patience=patience, threshold=threshold, mode=mode)
        self.targets = list(targets)
        self.monitor = monitor
        self.factor = float(factor)
        self.max_width = max_width
        self.init = init
        self.noise = float(noise)
        self.max_events = max_events
        self.cooldown = cooldown
        self.rounds = 0
        self.cooldown_left = 0
        self.events: list[Event] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        for name in self.targets:
            _width(trainer.model, name)  # fail before training, not at the first plateau

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = _monitored("GrowOnPlateau", self.monitor, metrics)
        if self.max_events is not None and self.rounds >= self.max_events:
            return
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            return
        if self.trigger.update(value) and not training_done(trainer):
            self.grow(trainer)

    def grow(self, trainer: Trainer) -> list[Event]:
        """Widen every target not yet at ``max_width``; returns the events (empty if none)."""
        from .surgery import widen  # lazy: surgery imports much of the package

        events = []
        for name in self.targets:
            old = _width(trainer.model, name)
            new = max(old + 1, math.ceil(old * self.factor - 1e-9))  # 10 * 1.1 -> 11, not 12
            if self.max_width is not None:
                if old >= self.max_width:
                    continue
                new = min(new, self.max_width)
            events.append(
                widen(
                    trainer.model,
                    name,
                    new,
                    optimizer=trainer.optimizer,
                    init=self.init,
                    noise=self.noise,
                    reason="plateau",
                )
            )
        self.trigger.reset()
        if events:
            self.rounds += 1
            self.cooldown_left = self.cooldown
            self.events.extend(events)
        return events

    def state_dict(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger.state_dict(),
            "rounds": self.rounds,
            "cooldown_left": self.cooldown_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state("GrowOnPlateau", state, {"trigger", "rounds", "cooldown_left"})
        self.trigger.load_state_dict(state["trigger"])
        self.rounds = int(state["rounds"])
        self.cooldown_left = int(state["cooldown_left"])


class CosineLR(Callback):
    """Per-step cosine decay of every param group's learning rate from its base rate when
    training starts to ``floor`` × that rate at the last step (``trainer.total_steps``).

    Each group keeps its base rate in ``group["lr_base"]`` (set from its ``lr`` the first
    time the schedule sees the group, unless already there) and the schedule's multiplier in
    ``group["lr_schedule"]``; its rate is ``lr_base * lr_schedule``. So groups that appear
    later (a :class:`~dynarch.lr.LRPlan` regrouping after growth) follow the schedule, and a
    plan, which sets ``lr_base`` from its factors, composes with it in either callback order.
    The base rates of the first fit start are saved in :meth:`state_dict`: a resumed run on a
    fresh optimizer with the same groups continues the same curve (an optimizer rebuilt from
    a checkpoint carries ``lr_base`` in its groups).

    Example:
        >>> import torch, torch.nn as nn
        >>> from dynarch.train import Trainer
        >>> m = nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(m.parameters(), lr=1.0)
        >>> data = (torch.randn(8, 2), torch.zeros(8, dtype=torch.long))
        >>> _ = Trainer(m, opt, data, epochs=2, batch_size=4, callbacks=[CosineLR()],
        ...             progress=False).fit()
        >>> round(opt.param_groups[0]["lr"], 6)  # step 4 of 4: the end of the curve
        0.0
        >>> opt.param_groups[0]["lr_base"]
        1.0
    """

    def __init__(self, floor: float = 0.0) -> None:
        if isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 <= floor <= 1:
            raise ValueError(f"CosineLR floor must be a number in [0, 1], got {floor!r}")
        self.floor = float(floor)
        self.base: list[float] | None = None
        self._total = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        groups = trainer.optimizer.param_groups
        if self.base is not None and any("lr_base" not in g for g in groups):
            # resumed on an optimizer without the base rates: the saved ones, group by group
            if len(self.base) != len(groups):
                raise ValueError(
                    f"CosineLR was started with {len(self.base)} param groups, the optimizer "
                    f"has {len(groups)}; use a fresh CosineLR"
                )
            for group, base in zip(groups, self.base, strict=True):
                group.setdefault("lr_base", base)
        self._total = trainer.total_steps
        self._apply(trainer)
        if self.base is None:
            self.base = [float(g["lr_base"]) for g in groups]

    def on_step_end(self, trainer: Trainer) -> None:
        self._apply(trainer)

    def _apply(self, trainer: Trainer) -> None:
        t = min(trainer.step, self._total) / max(self._total, 1)
        scale = self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))
        for group in trainer.optimizer.param_groups:
            if "lr_base" not in group:  # a group seen for the first time: its rate now
                group["lr_base"] = float(group["lr"])
            group["lr_schedule"] = scale
            lr = group["lr_base"] * scale
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state("CosineLR", state, {"base"})
        self.base = None if state["base"] is None else [float(b) for b in state["base"]]
