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

import torch
from torch import nn

from ._engine import engine_state, transaction
from .events import Event
from .graph import ChannelGroup, ModelGraph, UnsupportedModelError, analyse, resolve
from .optim import ParamChange, index_map, transplant

__all__ = ["INITS", "remap", "shrink", "widen"]

INITS = ("net2net", "zero", "random")
_LAYERS = (nn.Linear, nn.Conv2d)


def _width(module: nn.Module) -> int:
    return int(module.out_features if isinstance(module, nn.Linear) else module.out_channels)


def _group_for(model: nn.Module, target: str, op: str) -> tuple[ModelGraph, ChannelGroup, int]:
    resolve(model, target, _LAYERS)
    graph = analyse(model)
    group = graph.group(target)
    if group.problems:
        raise UnsupportedModelError(
            f"cannot {op} '{target}': " + "; ".join(group.problems)
            + f" (coupled layers: {group.producers})"
        )
    widths = {name: _width(graph.modules[name]) for name in group.producers}
    if len(set(widths.values())) != 1:
        raise UnsupportedModelError(f"cannot {op} '{target}': coupled layers differ in width {widths}")
    return graph, group, next(iter(widths.values()))


def _uniform(shape: Sequence[int], bound: float, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """U(-bound, bound) from the engine generator (torch's default Linear/Conv init range)."""
    return ((torch.rand(tuple(shape), generator=gen) * 2 - 1) * bound).to(like.device, like.dtype)


def _random_mask(shape: Sequence[int], density: float, dim: int, gen: torch.Generator) -> torch.Tensor:
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


def _set_param(module: nn.Module, name: str, value: torch.Tensor, changes: list[ParamChange],
               maps: dict[int, torch.Tensor]) -> None:  # fmt: skip
    old = getattr(module, name)
    new = nn.Parameter(value.detach(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    changes.append(ParamChange(old, new, maps))


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
    """Re-index one channel space (see module docstring); ``split`` divides consumer columns
    among copies (Net2Net), ``init`` says how new units start."""
    gen = engine_state(model).generator
    old_width = _width(graph.modules[group.producers[0]])
    state_index = torch.where(is_new, torch.full_like(index, -1), index)
    new_pos = is_new.nonzero().squeeze(1)
    any_new = new_pos.numel() > 0
    scale = None
    if split:
        counts = torch.bincount(index, minlength=old_width).to(torch.float64)
        scale = (1.0 / counts)[index]
    changes: list[ParamChange] = []
    roles: dict[str, dict[str, bool]] = {}
    for name in group.producers:
        roles.setdefault(name, {})["out"] = True
    for name, flat in group.consumers:
        roles.setdefault(name, {})["in" if not flat else "flat"] = True
    with torch.no_grad():
        for name, role in roles.items():
            mod = graph.modules[name]
            w = mod.weight
            w_maps: dict[int, torch.Tensor] = {}
            s_maps: dict[int, torch.Tensor] = {}
            new_w = w.detach()
            mask = getattr(mod, "weight_mask", None)
            new_mask = mask
            if role.get("out"):
                new_w = new_w.index_select(0, index.to(w.device))
                w_maps[0], s_maps[0] = index, state_index
                if any_new and init != "net2net":
                    fan_in = math.prod(w.shape[1:])
                    rows = _uniform((new_pos.numel(), *w.shape[1:]), 1 / math.sqrt(fan_in), w, gen)
                    new_w[new_pos] = rows
                elif any_new and noise > 0:
                    std = float(w.detach().std()) if w.numel() > 1 else 1.0
                    jitter = torch.randn((new_pos.numel(), *w.shape[1:]), generator=gen) * noise * std
                    new_w[new_pos] += jitter.to(w.device, w.dtype)
                if new_mask is not None:
                    new_mask = new_mask.index_select(0, index.to(w.device))
                    if any_new and init != "net2net":
                        density = float(mask.float().mean())
                        fresh = _random_mask((new_pos.numel(), *w.shape[1:]), density, 0, gen)
                        new_mask[new_pos] = fresh.to(w.device)
                if mod.bias is not None:
                    b = mod.bias.detach().index_select(0, index.to(w.device))
                    if any_new and init != "net2net":
                        fan_in = math.prod(w.shape[1:])
                        b[new_pos] = _uniform((new_pos.numel(),), 1 / math.sqrt(fan_in), b, gen)
                    _set_param(mod, "bias", b, changes, {0: state_index})
                if isinstance(mod, nn.Linear):
                    mod.out_features = index.numel()
                else:
                    mod.out_channels = index.numel()
            if role.get("in") or role.get("flat"):
                block = 1
                if role.get("flat"):
                    block = w.shape[1] // old_width
                cols = (index[:, None] * block + torch.arange(block)).reshape(-1)
                cols_state = (state_index[:, None] * block + torch.arange(block)).reshape(-1)
                cols_state[(state_index < 0).repeat_interleave(block)] = -1
                new_w = new_w.index_select(1, cols.to(w.device))
                w_maps[1], s_maps[1] = cols, cols_state
                col_new = (cols_state < 0).nonzero().squeeze(1)
                if scale is not None:
                    col_scale = scale.repeat_interleave(block).to(w.device, w.dtype)
                    new_w *= col_scale.view(1, -1, *([1] * (w.dim() - 2)))
                elif col_new.numel() and init == "zero":
                    new_w[:, col_new] = 0
                elif col_new.numel() and init == "random":
                    fan_in = math.prod(new_w.shape[1:])
                    vals = _uniform((w.shape[0], col_new.numel(), *w.shape[2:]), 1 / math.sqrt(fan_in), w, gen)
                    new_w[:, col_new] = vals
                if new_mask is not None:
                    new_mask = new_mask.index_select(1, cols.to(w.device))
                    if col_new.numel() and init != "net2net" and mask is not None:
                        density = float(mask.float().mean())
                        fresh = _random_mask((w.shape[0], col_new.numel(), *w.shape[2:]), density, 1, gen)
                        new_mask[:, col_new] = fresh.to(w.device)
                if isinstance(mod, nn.Linear):
                    mod.in_features = new_w.shape[1]
                else:
                    mod.in_channels = new_w.shape[1]
            if new_mask is not None:
                new_w = new_w * new_mask
                mod.weight_mask = new_mask
            _set_param(mod, "weight", new_w, changes, s_maps)
        for name in group.norms:
            _remap_norm(graph.modules[name], group.norm_dims[name], index, state_index, new_pos,
                        init, changes)  # fmt: skip
    transplant(optimizer, changes)


def _remap_norm(mod: nn.Module, dim: int, index: torch.Tensor, state_index: torch.Tensor,
                new_pos: torch.Tensor, init: str, changes: list[ParamChange]) -> None:  # fmt: skip
    fresh = new_pos.numel() > 0 and init != "net2net"
    defaults = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
    for attr, default in defaults.items():
        t = getattr(mod, attr, None)
        if t is None:
            continue
        new = t.detach().index_select(dim, index.to(t.device))
        if fresh:
            new.index_fill_(dim, new_pos.to(t.device), default)
        if isinstance(t, nn.Parameter):
            _set_param(mod, attr, new, changes, {dim: state_index})
        else:
            setattr(mod, attr, new)
    if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
        mod.num_features = index.numel()
    elif isinstance(mod, nn.LayerNorm):
        shape = list(mod.normalized_shape)
        shape[dim] = index.numel()
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
    sources = torch.randint(0, old, (extra,), generator=gen) if init == "net2net" else torch.zeros(extra, dtype=torch.long)
    index = torch.cat([torch.arange(old), sources])
    is_new = torch.cat([torch.zeros(old, dtype=torch.bool), torch.ones(extra, dtype=torch.bool)])
    with transaction(model, "widen", target, reason=reason, record=record) as tx:
        remap(model, graph, group, index, is_new, init=init, noise=float(noise),
              split=init == "net2net", optimizer=optimizer)  # fmt: skip
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
    if idx.dim() != 1 or idx.numel() == 0 or idx.dtype in (torch.float16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"keep must be a non-empty 1-D tensor of unit indices, got {idx.dtype} of shape {tuple(idx.shape)}")
    idx = idx.long().cpu()
    if int(idx.min()) < 0 or int(idx.max()) >= old:
        raise ValueError(f"keep holds indices outside [0, {old}) for '{target}' (min {int(idx.min())}, max {int(idx.max())})")
    idx = torch.unique(idx)
    if idx.numel() != torch.as_tensor(keep).numel():
        raise ValueError(f"keep holds duplicate indices for '{target}'")
    _check_blocks(graph, group, old, target)
    with transaction(model, "shrink", target, reason=reason, record=record) as tx:
        remap(model, graph, group, idx, torch.zeros(idx.numel(), dtype=torch.bool), init="net2net",
              noise=0.0, split=False, optimizer=optimizer)  # fmt: skip
        tx.details = _details(group, old, idx.numel())
        tx.replay = {"target": target, "width": idx.numel()}
    assert tx.event is not None
    return tx.event


def _check_blocks(graph: ModelGraph, group: ChannelGroup, old: int, target: str) -> None:
    for name, flat in group.consumers:
        cols = graph.modules[name].weight.shape[1]
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

