"""Weight masks: the foundation of dynamic sparse training.

A *masked layer* is an ``nn.Linear`` or ``nn.Conv2d`` holding a persistent ``torch.bool``
buffer ``weight_mask`` shaped like its ``weight``. Masked weights are kept exactly zero in
``weight`` itself (the forward uses ``weight`` directly, so dense gradients stay available
to algorithms such as RigL); biases are never masked. Once created, a mask is only ever
updated in place, so references to it and ``torch.compile`` graphs stay valid.

    >>> from dynarch.masks import sparsify, layer_density
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> event = sparsify(model, 0.5, distribution="uniform")
    >>> layer_density(model)
    {'0': 0.5, '2': 0.5}

Per-layer budgets come from :func:`dynarch.budgets.layer_budgets`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from ._enforce import (
    CLEAN,
    GRAD_MASKING,
    MASK,
    MaskEnforcer,
    _mask,
    _weight,
    clip_grad_norm_,
    enforce,
    get_enforcer,
    mark_clean,
    masked_modules,
)
from ._engine import engine_state, transaction
from ._validate import check_optimizer
from .budgets import DISTRIBUTIONS, check_choice, check_density, layer_budgets
from .events import Event
from .select import topk_mask

__all__ = [
    "CLEAN",
    "DISTRIBUTIONS",
    "GRAD_MASKING",
    "MASK",
    "SCORES",
    "MaskEnforcer",
    "apply_masks",
    "check_held",
    "check_layers",
    "clip_grad_norm_",
    "enforce",
    "get_enforcer",
    "global_density",
    "is_sparse",
    "layer_budgets",
    "layer_density",
    "mark_clean",
    "masked_modules",
    "replay",
    "select_layers",
    "sparsify",
    "zero_masked",
]  # fmt: skip

SCORES = ("magnitude", "random")
_LAYER_TYPES = (nn.Linear, nn.Conv2d)


def apply_masks(model: nn.Module) -> None:
    """Zero every masked weight of ``model`` now (one batched multiply).

    Example:
        >>> apply_masks(nn.Linear(2, 2))  # no masks: nothing to do
    """
    modules = list(masked_modules(model).values())
    _multiply([_weight(m) for m in modules], [_mask(m) for m in modules])
    for module in modules:
        mark_clean(module)


def _multiply(tensors: list[Tensor], masks: list[Tensor]) -> None:
    """``tensors[i] *= masks[i]`` in one batched op; each distinct bool mask is converted to
    its tensor's dtype once (a float multiply is several times faster than a bool one)."""
    if not tensors:
        return
    converted: dict[tuple[int, torch.dtype], Tensor] = {}
    factors = []
    for t, m in zip(tensors, masks, strict=True):
        key = (id(m), t.dtype)
        if key not in converted:
            converted[key] = m.to(t.dtype)
        factors.append(converted[key])
    with torch.no_grad():
        torch._foreach_mul_(tensors, factors)


def _counts(model: nn.Module) -> tuple[list[str], list[int], list[int]]:
    mods = masked_modules(model)
    if not mods:
        return [], [], []
    masks = [_mask(m) for m in mods.values()]
    sums = [mask.sum() for mask in masks]  # one host sync for all layers below
    active = torch.stack([x.to(sums[0].device) for x in sums]).tolist()
    return list(mods), active, [mask.numel() for mask in masks]


def layer_density(model: nn.Module) -> dict[str, float]:
    """Active fraction (active / total weights) of each masked layer.

    Example:
        >>> layer_density(nn.Linear(2, 2))
        {}
    """
    names, active, total = _counts(model)
    return {n: a / t for n, a, t in zip(names, active, total)}


def global_density(model: nn.Module) -> float:
    """Active fraction over all masked layers together (1.0 when no layer is masked).

    Example:
        >>> global_density(nn.Linear(2, 2))
        1.0
    """
    _, active, total = _counts(model)
    return sum(active) / sum(total) if total else 1.0


def is_sparse(model: nn.Module) -> bool:
    """Whether ``model`` has at least one masked layer.

    Example:
        >>> is_sparse(nn.Linear(2, 2))
        False
    """
    return bool(masked_modules(model))


