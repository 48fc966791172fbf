"""Widen and shrink layers: one remapping of a channel space, applied everywhere it is indexed.

Both ops build an index over the *new* units of a channel space (for each new unit, the
old unit it comes from; new units are flagged) and hand it to :func:`remap`, which rewrites
every producer's rows, every norm's entries, every consumer's input columns (a block per
channel after ``Flatten``), the masks of sparse layers, and the optimizer state, in one
transaction. Modules are changed in place (same objects, same names); their parameters are
new tensors that take the old ones' place in the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._engine import engine_state, transaction
from .events import Event
from .graph import ChannelGroup, ModelGraph, UnsupportedModelError, analyse, resolve
from .optim import ParamChange, transplant

__all__ = ["INITS", "remap", "shrink", "widen"]

INITS = ("net2net", "zero", "random")
_LAYERS = (nn.Linear, nn.Conv2d)


def _width(module: nn.Module) -> int:
    assert isinstance(module, nn.Linear | nn.Conv2d)
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _group_for(model: nn.Module, target: str, op: str) -> tuple[ModelGraph, ChannelGroup, int]:
    resolve(model, target, _LAYERS)
    graph = analyse(model)
    group = graph.group(target)
    if group.problems:
        raise UnsupportedModelError(
            f"cannot {op} '{target}': "
            + "; ".join(group.problems)
            + f" (coupled layers: {group.producers})"
        )
    widths = {name: _width(graph.modules[name]) for name in group.producers}
    if len(set(widths.values())) != 1:
        raise UnsupportedModelError(
            f"cannot {op} '{target}': coupled layers differ in width {widths}"
        )
    return graph, group, next(iter(widths.values()))


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


def _set_param(
    module: nn.Module,
    name: str,
    value: torch.Tensor,
    changes: list[ParamChange],
    maps: dict[int, torch.Tensor],
) -> None:
    old = getattr(module, name)
    new = nn.Parameter(value.detach(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    changes.append(ParamChange(old, new, maps))


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
    changes: list[ParamChange],
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
        _set_param(layer, "bias", b, changes, {0: plan.state_index})
    if isinstance(layer, nn.Linear):
        layer.out_features = index.numel()
    else:
        layer.out_channels = index.numel()
    return w, mask


def _cols(
    layer: nn.Linear | nn.Conv2d,
    plan: _Plan,
    w: torch.Tensor,
    mask: torch.Tensor | None,
    block: int,
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
    if isinstance(layer, nn.Linear):
        layer.in_features = w.shape[1]
    else:
        layer.in_channels = w.shape[1]
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
    old_width = _width(graph.modules[group.producers[0]])
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
    roles: dict[str, set[str]] = {}
    for name in group.producers:
        roles.setdefault(name, set()).add("out")
    for name, flat in group.consumers:
        roles.setdefault(name, set()).add("flat" if flat else "in")
    changes: list[ParamChange] = []
    with torch.no_grad():
        for name, role in roles.items():
            layer = graph.modules[name]
            assert isinstance(layer, nn.Linear | nn.Conv2d)
            w = layer.weight.detach()
            mask = layer._buffers.get("weight_mask")
            maps: dict[int, torch.Tensor] = {}
            if "out" in role:
                w, mask = _rows(layer, plan, w, mask, changes)
                maps[0] = plan.state_index
            if role & {"in", "flat"}:
                block = w.shape[1] // old_width if "flat" in role else 1
                w, mask, maps[1] = _cols(layer, plan, w, mask, block)
            if mask is not None:
                w = w * mask
                layer.weight_mask = mask
            _set_param(layer, "weight", w, changes, maps)
        for name in group.norms:
            _remap_norm(graph.modules[name], group.norm_dims[name], plan, changes)
    transplant(optimizer, changes)


def _remap_norm(mod: nn.Module, dim: int, plan: _Plan, changes: list[ParamChange]) -> None:
    defaults = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
    for attr, default in defaults.items():
        t = getattr(mod, attr, None)
        if not isinstance(t, torch.Tensor):
            continue
        new = t.detach().index_select(dim, plan.index.to(t.device))
        if plan.fresh:
            new.index_fill_(dim, plan.new_pos.to(t.device), default)
        if isinstance(t, nn.Parameter):
            _set_param(mod, attr, new, changes, {dim: plan.state_index})
        else:
            setattr(mod, attr, new)
    if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
        mod.num_features = plan.index.numel()
    elif isinstance(mod, nn.LayerNorm):
        shape = list(mod.normalized_shape)
        shape[dim] = plan.index.numel()
        mod.normalized_shape = tuple(shape)


def widen(
    model: nn.Module,
    target: str,
    width: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    init: str = "net2net",
    noise: float = 0.0,
    reason: str = "",
    record: bool = True,
) -> Event:
    """Give the ``Linear``/``Conv2d`` called ``target`` ``width`` output units.

    Every consumer of that output is updated: the next Linear/Conv inputs, BatchNorm
    parameters and running statistics, ``Flatten``→``Linear`` blocks, and every layer whose
    output is added to it through a residual connection (they widen together).

    ``init``:
        * ``"net2net"`` — each new unit copies a random existing one (engine generator) and
          the consumers' input weights of a unit and its copies are divided among them, so
          the function is unchanged (exactly when ``noise == 0``; ``noise`` adds Gaussian noise
          of ``noise × std(weight)`` to the copies' incoming weights to break symmetry).
        * ``"zero"`` — new units get default-random incoming weights and zero outgoing
          weights: the function is unchanged.
        * ``"random"`` — new units get default-random incoming *and outgoing* weights: this
          **changes the function** (use it when you want fresh capacity, not preservation).

    A LayerNorm normalising over the widened units cannot keep the function (its mean and
    variance change), so ``"net2net"`` and ``"zero"`` are refused there; use ``"random"``.
    The optimizer state of kept units is kept, that of new units is zero.

    Example:
        >>> import torch, torch.nn as nn, dynarch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(3, 4); before = model(x)
        >>> event = dynarch.widen(model, "0", 12)
        >>> model[0].out_features, model[2].in_features
        (12, 12)
        >>> bool((model(x) - before).abs().max() < 1e-5)
        True
    """
    if init not in INITS:
        raise ValueError(f"unknown init '{init}' for widen; allowed: {', '.join(INITS)}")
    if not isinstance(noise, int | float) or noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    graph, group, old = _group_for(model, target, "widen")
    if not isinstance(width, int) or isinstance(width, bool) or width <= old:
        raise ValueError(
            f"new width of '{target}' must be an int greater than its current width {old}, "
            f"got {width!r} (use dynarch.shrink to remove units)"
        )
    if group.layernorm_over_channels and init != "random":
        ln = group.layernorm_over_channels[0]
        raise UnsupportedModelError(
            f"cannot widen '{target}' with init='{init}': LayerNorm '{ln}' normalises over the "
            "widened units, so its mean and variance change and the function cannot be preserved "
            "exactly; use init='random' to accept the change"
        )
    _check_blocks(graph, group, old, target)
    gen = engine_state(model).generator
    extra = width - old
    sources = (
        torch.randint(0, old, (extra,), generator=gen)
        if init == "net2net"
        else torch.zeros(extra, dtype=torch.long)
    )
    index = torch.cat([torch.arange(old), sources])
    is_new = torch.cat([torch.zeros(old, dtype=torch.bool), torch.ones(extra, dtype=torch.bool)])
    with transaction(model, "widen", target, reason=reason, record=record) as tx:
        remap(
            model,
            graph,
            group,
            index,
            is_new,
            init=init,
            noise=float(noise),
            split=init == "net2net",
            optimizer=optimizer,
        )
        tx.details = _details(group, old, width) | {"init": init, "noise": float(noise)}
        tx.replay = {"target": target, "width": width}
    assert tx.event is not None
    return tx.event


def shrink(
    model: nn.Module,
    target: str,
    keep: torch.Tensor | Sequence[int],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    reason: str = "",
    record: bool = True,
) -> Event:
    """Physically remove the output units of ``target`` not listed in ``keep``.

    ``keep`` holds the indices of the units to keep (any order; kept in ascending order).
    Every consumer loses the matching inputs, coupled layers lose the same units. The
    function changes unless the removed units contributed nothing (e.g. zero outgoing
    weights).

    Example:
        >>> import torch, torch.nn as nn, dynarch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = dynarch.shrink(model, "0", torch.tensor([0, 2, 5]))
        >>> model[0].out_features, model[2].in_features
        (3, 3)
    """
    graph, group, old = _group_for(model, target, "shrink")
    idx = torch.as_tensor(keep)
    if (
        idx.dim() != 1
        or idx.numel() == 0
        or idx.dtype in (torch.float16, torch.float32, torch.float64, torch.bool)
    ):
        raise ValueError(
            "keep must be a non-empty 1-D tensor of unit indices, "
            f"got {idx.dtype} of shape {tuple(idx.shape)}"
        )
    idx = idx.long().cpu()
    if int(idx.min()) < 0 or int(idx.max()) >= old:
        raise ValueError(
            f"keep holds indices outside [0, {old}) for '{target}' "
            f"(min {int(idx.min())}, max {int(idx.max())})"
        )
    idx = torch.unique(idx)
    if idx.numel() != torch.as_tensor(keep).numel():
        raise ValueError(f"keep holds duplicate indices for '{target}'")
    _check_blocks(graph, group, old, target)
    with transaction(model, "shrink", target, reason=reason, record=record) as tx:
        remap(
            model,
            graph,
            group,
            idx,
            torch.zeros(idx.numel(), dtype=torch.bool),
            init="net2net",
            noise=0.0,
            split=False,
            optimizer=optimizer,
        )
        tx.details = _details(group, old, idx.numel())
        tx.replay = {"target": target, "width": idx.numel()}
    assert tx.event is not None
    return tx.event


def _check_blocks(graph: ModelGraph, group: ChannelGroup, old: int, target: str) -> None:
    for name, flat in group.consumers:
        layer = graph.modules[name]
        assert isinstance(layer, nn.Linear | nn.Conv2d)
        cols = layer.weight.shape[1]
        if flat and cols % old:
            raise UnsupportedModelError(
                f"cannot change '{target}': '{name}' takes {cols} flattened inputs, not a multiple "
                f"of the {old} channels"
            )
        if not flat and cols != old:  # e.g. a flatten that folds a sequence axis into features
            raise UnsupportedModelError(
                f"cannot change '{target}': '{name}' takes {cols} inputs, not the {old} units of "
                f"'{target}' (they were reshaped on the way)"
            )


def _details(group: ChannelGroup, old: int, new: int) -> dict:
    return {
        "old_width": old,
        "new_width": new,
        "producers": list(group.producers),
        "consumers": [name for name, _ in group.consumers],
        "norms": list(group.norms),
    }


def replay_resize(model: nn.Module, args: dict) -> None:
    """Rebuild the structure of a recorded widen/shrink (values come from the checkpoint)."""
    mod = resolve(model, args["target"], _LAYERS)
    width = int(args["width"])
    if width > _width(mod):
        widen(model, args["target"], width, init="zero", record=False)
    elif width < _width(mod):
        shrink(model, args["target"], torch.arange(width), record=False)
