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
from .remap import out_units, remap, resized_modules

__all__ = ["INITS", "shrink", "widen"]

INITS = ("net2net", "zero", "random")
_LAYERS = (nn.Linear, nn.Conv2d)


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
    widths = {name: out_units(graph.modules[name]) for name in group.producers}
    if len(set(widths.values())) != 1:
        raise UnsupportedModelError(
            f"cannot {op} '{target}': coupled layers differ in width {widths}"
        )
    _check_params(model, resized_modules(model, graph, group), op, target)
    return graph, group, next(iter(widths.values()))


def _check_params(model: nn.Module, modules: dict[str, nn.Module], op: str, target: str) -> None:
    """Refuse, before anything changes, modules whose parameters cannot be replaced one by one:
    weights computed from other parameters (parametrizations, ``torch.nn.utils.prune``), lazy
    weights, and parameters shared with another module (tied weights)."""
    from torch.nn.utils import parametrize

    owners: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for name, mod in model.named_modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((name, attr, mod))
    for name, mod in modules.items():
        if parametrize.is_parametrized(mod):
            computed = list(getattr(mod, "parametrizations", {}))
        else:  # torch.nn.utils.prune and the old weight_norm: a plain tensor set by a hook
            computed = [
                a
                for a in ("weight", "bias")
                if a not in mod._parameters and isinstance(getattr(mod, a, None), torch.Tensor)
            ]
        if computed:
            what = computed[0]
            raise UnsupportedModelError(
                f"cannot {op} '{target}': '{name}' computes its {what} from other parameters (a "
                "parametrization such as weight_norm or spectral_norm, or torch.nn.utils.prune), "
                "so it cannot be resized; remove it first (torch.nn.utils.parametrize."
                "remove_parametrizations or torch.nn.utils.prune.remove)"
            )
        for attr, p in mod._parameters.items():
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise UnsupportedModelError(
                    f"cannot {op} '{target}': '{name}' has an uninitialised (lazy) {attr}; run "
                    "one forward pass first"
                )
            other = next((o for o in owners.get(id(p), []) if o[2] is not mod), None)
            if p is not None and other is not None:
                where = f"{other[0]}.{other[1]}" if other[0] else f"model.{other[1]}"
                raise UnsupportedModelError(
                    f"cannot {op} '{target}': layers '{name}' and '{other[0] or 'the model'}' "
                    f"share one {attr} tensor (tied weights), and resizing one would untie them; "
                    f"untie them first ({where} = nn.Parameter({name}.{attr}.detach().clone())) "
                    "or change another layer"
                )


def widen(
    model: nn.Module,
    target: str,
    width: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    init: str = "net2net",
    noise: float = 0.0,
    sources: torch.Tensor | Sequence[int] | None = None,
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
          ``sources`` (``width - current`` unit indices, repeats allowed) names the unit each
          new unit copies instead (vertical cloning of chosen units).
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
    if sources is not None:
        copied = _check_sources(sources, init, extra, old, target)
    elif init == "net2net":
        copied = torch.randint(0, old, (extra,), generator=gen)
    else:
        copied = torch.zeros(extra, dtype=torch.long)
    index = torch.cat([torch.arange(old), copied])
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
        if sources is not None:
            tx.details["sources"] = copied.tolist()
        tx.replay = {"target": target, "width": width}
    assert tx.event is not None
    return tx.event


def _check_sources(
    sources: torch.Tensor | Sequence[int], init: str, extra: int, old: int, target: str
) -> torch.Tensor:
    """``sources`` as a CPU LongTensor of ``extra`` unit indices in ``[0, old)``."""
    if init != "net2net":
        raise ValueError(
            f"sources= names the units that new units copy, which only init='net2net' does; "
            f"got init='{init}'"
        )
    idx = _as_indices(sources, "sources", "repeats allowed, in the order of the new units")
    if idx.dim() != 1 or not _integral(idx):
        raise ValueError(
            f"sources must be a 1-D tensor or list of unit indices, got {idx.dtype} of shape "
            f"{tuple(idx.shape)}"
        )
    if idx.numel() != extra:
        raise ValueError(
            f"sources holds {idx.numel()} unit indices but widening '{target}' from {old} adds "
            f"{extra} units; give one source unit per new unit"
        )
    idx = idx.long().cpu()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= old):
        raise ValueError(
            f"sources holds indices outside [0, {old}) for '{target}' "
            f"(min {int(idx.min())}, max {int(idx.max())})"
        )
    return idx


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
    weights) and no LayerNorm normalises over them: a LayerNorm's mean and variance are
    taken over all its units, so removing any of them changes every unit's output.

    Example:
        >>> import torch, torch.nn as nn, dynarch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = dynarch.shrink(model, "0", torch.tensor([0, 2, 5]))
        >>> model[0].out_features, model[2].in_features
        (3, 3)
    """
    graph, group, old = _group_for(model, target, "shrink")
    idx = _as_indices(keep, "keep", "e.g. sorted(keep)")
    if idx.dim() != 1 or idx.numel() == 0 or not _integral(idx):
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
    n_keep = idx.numel()
    idx = torch.unique(idx)
    if idx.numel() != n_keep:
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


def _as_indices(value: object, what: str, hint: str) -> torch.Tensor:
    """``value`` (a tensor or a sequence of ints) as a tensor; sets and non-numbers refused."""
    if isinstance(value, set | frozenset | dict):
        raise ValueError(
            f"{what} must be a 1-D tensor or list of unit indices, got a {type(value).__name__}, "
            f"which has no order; pass a list ({hint})"
        )
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{what} must be a 1-D tensor or list of unit indices, got {value!r} ({exc})"
        ) from None


def _integral(idx: torch.Tensor) -> bool:
    """Whether ``idx`` holds integers (not bool, floating point or complex numbers)."""
    return not (idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool)


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
    """Rebuild the structure of a recorded widen/shrink (values come from the checkpoint).

    Widening replays with ``init="random"``, the one init every model accepts (a LayerNorm
    over the units refuses the function-preserving ones); the values it draws are
    overwritten by the checkpoint's, and the engine generator is restored afterwards.
    """
    mod = resolve(model, args["target"], _LAYERS)
    new = int(args["width"])
    if new > out_units(mod):
        widen(model, args["target"], new, init="random", record=False)
    elif new < out_units(mod):
        shrink(model, args["target"], torch.arange(new), record=False)