def _patterns(kind: str, patterns: Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        raise TypeError(
            f"{kind} must be a list of fnmatch patterns, got the string {patterns!r}; "
            f"write [{patterns!r}]"
        )
    return list(patterns)


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    purpose: str = "sparsify",
) -> dict[str, nn.Module]:
    """The Linear/Conv2d modules of ``model`` chosen by fnmatch ``include``/``exclude`` patterns,
    checked by :func:`check_layers` (``purpose`` words the error when none is left).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> list(select_layers(model, exclude=["2"]))
        ['0']
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _LAYER_TYPES)}
    inc, exc = _patterns("include", include), _patterns("exclude", exclude)
    for kind, pats in (("include", inc), ("exclude", exc)):
        for p in pats:
            if not any(fnmatchcase(n, p) for n in layers):
                raise ValueError(
                    f"{kind} pattern {p!r} matches no Linear/Conv2d module; "
                    f"available: {sorted(layers)}"
                )
    chosen: dict[str, nn.Module] = {
        n: m
        for n, m in layers.items()
        if (include is None or any(fnmatchcase(n, p) for p in inc))
        and not any(fnmatchcase(n, p) for p in exc)
    }
    if not chosen:
        raise ValueError(
            f"no Linear/Conv2d layer left to {purpose} (the model has none, or include/exclude "
            f"removed them all); Linear/Conv2d modules: {sorted(layers)}"
        )
    if include is None:
        _warn_unsupported(model, purpose)
    check_layers(chosen)
    return chosen


# weighted layers dynarch does not mask: said once when "every layer" is asked for
_UNSUPPORTED = (
    nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Embedding, nn.EmbeddingBag, nn.Bilinear, nn.MultiheadAttention,
)  # fmt: skip


def _warn_unsupported(model: nn.Module, purpose: str) -> None:
    # a weight tied to a Linear's (an embedding sharing its decoder's) is masked with it
    masked = {id(m.weight) for m in model.modules() if isinstance(m, _LAYER_TYPES)}
    found = [
        f"{n} ({type(m).__name__})" for n, m in model.named_modules()
        if isinstance(m, _UNSUPPORTED) and id(getattr(m, "weight", None)) not in masked
    ]  # fmt: skip
    said = model.__dict__.setdefault("_dynarch_said_dense", set())
    if found and (purpose, *found) not in said:  # once per model and purpose
        said.add((purpose, *found))
        warnings.warn(
            f"{purpose} leaves {', '.join(found[:5])}{' …' if len(found) > 5 else ''} dense: "
            "dynarch masks the weights of Linear and Conv2d layers only",
            stacklevel=3,
        )


def check_layers(chosen: Mapping[str, nn.Module]) -> None:
    """Refuse lazy weights, computed weights (parametrizations such as weight_norm), weights
    shared by two layers and malformed masks (clear errors)."""
    owner: dict[int, str] = {}
    for n, m in chosen.items():
        if isinstance(m.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"layer {n!r} has an uninitialised (lazy) weight; run one forward pass first"
            )
        if not isinstance(m._parameters.get("weight"), nn.Parameter):
            raise ValueError(
                f"layer {n!r} computes its weight from other parameters (a parametrization "
                "such as weight_norm or spectral_norm), so a mask cannot be kept on it; "
                "remove the parametrization or exclude the layer"
            )
        first = owner.setdefault(id(m.weight), n)
        if first != n:
            raise ValueError(
                f"layers {first!r} and {n!r} share one weight tensor; exclude one of them"
            )
        mask = m._buffers.get(MASK)
        if mask is not None and (mask.dtype != torch.bool or mask.shape != m.weight.shape):
            raise ValueError(
                f"layer {n!r} has a weight_mask of dtype {mask.dtype} and shape "
                f"{tuple(mask.shape)} but its weight has shape {tuple(_weight(m).shape)}; "
                "a mask must be a torch.bool tensor shaped like the weight"
            )


def check_held(
    optimizer: torch.optim.Optimizer,
    layers: Mapping[str, nn.Module],
    *,
    owner: str,
    every: bool = False,
) -> None:
    """Refuse an ``optimizer`` that does not train the weights of ``layers``: with ``every``
    when it misses any of them, otherwise only when it holds none (a clear error naming them).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> check_held(torch.optim.SGD(model.parameters(), lr=0.1), {"0": model[0]}, owner="x")
    """
    check_optimizer(optimizer)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, m in layers.items() if id(m.weight) not in held]
    frozen = [n for n in missing if not layers[n].weight.requires_grad]
    if frozen and frozen == missing and (every or len(missing) == len(layers)):
        raise ValueError(
            f"{owner}: the optimizer does not hold the weights of layers {frozen}: they are "
            "frozen (requires_grad=False), so no optimizer step changes them; leave them out "
            f"with exclude={frozen}"
        )
    if missing and (every or len(missing) == len(layers)):
        raise ValueError(
            f"{owner}: the optimizer does not hold the weights of layers {missing}; build it "
            "from this model's parameters (torch.optim.SGD(model.parameters(), ...))"
            + (" or exclude those layers" if every else "")
        )


def _check_trained(optimizer: torch.optim.Optimizer, layers: Mapping[str, nn.Module]) -> None:
    """Refuse layers that train (``requires_grad``) but not by ``optimizer``: its step hook
    could not keep their masks, and their masked weights would grow back. Frozen layers are
    fine (their weights do not move)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    other = [n for n, m in layers.items() if m.weight.requires_grad and id(m.weight) not in held]
    if other:
        raise ValueError(
            f"sparsify: layers {other} train, but not by the optimizer given, which could not "
            "keep their masks (their masked weights would grow back); sparsify them in a call "
            "with the optimizer that trains them (include=/exclude= choose the layers), or "
            "build one optimizer from all of model.parameters()"
        )


