"""When to prune: gradual magnitude pruning (Zhu & Gupta) and overparameterise-then-prune.

Both are callbacks for :class:`dynarch.train.Trainer`; they prune after optimizer steps
(``on_step_end``; ``trainer.step`` counts steps from 1) and keep masked weights and their
optimizer state zero from then on. Pruning never un-prunes.

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> gmp = GradualMagnitudePruning(model, opt, 0.9, start_step=0, end_step=100, frequency=10)
    >>> [round(gmp.sparsity_at(t), 4) for t in (0, 10, 50, 100, 200)]
    [0.0, 0.2439, 0.7875, 0.9, 0.9]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._validate import check_int, check_optimizer
from ..callbacks import Callback
from ..events import Event
from ..masks import check_held
from ..triggers import check_state
from ._core import SCOPES, as_number, check_choice, check_sparsity, select_layers
from .magnitude import magnitude_prune

if TYPE_CHECKING:
    from ..train import Trainer

__all__ = [
    "PHASES", "SCHEDULES", "GradualMagnitudePruning", "OverparameterizeThenPrune",
    "scheduled_sparsity",
]  # fmt: skip

SCHEDULES = ("cubic", "linear")
PHASES = ("train", "prune", "finetune")


def scheduled_sparsity(
    step: int,
    *,
    initial: float,
    final: float,
    start: int,
    end: int,
    schedule: str = "cubic",
) -> float:
    """Sparsity of a ``start`` → ``end`` pruning schedule at ``step`` (clamped outside).

    ``"cubic"`` is Zhu & Gupta's ``s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start))³``:
    fast pruning first, slow near the end; ``"linear"`` replaces the cube by the first power.
    ``0 <= initial <= final < 1`` (pruning never un-prunes), ``0 <= start < end`` and
    ``step >= 0`` (integers; NumPy scalars and 0-d tensors are accepted); anything else is
    refused.

    Example:
        >>> round(scheduled_sparsity(5, initial=0.0, final=0.8, start=0, end=10), 6)
        0.7
        >>> scheduled_sparsity(5, initial=0.0, final=0.8, start=0, end=10, schedule="linear")
        0.4
    """
    check_choice("schedule", schedule, SCHEDULES)
    step = check_int("step", as_number(step), 0)
    start = check_int("start", as_number(start), 0)
    end = check_int("end", as_number(end), start + 1)
    initial = check_sparsity(initial, "initial")
    final = check_sparsity(final, "final")
    if initial > final:
        raise ValueError(
            f"initial {initial!r} must not exceed final {final!r} (pruning never un-prunes)"
        )
    if step <= start:
        return float(initial)
    if step >= end:
        return float(final)
    progress = (step - start) / (end - start)
    power = 3 if schedule == "cubic" else 1
    return final + (initial - final) * (1.0 - progress) ** power


class GradualMagnitudePruning(Callback):
    """Gradual magnitude pruning (Zhu & Gupta 2017) on the cubic (or linear) schedule.

    At steps ``start_step, start_step + frequency, …`` up to ``end_step`` (which always
    prunes, even off that grid) the selected layers are pruned by magnitude to
    :meth:`sparsity_at` of that step: ``initial_sparsity`` at ``start_step`` rising to
    ``final_sparsity`` at ``end_step``. ``scope="layer"`` gives every layer that sparsity,
    ``"global"`` ranks all weights together. A schedule value of 0 prunes nothing. Use it
    as a trainer callback, or call :meth:`update` with the step in your own loop.
    ``optimizer`` is the one that trains ``model`` (pruned weights and their state are kept
    zero after its steps); as a callback, ``None`` takes the trainer's.

    Example:
        >>> model = nn.Linear(10, 10)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> gmp = GradualMagnitudePruning(model, opt, 0.5, start_step=2, end_step=6, frequency=2)
        >>> [gmp.is_pruning_step(t) for t in range(1, 8)]
        [False, True, False, True, False, True, False]
        >>> gmp.update(4).details["pruned"]
        44

    GraNet (Liu et al. 2021) is this schedule plus a RigL drop-and-regrow after each pruning
    step: give both callbacks to the trainer, the pruner first, the rewirer starting dense.

        >>> import dynarch
        >>> from dynarch.sparse import RigL
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> gmp = GradualMagnitudePruning(model, opt, 0.9, 0, 6, 2, scope="global")
        >>> rigl = RigL(model, opt, density=1.0, delta_t=2, t_end=6)
        >>> data = (torch.randn(64, 8), torch.randint(0, 2, (64,)))
        >>> _ = dynarch.fit(model, opt, data, batch_size=8, max_steps=8, callbacks=[gmp, rigl],
        ...                 progress=False)
        >>> [e.op for e in dynarch.engine_state(model).history]
        ['sparsify', 'prune', 'rewire', 'prune', 'rewire', 'prune']
        >>> int(model[0].weight_mask.sum() + model[2].weight_mask.sum())  # 10% of 160
        16
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        final_sparsity: float,
        start_step: int,
        end_step: int,
        frequency: int,
        initial_sparsity: float = 0.0,
        *,
        scope: str = "layer",
        schedule: str = "cubic",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        reason: str = "gradual magnitude pruning",
    ) -> None:
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity {initial_sparsity!r} must not exceed final_sparsity "
                f"{final_sparsity!r} (pruning never un-prunes)"
            )
        self.start_step = check_int("start_step", start_step, 0)
        self.end_step = check_int("end_step", end_step, start_step + 1)
        self.frequency = check_int("frequency", frequency, 1)
        self.scope = check_choice("scope", scope, SCOPES)
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        check_optimizer(optimizer, optional=True)
        layers = select_layers(model, include, exclude)  # fail now, not at the first step
        if optimizer is not None:
            check_held(optimizer, layers, owner=type(self).__name__)
        self.model, self.optimizer = model, optimizer
        self.include, self.exclude, self.reason = include, exclude, reason
        self.last_step = -1

    def sparsity_at(self, step: int) -> float:
        """Scheduled sparsity after ``step`` steps (0 before ``start_step``)."""
        if step < self.start_step:
            return 0.0
        return scheduled_sparsity(
            step,
            initial=self.initial_sparsity,
            final=self.final_sparsity,
            start=self.start_step,
            end=self.end_step,
            schedule=self.schedule,
        )

    def is_pruning_step(self, step: int) -> bool:
        """Whether the schedule prunes at ``step``."""
        if not self.start_step <= step <= self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step

    def update(self, step: int) -> Event | None:
        """Prune if ``step`` is a pruning step not handled yet; returns the event, if any."""
        if step <= self.last_step or not self.is_pruning_step(step):
            return None
        self.last_step = step
        target = self.sparsity_at(step)
        if target <= 0:
            return None
        return magnitude_prune(
            self.model,
            target,
            scope=self.scope,
            optimizer=self.optimizer,
            include=self.include,
            exclude=self.exclude,
            reason=self.reason,
        )

    def on_fit_start(self, trainer: Trainer) -> None:
        self.adopt(trainer, owner=type(self).__name__)
        self.update(trainer.step)  # a schedule starting at step 0 prunes before training

    def adopt(self, trainer: Trainer, owner: str = "GradualMagnitudePruning") -> None:
        """Take the trainer's optimizer when none was given (so pruned weights stay zero);
        refuse a trainer that trains another model or with another optimizer."""
        if trainer.model is not self.model:
            raise ValueError(
                f"{owner}: the trainer trains another model than the one this "
                "schedule prunes; give both the same model"
            )
        if self.optimizer is None:
            layers = select_layers(self.model, self.include, self.exclude)
            check_held(trainer.optimizer, layers, owner=owner)
            self.optimizer = trainer.optimizer
        elif self.optimizer is not trainer.optimizer:
            raise ValueError(
                f"{owner}: the trainer steps another optimizer than the one "
                "given to this schedule, so pruned weights would not stay zero; pass the "
                "trainer's optimizer (or None to use it)"
            )

    def on_step_end(self, trainer: Trainer) -> None:
        self.update(trainer.step)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state("GradualMagnitudePruning", state, {"last_step"})
        self.last_step = int(state["last_step"])


