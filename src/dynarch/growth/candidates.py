"""Growth candidates for the tournament: what each action adds, applied through the engine.

A :class:`Candidate` names one action (``"patch"``, ``"insert"``, ``"widen"``, ``"skip"``)
at one layer; :meth:`Candidate.apply` performs it with the engine op
(:func:`dynarch.growth.patches.add_patches`, :func:`dynarch.deepen` plus an optional
diagonal-keeping mask, :func:`dynarch.widen`, :func:`dynarch.growth.skip.add_skip`).
:func:`scratch_copy` makes the trial copies the tournament scores candidates on, and
:func:`active_params` counts what a change adds.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> trial = scratch_copy(net)
    >>> _ = Candidate("widen", "0", {"units": 2}).apply(trial)
    >>> active_params(trial)[0] - active_params(net)[0]
    14
"""

from __future__ import annotations

import copy
import glob
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .._engine import _ATTR, engine_state
from ..events import Event
from ..masks import MASK

__all__ = [
    "KINDS", "Candidate", "Economy", "active_params", "scratch_copy", "sparsify_inserted",
]  # fmt: skip

KINDS = ("patch", "insert", "widen", "skip")
_LAYERS = (nn.Linear, nn.Conv2d)


class Economy(Protocol):
    """What the tournament needs from a credit economy."""

    def can_afford(self, connections: int = 0, units: int = 0) -> bool: ...

    def spend(self, connections: int = 0, units: int = 0) -> float: ...


def active_params(model: nn.Module) -> tuple[int, int]:
    """``(active parameters, active weights of Linear/Conv2d)``; masked weights excluded.

    Example:
        >>> import torch.nn as nn
        >>> active_params(nn.Linear(3, 2))
        (8, 6)
    """
    total = sum(p.numel() for p in model.parameters())
    layers = [m for m in model.modules() if isinstance(m, _LAYERS)]
    weights = sum(m.weight.numel() for m in layers)
    masks = [mk for m in layers if (mk := m._buffers.get(MASK)) is not None]
    if masks:
        off = int(torch.stack([(~mk).sum() for mk in masks]).sum())  # one sync
        total, weights = total - off, weights - off
    return total, weights


def scratch_copy(model: nn.Module) -> nn.Module:
    """A deep copy for trial changes: no engine listeners (a trainer's event log is not
    written), the engine generator continuing from ``model``'s state (the copy makes the
    random choices ``model`` would make next). Forward hooks that are plain functions (e.g. a
    started :class:`dynarch.activity.Extrema`'s) are shared with the copy: stop such
    observers first (bound-method hooks, like a skip connection's, are copied with it).

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> scratch_copy(net)[0].weight.data_ptr() != net[0].weight.data_ptr()
        True
    """
    state = model.__dict__.pop(_ATTR, None)
    try:
        clone = copy.deepcopy(model)
    finally:
        if state is not None:
            model.__dict__[_ATTR] = state
    if state is not None:
        st = engine_state(clone)
        st.generator.set_state(state.generator.get_state())
        st.seed, st.step, st.version = state.seed, state.step, state.version
        st.base_spec = copy.deepcopy(state.base_spec)
        st.slots, st.wrapped = dict(state.slots), set(state.wrapped)
    return clone


@dataclass
class Candidate:
    """One proposed growth action and, once scored, its ΔMI and score.

    ``options`` are the op's arguments; ``params``/``connections``/``units`` are what applying
    it adds (active parameters, active weights, new units), measured on a trial copy.

    Example:
        >>> Candidate("widen", "fc1", {"units": 4}).name
        'widen:fc1'
    """

    kind: str
    target: str
    options: dict[str, Any] = field(default_factory=dict)
    params: int = 0
    connections: int = 0
    units: int = 0
    affordable: bool | None = None
    delta_mi: float | None = None
    score: float | None = None

    @property
    def name(self) -> str:
        """``"<kind>:<target>"`` (plus ``"-><to>"`` for a skip)."""
        to = self.options.get("to")
        return f"{self.kind}:{self.target}" + (f"->{to}" if to else "")

    def apply(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        reason: str = "tournament",
    ) -> list[Event]:
        """Apply this action to ``model`` through the engine; returns its event(s)."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown candidate kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        return _APPLY[self.kind](model, self, optimizer, reason)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (used in the tournament event's details)."""
        return {"name": self.name, **asdict(self)}


def _apply_widen(
    model: nn.Module, c: Candidate, opt: torch.optim.Optimizer | None, reason: str
) -> list[Event]:
    from ..remap import out_units
    from ..surgery import widen

    width = out_units(model.get_submodule(c.target)) + int(c.options["units"])
    init, noise = c.options.get("init", "net2net"), c.options.get("noise", 0.0)
    return [widen(model, c.target, width, optimizer=opt, init=init, noise=noise, reason=reason)]


def _apply_insert(
    model: nn.Module, c: Candidate, opt: torch.optim.Optimizer | None, reason: str
) -> list[Event]:
    from ..insert import deepen

    event = deepen(model, c.target, optimizer=opt, reason=reason)
    density = c.options.get("density")
    if density is None:
        return [event]
    return [event, sparsify_inserted(model, event, density, optimizer=opt, reason=reason)]


def _apply_patch(
    model: nn.Module, c: Candidate, opt: torch.optim.Optimizer | None, reason: str
) -> list[Event]:
    from .patches import add_patches

    units = {c.target: list(c.options["units"])}
    size = c.options.get("patch_size")
    kwargs = {} if size is None else {"patch_size": size}
    return [add_patches(model, units, optimizer=opt, reason=reason, **kwargs)]


def _apply_skip(
    model: nn.Module, c: Candidate, opt: torch.optim.Optimizer | None, reason: str
) -> list[Event]:
    from .skip import add_skip

    density = c.options.get("density")
    return [add_skip(model, c.target, c.options["to"], optimizer=opt, density=density,
                     reason=reason)]  # fmt: skip


_APPLY: dict[str, Callable[..., list[Event]]] = {
    "patch": _apply_patch, "insert": _apply_insert, "widen": _apply_widen, "skip": _apply_skip,
}  # fmt: skip


def sparsify_inserted(
    model: nn.Module,
    deepen_event: Event,
    density: float,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    reason: str = "",
) -> Event:
    """Mask the layer inserted by ``deepen_event`` (a :func:`dynarch.deepen` event) to
    ``density``, never below one weight per row: magnitude selection keeps the identity
    diagonal first, so the function is unchanged. One ``"sparsify"`` event (rebuilt by
    checkpoints).

    Example:
        >>> import torch.nn as nn, dynarch
        >>> from dynarch.masks import layer_density
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> ev = dynarch.deepen(net, "0")
        >>> _ = sparsify_inserted(net, ev, 0.25)
        >>> layer_density(net), bool(net[2].weight_mask.diagonal().all())
        ({'1_deep': 0.25}, True)
    """
    from ..masks import sparsify

    inserted = deepen_event.details.get("inserted") if deepen_event.op == "deepen" else None
    if not inserted:
        raise ValueError(f"expected the event of a dynarch.deepen, got {deepen_event.summary()!r}")
    if not (
        isinstance(density, int | float) and not isinstance(density, bool) and 0 < density <= 1
    ):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    name = inserted[0]
    weight = model.get_submodule(name).weight
    assert isinstance(weight, Tensor)
    floor = 1.0 / weight[0].numel()  # the diagonal: one weight per row
    return sparsify(
        model,
        min(1.0, max(float(density), floor)),
        distribution="uniform",
        include=[glob.escape(name)],
        optimizer=optimizer,
        reason=reason,
    )
