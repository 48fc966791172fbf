"""Growth policies of a run config: the ``growth:`` section turned into training callbacks.

:func:`growth_callbacks` reads a :class:`~dynarch.config.GrowthConfig` and returns the
callbacks that grow the model as it asks — one trigger (``plateau`` on ``monitor`` or
``every`` N evaluations), one policy, one budget:

* ``widen`` — :class:`~dynarch.schedules.GrowAsNeeded` with a
  :class:`~dynarch.schedules.WidenAction`;
* ``patches`` — :class:`~dynarch.schedules.GrowAsNeeded` with a
  :class:`~dynarch.growth.actions.PatchesAction`;
* ``tournament`` — a :class:`~dynarch.growth.tournament.TournamentCallback` whose held-out
  batch is drawn from the *training* inputs (never the evaluation set) and whose economy is
  the budget (:class:`~dynarch.growth.actions.BudgetEconomy`).

The budget (``max_params``) is a :class:`~dynarch.triggers.Budget` over active parameters;
a fraction is taken of the model's dense parameter count at the time the callbacks are built.

Example:
    >>> from dynarch.config import GrowthConfig
    >>> from dynarch.models import mlp
    >>> import torch
    >>> model = mlp(8, [16], 3)
    >>> data = (torch.randn(64, 8), torch.randint(0, 3, (64,)))
    >>> [type(c).__name__ for c in growth_callbacks(GrowthConfig(max_params=0.5), model, data)]
    ['GrowAsNeeded']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._config_growth import GrowthConfig
from ._engine import count_params, engine_state
from .callbacks import Callback
from .config import ConfigError, growth_targets

__all__ = ["growth_callbacks", "held_out"]


def held_out(train: tuple[Tensor, Tensor], n: int, model: nn.Module) -> tuple[Tensor, Tensor]:
    """``n`` training samples drawn with the model's engine generator (for growth decisions
    that must not look at the evaluation set).

    Example:
        >>> x, y = torch.arange(10.0)[:, None], torch.arange(10)
        >>> held_out((x, y), 3, nn.Linear(1, 1))[1].shape
        torch.Size([3])
    """
    x, y = train
    k = min(n, x.shape[0])
    idx = torch.randperm(x.shape[0], generator=engine_state(model).generator)[:k]
    return x[idx], y[idx]


def _trigger(cfg: GrowthConfig) -> Any:
    from .triggers import Every, Plateau

    if cfg.trigger == "every":
        return Every(cfg.every)
    return Plateau(cfg.patience, cfg.threshold, cfg.mode)


def growth_callbacks(
    cfg: GrowthConfig, model: nn.Module, train: tuple[Tensor, Tensor] | Any
) -> list[Callback]:
    """The callbacks that grow ``model`` as ``cfg`` says (see the module docstring).

    ``train`` is the training set (an ``(x, y)`` pair or an object with ``train_x`` /
    ``train_y``): the tournament draws its held-out batch from it.
    """
    from .growth.actions import PatchesAction
    from .schedules import GrowAsNeeded, WidenAction
    from .triggers import Budget

    cap = cfg.budget(count_params(model))
    budget = None if cap is None else Budget(max_params=cap)
    if cfg.policy == "widen":
        action: Any = WidenAction(
            growth_targets(cfg, model), factor=cfg.factor, init=cfg.init, noise=cfg.noise,
            max_width=cfg.max_width,
        )  # fmt: skip
    elif cfg.policy == "patches":
        action = PatchesAction(cfg.amount, cfg.patch_size, budget=budget)
    else:
        return [_tournament(cfg, model, train, budget)]
    return [
        GrowAsNeeded(
            _trigger(cfg), action, monitor=cfg.monitor, cooldown=cfg.cooldown, budget=budget,
            max_growths=cfg.max_events,
        )
    ]  # fmt: skip


def _tournament(cfg: GrowthConfig, model: nn.Module, train: Any, budget: Any) -> Callback:
    from .growth.actions import BudgetEconomy
    from .growth.tournament import Tournament, TournamentCallback

    pair = (train.train_x, train.train_y) if hasattr(train, "train_x") else train
    if not (isinstance(pair, tuple) and len(pair) == 2):
        raise ConfigError("growth.policy tournament needs the training data as an (x, y) pair")
    economy = None if budget is None else BudgetEconomy(budget, model)
    tournament = Tournament(
        model, data=held_out(pair, 1024, model), candidates=list(cfg.candidates),
        economy=economy, patch_size=cfg.patch_size, monitor=None,
    )  # fmt: skip
    every, patience = (cfg.every, None) if cfg.trigger == "every" else (None, cfg.patience)
    return TournamentCallback(
        tournament, every=every, monitor=cfg.monitor, mode=cfg.mode, patience=patience,
        threshold=cfg.threshold, max_rounds=cfg.max_events,
    )  # fmt: skip
