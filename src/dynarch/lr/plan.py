""":class:`LRPlan`: combines strategies into optimizer param groups and keeps them current.

Grouping: **one param group per unit** (a module that directly owns parameters), in module
order, named after the module (``"fc1"``, ``"act1_slot"``, ``"act1_slot.module"``; the
model's own parameters: ``"<root>"``). With a ``weights_only`` strategy (LARS) a unit's
parameters of two or more dimensions and its others (bias, norm parameters) get a group
each, both named after the unit. Each group holds ``"name"``, ``"lr_factor"`` (the combined
factor), ``"lr_base" = base_lr * lr_factor`` and ``"lr" = lr_base * lr_schedule``, where
``"lr_schedule"`` (1 when absent) is the multiplier a schedule such as
:class:`dynarch.callbacks.CosineLR` keeps in the group: the plan and the schedule compose, in
either callback order. Combination: the factors of all strategies are **multiplied**, per
unit; so are their patch factors.

Patch connections (the ``weight_patch`` buffer) cannot have their own group: the learning
rate belongs to a whole parameter tensor. The plan therefore scales the *update* at patch
positions: a pre-step hook keeps a copy of each patched weight, a post-step hook multiplies
``new - old`` at patch positions by ``patch factor / factor``. This is exact for every
optimizer whose update is proportional to the group learning rate given its state (SGD with
momentum, Nesterov and weight decay, Adam, AdamW, RMSprop, Adagrad, …), since moments do
not depend on the learning rate; it is not for Rprop or L-BFGS. A unit whose factor is 0
is frozen, patches included.

Keeping groups current: attached to an optimizer, the plan listens to the engine. After
every structural event it regroups (the engine's optimizer transplant has already put new
parameters into a neighbour's group and carried the state of changed ones; regrouping moves
parameters between groups, so ``optimizer.state[p]`` is untouched) and re-assigns every
group's learning rate. Time- or gradient-dependent strategies (``dynamic``) are re-evaluated
in the optimizer's pre-step hook (with ``optimizer.step(closure)``: after the closure has
computed the gradients), so any training loop works. The step is the engine step, which
:class:`~dynarch.train.Trainer` keeps current (set ``engine_state(model).step`` yourself in
a custom loop).

The plan owns the groups' learning rates: a ``torch.optim.lr_scheduler`` on the same
optimizer is refused (its rates would be reset at the next structural event or dynamic
factor); use :class:`dynarch.callbacks.CosineLR`, :meth:`LRPlan.set_base_lr` or a
step-dependent strategy instead.
To resume from a checkpoint, build the optimizer from the saved groups
(:meth:`dynarch.checkpoint.Checkpoint.param_groups`), load its state
(:meth:`~dynarch.checkpoint.Checkpoint.load_optimizer`), then attach a plan built on the
loaded model: the groups are the saved ones, parameters a structural op added while frozen
(e.g. a slot's scheduled ``alpha``) included. :meth:`LRPlan.param_groups` of the rebuilt
model gives the same groups only when the optimizer held exactly its trainable parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .._engine import engine_state
from .._validate import check_model, check_optimizer
from ..callbacks import Callback
from ..events import Event
from ._checks import check_state
from .base import LRContext, Strategy, as_strategy, build_units

if TYPE_CHECKING:
    from ..train import Trainer

__all__ = ["LRPlan"]


def _check_no_scheduler(optimizer: torch.optim.Optimizer) -> None:
    # every torch.optim.lr_scheduler.LRScheduler wraps optimizer.step to count its calls
    if getattr(optimizer.step, "_wrapped_by_lr_sched", False):
        raise ValueError(
            "LRPlan cannot share its optimizer with a torch.optim.lr_scheduler (one was created "
            "on it): the plan sets every group's learning rate at structural events and for "
            "dynamic strategies, which would undo the scheduler's decay. Use "
            "dynarch.callbacks.CosineLR (it composes with the plan), plan.set_base_lr or a "
            "step-dependent strategy ('age', 'warmup') instead, or leave the rates to the "
            "scheduler alone (plan.detach())"
        )


def _check_lr(value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:  # type: ignore[operator]
        raise ValueError(f"base_lr must be a finite number > 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


class LRPlan(Callback):
    """Learning rates of ``model``'s units: ``base_lr`` times the product of the
    ``strategies``' factors (instances, registered names or ``{"name": ..., **kwargs}``).

    Use :meth:`param_groups` for a fresh optimizer and :meth:`attach` it (or pass the plan
    to the :class:`~dynarch.train.Trainer` as a callback: it attaches to the trainer's
    optimizer at the start of :meth:`fit`).

    Example:
        >>> import torch, dynarch
        >>> from dynarch.models import mlp
        >>> model = mlp(4, [8, 8], 2)
        >>> plan = LRPlan(model, 0.1, ["cascade", {"name": "warmup", "steps": 4}])
        >>> opt = torch.optim.SGD(plan.param_groups(), lr=0.1)
        >>> _ = plan.attach(opt)
        >>> [(g["name"], round(g["lr"], 4)) for g in opt.param_groups]
        [('fc1', 0.01), ('fc2', 0.0316), ('out', 0.1)]
        >>> _ = dynarch.deepen(model, "fc1", optimizer=opt)
        >>> [(g["name"], round(g["lr"], 4)) for g in opt.param_groups]
        [('fc1', 0.01), ('act1_deep', 0.0054), ('fc2', 0.0464), ('out', 0.1)]
    """

    def __init__(self, model: nn.Module, base_lr: float, strategies: Iterable[object] = ()) -> None:
        self.model = check_model(model)
        self.base_lr = _check_lr(base_lr)
        if isinstance(strategies, str | Strategy) or not isinstance(strategies, Iterable):
            raise TypeError(
                f"strategies must be a list of strategies, names or dicts, got {strategies!r}"
            )
        self.strategies = [as_strategy(s, i) for i, s in enumerate(strategies)]
        # a weights-only strategy (LARS): a unit's >=2-D parameters and its others get a
        # group each, the others without that strategy's factor
        self._split = any(s.weights_only for s in self.strategies)
        self.optimizer: torch.optim.Optimizer | None = None
        self._structure: tuple[int, LRContext] | None = None
        self._grouped = -1  # structure version the optimizer's groups were built for
        self._handles: list[Any] = []
        self._scales: list[tuple[Tensor, Tensor]] = []  # (patched weight, (ratio-1)*patch)
        self._scale_cache: dict[int, tuple[Tensor, int, float, Tensor]] = {}
        self._snapshot: list[Tensor] | None = None

    @property
    def dynamic(self) -> bool:
        """Whether some strategy depends on the step or the gradients."""
        return any(s.dynamic for s in self.strategies)

    # ------------------------------------------------------------------ evaluation
    def context(self) -> LRContext:
        """The :class:`~dynarch.lr.base.LRContext` now (units cached per structure)."""
        st = engine_state(self.model)
        if self._structure is None or self._structure[0] != st.version:
            units = build_units(self.model, st.history)
            layers = max((u.depth for u in units), default=0) + 1
            ctx = LRContext(self.model, st.step, units, list(st.history), layers)
            self._structure = (st.version, ctx)
        base = self._structure[1]
        return LRContext(self.model, st.step, base.units, base.history, base.layers, base.cache)

    def _evaluate(
        self,
    ) -> tuple[LRContext, dict[str, float], dict[str, float], dict[str, float]]:
        """Context and, per unit, the factor of its >=2-D parameters, of its others (without
        the weights-only strategies) and of its patch connections."""
        ctx = self.context()
        if "static" not in ctx.cache:
            ctx.cache["static"] = self._product(ctx, [s for s in self.strategies if not s.dynamic])
        static_f, static_o, static_p = ctx.cache["static"]
        dyn_f, dyn_o, dyn_p = self._product(ctx, [s for s in self.strategies if s.dynamic])
        f = {n: v * dyn_f[n] for n, v in static_f.items()}
        o = {n: v * dyn_o[n] for n, v in static_o.items()}
        p = {n: v * dyn_p[n] for n, v in static_p.items()}
        return ctx, f, o, p

    @staticmethod
    def _product(
        ctx: LRContext, strategies: list[Strategy]
    ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        f = {u.name: 1.0 for u in ctx.units}
        o = dict(f)
        p = {u.name: 1.0 for u in ctx.units if u.patch is not None}
        for strategy in strategies:
            values = strategy.factors(ctx)
            for u in ctx.units:
                value = values[u.name]
                f[u.name] *= value
                if not strategy.weights_only:
                    o[u.name] *= value
                if u.patch is not None:
                    p[u.name] *= strategy.patch_factor(u, ctx, value)
        return f, o, p

    def _is_other(self, params: Sequence[Tensor]) -> bool:
        """Whether a (split) group holds a unit's bias/norm parameters, not its weights."""
        return self._split and bool(params) and params[0].dim() < 2

    def factors(self) -> dict[str, float]:
        """The combined factor of every unit now, by group name (with a ``weights_only``
        strategy such as LARS: the factor of its parameters of two or more dimensions).

        Example:
            >>> from dynarch.models import mlp
            >>> LRPlan(mlp(4, [8], 2), 0.1, ["cascade"]).factors()
            {'fc1': 0.1, 'out': 1.0}
        """
        ctx, f, _, _ = self._evaluate()
        return {u.group: f[u.name] for u in ctx.units}

    def patch_factors(self) -> dict[str, float]:
        """The combined factor on the patch connections of every patched unit, by group name.

        Example:
            >>> from dynarch.models import mlp
            >>> LRPlan(mlp(4, [8], 2), 0.1, ["dual"]).patch_factors()  # nothing patched
            {}
        """
        ctx, _, _, p = self._evaluate()
        return {u.group: p[u.name] for u in ctx.units if u.patch is not None}

    def param_groups(self) -> list[dict[str, Any]]:
        """Param groups for a fresh optimizer: one per unit with trainable parameters (two
        with a ``weights_only`` strategy: its >=2-D parameters, then its others).

        Example:
            >>> from dynarch.models import mlp
            >>> groups = LRPlan(mlp(4, [8], 2), 0.1, ["cascade"]).param_groups()
            >>> [(g["name"], g["lr"], len(g["params"])) for g in groups]
            [('fc1', 0.010000000000000002, 2), ('out', 0.1, 2)]
        """
        ctx, f, o, _ = self._evaluate()
        groups = []
        for u in ctx.units:
            params = [p for p in u.params if p.requires_grad]
            parts = [params]
            if self._split:
                parts = [[p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]]
            for part in parts:
                if part:
                    factor = (o if self._is_other(part) else f)[u.name]
                    groups.append(
                        {"params": part, "lr": self.base_lr * factor, "name": u.group,
                         "lr_factor": factor}
                    )  # fmt: skip
        return groups

    # ------------------------------------------------------------------ the optimizer
    def attach(self, optimizer: torch.optim.Optimizer) -> LRPlan:
        """Regroup ``optimizer`` (one group per unit, state kept), set its learning rates and
        keep them current.

        Every parameter keeps the hyperparameters of the group it was in: a unit whose
        parameters sat in groups with different settings (say weight decay on weights, none
        on biases) gets one group per setting, all named after the unit.

        Parameters of the model that ``optimizer`` does not hold stay out of it.

        Example:
            >>> import torch
            >>> from dynarch.models import mlp
            >>> model = mlp(4, [8], 2)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            >>> plan = LRPlan(model, 0.1, ["cascade"]).attach(opt)
            >>> [(g["name"], g["momentum"]) for g in opt.param_groups]
            [('fc1', 0.9), ('out', 0.9)]
        """
        check_optimizer(optimizer)
        _check_no_scheduler(optimizer)
        if self.optimizer is optimizer:
            self.update()
            return self
        if self.optimizer is not None:
            raise ValueError(
                "this LRPlan is already attached to another optimizer; call plan.detach() first"
            )
        self._regroup(optimizer)
        self.optimizer = optimizer
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]
        engine_state(self.model).add_listener(self._on_event)
        self.update()
        return self

    def detach(self) -> None:
        """Stop updating the optimizer (its groups and learning rates stay as they are).

        Example:
            >>> from dynarch.models import mlp
            >>> LRPlan(mlp(4, [8], 2), 0.1).detach()  # not attached: nothing to do
        """
        for handle in self._handles:
            handle.remove()
        self._handles, self._scales, self._snapshot = [], [], None
        engine_state(self.model).remove_listener(self._on_event)
        self.optimizer = None
        self._grouped = -1

    def update(self) -> None:
        """Regroup after a structural change and set every group's learning rate now
        (``lr_base * lr_schedule``, see :mod:`dynarch.lr.plan`).

        Example:
            >>> import torch
            >>> from dynarch.models import mlp
            >>> model = mlp(4, [8], 2)
            >>> plan = LRPlan(model, 0.1, ["cascade"])
            >>> plan.update()
            Traceback (most recent call last):
            ...
            RuntimeError: LRPlan.update needs an optimizer: call plan.attach(optimizer) first
        """
        optimizer = self.optimizer
        if optimizer is None:
            raise RuntimeError(
                "LRPlan.update needs an optimizer: call plan.attach(optimizer) first"
            )
        _check_no_scheduler(optimizer)
        if engine_state(self.model).version != self._grouped:
            self._regroup(optimizer)
        ctx, f, o, p = self._evaluate()
        by_group = {u.group: u.name for u in ctx.units}
        for group in optimizer.param_groups:
            factor = (o if self._is_other(group["params"]) else f)[by_group[group["name"]]]
            base = self.base_lr * factor
            lr = base * float(group.get("lr_schedule", 1.0))
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            group["lr_factor"] = factor
            group["lr_base"] = base
        held = {id(q) for g in optimizer.param_groups for q in g["params"]}
        self._scales = []
        for u in ctx.units:
            weight = getattr(u.module, "weight", None)
            if u.patch is None or f[u.name] <= 0 or id(weight) not in held:
                continue
            ratio = p[u.name] / f[u.name]
            if ratio != 1.0:
                assert isinstance(weight, Tensor)
                self._scales.append((weight, self._scale(weight, u.patch, ratio)))

    def _scale(self, weight: Tensor, patch: Tensor, ratio: float) -> Tensor:
        cached = self._scale_cache.get(id(weight))
        if cached is not None and cached[:3] == (patch, patch._version, ratio):
            return cached[3]
        scale = patch.to(weight.dtype) * (ratio - 1.0)
        self._scale_cache[id(weight)] = (patch, patch._version, ratio, scale)
        return scale

    def _regroup(self, optimizer: torch.optim.Optimizer) -> None:
        st = engine_state(self.model)
        owner: dict[int, dict[str, Any]] = {}
        for group in optimizer.param_groups:
            for q in group["params"]:
                owner[id(q)] = group
        live = {id(q) for q in self.model.parameters()}
        dead = [q for g in optimizer.param_groups for q in g["params"] if id(q) not in live]
        if dead:
            shapes = [tuple(q.shape) for q in dead[:4]]
            raise ValueError(
                f"the optimizer holds {len(dead)} parameter(s) that are not parameters of the "
                f"model (shapes {shapes}); build it on this model and pass optimizer= to every "
                "structural op so the engine replaces changed parameters"
            )
        groups = []
        for u in self.context().units:
            # one group per (unit, source group): a unit whose parameters sat in groups with
            # different settings (e.g. no weight decay on biases) keeps each one's settings;
            # with a weights-only strategy, per (unit, source group, >=2-D or not)
            split: dict[tuple[int, bool], list[Tensor]] = {}
            for q in u.params:
                if id(q) in owner:
                    key = (id(owner[id(q)]), self._split and q.dim() < 2)
                    split.setdefault(key, []).append(q)
            for params in split.values():
                src = owner[id(params[0])]
                group = {k: v for k, v in src.items() if k != "params"}
                if isinstance(group.get("lr"), Tensor):
                    group["lr"] = group["lr"].clone()
                group.update(params=params, name=u.group)
                groups.append(group)
        optimizer.param_groups[:] = groups
        self._grouped = st.version
        self._scale_cache = {k: v for k, v in self._scale_cache.items() if k in owner}

    def set_base_lr(self, lr: float) -> None:
        """Change the base learning rate (and the groups' rates now, when attached).

        Example:
            >>> from dynarch.models import mlp
            >>> plan = LRPlan(mlp(4, [8], 2), 0.1)
            >>> plan.set_base_lr(0.05); plan.base_lr
            0.05
        """
        self.base_lr = _check_lr(lr)
        if self.optimizer is not None:
            self.update()

    def _on_event(self, event: Event) -> None:
        optimizer = self.optimizer
        # with a torch scheduler, leave the rates alone: the next step refuses (_pre)
        if optimizer is not None and not getattr(optimizer.step, "_wrapped_by_lr_sched", False):
            self.update()

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        _check_no_scheduler(optimizer)
        # args[0] is the optimizer itself; step(closure) computes the gradients inside
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._prepare()
            return None
        if engine_state(self.model).version != self._grouped:
            self.update()  # regroup before the step even if the closure is never called

        def closure_then_prepare() -> Any:
            loss = closure()
            self._prepare()  # this step's gradients (LARS) are there now, the update is not
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_prepare}
        return (args[0], closure_then_prepare, *args[2:]), kwargs

    def _prepare(self) -> None:
        """Set the rates for the coming update and snapshot the patched weights."""
        if self.dynamic or engine_state(self.model).version != self._grouped:
            self.update()
        if self._scales:
            with torch.no_grad():
                self._snapshot = [w.detach().clone() for w, _ in self._scales]

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._snapshot is None:
            return
        weights = [w for w, _ in self._scales]
        with torch.no_grad():
            delta = torch._foreach_sub(weights, self._snapshot)
            torch._foreach_mul_(delta, [s for _, s in self._scales])
            torch._foreach_add_(weights, delta)
        self._snapshot = None

    # ------------------------------------------------------------------ callback
    def on_fit_start(self, trainer: Trainer) -> None:
        """Attach to the trainer's optimizer (or check it is the one attached)."""
        if trainer.model is not self.model:
            raise ValueError(
                "LRPlan was built for another model than the trainer's; build it on trainer.model"
            )
        if self.optimizer is not None and self.optimizer is not trainer.optimizer:
            raise ValueError(
                "LRPlan is attached to another optimizer than the trainer's; "
                "call plan.detach() first or attach it to trainer.optimizer"
            )
        self.attach(trainer.optimizer)

    def state_dict(self) -> dict[str, Any]:
        """Base learning rate and each strategy's state (plain data).

        Example:
            >>> from dynarch.models import mlp
            >>> LRPlan(mlp(4, [8], 2), 0.1, ["freeze"]).state_dict()
            {'base_lr': 0.1, 'strategies': [{'name': 'freeze', 'state': {'frozen_at': {}}}]}
        """
        return {
            "base_lr": self.base_lr,
            "strategies": [
                {"name": s.name or type(s).__name__, "state": s.state_dict()}
                for s in self.strategies
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the plan must have the same strategies); a
        refused state changes nothing."""
        check_state("LRPlan", state, {"base_lr", "strategies"})
        saved = [s.get("name") if isinstance(s, dict) else s for s in state["strategies"]]
        have = [s.name or type(s).__name__ for s in self.strategies]
        if saved != have:
            raise ValueError(
                f"saved LRPlan state has strategies {saved} but this plan has {have}; "
                "build the plan with the same strategies in the same order"
            )
        base_lr = _check_lr(state["base_lr"])
        saved_states = [
            check_state("LRPlan strategy", s, {"name", "state"})["state"]
            for s in state["strategies"]
        ]
        previous = [s.state_dict() for s in self.strategies]
        try:
            for strategy, saved_state in zip(self.strategies, saved_states):
                strategy.load_state_dict(saved_state)
        except Exception:  # a refused state leaves the plan as it was
            for strategy, old in zip(self.strategies, previous):
                strategy.load_state_dict(old)
            raise
        self.base_lr = base_lr
        if self.optimizer is not None:
            self.update()
