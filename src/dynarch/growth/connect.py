"""Turn connections of a masked layer on: the primitive behind every mask-embedded growth op.

A masked layer (a ``weight_mask`` bool buffer, see :mod:`dynarch.masks`) grows by switching
positions of its mask on. :func:`connect` does that for one layer in one engine transaction
(op ``"connect"``); the new weights start at zero (the function is unchanged) or at a
fan-in uniform draw from the engine generator, and their optimizer state starts at zero.

Every position turned on by growth is flagged in a persistent bool buffer ``weight_patch``
shaped like the weight (created on first use; ``True`` = turned on by growth). Learning-rate
strategies read it; it is re-indexed by ``widen``/``shrink`` like the mask and saved in
checkpoints. A flagged position that is later pruned keeps its flag: the live patch
connections are ``weight_patch & weight_mask``.

Example:
    >>> import torch, torch.nn as nn
    >>> from dynarch.masks import sparsify
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> _ = sparsify(model, 0.5, distribution="uniform")
    >>> off = (~model[0].weight_mask).reshape(-1).nonzero().squeeze(1)[:3]
    >>> connect(model, "0", off).details["added"]
    3
    >>> int(model[0].weight_patch.sum())
    3
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._engine import engine_state, transaction
from .._validate import check_optimizer
from ..events import Event
from ..masks import MASK
from ..replay import register_replay
from ..sparse._ops import init_values, put, state_tensors
from ._units import check_reason, get_layer

__all__ = ["INITS", "PATCH", "connect", "patch_flags", "replay_patches", "turn_off", "turn_on"]

PATCH = "weight_patch"
INITS = ("zero", "random")


def _check_init(init: object) -> str:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r} for new connections; allowed: {', '.join(INITS)}")
    return str(init)


def _masked(module: nn.Module, name: str) -> Tensor:
    """The ``weight_mask`` of ``module``; a clear error for a dense layer."""
    mask = module._buffers.get(MASK)
    if mask is None:
        raise ValueError(
            f"layer '{name}' is dense (it has no weight_mask): every connection is already on; "
            f"sparsify it first, e.g. dynarch.sparsify(model, 0.1, include=['{name}'])"
        )
    return mask


def _flat_positions(positions: Tensor, weight: Tensor, name: str) -> Tensor:
    """``positions`` (flat indices or a bool mask shaped like ``weight``) as sorted flat
    indices on the weight's device; clear errors for anything else."""
    if not isinstance(positions, Tensor):
        positions = torch.as_tensor(positions)
    if positions.dtype is torch.bool:
        if positions.shape != weight.shape:
            raise ValueError(
                f"a bool positions mask for '{name}' must have the weight's shape "
                f"{tuple(weight.shape)}, got {tuple(positions.shape)}"
            )
        return positions.reshape(-1).nonzero().squeeze(1).to(weight.device)
    if positions.dim() != 1 or positions.dtype.is_floating_point or positions.is_complex():
        raise ValueError(
            f"positions for '{name}' must be a 1-D integer tensor of flat indices or a bool mask "
            f"shaped like the weight {tuple(weight.shape)}, got {positions.dtype} of shape "
            f"{tuple(positions.shape)}"
        )
    idx = positions.long()
    n = weight.numel()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(
            f"positions for '{name}' must be flat indices in [0, {n}), got min {int(idx.min())} "
            f"and max {int(idx.max())}"
        )
    unique = torch.unique(idx)
    if unique.numel() != idx.numel():
        raise ValueError(
            f"positions for '{name}' hold {idx.numel() - unique.numel()} duplicate indices; "
            "give each position once"
        )
    return unique.to(weight.device)


def patch_flags(module: nn.Module) -> Tensor:
    """The ``weight_patch`` buffer of ``module``, created all False on first use.

    Example:
        >>> layer = nn.Linear(2, 3)
        >>> patch_flags(layer).shape, bool(patch_flags(layer).any())
        (torch.Size([3, 2]), False)
    """
    flags = module._buffers.get(PATCH)
    if flags is None:
        weight = module.weight
        assert isinstance(weight, Tensor)
        flags = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        module.register_buffer(PATCH, flags, persistent=True)
    return flags


def turn_on(
    module: nn.Module,
    idx: Tensor,
    *,
    optimizer: torch.optim.Optimizer | None,
    init: str,
    gen: torch.Generator,
) -> None:
    """Switch the (inactive) flat positions ``idx`` of ``module``'s mask on, in place: weights
    ``init_values(init)`` (zero or fan-in uniform), optimizer state zero, ``weight_patch``
    flagged. Call inside a transaction; no checks.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> layer.register_buffer(MASK, torch.zeros(2, 2, dtype=torch.bool))
        >>> turn_on(layer, torch.tensor([1]), optimizer=None, init="zero", gen=torch.Generator())
        >>> layer.weight_mask.tolist(), float(layer.weight.detach()[0, 1])
        ([[False, True], [False, False]], 0.0)
    """
    weight, mask = module.weight, module._buffers[MASK]
    assert isinstance(weight, Tensor) and mask is not None
    with torch.no_grad():
        put(mask, idx, True)
        put(patch_flags(module), idx, True)
        values = init_values(init, weight, idx, None, gen)
        put(weight, idx, 0.0 if values is None else values)
        for state in state_tensors(optimizer, weight):
            put(state, idx, 0)


