"""Time- and gradient-dependent learning-rate strategies (``dynamic``: re-evaluated before
every optimizer step).

Age-based decay, warm-up of new components, LARS-style layer scaling, progressive freezing
and the sedimentary strata. ``age`` is the number of steps since the event that created the
unit (the step itself for units present from the start; see :mod:`dynarch.lr.base`).
Only :class:`ProgressiveFreezing` keeps state (saved with the plan).

====================  =======================================================================
name                  factor
====================  =======================================================================
``age``               ``decay ** (age/period)`` (``floor(age/period)`` with ``staircase``)
``warmup``            ``min(1, (age+1)/steps)`` for created units (all units if ``initial``):
                      the k-th update after creation uses ``k/steps``; else 1
``lars``              ``trust * ||w|| / (||g|| + eps)`` over a layer's ≥2-D parameters, applied
                      to those only (bias, norm parameters: 1); 1 when either norm is 0,
                      without gradients, and for units without such a weight
``freeze``            ``frozen`` once ``step >= start + (depth+1)*every`` and
                      ``age >= every`` (never the last depth with ``keep_last``); stays frozen
``sedimentary``       ``active`` (age ``< active_age``), ``sediment`` (``< geological_age``),
                      ``geological``; ``patch`` on patch connections
====================  =======================================================================
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._checks import check_factor, check_state, check_steps
from .base import LRContext, Strategy, Unit, register_strategy

__all__ = ["LARS", "AgeDecay", "ProgressiveFreezing", "Sedimentary", "Warmup"]


@register_strategy("age")
class AgeDecay(Strategy):
    """Age-based: ``decay`` per ``period`` steps of age (older units learn slower).

    Example:
        >>> AgeDecay(decay=0.5, period=100, staircase=True)
        AgeDecay(decay=0.5, period=100, staircase=True)
    """

    dynamic = True

    def __init__(self, decay: float = 0.1, period: int = 1000, staircase: bool = False) -> None:
        self.decay = check_factor("age", "decay", decay)
        self.period = check_steps("age", "period", period)
        if not isinstance(staircase, bool):
            raise ValueError(f"age: staircase must be True or False, got {staircase!r}")
        self.staircase = staircase

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        periods = ctx.age(unit) / self.period
        return self.decay ** (math.floor(periods) if self.staircase else periods)


@register_strategy("warmup")
class Warmup(Strategy):
    """Linear warm-up of new components: the k-th update after creation uses ``k/steps``.

    With ``initial=True`` original units warm up from step 0 as well.

    Example:
        >>> Warmup(steps=4)
        Warmup(steps=4, initial=False)
    """

    dynamic = True

    def __init__(self, steps: int = 100, initial: bool = False) -> None:
        self.steps = check_steps("warmup", "steps", steps)
        if not isinstance(initial, bool):
            raise ValueError(f"warmup: initial must be True or False, got {initial!r}")
        self.initial = initial

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        if unit.creator is None and not self.initial:
            return 1.0
        return min(1.0, (ctx.age(unit) + 1) / self.steps)


@register_strategy("lars")
class LARS(Strategy):
    """Layer-wise adaptive rate scaling: ``trust * ||w|| / (||g|| + eps)`` per layer.

    The norms run over the unit's parameters of two or more dimensions, all layers at once
    (``torch._foreach_norm``, one host sync); only those parameters are adapted: the bias
    and norm parameters keep factor 1 (``weights_only``: the plan gives them their own param
    group). Weight decay is not part of the ratio. With ``optimizer.step(closure)`` the ratio
    is taken after the closure's backward, from the gradients of that step.

    Example:
        >>> LARS(trust=0.001)
        LARS(trust=0.001, eps=1e-08)
    """

    dynamic = True
    needs_grads = True
    weights_only = True

    def __init__(self, trust: float = 0.001, eps: float = 1e-8) -> None:
        self.trust = check_factor("lars", "trust", trust, positive=True)
        self.eps = check_factor("lars", "eps", eps)

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        return self.factors(ctx)[unit.name]

    def factors(self, ctx: LRContext) -> dict[str, float]:
        out = {u.name: 1.0 for u in ctx.units}
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        owner: list[int] = []
        for i, unit in enumerate(ctx.units):
            for p in unit.params:
                if p.dim() >= 2 and p.grad is not None and not p.grad.is_sparse:
                    params.append(p.detach())
                    grads.append(p.grad)
                    owner.append(i)
        if not params:
            return out
        device = params[0].device
        with torch.no_grad():
            w = torch.stack([n.float().to(device) for n in torch._foreach_norm(params)])
            g = torch.stack([n.float().to(device) for n in torch._foreach_norm(grads)])
            idx = torch.tensor(owner, device=device)
            w2 = torch.zeros(len(ctx.units), device=device).index_add_(0, idx, w * w).sqrt()
            g2 = torch.zeros(len(ctx.units), device=device).index_add_(0, idx, g * g).sqrt()
            ratio = self.trust * w2 / (g2 + self.eps)
            ratio = torch.where((w2 > 0) & (g2 > 0), ratio, torch.ones_like(ratio))
        values = ratio.tolist()
        for i in set(owner):
            out[ctx.units[i].name] = values[i]
        return out


@register_strategy("freeze")
class ProgressiveFreezing(Strategy):
    """Progressive freezing, front to back: depth ``d`` freezes at step
    ``start + (d+1)*every`` once it is at least ``every`` steps old, and stays frozen.

    ``frozen`` is the factor of a frozen unit (0: no update at all). With ``keep_last`` the
    last depth never freezes. State: the step at which each unit froze (saved with the plan).
    A unit created after that step under the name of a frozen one (detached, then attached
    again at the same slot) is a new unit and is not frozen before its own time.

    Example:
        >>> ProgressiveFreezing(every=500, frozen=0.0).frozen_at
        {}
    """

    dynamic = True

    def __init__(
        self, every: int = 1000, start: int = 0, frozen: float = 0.0, keep_last: bool = True
    ) -> None:
        self.every = check_steps("freeze", "every", every)
        self.start = check_steps("freeze", "start", start, low=0)
        self.frozen = check_factor("freeze", "frozen", frozen)
        if not isinstance(keep_last, bool):
            raise ValueError(f"freeze: keep_last must be True or False, got {keep_last!r}")
        self.keep_last = keep_last
        self.frozen_at: dict[str, int] = {}

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        froze = self.frozen_at.get(unit.name)
        if froze is not None and froze > unit.birth:
            return self.frozen
        if froze is not None:  # an earlier unit of the same name (removed, then re-created)
            del self.frozen_at[unit.name]
        if self.keep_last and unit.depth == ctx.layers - 1:
            return 1.0
        due = self.start + (unit.depth + 1) * self.every
        if ctx.step >= due and ctx.age(unit) >= self.every:
            self.frozen_at[unit.name] = ctx.step
            return self.frozen
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"frozen_at": dict(self.frozen_at)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state("ProgressiveFreezing", state, {"frozen_at"})
        self.frozen_at = {str(k): int(v) for k, v in state["frozen_at"].items()}


@register_strategy("sedimentary")
class Sedimentary(Strategy):
    """Sedimentary: strata by age (active, sediment, geological); ``patch`` on patches.

    Example:
        >>> Sedimentary(active_age=100, geological_age=1000).geological
        0.01
    """

    dynamic = True

    def __init__(
        self,
        geological: float = 0.01,
        sediment: float = 0.1,
        active: float = 1.0,
        patch: float = 0.5,
        active_age: int = 1000,
        geological_age: int = 10000,
    ) -> None:
        self.geological = check_factor("sedimentary", "geological", geological)
        self.sediment = check_factor("sedimentary", "sediment", sediment)
        self.active = check_factor("sedimentary", "active", active)
        self.patch = check_factor("sedimentary", "patch", patch)
        self.active_age = check_steps("sedimentary", "active_age", active_age)
        self.geological_age = check_steps("sedimentary", "geological_age", geological_age)
        if self.geological_age <= self.active_age:
            raise ValueError(
                f"sedimentary: geological_age ({geological_age!r}) must be greater than "
                f"active_age ({active_age!r})"
            )

    def factor(self, unit: Unit, ctx: LRContext) -> float:
        age = ctx.age(unit)
        if age < self.active_age:
            return self.active
        return self.sediment if age < self.geological_age else self.geological

    def patch_factor(self, unit: Unit, ctx: LRContext, factor: float) -> float:
        return self.patch
