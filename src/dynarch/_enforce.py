"""Keeping masked weights and their optimizer state exactly zero, cheaply.

The low-level half of :mod:`dynarch.masks` (which re-exports everything here): finding the
masked layers of a model and the optimizer-step hooks that enforce their masks.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._engine import engine_state
from ._validate import check_optimizer

__all__ = [
    "CLEAN", "GRAD_MASKING", "MASK", "MaskEnforcer", "clip_grad_norm_", "enforce",
    "get_enforcer", "mark_clean", "masked_modules",
]  # fmt: skip

MASK = "weight_mask"
_CACHE = "_dynarch_masked_modules"
_REGISTRY = "_dynarch_mask_enforcers"


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` holding a ``weight_mask`` buffer, by fully-qualified name.

    Cached on the engine's structure version (every structural change bumps it).

    Example:
        >>> masked_modules(nn.Sequential(nn.Linear(2, 2)))
        {}
    """
    version = engine_state(model).version
    cached = model.__dict__.get(_CACHE)
    if cached is not None and cached[0] == id(model) and cached[1] == version:
        return dict(cached[2])
    found = {n: m for n, m in model.named_modules() if m._buffers.get(MASK) is not None}
    model.__dict__[_CACHE] = (id(model), version, found)
    return dict(found)


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def _mask(module: nn.Module) -> Tensor:
    mask = module._buffers[MASK]
    assert mask is not None
    return mask


# Optimizers whose update of one position depends only on that position's gradient, state
# and weight, and leaves a zero weight with zero state and zero gradient exactly zero. For
# them the enforcer masks the gradient the optimizer sees (one multiply per layer) instead of
# multiplying the weight and every state tensor after the step.
GRAD_MASKING: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
    torch.optim.NAdam, torch.optim.RAdam,
)  # fmt: skip
CLEAN = "_dynarch_mask_clean"  # module attribute: weight._version when masked weights were 0


@dataclass(eq=False)
class _Entry:
    """One masked layer as the enforcer sees it (cached until the structure changes)."""

    module: nn.Module
    weight: Tensor
    mask: Tensor
    factor: Tensor  # the mask in the weight's dtype and device
    mask_version: int
    clean: int = -1  # weight._version when weight and state were last known masked
    buffer: Tensor | None = None  # persistent masked-gradient buffer
    dense: Tensor | None = None  # the dense gradient while the buffer stands in for it


def mark_clean(module: nn.Module) -> None:
    """Record that ``module``'s masked weights are zero at the weight's current version."""
    module.__dict__[CLEAN] = _weight(module)._version


