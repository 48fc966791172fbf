"""Carry optimizer state through structural changes, generically for any ``torch.optim``.

A structural op replaces a parameter by a new one whose dimensions are *index-mapped*
from the old one: for each changed dimension an index tensor gives, for every new
position, the old position it comes from, or ``-1`` for a new unit. :func:`transplant`
then, for every optimizer that holds the old parameter:

* puts the new parameter at the old one's place in its param group (hyperparameters and
  therefore LR schedulers are untouched);
* maps every state tensor shaped like the old parameter (SGD ``momentum_buffer``, Adam
  ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, RMSprop ``square_avg``, Adagrad ``sum``…)
  with the same indices; new units get the value a fresh parameter starts from (zero, but
  the group's ``lr`` for Rprop's ``step_size`` and ``initial_accumulator_value`` for
  Adagrad's ``sum``);
* copies scalar state (``step``) unchanged;
* resets, with a warning, state it cannot map (e.g. L-BFGS's flat history over all
  parameters, which is reset whenever any of its parameters changes, appears or goes).

Parameters that disappear are removed from groups and state; brand-new parameters join the
group of an *anchor* parameter, right after it, so a single-group optimizer keeps the
model's parameter order.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ParamChange", "index_map", "transplant"]


@dataclass
class ParamChange:
    """``old`` becomes ``new``; ``maps[dim]`` = old index per new position (-1: new)."""

    old: torch.Tensor
    new: torch.Tensor
    maps: dict[int, torch.Tensor] = field(default_factory=dict)


def index_map(
    tensor: torch.Tensor, maps: dict[int, torch.Tensor], fill: float = 0.0
) -> torch.Tensor:
    """Gather ``tensor`` along each mapped dim; positions mapped from ``-1`` get ``fill``.

    Example:
        >>> index_map(torch.tensor([1., 2., 3.]), {0: torch.tensor([2, 0, -1])})
        tensor([3., 1., 0.])
    """
    out = tensor
    for dim, idx in maps.items():
        idx = idx.to(tensor.device)
        new = idx < 0
        out = out.index_select(dim, idx.clamp(min=0))
        if bool(new.any()):
            out.index_fill_(dim, new.nonzero().squeeze(1), fill)
    return out if out is not tensor else tensor.clone()


def _locate(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[int, int] | None:
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if p is param:
                return gi, pi
    return None


def _fills(optimizer: torch.optim.Optimizer, group: dict) -> dict[str, float]:
    """Per-element state whose fresh value (a new unit's) is not zero."""
    if isinstance(optimizer, torch.optim.Rprop):
        return {"step_size": float(group["lr"])}
    if isinstance(optimizer, torch.optim.Adagrad):
        return {"sum": float(group["initial_accumulator_value"])}
    return {}


def _map_state(
    old: torch.Tensor,
    new: torch.Tensor,
    state: dict,
    maps: dict[int, torch.Tensor],
    fills: dict[str, float],
) -> dict:
    mapped: dict = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == old.shape and value.dim() > 0:
            mapped[key] = index_map(value, maps, fills.get(key, 0.0))
        elif (isinstance(value, torch.Tensor) and value.numel() <= 1) or isinstance(
            value, int | float | bool | type(None)
        ):
            mapped[key] = value
        else:
            warnings.warn(
                f"optimizer state '{key}' of a changed parameter ({type(value).__name__}) "
                "cannot be "
                "index-mapped; the parameter's optimizer state was reset",
                stacklevel=4,
            )
            return {}
    return mapped


def transplant(
    optimizer: torch.optim.Optimizer | None,
    changes: Iterable[ParamChange] = (),
    *,
    added: Iterable[tuple[nn.Parameter, torch.Tensor | None]] = (),
    removed: Iterable[torch.Tensor] = (),
) -> None:
    """Apply parameter ``changes`` (and additions/removals) to ``optimizer``'s groups and state.

    ``added`` holds ``(new_param, anchor)``: the new parameter joins the group of ``anchor``
    right after it (group 0, at the end, when the anchor is ``None`` or not optimised).

    Example:
        >>> old = nn.Parameter(torch.ones(2)); opt = torch.optim.SGD([old], lr=0.1, momentum=0.9)
        >>> old.grad = torch.ones(2); opt.step()
        >>> new = nn.Parameter(torch.ones(3))
        >>> transplant(opt, [ParamChange(old, new, {0: torch.tensor([0, 1, -1])})])
        >>> opt.state[new]["momentum_buffer"]
        tensor([1., 1., 0.])
    """
    if optimizer is None:
        return
    flat = isinstance(optimizer, torch.optim.LBFGS)
    had_state = any(optimizer.state.values())
    touched = False
    for ch in changes:
        where = _locate(optimizer, ch.old)
        if where is None:
            continue  # this optimizer does not train that parameter
        touched = True
        gi, pi = where
        optimizer.param_groups[gi]["params"][pi] = ch.new
        state = optimizer.state.pop(ch.old, None)
        if state and not flat:
            fills = _fills(optimizer, optimizer.param_groups[gi])
            mapped = _map_state(ch.old, ch.new, state, ch.maps, fills)
            if mapped:
                optimizer.state[ch.new] = mapped
    for param in removed:
        where = _locate(optimizer, param)
        if where is not None:
            touched = True
            del optimizer.param_groups[where[0]]["params"][where[1]]
        optimizer.state.pop(param, None)
    for param, anchor in added:
        touched = True
        where = _locate(optimizer, anchor) if anchor is not None else None
        if where is None:
            optimizer.param_groups[0]["params"].append(param)
            continue
        gi, pi = where
        optimizer.param_groups[gi]["params"].insert(pi + 1, param)
    if isinstance(optimizer, torch.optim.LBFGS) and touched:
        _reset_lbfgs(optimizer, had_state)


def _reset_lbfgs(optimizer: torch.optim.LBFGS, had_state: bool) -> None:
    """L-BFGS keeps one flat history over all its parameters (and caches their total size):
    any change of its parameters invalidates both."""
    if had_state:
        warnings.warn(
            "L-BFGS keeps a flat history over all its parameters, which cannot be index-mapped; "
            "its optimizer state was reset",
            stacklevel=4,
        )
    optimizer.state.clear()
    optimizer._params = optimizer.param_groups[0]["params"]
    optimizer._numel_cache = None


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise if ``optimizer`` holds a parameter twice or one that ``model`` no longer has."""
    live = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) in seen:
                raise RuntimeError(
                    f"param group {gi} holds a parameter twice (shape {tuple(p.shape)})"
                )
            if id(p) not in live:
                raise RuntimeError(
                    f"param group {gi} holds a dead parameter (shape {tuple(p.shape)})"
                )
            seen.add(id(p))
    for p in optimizer.state:
        if id(p) not in seen:
            raise RuntimeError(
                f"optimizer state refers to a parameter not in any group {tuple(p.shape)}"
            )
