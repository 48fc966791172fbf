"""Learning-rate strategies for networks that grow: per-unit factors, combined into
optimizer param groups that follow every structural change.

A :class:`Strategy` maps each *unit* (a module that directly owns parameters) to a factor
of the base learning rate, from what the engine knows: depth, age (steps since the event
that created the unit), the growth events since, mask density, patch connections, and
(LARS) gradients. :class:`LRPlan` multiplies the factors of its strategies, builds one
param group per unit and, attached to an optimizer, regroups and re-tunes it after every
structural event and before every step (time-dependent strategies), keeping the optimizer
state. The twelve strategies of design document ``003`` are registered by name
(:data:`STRATEGIES`, :func:`make_strategy`). Exact factors: :mod:`dynarch.lr.structural`
(evaluated once per structure) and :mod:`dynarch.lr.dynamic` (every step); grouping, patches
and combination: :mod:`dynarch.lr.plan`.

    >>> import torch, torch.nn as nn, dynarch
    >>> from dynarch.models import mlp
    >>> model = mlp(4, [8], 2)
    >>> plan = LRPlan(model, 0.01, ["pretrained"])
    >>> opt = torch.optim.Adam(plan.param_groups())
    >>> _ = plan.attach(opt)
    >>> _ = dynarch.attach(model, "after:act1", nn.Linear(8, 8), optimizer=opt)
    >>> {g["name"]: g["lr_factor"] for g in opt.param_groups}
    {'fc1': 0.01, 'act1_slot': 0.5, 'act1_slot.module': 0.5, 'out': 0.01}
"""

from __future__ import annotations

from .base import PATCH, STRATEGIES, LRContext, Strategy, Unit, make_strategy, register_strategy
from .dynamic import LARS, AgeDecay, ProgressiveFreezing, Sedimentary, Warmup
from .history import GROWTH_OPS, REMOVAL_OPS, is_growth
from .plan import LRPlan
from .structural import (
    Cascade,
    ComponentLR,
    DifferentialDecay,
    DualScaffoldPatch,
    GrowthAware,
    PretrainedNew,
    SparsityAware,
)

__all__ = [
    "GROWTH_OPS",
    "LARS",
    "PATCH",
    "REMOVAL_OPS",
    "STRATEGIES",
    "AgeDecay",
    "Cascade",
    "ComponentLR",
    "DifferentialDecay",
    "DualScaffoldPatch",
    "GrowthAware",
    "LRContext",
    "LRPlan",
    "PretrainedNew",
    "ProgressiveFreezing",
    "Sedimentary",
    "SparsityAware",
    "Strategy",
    "Unit",
    "Warmup",
    "is_growth",
    "make_strategy",
    "register_strategy",
]