def _choose(
    weight: Tensor, mask: Tensor | None, k: int, score: str, gen: torch.Generator
) -> Tensor:
    """Flat bool mask with exactly ``k`` True: currently active positions rank first, then
    the score (|w|, or uniform draws for ``"random"``); ties are broken by seeded draws."""
    flat = weight.detach().reshape(-1)
    if score == "magnitude":
        keys = flat.abs().float()
        floor = -1.0  # below every |w|: inactive positions rank last
    else:
        keys = torch.rand(flat.numel(), generator=gen).to(flat.device)
        floor = -2.0
    if mask is not None:
        keys = torch.where(mask.reshape(-1), keys, floor)
    return topk_mask(keys, k, gen)


def sparsify(
    model: nn.Module,
    density: float,
    *,
    distribution: str = "erk",
    optimizer: torch.optim.Optimizer | None = None,
    score: str = "magnitude",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    reason: str = "",
) -> Event:
    """Mask the Linear/Conv2d weights of ``model`` down to ``density`` (one recorded event).

    ``score="magnitude"`` keeps the largest ``|w|``, ``"random"`` a random subset; both use
    the engine generator for ties / draws. A layer that is already masked is updated in
    place and never un-pruned when its density is lowered. Masked weights are zeroed; with
    ``optimizer`` the masks are also enforced after every step (:func:`enforce`).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> sparsify(model, 0.25, distribution="er").details["2"]
        {'density': 0.34375, 'active': 22, 'total': 64}
    """
    density = check_density(density)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_choice("score", score, SCORES)
    layers = select_layers(model, include, exclude)
    if optimizer is not None:
        check_held(optimizer, layers, owner="sparsify")
        _check_trained(optimizer, layers)
    shapes = {n: tuple(_weight(m).shape) for n, m in layers.items()}
    budgets = layer_budgets(shapes, density, distribution)
    gen = engine_state(model).generator
    with transaction(model, "sparsify", "*", reason=reason) as tx:
        for name, module in layers.items():
            weight, old = _weight(module), module._buffers.get(MASK)
            new = _choose(weight, old, budgets[name], score, gen).view(weight.shape)
            if old is None:
                module.register_buffer(MASK, new, persistent=True)
            else:
                old.copy_(new)
            k, n = budgets[name], weight.numel()
            tx.details[name] = {"density": k / n, "active": k, "total": n}
        tx.replay = {"layers": list(layers), "density": density, "distribution": distribution}
        zero_masked(model, optimizer)
    assert tx.event is not None
    return tx.event


def zero_masked(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Zero masked weights now; with ``optimizer`` also their optimizer state, and keep them
    zero after every step (:func:`enforce`)."""
    if optimizer is not None:
        enforce(model, optimizer)
    else:
        apply_masks(model)


def replay(model: nn.Module, args: dict[str, Any]) -> None:
    """Re-create the mask buffers of a recorded ``sparsify`` (values come from a checkpoint).

    Missing ``weight_mask`` buffers are created all True on the named layers; no event is
    recorded and the engine generator is not consumed.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> replay(model, {"layers": ["0"], "density": 0.5, "distribution": "erk"})
        >>> is_sparse(model)
        True
    """
    layers = args.get("layers") if isinstance(args, dict) else None
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        raise ValueError(f"replay args need 'layers': a list of module names, got {args!r}")
    modules = dict(model.named_modules())
    for name in layers:
        if not isinstance(modules.get(name), _LAYER_TYPES):
            raise ValueError(f"replay: no Linear/Conv2d module named {name!r} in the model")
    with transaction(model, "sparsify", "*", record=False):
        for name in layers:
            module = modules[name]
            if module._buffers.get(MASK) is None:
                mask = torch.ones_like(_weight(module), dtype=torch.bool)
                module.register_buffer(MASK, mask, persistent=True)