class MaskEnforcer:
    """Optimizer step hooks keeping masked weights and their state exactly zero.

    Two exact strategies, chosen by the optimizer's type:

    * :data:`GRAD_MASKING` optimizers (SGD, Adam, AdamW, RMSprop, NAdam, RAdam): a pre-step
      hook hands the optimizer ``grad * mask`` (a persistent buffer, one multiply per layer)
      and the post-step hook puts the dense gradient back. A masked position then has zero
      weight, zero state and zero gradient, which these optimizers leave exactly zero. Weights
      or state changed outside a step (``load_state_dict``, a structural change, a mask edited
      in place: detected through tensor version counters) are re-masked in full first.
    * any other optimizer, and any step given a closure (which recomputes the gradients
      inside the step): after the step each masked weight, and each optimizer-state tensor
      of it with the weight's shape, is multiplied by its mask.

    Either way gradients stay dense after the step, and masks converted to the weight's
    dtype are cached until a mask changes. Create it with :func:`enforce`; :meth:`remove`
    detaches it.

    Example:
        >>> model = nn.Linear(4, 4)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> from dynarch.masks import sparsify
        >>> _ = sparsify(model, 0.5, optimizer=opt)
        >>> get_enforcer(model, opt).masks_gradients
        True
        >>> get_enforcer(model, opt).remove()
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._model = weakref.ref(model)
        self._optimizer = weakref.ref(optimizer)
        self.masks_gradients = type(optimizer) in GRAD_MASKING
        self._closure = False  # the step in progress was given a closure
        self._entries: list[_Entry] = []
        self._version = -1
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
            optimizer.register_load_state_dict_post_hook(self._dirty),
        ]

    def _plan(self, model: nn.Module) -> list[_Entry]:
        """The cached entries, rebuilt after a structural change, factors refreshed."""
        version = engine_state(model).version
        if version != self._version:
            old = {(id(e.weight), id(e.mask)): e for e in self._entries}
            entries = []
            for module in masked_modules(model).values():
                weight, mask = _weight(module), _mask(module)
                entry = old.get((id(weight), id(mask)))
                if entry is None or entry.module is not module:
                    entry = _Entry(module, weight, mask, mask.to(weight), mask._version)
                entry.clean = -1
                entries.append(entry)
            self._entries, self._version = entries, version
        for e in self._entries:
            w, f = e.weight, e.factor
            if f.dtype != w.dtype or f.device != w.device:
                e.factor = e.mask.to(w)
            elif e.mask._version != e.mask_version:
                f.copy_(e.mask)
            else:
                continue
            e.mask_version, e.clean = e.mask._version, -1
        return self._entries

    def _dirty(self, optimizer: torch.optim.Optimizer) -> None:
        for e in self._entries:
            e.clean = -1

    def _targets(self, optimizer: torch.optim.Optimizer, entries: list[_Entry]) -> list[Tensor]:
        """Per entry: the weight and its floating state tensors shaped like it (flattened)."""
        tensors: list[Tensor] = []
        for e in entries:
            state = optimizer.state.get(e.weight, {}).values()
            tensors.append(e.weight)
            tensors += [
                v
                for v in state
                if isinstance(v, Tensor)
                and v.shape == e.weight.shape
                and (v.is_floating_point() or v.is_complex())
            ]
        return tensors

    def _mask_all(self, optimizer: torch.optim.Optimizer, entries: list[_Entry]) -> None:
        tensors: list[Tensor] = []
        factors: list[Tensor] = []
        for e in entries:
            found = self._targets(optimizer, [e])
            tensors += found
            factors += [e.factor if t.dtype == e.factor.dtype else e.mask.to(t) for t in found]
        if tensors:
            with torch.no_grad():
                torch._foreach_mul_(tensors, factors)
        for e in entries:
            e.clean = e.weight._version
            e.module.__dict__[CLEAN] = e.clean

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        model = self._model()
        if model is None or not self.masks_gradients:
            return
        self._closure = (
            bool(args and args[0] is not None) or (kwargs or {}).get("closure") is not None
        )
        if self._closure:
            return  # the closure recomputes the gradients: mask weights and state after the step
        entries = self._plan(model)
        stale = [e for e in entries if e.weight._version != e.clean]
        if stale:
            self._mask_all(optimizer, stale)
        with torch.no_grad():
            for e in entries:
                grad = e.weight.grad
                if grad is None or grad is e.buffer:
                    continue
                buf = e.buffer
                if (
                    buf is None
                    or buf.shape != grad.shape
                    or buf.dtype != grad.dtype
                    or (buf.device != grad.device)
                ):
                    buf = e.buffer = torch.empty_like(grad)
                torch.mul(grad, e.factor, out=buf)
                e.dense = grad
                e.weight.grad = buf

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        model = self._model()
        if model is None:
            return
        if not self.masks_gradients or self._closure:
            self._closure = False
            self._mask_all(optimizer, self._plan(model))
            return
        for e in self._entries:
            if e.dense is not None:
                e.weight.grad, e.dense = e.dense, None
            if e.clean != -1:
                e.clean = e.weight._version
                e.module.__dict__[CLEAN] = e.clean

    def apply(self) -> None:
        """Multiply masked weights and their same-shaped optimizer state by the masks now."""
        model, optimizer = self._model(), self._optimizer()
        if model is None or optimizer is None:
            return
        self._mask_all(optimizer, self._plan(model))

    def resync(self, changes: Mapping[nn.Module, tuple[int, Tensor, Tensor]] | None = None) -> None:
        """Refresh the cached masks after masks changed while the weights and optimizer
        state of every masked position were already zeroed (used by :mod:`dynarch.sparse`);
        multiplies nothing. ``changes[module] = (mask version before the change, flat
        positions switched off, then on)`` lets an up-to-date cache be patched in place
        instead of re-converted."""
        model = self._model()
        if model is None:
            return
        for e in self._entries:
            change = None if changes is None else changes.get(e.module)
            if change is not None and change[0] == e.mask_version and e.factor.is_contiguous():
                flat = e.factor.view(-1)
                flat.index_fill_(0, change[1], 0).index_fill_(0, change[2], 1)
                e.mask_version = e.mask._version
        for e in self._plan(model):
            e.clean = e.weight._version
            e.module.__dict__[CLEAN] = e.clean

    def remove(self) -> None:
        """Detach the hooks; :func:`enforce` may register a new enforcer afterwards."""
        for handle in self._handles:
            handle.remove()
        for e in self._entries:
            if e.dense is not None:
                e.weight.grad, e.dense = e.dense, None
        model, optimizer = self._model(), self._optimizer()
        if model is not None and optimizer is not None:
            registry = optimizer.__dict__.get(_REGISTRY, {})
            if registry.get(model) is self:
                del registry[model]


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Clip the gradients of ``model`` like ``torch.nn.utils.clip_grad_norm_``, measuring the
    norm of the gradient the optimizer applies: masked positions count as zero.

    ``weight.grad`` of a masked layer stays dense between steps (gradient-guided rewirers
    read it; the enforcer masks it inside the optimizer step), so PyTorch's own clipping
    would count gradients that are never applied. This one scales every gradient (masked
    positions too, so rewirers see the same direction) by ``max_norm / norm`` when the
    masked norm exceeds ``max_norm``; returns that norm.

    Example:
        >>> layer = nn.Linear(2, 1, bias=False)
        >>> layer.register_buffer(MASK, torch.tensor([[True, False]]))
        >>> layer.weight.grad = torch.tensor([[3.0, 4.0]])
        >>> float(clip_grad_norm_(layer, 1.0)), layer.weight.grad.mul(3).round().tolist()
        (3.0, [[3.0, 4.0]])
    """
    masks = {id(_weight(m)): _mask(m) for m in masked_modules(model).values()}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    with torch.no_grad():
        seen = [
            g * masks[id(p)] if id(p) in masks else g
            for p in model.parameters()
            if (g := p.grad) is not None
        ]
        norms = torch.stack([torch.linalg.vector_norm(g, norm_type).float() for g in seen])
        total = torch.linalg.vector_norm(norms, norm_type)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total


def get_enforcer(model: nn.Module, optimizer: torch.optim.Optimizer) -> MaskEnforcer | None:
    """The :class:`MaskEnforcer` registered for ``(model, optimizer)``, if any.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> get_enforcer(m, torch.optim.SGD(m.parameters(), lr=0.1)) is None
        True
    """
    found: MaskEnforcer | None = optimizer.__dict__.get(_REGISTRY, {}).get(model)
    return found


def enforce(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Keep ``model``'s masks enforced after every step of ``optimizer``; apply them now.

    Registers the hook once per ``(model, optimizer)`` pair (later calls only re-apply).

    Example:
        >>> model = nn.Linear(4, 4)
        >>> opt = torch.optim.Adam(model.parameters())
        >>> from dynarch.masks import sparsify
        >>> _ = sparsify(model, 0.5)
        >>> enforce(model, opt)
    """
    check_optimizer(optimizer)
    registry = optimizer.__dict__.setdefault(_REGISTRY, weakref.WeakKeyDictionary())
    enforcer = registry.get(model)
    if enforcer is None:
        enforcer = registry[model] = MaskEnforcer(model, optimizer)
    enforcer.apply()
