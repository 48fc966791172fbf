"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin; Frankle et al.).

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> ticket = LotteryTicket(model, opt, final_sparsity=0.8, rounds=2)
>>> def train(m):  # one training round (normally a Trainer)
...     m(torch.randn(4, 4)).sum().backward(); opt.step(); opt.zero_grad()
>>> events = ticket.run(train)
>>> [e.details["pruned"] for e in events], ticket.rounds_done
([27, 38], 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .._validate import check_int, check_optimizer
from ..callbacks import Callback
from ..events import Event
from ..masks import MASK, check_held, enforce
from ..triggers import check_state
from ._core import SCOPES, check_choice, check_sparsity, select_layers
from .magnitude import magnitude_prune

if TYPE_CHECKING:
    from ..train import Trainer

__all__ = ["LotteryTicket"]


def _rewindable(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers of ``model`` by name, masks excluded."""
    found: dict[str, Tensor] = dict(model.named_parameters())
    for name, buf in model.named_buffers():
        if name.rsplit(".", 1)[-1] != MASK:
            found[name] = buf
    return found


class LotteryTicket(Callback):
    """Iterative magnitude pruning with rewinding: train, prune, rewind, repeat.

    Each of ``rounds`` rounds prunes ``1 - (1 - final_sparsity) ** (1 / rounds)`` of the
    weights still active, by magnitude (``scope="global"`` ranks all selected layers
    together; ``"layer"`` prunes each layer alike), then rewinds every parameter and buffer
    (masks excepted) to the saved point: the initialisation (``rewind="init"``, copied when
    the ticket is created) or the values after training step ``k`` (``rewind=k``, captured
    by :meth:`on_step_end` when the trainer reaches step ``k``, or by calling
    :meth:`capture` yourself). Masked weights stay zero. Rewinding also **clears the
    optimizer state** (momentum, Adam moments): the next round starts like a fresh run.

    Sparsity counts are computed on totals, ``round(s_r * total)`` with the cumulative
    ``s_r = 1 - (1 - final_sparsity) ** (r / rounds)``, so rounding errors never accumulate:
    after the last round exactly ``round(final_sparsity * total)`` weights are masked.
    Pruning never un-prunes. The saved values live on the model's device.

    Example:
        >>> model = nn.Linear(10, 10)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ticket = LotteryTicket(model, opt, final_sparsity=0.875, rounds=3)
        >>> ticket.per_round, [ticket.sparsity_after(r) for r in (1, 2, 3)]
        (0.5, [0.5, 0.75, 0.875])
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        final_sparsity: float,
        rounds: int,
        *,
        rewind: str | int = "init",
        scope: str = "global",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        check_optimizer(optimizer)
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        self.rounds = check_int("rounds", rounds, 1)
        if rewind != "init" and (
            not isinstance(rewind, int) or isinstance(rewind, bool) or rewind < 1
        ):
            raise ValueError(
                f"rewind must be 'init' or a training step k >= 1 to rewind to, got {rewind!r}"
            )
        self.rewind = rewind
        self.scope = check_choice("scope", scope, SCOPES)
        layers = select_layers(model, include, exclude)  # fail now, not after the first round
        check_held(optimizer, layers, owner="LotteryTicket")
        self.model, self.optimizer = model, optimizer
        self.include, self.exclude = include, exclude
        self.rounds_done = 0
        self.saved: dict[str, Tensor] | None = None
        if rewind == "init":
            self.capture()

    @property
    def per_round(self) -> float:
        """Fraction of the remaining weights each round prunes."""
        return 1 - (1 - self.final_sparsity) ** (1 / self.rounds)

    def sparsity_after(self, rounds: int) -> float:
        """Target sparsity once ``rounds`` rounds are done (exactly ``final_sparsity`` at the end).

        Example:
            >>> m = nn.Linear(2, 2)
            >>> LotteryTicket(m, torch.optim.SGD(m.parameters(), lr=1), 0.75, 2).sparsity_after(1)
            0.5
        """
        if rounds >= self.rounds:
            return self.final_sparsity
        value = 1 - (1 - self.final_sparsity) ** (rounds / self.rounds)
        return float(f"{value:.12g}")  # 0.5000000000000001 -> 0.5: counts are rounded anyway

    def capture(self) -> None:
        """Save the current parameters and buffers (masks excepted) as the rewind point."""
        with torch.no_grad():
            self.saved = {n: t.detach().clone() for n, t in _rewindable(self.model).items()}

    def on_step_end(self, trainer: Trainer) -> None:
        if self.saved is None and isinstance(self.rewind, int) and trainer.step == self.rewind:
            self.capture()

    def _checked(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The model's rewindable tensors and the saved ones, checked to match."""
        if self.saved is None:
            raise RuntimeError(
                f"no rewind point: training never reached step {self.rewind}; pass this "
                "LotteryTicket to the Trainer's callbacks or call capture() at that step"
            )
        current = _rewindable(self.model)
        if set(current) != set(self.saved):
            diff = sorted(set(current) ^ set(self.saved))
            raise RuntimeError(
                f"cannot rewind: the model's parameters/buffers {diff} differ from the rewind "
                "point's (the structure changed in between)"
            )
        bad = [n for n, t in current.items() if t.shape != self.saved[n].shape]
        if bad:
            raise RuntimeError(
                f"cannot rewind: {bad} changed shape since the rewind point (structural change)"
            )
        return current, self.saved

    def rewind_weights(self) -> None:
        """Copy the saved values back, zero masked weights and clear the optimizer state."""
        current, saved = self._checked()
        with torch.no_grad():
            torch._foreach_copy_(list(current.values()), [saved[n] for n in current])
        self.optimizer.state.clear()
        enforce(self.model, self.optimizer)  # zero masked weights; keep them zero from now on

    def prune_round(self) -> Event:
        """Prune one round by magnitude, then rewind (see the class docstring)."""
        if self.rounds_done >= self.rounds:
            raise RuntimeError(
                f"all {self.rounds} rounds are done (sparsity {self.final_sparsity}); "
                "create a new LotteryTicket to prune further"
            )
        self._checked()  # fail before pruning, not after
        target = self.sparsity_after(self.rounds_done + 1)
        event = magnitude_prune(
            self.model,
            target,
            scope=self.scope,
            include=self.include,
            exclude=self.exclude,
            reason=f"lottery ticket round {self.rounds_done + 1}/{self.rounds}",
        )
        self.rewind_weights()
        self.rounds_done += 1
        return event

    def run(
        self, train_fn: Callable[[nn.Module], object], *, final_train: bool = True
    ) -> list[Event]:
        """Drive the remaining rounds: ``train_fn(model)``, then :meth:`prune_round`, repeated;
        with ``final_train`` the ticket is trained once more at the end. Returns the events."""
        events = []
        while self.rounds_done < self.rounds:
            train_fn(self.model)
            events.append(self.prune_round())
        if final_train:
            train_fn(self.model)
        return events

    def state_dict(self) -> dict[str, Any]:
        saved = None if self.saved is None else {n: t.clone() for n, t in self.saved.items()}
        return {"rounds_done": self.rounds_done, "saved": saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state("LotteryTicket", state, {"rounds_done", "saved"})
        done = state["rounds_done"]
        if not isinstance(done, int) or not 0 <= done <= self.rounds:
            raise ValueError(
                f"LotteryTicket state: rounds_done must be an int in [0, {self.rounds}], "
                f"got {done!r}"
            )
        self.rounds_done = done
        saved = state["saved"]
        self.saved = None if saved is None else {n: t.clone() for n, t in saved.items()}
