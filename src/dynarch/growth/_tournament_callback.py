"""The callback that runs a :class:`~dynarch.growth.Tournament` during training
(:class:`TournamentCallback`, importable from :mod:`dynarch.growth.tournament`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._validate import check_int
from ..callbacks import Callback, training_done
from ..triggers import Plateau, check_state

if TYPE_CHECKING:
    from ..train import Trainer
    from .tournament import Tournament

__all__ = ["TournamentCallback"]


class TournamentCallback(Callback):
    """Run a :class:`Tournament` during training: every ``every`` evaluations and/or when
    ``monitor`` plateaus (``patience`` evaluations without an improvement > ``threshold``);
    at most ``max_rounds`` growth events. The trainer's optimizer receives the new parameters.
    Pair it with ``economy.callback()`` so the economy earns from training batches.

    Example:
        >>> import torch
        >>> from dynarch.growth.tournament import Tournament
        >>> from dynarch.models import mlp
        >>> model = mlp(4, [8], 2)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> cb = TournamentCallback(Tournament(model, data=(x, y)), every=2)
    """

    def __init__(
        self,
        tournament: Tournament,
        *,
        every: int | None = None,
        monitor: str = "val_loss",
        mode: str = "min",
        patience: int | None = None,
        threshold: float = 0.0,
        max_rounds: int | None = None,
    ) -> None:
        from .tournament import Tournament  # lazy: tournament.py re-exports this class

        if not isinstance(tournament, Tournament):
            raise TypeError(f"tournament must be a Tournament, got {type(tournament).__name__}")
        if every is None and patience is None:
            raise ValueError("give every=<evaluations> and/or patience=<evaluations> (plateau)")
        for arg, value in (("every", every), ("max_rounds", max_rounds)):
            if value is not None:
                check_int(arg, value, 1)
        self.plateau = None if patience is None else Plateau(patience, threshold, mode)
        self.tournament, self.every, self.monitor = tournament, every, monitor
        self.max_rounds = max_rounds
        self.evaluations = 0
        self.rounds = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.model is not self.tournament.model:
            raise ValueError("the tournament was built for another model than the trainer's")

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.evaluations += 1
        if self.max_rounds is not None and self.rounds >= self.max_rounds:
            return
        due = self.every is not None and self.evaluations % self.every == 0
        if self.plateau is not None:
            if self.monitor not in metrics:
                raise ValueError(
                    f"TournamentCallback monitors {self.monitor!r} but the evaluation produced "
                    f"{sorted(metrics)}; set monitor= to one of those"
                )
            due = self.plateau.update(metrics[self.monitor]) or due
        if due and not training_done(trainer):  # after the last step nothing would train it
            if self.tournament.run(trainer.optimizer) is not None:
                self.rounds += 1
            if self.plateau is not None:
                self.plateau.reset()

    def state_dict(self) -> dict[str, Any]:
        plateau = None if self.plateau is None else self.plateau.state_dict()
        return {"evaluations": self.evaluations, "rounds": self.rounds, "plateau": plateau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state("TournamentCallback", state, {"evaluations", "rounds", "plateau"})
        self.evaluations, self.rounds = int(state["evaluations"]), int(state["rounds"])
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])