def turn_off(module: nn.Module, idx: Tensor, *, optimizer: torch.optim.Optimizer | None) -> None:
    """Switch the flat positions ``idx`` of ``module``'s mask off: weights and optimizer state
    zero. Call inside a transaction; no checks.

    Example:
        >>> layer = nn.Linear(2, 1)
        >>> layer.register_buffer(MASK, torch.ones(1, 2, dtype=torch.bool))
        >>> turn_off(layer, torch.tensor([0]), optimizer=None)
        >>> layer.weight_mask.tolist(), float(layer.weight.detach()[0, 0])
        ([[False, True]], 0.0)
    """
    weight, mask = module.weight, module._buffers[MASK]
    assert isinstance(weight, Tensor) and mask is not None
    with torch.no_grad():
        put(mask, idx, False)
        put(weight, idx, 0.0)
        for state in state_tensors(optimizer, weight):
            put(state, idx, 0)


def _layer_facts(modules: Mapping[str, nn.Module], added: Mapping[str, int]) -> dict[str, Any]:
    """``{name: {"added", "active", "density"}}`` of masked layers after a change (one host
    sync for all of them)."""
    masks = {n: m._buffers[MASK] for n, m in modules.items()}
    if not masks:
        return {}
    sums = [mask.sum().cpu() for mask in masks.values() if mask is not None]
    active = torch.stack(sums).tolist()
    return {
        n: {"added": added[n], "active": a, "density": a / mask.numel()}
        for (n, mask), a in zip(masks.items(), active, strict=True)
        if mask is not None
    }


def connect(
    model: nn.Module,
    layer: str,
    positions: Tensor,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    init: str = "zero",
    reason: str = "",
    record: bool = True,
) -> Event:
    """Turn the inactive ``positions`` of the masked layer ``layer`` on (op ``"connect"``).

    ``positions`` holds flat (row-major) indices into the weight, or is a bool tensor shaped
    like it (True = turn on). Every position must be inactive. ``init="zero"`` keeps the
    function exactly; ``"random"`` draws ``U(-b, b)``, ``b = 1/sqrt(fan_in)``, from the engine
    generator. The optimizer state of the new positions starts at zero (other positions keep
    theirs); the mask is changed in place, so an enforcer (:func:`dynarch.masks.enforce`)
    keeps the new positions trainable. They are flagged in ``weight_patch``.

    The event's details are ``{"layer", "added", "active", "density", "init"}``.

    Example:
        >>> import torch.nn as nn
        >>> from dynarch.masks import sparsify
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> _ = sparsify(model, 0.5, distribution="uniform")
        >>> event = connect(model, "0", ~model[0].weight_mask)
        >>> event.op, event.details["active"], event.details["density"]
        ('connect', 6, 1.0)
    """
    module = get_layer(model, layer)
    init = _check_init(init)
    check_reason(reason)
    check_optimizer(optimizer, optional=True)
    mask = _masked(module, layer)
    idx = _flat_positions(positions, module.weight, layer)
    if idx.numel() == 0:
        raise ValueError(f"no positions given for '{layer}'; nothing to connect")
    on = int(mask.reshape(-1).index_select(0, idx).sum())
    if on:
        raise ValueError(
            f"{on} of the {idx.numel()} positions given for '{layer}' are already active; "
            f"pass only inactive positions (where {layer}.weight_mask is False)"
        )
    gen = engine_state(model).generator
    with transaction(model, "connect", layer, reason=reason, record=record) as tx:
        turn_on(module, idx, optimizer=optimizer, init=init, gen=gen)
        facts = _layer_facts({layer: module}, {layer: idx.numel()})[layer]
        tx.details = {"layer": layer, **facts, "init": init}
        tx.replay = {"layers": [layer]}
    assert tx.event is not None
    return tx.event


@register_replay("connect")
def replay_patches(model: nn.Module, args: Mapping[str, Any], _mods: Any = None) -> None:
    """Re-create the ``weight_patch`` buffers of a recorded ``connect``/``patch`` on a rebuilt
    model (their values, and the masks', come from the checkpoint).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> replay_patches(model, {"layers": ["0"]})
        >>> model[0].weight_patch.shape
        torch.Size([2, 2])
    """
    layers = args.get("layers") if isinstance(args, Mapping) else None
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        raise ValueError(f"replay args need 'layers': a list of module names, got {args!r}")
    for name in layers:
        patch_flags(get_layer(model, name))


register_replay("patch")(replay_patches)