def _check_frac(name: str, value: object) -> float:
    given, value = value, as_number(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= 1
    ):
        raise ValueError(f"{name} must be a number in [0, 1], got {given!r}")
    return float(value)


class OverparameterizeThenPrune(Callback):
    """Train dense, prune gradually, fine-tune the fixed sparse network.

    With ``T = total_steps``: steps ``1 … round(T * train_frac)`` are the ``"train"`` phase
    (dense); up to ``round(T * (train_frac + prune_frac))`` the ``"prune"`` phase, pruning by
    magnitude on the ``schedule`` (``"cubic"`` or ``"linear"``, see
    :class:`GradualMagnitudePruning`) every ``frequency`` steps (default: about 10 prunings
    over the phase) until ``target_sparsity`` at its last step; the remaining steps are the
    ``"finetune"`` phase with the masks fixed. :attr:`phase` is the phase of the last step
    seen (``"train"`` before any). ``optimizer``: as in :class:`GradualMagnitudePruning`
    (``None`` takes the trainer's).

    Example:
        >>> model = nn.Linear(10, 10)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> otp = OverparameterizeThenPrune(model, opt, 0.9, total_steps=100)
        >>> [otp.phase_at(t) for t in (1, 60, 61, 80, 81)]
        ['train', 'train', 'prune', 'prune', 'finetune']
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        target_sparsity: float,
        total_steps: int,
        train_frac: float = 0.6,
        prune_frac: float = 0.2,
        *,
        schedule: str = "cubic",
        frequency: int | None = None,
        scope: str = "global",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        check_int("total_steps", total_steps, 1)
        train_frac = _check_frac("train_frac", train_frac)
        prune_frac = _check_frac("prune_frac", prune_frac)
        if train_frac + prune_frac > 1 + 1e-12:
            raise ValueError(
                f"train_frac + prune_frac must be <= 1 (the rest is fine-tuning), got "
                f"{train_frac!r} + {prune_frac!r}"
            )
        self.train_end = round(total_steps * train_frac)
        self.prune_end = min(round(total_steps * (train_frac + prune_frac)), total_steps)
        if self.prune_end <= self.train_end:
            raise ValueError(
                f"the prune phase of {total_steps} steps with prune_frac={prune_frac!r} is empty; "
                "raise prune_frac or total_steps"
            )
        if frequency is None:
            frequency = math.ceil((self.prune_end - self.train_end) / 10)
        self.total_steps = total_steps
        self.pruning = GradualMagnitudePruning(
            model,
            optimizer,
            target_sparsity,
            self.train_end,
            self.prune_end,
            frequency,
            scope=scope,
            schedule=schedule,
            include=include,
            exclude=exclude,
            reason="overparameterize-then-prune",
        )
        self.step = 0

    def phase_at(self, step: int) -> str:
        """``"train"``, ``"prune"`` or ``"finetune"``: the phase step number ``step`` is in."""
        if step <= self.train_end:
            return "train"
        return "prune" if step <= self.prune_end else "finetune"

    @property
    def phase(self) -> str:
        """Phase of the last step seen."""
        return self.phase_at(self.step)

    def sparsity_at(self, step: int) -> float:
        """Scheduled sparsity after ``step`` steps."""
        return self.pruning.sparsity_at(step)

    def update(self, step: int) -> Event | None:
        """Record ``step`` and prune if the schedule says so; returns the event, if any."""
        self.step = step
        return self.pruning.update(step)

    def on_fit_start(self, trainer: Trainer) -> None:
        self.pruning.adopt(trainer, owner=type(self).__name__)
        self.update(trainer.step)

    def on_step_end(self, trainer: Trainer) -> None:
        self.update(trainer.step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "pruning": self.pruning.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state("OverparameterizeThenPrune", state, {"step", "pruning"})
        self.pruning.load_state_dict(state["pruning"])
        self.step = int(state["step"])
