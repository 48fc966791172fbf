"""Pruning: what to remove (a score), where (layers by name), how much (a target sparsity),
when (a schedule).

* :func:`magnitude_prune` — unstructured, per layer or global, by ``|w|`` (weight masks);
  :func:`prune_by_score` does the same for any per-weight score.
* :func:`structured_prune` — removes whole output units (neurons/channels) with the
  weakest incoming-weight norm, physically, through :func:`dynarch.shrink`.
* :class:`GradientImportance` — accumulated ``|grad|`` or Taylor ``|w·grad|`` per weight.
* :func:`contribution` / :func:`contributions` — a module's counterfactual contribution to a
  metric (with it vs with its output zeroed).
* :class:`LotteryTicket` — iterative magnitude pruning with rewinding to init or step k.
* :class:`GradualMagnitudePruning` (cubic schedule) and :class:`OverparameterizeThenPrune`
  (train → prune → fine-tune) — trainer callbacks.

Every change is one recorded event (``prune`` for masks, ``shrink`` for removed units), so
it lands in ``events.jsonl`` and checkpoints replay it. Masks are never un-pruned, and the
pruned count is ``round(sparsity * total)`` — within half a weight of the target. Ties are
broken by the engine generator (:func:`dynarch.set_seed`).

    >>> import torch, torch.nn as nn
    >>> from dynarch.prune import magnitude_prune
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> magnitude_prune(model, 0.5).details["layers"]["2"]
    {'sparsity': 0.5, 'pruned': 32, 'total': 64}
"""

from __future__ import annotations

from ._core import SCOPES, prune_by_score, select_layers
from .importance import IMPORTANCE_MODES, GradientImportance, contribution, contributions
from .lottery import LotteryTicket
from .magnitude import magnitude_prune, structured_prune, unit_norms
from .registry import PRUNERS, get_pruner, register_pruner
from .schedules import (
    PHASES,
    SCHEDULES,
    GradualMagnitudePruning,
    OverparameterizeThenPrune,
    scheduled_sparsity,
)

__all__ = [
    "IMPORTANCE_MODES", "PHASES", "PRUNERS", "SCHEDULES", "SCOPES", "GradientImportance",
    "GradualMagnitudePruning", "LotteryTicket", "OverparameterizeThenPrune", "contribution",
    "contributions", "get_pruner", "magnitude_prune", "prune_by_score", "register_pruner",
    "scheduled_sparsity", "select_layers", "structured_prune", "unit_norms",
]  # fmt: skip
