"""The callbacks a config's ``sparsity:`` section turns into: masks applied when training
starts (:class:`SparsifyAtStart`) or a dynamic sparse training algorithm built then
(:class:`RewireFromStart`); :mod:`dynarch.runner` re-exports them.
"""

from __future__ import annotations

import warnings
from typing import Any

from .callbacks import Callback
from .config import RunConfig

__all__ = ["RewireFromStart", "SparsifyAtStart", "sparsity_callbacks"]


class SparsifyAtStart(Callback):
    """Mask the model to ``density`` when training starts (the event lands in events.jsonl).

    Example:
        >>> cb = SparsifyAtStart(0.5, "erk")
    """

    def __init__(self, density: float, distribution: str) -> None:
        self.density, self.distribution = density, distribution
        self.done = False

    def on_fit_start(self, trainer: Any) -> None:
        from .masks import sparsify

        if self.done:  # a resumed run: the loaded model is already masked
            return
        self.done = True
        sparsify(
            trainer.model,
            self.density,
            distribution=self.distribution,
            optimizer=trainer.optimizer,
            reason="config",
        )

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = bool(state.get("done", False))


class RewireFromStart(Callback):
    """Build a rewirer (:func:`dynarch.sparse.make_rewirer`) when training starts and pass it
    every hook; built inside the run, its initial sparsify event lands in events.jsonl.
    A float ``t_end`` in (0, 1) is a fraction of the trainer's total optimizer steps.

    Example:
        >>> cb = RewireFromStart("rigl", 0.1, "erk", delta_t=50)
    """

    def __init__(self, algorithm: str, density: float, distribution: str, **kwargs: Any) -> None:
        from .sparse import ALGORITHMS  # fails here, before a run starts, not at its first step

        if algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown sparse training algorithm {algorithm!r}; registered: {list(ALGORITHMS)}"
            )
        self.algorithm, self.density, self.distribution = algorithm, density, distribution
        self.kwargs = kwargs
        self.rewirer: Callback | None = None
        self._state: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Any) -> None:
        if self.rewirer is None:
            from .sparse import make_rewirer
            from .sparse.base import IdleScheduleWarning

            t_end = self.kwargs.get("t_end")
            if isinstance(t_end, float):  # a fraction of the run's optimizer steps
                self.kwargs["t_end"] = max(1, round(t_end * trainer.total_steps))
            with warnings.catch_warnings():  # the run's summary notes an idle schedule
                warnings.simplefilter("ignore", IdleScheduleWarning)
                self.rewirer = make_rewirer(
                    self.algorithm, trainer.model, trainer.optimizer, density=self.density,
                    distribution=self.distribution, **self.kwargs,
                )  # fmt: skip
            if self._state is not None:
                self.rewirer.load_state_dict(self._state)
        self.rewirer.on_fit_start(trainer)

    def _hook(self, hook: str, trainer: Any, *args: Any) -> None:
        if self.rewirer is not None:
            getattr(self.rewirer, hook)(trainer, *args)

    def on_epoch_start(self, trainer: Any) -> None:
        self._hook("on_epoch_start", trainer)

    def on_after_backward(self, trainer: Any) -> None:
        self._hook("on_after_backward", trainer)

    def on_step_end(self, trainer: Any) -> None:
        self._hook("on_step_end", trainer)

    def on_epoch_end(self, trainer: Any) -> None:
        self._hook("on_epoch_end", trainer)

    def on_evaluate(self, trainer: Any, metrics: dict[str, float]) -> None:
        self._hook("on_evaluate", trainer, metrics)

    def on_fit_end(self, trainer: Any) -> None:
        self._hook("on_fit_end", trainer)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.rewirer is None else self.rewirer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.rewirer is None:
            self._state = dict(state)  # applied once the rewirer is built
        else:
            self.rewirer.load_state_dict(state)


def sparsity_callbacks(cfg: RunConfig) -> list[Callback]:
    """The callbacks ``sparsity:`` asks for: masks (static or rewired) and mask snapshots."""
    sp = cfg.sparsity
    if sp is None:
        return []
    callbacks: list[Callback] = []
    if sp.algorithm == "static":
        callbacks.append(SparsifyAtStart(sp.density, sp.distribution))
    else:
        callbacks.append(
            RewireFromStart(
                sp.algorithm, sp.density, sp.distribution, delta_t=sp.delta_t,
                drop_fraction=sp.drop_fraction, t_end=sp.t_end, anneal=sp.anneal,
                regrow_init=sp.regrow_init,
            )
        )  # fmt: skip
    if sp.snapshots:
        from .plots import MaskSnapshots

        callbacks.append(MaskSnapshots(count=max(sp.snapshots, 2), draw=False))
    return callbacks


# ----------------------------------------------------------------------------- running
