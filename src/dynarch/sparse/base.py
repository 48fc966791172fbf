"""The one dynamic-sparse-training engine every algorithm shares: :class:`Rewirer`.

An algorithm is a small subclass that only says how to score positions (jaxpruner-style):
``drop_scores`` (the lowest active ones are dropped), ``grow_scores`` (the highest inactive
ones are grown; ``None`` means uniformly at random) and, optionally, ``grow_counts`` (how
many each layer regrows). The engine does the rest: schedule, exact counts, selection via
:func:`dynarch.select.topk_indices`, regrowth initialisation, optimizer-state resets,
gradient capture, events and checkpoint state.

Example:
    >>> import torch, torch.nn as nn
    >>> from dynarch.sparse import SET
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> rw = SET(model, opt, density=0.5, delta_t=1, anneal="constant")
    >>> model(torch.randn(4, 8)).sum().backward(); opt.step()
    >>> rw.step().op
    'rewire'
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .._engine import engine_state, transaction
from .._validate import check_model, check_optimizer
from ..budgets import DISTRIBUTIONS, check_choice, check_density
from ..callbacks import Callback
from ..events import Event
from ..masks import (
    MASK,
    check_held,
    enforce,
    get_enforcer,
    is_sparse,
    masked_modules,
    select_layers,
    sparsify,
)
from ..triggers import check_state
from . import _ops
from ._grads import GradientBuffer
from .schedule import Schedule

if TYPE_CHECKING:
    from ..train import Trainer

__all__ = ["IdleScheduleWarning", "Layer", "Rewirer"]

_STATE_KEYS = {"algorithm", "step", "t_end", "grads", "active", "extra", "layers", "generator"}
_NEWER_KEYS = {"layers": None, "generator": None}  # absent from states of older versions


class IdleScheduleWarning(UserWarning):
    """A rewirer whose schedule ends before its first update: the mask never changes."""


@dataclass
class Layer:
    """One rewired layer during an update: its module, weight, mask and active count."""

    name: str
    module: nn.Module
    weight: Tensor
    mask: Tensor
    active: int

    @property
    def numel(self) -> int:
        return self.mask.numel()


class Rewirer(Callback):
    """Dynamic sparse training: periodically drop and regrow connections of masked layers.

    Construction sparsifies ``model`` to ``density`` with a random mask
    (:func:`dynarch.masks.sparsify`, ``distribution`` per layer) unless it already has masked
    layers (then ``density``/``distribution`` are ignored and those masks are rewired), and
    keeps masked weights and their optimizer state zero (:func:`dynarch.masks.enforce`).
    ``include``/``exclude`` (fnmatch patterns of module names) choose the layers; ``optimizer``
    must hold the weight of every chosen layer (exclude frozen ones), else a clear error.

    Each update, for every layer with ``a`` active of ``n`` weights:

    * ``n_drop = min(round(f * a), n - a)``, ``f`` the annealed drop fraction (see
      :mod:`dynarch.sparse.schedule`; Python's round, half to even); a dense layer is left
      alone;
    * the ``n_drop`` active positions with the lowest drop score are dropped (weights zeroed);
    * the ``n_grow`` (normally ``n_drop``) positions with the highest grow score among all
      positions inactive *after* the drop are grown. **A just-dropped connection may be
      regrown** (RigL's rule, not SET's): it then restarts from ``regrow_init`` with zero
      optimizer state. Active counts are preserved exactly;
    * regrown weights start at ``regrow_init``: ``"zero"`` (default), ``"random"``
      (``U(-b, b)``, ``b = 1/sqrt(fan_in)``: PyTorch's default-init scale) or ``"gradient"``
      (``-g * b / max|g|`` over the layer's regrown positions, ``g`` the captured dense
      gradient: a descent step scaled so the largest new weight sits at the default-init
      bound);
    * every optimizer-state tensor shaped like the weight is zeroed at dropped and regrown
      positions.

    Ties and random choices use the engine generator only (never the global RNG, so DDP
    ranks agree). Each update records one ``"rewire"`` event (``details[layer] =
    {"dropped", "regrown", "active", "density"}``).

    Use it as a callback (``dynarch.fit(model, opt, data, callbacks=[rw])``: the horizon
    ``t_end=None`` is taken from the trainer) or by hand: ``loss.backward();
    optimizer.step(); rw.step()``. Algorithms that need dense gradients capture them only on
    the steps that feed an update: as a callback in ``on_after_backward``; by hand ``step()``
    reads ``weight.grad`` of the step just done (the enforcer keeps it dense), so call it
    before ``optimizer.zero_grad()``, or call :meth:`capture` after ``loss.backward()``.

    Example:
        >>> import torch.nn as nn
        >>> from dynarch.sparse import RigL
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> rw = RigL(model, torch.optim.Adam(model.parameters()), density=0.25, t_end=1000)
        >>> rw.is_update_step(100), rw.drop_fraction_at(500)
        (True, 0.15)
    """

    name: ClassVar[str] = "rewirer"
    uses_gradients: ClassVar[bool] = False  # grow scores need captured dense gradients
    grad_accumulation: int = 1  # steps of gradients captured before each update

    rewires: ClassVar[bool] = True  # False: the mask never changes (Static): frozen is fine

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        density: float | None = None,
        distribution: str = "erk",
        delta_t: int = 100,
        t_end: int | None = None,
        drop_fraction: float = 0.3,
        anneal: str = "cosine",
        regrow_init: str = "zero",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        check_model(model)
        check_optimizer(optimizer)
        if density is not None:
            density = check_density(density)
        check_choice("distribution", distribution, DISTRIBUTIONS)
        check_choice("regrow_init", regrow_init, _ops.GROW_INITS)
        self.schedule = Schedule(delta_t, t_end, drop_fraction, anneal)
        self._user_t_end = t_end
        if t_end is not None:
            self._warn_if_idle(t_end, stacklevel=2)
        self.model, self.optimizer, self.regrow_init = model, optimizer, regrow_init
        self._validate()
        sparse = is_sparse(model)
        if not sparse and density is None:
            raise ValueError(
                f"{type(self).__name__}: the model has no masked layer yet, so density is "
                "required (the fraction of weights kept, e.g. density=0.1)"
            )
        # the layers to rewire: the masked ones, or those sparsify is about to mask
        if sparse:
            masked = masked_modules(model)
            chosen = {n: masked[n] for n in self._choose(include, exclude)}
        else:
            chosen = select_layers(model, include, exclude)
        check_held(optimizer, chosen, owner=type(self).__name__, every=True)
        frozen = [n for n, m in chosen.items() if not _tensor(m.weight).requires_grad]
        if frozen and self.rewires:
            raise ValueError(
                f"{type(self).__name__}: layers {frozen} are frozen (weight.requires_grad is "
                "False): rewiring would drop their trained weights and regrow zeros that never "
                f"train; leave them out (exclude={frozen!r}) or unfreeze them"
            )
        if sparse:
            enforce(model, optimizer)
        else:
            assert density is not None
            sparsify(model, density, distribution=distribution, optimizer=optimizer,
                     score="random", include=include, exclude=exclude,
                     reason=self.name)  # fmt: skip
        # the layers follow the model: those chosen now (by identity, whatever they are
        # renamed to), and masked layers added later that include/exclude select
        self._include, self._exclude = include, exclude
        self._picked: weakref.WeakSet[nn.Module] = weakref.WeakSet(chosen.values())
        self._passed: weakref.WeakSet[nn.Module] = weakref.WeakSet(
            m for m in model.modules() if m not in self._picked
        )
        self._names, self._names_version = list(chosen), engine_state(model).version
        self._step = 0
        self.grads = GradientBuffer()  # captured dense gradients
        self._count_key: tuple[tuple[int, int], ...] = ()
        self._counts: dict[str, int] = {}
        self._active: dict[str, Tensor] = {}
        self._active_key: dict[str, tuple[int, int] | None] = {}

    def _choose(self, include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[str]:
        masked = list(masked_modules(self.model))
        for kind, pats in (("include", include), ("exclude", exclude)):
            if isinstance(pats, str):
                raise TypeError(f"{kind} must be a list of fnmatch patterns, got {pats!r}")
            for p in pats or ():
                if not any(fnmatchcase(n, p) for n in masked):
                    raise ValueError(
                        f"{kind} pattern {p!r} matches no masked layer; masked: {masked}"
                    )
        return [
            n
            for n in masked
            if (include is None or any(fnmatchcase(n, p) for p in include))
            and not any(fnmatchcase(n, p) for p in exclude or ())
        ]

    @property
    def layer_names(self) -> list[str]:
        """The rewired layers' names now: the layers chosen at construction (renamed or not)
        plus masked layers added since (a sparse skip, a module attached while sparse) that
        ``include``/``exclude`` select, whose weights the optimizer trains.

        Example:
            >>> import torch, torch.nn as nn
            >>> from dynarch.sparse import SET
            >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
            >>> SET(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.5).layer_names
            ['0', '2']
        """
        version = engine_state(self.model).version
        if version != self._names_version:
            held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            names = []
            for name, module in masked_modules(self.model).items():
                if module not in self._picked and module not in self._passed:
                    weight = _tensor(module.weight)
                    new = weight.requires_grad and id(weight) in held and self._selects(name)
                    (self._picked if new else self._passed).add(module)
                if module in self._picked:
                    names.append(name)
            self._names, self._names_version = names, version
        return list(self._names)

    def _selects(self, name: str) -> bool:
        inc, exc = self._include, self._exclude
        return (inc is None or any(fnmatchcase(name, p) for p in inc)) and not any(
            fnmatchcase(name, p) for p in exc or ()
        )

    # ------------------------------------------------------------------ algorithm hooks
    def _validate(self) -> None:
        """Check arguments that depend on each other; runs before the model is touched."""

    def drop_scores(self, layer: Layer, active: Tensor) -> Tensor:
        """Scores of the active flat positions ``active``; the lowest are dropped (|w|)."""
        return layer.weight.detach().reshape(-1).index_select(0, active).abs()

    def grow_scores(self, layer: Layer) -> Tensor | None:
        """A new full-size score tensor (the engine overwrites it); the highest inactive
        positions grow. ``None``: grow uniformly at random (sampled in O(k))."""
        return None

    def drop_counts(self, layers: list[Layer], step: int) -> list[int]:
        """Per layer ``min(round(f * active), n - active)`` with the annealed fraction."""
        f = self.drop_fraction_at(step)
        return [min(round(f * x.active), x.numel - x.active) for x in layers]

    def grow_counts(self, layers: list[Layer], drops: list[int]) -> list[int]:
        """How many positions each layer regrows (default: as many as it dropped)."""
        return list(drops)

    # ------------------------------------------------------------------------ schedule
    @property
    def current_step(self) -> int:
        """Optimizer steps counted so far (the trainer's step when used as a callback)."""
        return self._step

    @property
    def t_end(self) -> int | None:
        """The step from which the mask stays fixed (``None``: not known yet)."""
        return self.schedule.t_end

    def drop_fraction_at(self, step: int) -> float:
        """Annealed drop fraction at ``step`` (see :class:`~dynarch.sparse.Schedule`)."""
        return self.schedule.fraction(step)

    def is_update_step(self, step: int) -> bool:
        """Whether the mask is updated after optimizer step ``step``."""
        return self.schedule.is_update(step)

    # ----------------------------------------------------------------------- gradients
    @property
    def needs_gradients(self) -> bool:
        return self.uses_gradients or self.regrow_init == "gradient"

    def _capture_due(self, step: int) -> bool:
        if not self.needs_gradients:
            return False
        upcoming = self.schedule.next_update(step)
        return upcoming is not None and upcoming - step < self.grad_accumulation

    def capture(self) -> None:
        """Store the dense gradients of the step in progress for the next update.

        Call after ``loss.backward()`` when ``step()`` cannot read them after
        ``optimizer.step()`` (e.g. gradients are zeroed in between). Cheap to skip on steps
        that feed no update (a call on such a step does nothing: the gradients of the last
        ``grad_accumulation`` steps before an update feed it, whoever captures them); as a
        callback it is called automatically."""
        if self._capture_due(self._step + 1):
            self._capture(self._step + 1)

    def _capture(self, step: int) -> None:
        grads = {x.name: x.weight.grad for x in self.layers()}
        if all(g is None for g in grads.values()):
            raise ValueError(
                f"{self.name} needs the dense gradients of step {step}, but weight.grad is None "
                "for every layer: call rw.step() after optimizer.step() and before "
                "optimizer.zero_grad(), or rw.capture() after loss.backward()"
            )
        self.grads.add(grads, step, self.schedule.next_update(step))

    def _found_gradient(self, layer: Layer) -> Tensor | None:
        found = self.grads.get(layer.name, layer.weight.shape)
        if found is not None:
            return found
        grad = layer.weight.grad
        return None if grad is None else grad.detach()

    def gradient(self, layer: Layer) -> Tensor:
        """The captured gradient of ``layer`` (see :attr:`grads`), else its ``.grad``; zeros
        for a layer that had none (e.g. a head no batch of the window used)."""
        found = self._found_gradient(layer)
        return torch.zeros_like(layer.weight) if found is None else found

    # ---------------------------------------------------------------------------- loop
    def _first_update(self) -> int:
        """The step of the first scheduled update."""
        return self.schedule.delta_t

    def _warn_if_idle(self, t_end: int, stacklevel: int = 2) -> None:
        """Warn when a schedule ending at ``t_end`` never updates the mask."""
        first, delta_t = self._first_update(), self.schedule.delta_t
        at, bound = (f"delta_t={delta_t}", "delta_t") if first == delta_t else (first, first)
        if self.rewires and t_end <= first:
            warnings.warn(
                f"{type(self).__name__}: t_end={t_end} is not after the first update (step "
                f"{at}), so the mask will never change; give t_end > {bound}, a smaller "
                "delta_t, or use Static for a fixed mask",
                IdleScheduleWarning,
                stacklevel=stacklevel + 1,  # + this method
            )

    def on_fit_start(self, trainer: Trainer) -> None:
        for what, mine, theirs in (
            ("model", self.model, trainer.model),
            ("optimizer", self.optimizer, trainer.optimizer),
        ):
            if mine is not theirs:
                raise ValueError(
                    f"{type(self).__name__} was built for a different {what} than the "
                    f"Trainer's; build it with the {what} you train"
                )
        if self._user_t_end is None:
            horizon = trainer.epochs * trainer.batches_per_epoch
            if trainer.max_steps is not None:
                horizon = min(horizon, trainer.max_steps)
            self.schedule.t_end = max(1, horizon)
            if trainer.step == 0:  # t_end=None: rewire until training ends, which is this
                self._warn_if_idle(self.schedule.t_end, stacklevel=4)
        self._step = trainer.step

    def on_after_backward(self, trainer: Trainer) -> None:
        if self._capture_due(trainer.step + 1):
            self._capture(trainer.step + 1)

    def on_step_end(self, trainer: Trainer) -> None:
        self._step = trainer.step
        self._after_step()

    def step(self) -> Event | None:
        """Count one optimizer step (call after ``optimizer.step()``); update if due."""
        self._step += 1
        engine_state(self.model).step = self._step
        return self._after_step()

    def _after_step(self) -> Event | None:
        s = self._step
        if self.grads.captured != s and self._capture_due(s):
            self._capture(s)
        return self.update() if self.is_update_step(s) else None

    # -------------------------------------------------------------------------- update
    def layers(self) -> list[Layer]:
        """The rewired layers with their active counts (one host sync when masks changed)."""
        mods = masked_modules(self.model)
        named = [(n, mods[n]) for n in self.layer_names if n in mods]
        masks = [_tensor(m._buffers[MASK]) for _, m in named]
        key = tuple((id(m), m._version) for m in masks)
        if key != self._count_key:
            sums = [m.sum().to(masks[0].device) for m in masks]
            counts = torch.stack(sums).tolist() if sums else []
            self._counts = {n: int(c) for (n, _), c in zip(named, counts)}
            self._count_key = key
        return [
            Layer(n, m, _tensor(m.weight), mask, self._counts[n])
            for (n, m), mask in zip(named, masks)
        ]

    def check_ready(self, layers: list[Layer]) -> None:
        """Raise before anything changes if the update cannot run (e.g. no gradients)."""
        if not (self.needs_gradients and layers):
            return
        if all(self._found_gradient(x) is None for x in layers):
            raise ValueError(
                f"{self.name}: no gradient for any rewired layer "
                f"({', '.join(repr(x.name) for x in layers)}); run loss.backward() before "
                "rw.update(), or train with rw as a callback"
            )

    def update(self) -> Event:
        """Rewire every layer now (one ``"rewire"`` event); active counts are preserved."""
        layers = self.layers()
        drops = self.drop_counts(layers, self._step)
        grows = self.grow_counts(layers, drops)
        self.check_ready(layers)
        gen = engine_state(self.model).generator
        changes = {}
        with torch.no_grad(), transaction(self.model, "rewire", "*", reason=self.name) as tx:
            for layer, n_drop, n_grow in zip(layers, drops, grows):
                version = layer.mask._version
                drop, grow = self._rewire(layer, n_drop, n_grow, gen)
                changes[layer.module] = (version, drop, grow)
                layer.active += n_grow - n_drop
                tx.details[layer.name] = self._details(layer, n_drop, n_grow)
        self._active_key.update({x.name: (id(x.mask), x.mask._version) for x in layers})
        return self._finish(layers, tx.event, changes)

    def _rewire(
        self, layer: Layer, n_drop: int, n_grow: int, gen: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        if n_drop <= 0 and n_grow <= 0:
            none = torch.zeros(0, dtype=torch.long, device=layer.mask.device)
            return none, none
        drop, grow, self._active[layer.name] = _ops.rewire_layer(
            layer.mask, layer.weight, self.active_positions(layer), (n_drop, n_grow),
            lambda idx: self.drop_scores(layer, idx), lambda: self.grow_scores(layer),
            self.regrow_init, lambda: self.gradient(layer),
            _ops.state_tensors(self.optimizer, layer.weight), gen,
        )  # fmt: skip
        return drop, grow

    def active_positions(self, layer: Layer) -> Tensor:
        """Flat positions of ``layer``'s active weights (each once; cached between updates,
        in the order the updates left them, so a resumed run ranks ties identically)."""
        key = (id(layer.mask), layer.mask._version)
        idx = self._active.get(layer.name)
        known = self._active_key.get(layer.name)
        if idx is not None and known == key:
            return idx
        flat = layer.mask.reshape(-1)
        if idx is not None and known is None and _lists_active(idx, flat, layer.active):
            self._active[layer.name], self._active_key[layer.name] = idx, key
            return idx
        idx = _ops.active_indices(layer.mask)
        self._active[layer.name], self._active_key[layer.name] = idx, key
        return idx

    @staticmethod
    def _details(layer: Layer, dropped: int, regrown: int) -> dict[str, Any]:
        return {"dropped": dropped, "regrown": regrown, "active": layer.active,
                "density": layer.active / layer.numel}  # fmt: skip

    def _finish(
        self,
        layers: list[Layer],
        event: Event | None,
        changes: dict[nn.Module, tuple[int, Tensor, Tensor]],
    ) -> Event:
        self._counts.update({x.name: x.active for x in layers})
        self._count_key = tuple((id(x.mask), x.mask._version) for x in layers)
        enforcer = get_enforcer(self.model, self.optimizer)
        if enforcer is not None:
            enforcer.resync(changes)
        if self.grads.momentum is None:
            self.grads.clear()
        assert event is not None
        return event

    # --------------------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, extra: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Step counter, horizon, captured gradients and algorithm state (plain data)."""
        return {
            "algorithm": self.name,
            "step": self._step,
            "t_end": self.schedule.t_end,
            "grads": self.grads.state_dict(),
            "active": {n: t.clone() for n, t in self._active.items()},
            "extra": self._extra_state(),
            "layers": self.layer_names,
            # the engine generator draws random regrowth: without it a resume from these
            # states alone (not through dynarch.save/load) would regrow elsewhere
            "generator": engine_state(self.model).generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (exact resume)."""
        if isinstance(state, dict) and set(state) < _STATE_KEYS <= set(state) | set(_NEWER_KEYS):
            state = {**_NEWER_KEYS, **state}  # a state of an older version
        check_state(type(self).__name__, state, _STATE_KEYS)
        if state["algorithm"] != self.name:
            raise ValueError(
                f"state was saved by the {state['algorithm']!r} rewirer, this is {self.name!r}"
            )
        self._step = int(state["step"])
        if self._user_t_end is None:
            self.schedule.t_end = state["t_end"]
        self.grads.load_state_dict(state["grads"])
        self._active = {n: t.clone() for n, t in state["active"].items()}
        self._active_key = dict.fromkeys(self._active)  # verified at first use
        self._load_extra(state["extra"])
        if state["layers"] is not None:
            self._adopt_layers(list(state["layers"]))
        if state["generator"] is not None:
            engine_state(self.model).generator.set_state(state["generator"].cpu())

    def _adopt_layers(self, names: list[str]) -> None:
        """Rewire exactly the masked layers ``names`` (a saved state's), from now on."""
        mods = masked_modules(self.model)
        missing = [n for n in names if n not in mods]
        if missing:
            raise ValueError(
                f"the saved {self.name} state rewires layers {missing}, which have no mask in "
                f"this model (masked: {list(mods)}); load it into the model it was saved with"
            )
        self._picked = weakref.WeakSet(mods[n] for n in names)
        self._passed = weakref.WeakSet(m for m in self.model.modules() if m not in self._picked)
        self._names, self._names_version = names, engine_state(self.model).version


def _lists_active(idx: Tensor, flat: Tensor, active: int) -> bool:
    """Whether loaded positions ``idx`` are exactly the True positions of ``flat``, each once
    (a state saved from another model may hold positions out of range: then False)."""
    if idx.dtype != torch.long or idx.dim() != 1 or idx.numel() != active:
        return False
    idx = idx.to(flat.device)
    if not bool(((idx >= 0) & (idx < flat.numel())).all()):
        return False
    seen = torch.zeros_like(flat).index_fill_(0, idx, True)
    return torch.equal(seen, flat)


def _tensor(value: object) -> Tensor:
    assert isinstance(value, Tensor)
    return value
