"""Re-index one channel space everywhere it is indexed (the core of widen and shrink).

Given, for every new unit, the old unit it comes from (``index``) and whether it is new
(``is_new``), :func:`remap` rewrites every producer's rows, every norm's entries, every
consumer's input columns (a block per channel after ``Flatten``), the masks of sparse
layers, and the optimizer state. Modules are changed in place (same objects, same names);
their parameters become new tensors that take the old ones' place in the optimizer.

A ``weight_patch`` buffer (positions turned on by growth, :mod:`dynarch.growth.connect`) is
re-indexed like the mask: copies keep their source's flags, fresh units start unflagged.
Modules that read or write a space without being visible to the traced graph (skip
projections of :mod:`dynarch.growth.skip`, run by forward hooks) are found through
:func:`register_remap_extra`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._engine import engine_state
from .graph import ChannelGroup, ModelGraph
from .optim import ParamChange, transplant

__all__ = ["out_units", "register_remap_extra", "remap", "resized_modules"]

PATCH = "weight_patch"
RemapExtra = Callable[[nn.Module, ModelGraph, ChannelGroup], dict[str, set[str]]]
_EXTRAS: list[RemapExtra] = []


def register_remap_extra(fn: RemapExtra) -> RemapExtra:
    """Register ``fn(model, graph, group) -> {module name: roles}`` naming extra Linear/Conv2d
    modules that a re-indexing of ``group`` must also rewrite: role ``"out"`` (their output
    rows are units of the space) and/or ``"in"`` (their input columns are). Decorator;
    registering the same function twice keeps one.

    Example:
        >>> fn = register_remap_extra(lambda model, graph, group: {})
        >>> _EXTRAS.remove(fn)
    """
    if fn not in _EXTRAS:
        _EXTRAS.append(fn)
    return fn


def out_units(module: nn.Module) -> int:
    """Number of output units of a Linear/Conv2d."""
    assert isinstance(module, nn.Linear | nn.Conv2d)
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _uniform(
    shape: Sequence[int], fan_in: int, like: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) from the engine generator (torch's default init)."""
    bound = 1 / math.sqrt(max(fan_in, 1))
    return ((torch.rand(tuple(shape), generator=gen) * 2 - 1) * bound).to(like.device, like.dtype)


