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
Growth events carry the trigger as their reason (``plateau(val_loss)``, ``every(val_loss)``;
``tournament:`` in front for the tournament). :func:`check_growth` refuses, before a run
starts, a ``growth:`` section that could never grow the model (no hidden layer, a budget at
or below the model's active parameters at the start, a ``max_width`` at or below every width
to grow, patches without masks, no usable tournament candidate); :func:`check_sparsity` a
density too low for the model.

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

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._config_growth import GrowthConfig
from ._engine import count_params, engine_state
from .callbacks import Callback
from .config import ConfigError, RunConfig, growth_targets

__all__ = ["check_growth", "growth_callbacks", "held_out", "start_active_params"]


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
    cfg: GrowthConfig,
    model: nn.Module,
    train: tuple[Tensor, Tensor] | Any,
    *,
    dense_params: int | None = None,
) -> list[Callback]:
    """The callbacks that grow ``model`` as ``cfg`` says (see the module docstring).

    ``train`` is the training set (an ``(x, y)`` pair or an object with ``train_x`` /
    ``train_y``): the tournament draws its held-out batch from it. ``dense_params``: the
    parameter count a fractional ``max_params`` is taken of (default: ``model``'s now; a
    resumed run passes the count its model started with, not the grown one's).
    """
    from .growth.actions import PatchesAction
    from .schedules import GrowAsNeeded, WidenAction
    from .triggers import Budget

    cap = cfg.budget(count_params(model) if dense_params is None else dense_params)
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


def start_active_params(cfg: RunConfig, model: nn.Module) -> int:
    """The active parameters ``model`` (built for ``cfg``, not yet sparse) will have once the
    run's ``sparsity:`` masks it (the exact per-layer counts of
    :func:`dynarch.budgets.layer_budgets`); its parameter count for a dense run.

    Example:
        >>> from dynarch.config import validate_config
        >>> from dynarch.models import mlp
        >>> cfg = validate_config({"sparsity": {"density": 0.5, "distribution": "uniform"}})
        >>> start_active_params(cfg, mlp(8, [16], 3))  # 8*16 + 16*3 weights at 50%, 19 biases
        107
    """
    from .budgets import layer_budgets
    from .masks import select_layers

    total = count_params(model)
    sp = cfg.sparsity
    if sp is None:
        return total
    weights = {n: m.weight for n, m in select_layers(model).items()}
    shapes = {n: tuple(w.shape) for n, w in weights.items() if isinstance(w, Tensor)}
    kept = layer_budgets(shapes, sp.density, sp.distribution)
    return total - sum(math.prod(s) for s in shapes.values()) + sum(kept.values())


def check_sparsity(cfg: RunConfig, model: nn.Module, what: str = "sparsity.density") -> None:
    """Refuse (:class:`~dynarch.config.ConfigError`) a ``sparsity:`` density so low that some
    layer of ``model`` would keep no weight (the message names the smallest that works).

    Example:
        >>> from dynarch.config import validate_config
        >>> from dynarch.models import mlp
        >>> check_sparsity(validate_config({"sparsity": {"density": 0.001}}), mlp(8, [4], 3))
        Traceback (most recent call last):
        ...
        dynarch.config.ConfigError: sparsity.density: layer 'fc1' (32 weights, shape (4, 8)) \
would get 0 active weights at density 0.001 with distribution 'erk'; the minimal density that \
works is 0.0455
    """
    try:
        start_active_params(cfg, model)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _unusable(candidate: str, cfg: RunConfig) -> str | None:
    """Why a tournament candidate can never apply to ``cfg``'s model (None: it can)."""
    layernorm = getattr(cfg.model, "layernorm", False)
    if candidate == "patch" and cfg.sparsity is None:
        return "'patch' needs masks (a sparsity: section)"
    if candidate == "widen" and layernorm:
        return "'widen' cannot keep the function of a layer followed by LayerNorm"
    return None


def check_growth(cfg: RunConfig, model: nn.Module) -> None:
    """Refuse (:class:`~dynarch.config.ConfigError`) a ``growth:`` section that could never
    grow ``model`` (built for ``cfg``): a model without hidden layers, policy ``patches``
    without a ``sparsity:`` section, a tournament none of whose candidates applies, a
    ``max_width`` at or below the width of every layer to widen, or a ``max_params`` budget
    at or below the active parameters the model starts with.

    Example:
        >>> from dynarch.config import validate_config
        >>> from dynarch.models import mlp
        >>> cfg = validate_config({"growth": {"max_params": 0.5}})
        >>> check_growth(cfg, mlp(8, [16], 3))
        Traceback (most recent call last):
        ...
        dynarch.config.ConfigError: growth.max_params: 0.5 caps the active parameters at 97, \
but the model starts with 195 (dense), so it could never grow; a fraction (<= 1) of a dense \
model leaves no room: give a count above 195 (e.g. 390) or add a sparsity: section
    """
    g = cfg.growth
    if g is None:
        return
    from .config import growth_targets
    from .models import hidden_layer_names, layer_widths

    if not hidden_layer_names(model):
        raise ConfigError(
            "growth: the model has no hidden layer to grow (model.hidden is empty); add one "
            "(e.g. --set model.hidden=[64]) or remove the growth: section (--set growth=null)"
        )
    if g.policy == "widen" and g.max_width is not None:
        widths = layer_widths(model)
        targets = growth_targets(g, model)
        if all(widths[t] >= g.max_width for t in targets):
            raise ConfigError(
                f"growth.max_width: {g.max_width} is not above the width of any layer to widen "
                f"({', '.join(f'{t}: {widths[t]}' for t in targets)}), so it could never grow; "
                f"give a max_width above {min(widths[t] for t in targets)}"
            )
    if g.policy == "patches" and cfg.sparsity is None:
        raise ConfigError(
            "growth.policy: 'patches' turns on connections in the masks of a sparse model, but "
            "this model has no masks; add a sparsity: section (e.g. sparsity: {density: 0.1}) "
            "or use policy widen or tournament"
        )
    if g.policy == "tournament":
        why = [w for c in g.candidates if (w := _unusable(c, cfg)) is not None]
        if len(why) == len(g.candidates):
            raise ConfigError(
                f"growth.candidates: {list(g.candidates)} has no candidate this model can use "
                f"({'; '.join(why)}); add 'insert' or 'skip'"
            )
    dense = count_params(model)
    cap = g.budget(dense)
    if cap is None:
        return
    start = start_active_params(cfg, model)
    if cap > start:
        return
    sp = cfg.sparsity
    what = "dense" if sp is None else f"at sparsity.density {sp.density:g}"
    if sp is None:
        fix = (
            "a fraction (<= 1) of a dense model leaves no room: give a count above "
            f"{start} (e.g. {2 * start}) or add a sparsity: section"
        )
    else:
        fix = f"give a fraction above {start / dense:.4g} or a count above {start}"
    raise ConfigError(
        f"growth.max_params: {g.max_params:g} caps the active parameters at {cap}, but the "
        f"model starts with {start} ({what}), so it could never grow; {fix}"
    )


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
        reason=f"tournament:{cfg.trigger}({cfg.monitor})",
    )  # fmt: skip
    every, patience = (cfg.every, None) if cfg.trigger == "every" else (None, cfg.patience)
    return TournamentCallback(
        tournament, every=every, monitor=cfg.monitor, mode=cfg.mode, patience=patience,
        threshold=cfg.threshold, max_rounds=cfg.max_events,
    )  # fmt: skip