def _random_mask(
    shape: Sequence[int], density: float, dim: int, gen: torch.Generator
) -> torch.Tensor:
    """Mask rows/cols for new units: exactly round(density * slice size) active per slice."""
    shape = tuple(shape)
    moved = (shape[dim], math.prod(shape) // shape[dim])
    k = max(1, round(density * moved[1]))
    keys = torch.rand(moved, generator=gen)
    mask = torch.zeros(moved, dtype=torch.bool)
    mask.scatter_(1, keys.topk(k, dim=1).indices, True)
    perm = [*range(1, len(shape))]
    perm.insert(dim, 0)
    rest = [s for i, s in enumerate(shape) if i != dim]
    return mask.view(shape[dim], *rest).permute(*perm).contiguous()


class _Staged:
    """Attribute assignments and parameter changes, applied together once all are computed
    (an error while computing them leaves the model untouched)."""

    def __init__(self) -> None:
        self.sets: list[tuple[nn.Module, str, object]] = []
        self.changes: list[ParamChange] = []

    def set(self, module: nn.Module, name: str, value: object) -> None:
        self.sets.append((module, name, value))

    def param(
        self, module: nn.Module, name: str, value: torch.Tensor, maps: dict[int, torch.Tensor]
    ) -> None:
        old = getattr(module, name)
        new = nn.Parameter(value.detach(), requires_grad=old.requires_grad)
        self.set(module, name, new)
        self.changes.append(ParamChange(old, new, maps))

    def apply(self) -> None:
        for module, name, value in self.sets:
            setattr(module, name, value)


@dataclass
class _Plan:
    """One re-indexing of a channel space (see :func:`remap`)."""

    index: torch.Tensor  # old unit per new unit
    state_index: torch.Tensor  # same, -1 for new units (optimizer state starts at zero)
    new_pos: torch.Tensor  # positions of new units
    init: str
    noise: float
    scale: torch.Tensor | None  # Net2Net split factor per new unit
    gen: torch.Generator

    @property
    def fresh(self) -> bool:
        """New units start from an init of their own (not copies)."""
        return self.new_pos.numel() > 0 and self.init != "net2net"


def _rows(
    layer: nn.Linear | nn.Conv2d,
    plan: _Plan,
    w: torch.Tensor,
    mask: torch.Tensor | None,
    staged: _Staged,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-index output units: rows of weight, mask and bias."""
    index, new_pos = plan.index.to(w.device), plan.new_pos.to(w.device)
    tail = tuple(w.shape[1:])
    fan_in = math.prod(tail)
    w = w.index_select(0, index)
    if plan.fresh:
        w[new_pos] = _uniform((new_pos.numel(), *tail), fan_in, w, plan.gen)
    elif new_pos.numel() and plan.noise > 0:
        jitter = torch.randn((new_pos.numel(), *tail), generator=plan.gen).to(w.device, w.dtype)
        w[new_pos] += jitter * (plan.noise * w.std())
    if mask is not None:
        density = float(mask.float().mean())
        mask = mask.index_select(0, index)
        if plan.fresh:
            mask[new_pos] = _random_mask((new_pos.numel(), *tail), density, 0, plan.gen).to(
                w.device
            )
    if layer.bias is not None:
        b = layer.bias.detach().index_select(0, index)
        if plan.fresh:
            b[new_pos] = _uniform((new_pos.numel(),), fan_in, b, plan.gen)
        staged.param(layer, "bias", b, {0: plan.state_index})
    staged.set(layer, "out_features" if isinstance(layer, nn.Linear) else "out_channels", len(w))
    return w, mask


def _cols(
    layer: nn.Linear | nn.Conv2d,
    plan: _Plan,
    w: torch.Tensor,
    mask: torch.Tensor | None,
    block: int,
    staged: _Staged,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Re-index input units (a block of ``block`` columns each): returns weight, mask, state map."""
    offsets = torch.arange(block)
    cols = (plan.index[:, None] * block + offsets).reshape(-1)
    cols_state = (plan.state_index[:, None] * block + offsets).reshape(-1)
    cols_state[(plan.state_index < 0).repeat_interleave(block)] = -1
    w = w.index_select(1, cols.to(w.device))
    new_cols = (cols_state < 0).nonzero().squeeze(1).to(w.device)
    if plan.scale is not None:
        col_scale = plan.scale.repeat_interleave(block).to(w.device, w.dtype)
        w *= col_scale.view(1, -1, *([1] * (w.dim() - 2)))
    elif new_cols.numel() and plan.init == "zero":
        w[:, new_cols] = 0
    elif new_cols.numel() and plan.init == "random":
        shape = (w.shape[0], new_cols.numel(), *w.shape[2:])
        w[:, new_cols] = _uniform(shape, math.prod(w.shape[1:]), w, plan.gen)
    if mask is not None:
        density = float(mask.float().mean())
        mask = mask.index_select(1, cols.to(w.device))
        if new_cols.numel() and plan.init != "net2net":
            shape = (w.shape[0], new_cols.numel(), *w.shape[2:])
            mask[:, new_cols] = _random_mask(shape, density, 1, plan.gen).to(w.device)
    staged.set(layer, "in_features" if isinstance(layer, nn.Linear) else "in_channels", w.shape[1])
    return w, mask, cols_state


def remap(
    model: nn.Module,
    graph: ModelGraph,
    group: ChannelGroup,
    index: torch.Tensor,
    is_new: torch.Tensor,
    *,
    init: str,
    noise: float,
    split: bool,
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Re-index one channel space everywhere it is indexed.

    ``index[j]`` is the old unit that new unit ``j`` comes from; ``is_new[j]`` flags units
    that did not exist (their optimizer state starts at zero). ``split`` divides consumer
    columns among a unit and its copies (Net2Net); ``init`` says how new units start.
    """
    old_width = out_units(graph.modules[group.producers[0]])
    scale = None
    if split:
        counts = torch.bincount(index, minlength=old_width).to(torch.float64)
        scale = (1.0 / counts)[index]
    plan = _Plan(
        index=index,
        state_index=torch.where(is_new, torch.full_like(index, -1), index),
        new_pos=is_new.nonzero().squeeze(1),
        init=init,
        noise=noise,
        scale=scale,
        gen=engine_state(model).generator,
    )
    staged = _Staged()
    with torch.no_grad():
        for name, role in _roles(model, graph, group).items():
            layer = graph.modules[name]
            assert isinstance(layer, nn.Linear | nn.Conv2d)
            w = layer.weight.detach()
            mask = layer._buffers.get("weight_mask")
            patch = layer._buffers.get(PATCH)
            maps: dict[int, torch.Tensor] = {}
            if "out" in role:
                w, mask = _rows(layer, plan, w, mask, staged)
                maps[0] = plan.state_index
                patch = _patch_rows(patch, plan)
            if role & {"in", "flat"}:
                block = w.shape[1] // old_width if "flat" in role else 1
                patch = _patch_cols(patch, plan, block)
                w, mask, maps[1] = _cols(layer, plan, w, mask, block, staged)
            if patch is not None:
                staged.set(layer, PATCH, patch)
            if mask is not None:
                w = w * mask
                staged.set(layer, "weight_mask", mask)
            staged.param(layer, "weight", w, maps)
        for name in group.norms:
            _remap_norm(graph.modules[name], group.norm_dims[name], plan, staged)
    staged.apply()
    transplant(optimizer, staged.changes)


def _roles(model: nn.Module, graph: ModelGraph, group: ChannelGroup) -> dict[str, set[str]]:
    """Linear/Conv2d names -> how a re-indexing of ``group`` touches them (out/in/flat)."""
    roles: dict[str, set[str]] = {}
    for name in group.producers:
        roles.setdefault(name, set()).add("out")
    for name, flat in group.consumers:
        roles.setdefault(name, set()).add("flat" if flat else "in")
    for extra in _EXTRAS:
        for name, role in extra(model, graph, group).items():
            roles.setdefault(name, set()).update(role)
    return roles


def resized_modules(
    model: nn.Module, graph: ModelGraph, group: ChannelGroup
) -> dict[str, nn.Module]:
    """Every module whose parameters a re-indexing of ``group`` replaces (layers, then norms).

    Example:
        >>> from dynarch.graph import analyse
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
        >>> graph = analyse(net)
        >>> list(resized_modules(net, graph, graph.group("0")))
        ['0', '2', '1']
    """
    names = [*_roles(model, graph, group), *group.norms]
    return {name: graph.modules[name] for name in names}


def _patch_rows(patch: torch.Tensor | None, plan: _Plan) -> torch.Tensor | None:
    """Re-index the output rows of a ``weight_patch`` (fresh units: unflagged)."""
    if patch is None:
        return None
    patch = patch.index_select(0, plan.index.to(patch.device))
    if plan.fresh:
        patch[plan.new_pos.to(patch.device)] = False
    return patch


def _patch_cols(patch: torch.Tensor | None, plan: _Plan, block: int) -> torch.Tensor | None:
    """Re-index the input columns of a ``weight_patch`` (fresh units: unflagged)."""
    if patch is None:
        return None
    offsets = torch.arange(block)
    cols = (plan.index[:, None] * block + offsets).reshape(-1).to(patch.device)
    patch = patch.index_select(1, cols)
    if plan.fresh:
        new = (plan.new_pos[:, None] * block + offsets).reshape(-1).to(patch.device)
        patch[:, new] = False
    return patch


def _remap_norm(mod: nn.Module, dim: int, plan: _Plan, staged: _Staged) -> None:
    defaults = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
    for attr, default in defaults.items():
        t = getattr(mod, attr, None)
        if not isinstance(t, torch.Tensor):
            continue
        new = t.detach().index_select(dim, plan.index.to(t.device))
        if plan.fresh:
            new.index_fill_(dim, plan.new_pos.to(t.device), default)
        if isinstance(t, nn.Parameter):
            staged.param(mod, attr, new, {dim: plan.state_index})
        else:
            staged.set(mod, attr, new)
    if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
        staged.set(mod, "num_features", plan.index.numel())
    elif isinstance(mod, nn.LayerNorm):
        shape = list(mod.normalized_shape)
        shape[dim] = plan.index.numel()
        staged.set(mod, "normalized_shape", tuple(shape))
