"""Modules the engine inserts into models: ``Residual`` (slots) and ``BranchableLayer``."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from ._engine import transaction
from .events import Event
from .optim import ParamChange, transplant
from .replay import register_replay

__all__ = ["BranchableLayer", "Residual", "add_branch"]


def _check_alpha(alpha: object) -> float:
    """``alpha`` as a float; a clear error unless it is a finite real number."""
    value = alpha.item() if isinstance(alpha, torch.Tensor) and alpha.numel() == 1 else alpha
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"alpha must be a finite number, got {type(alpha).__name__} {alpha!r}")
    if not math.isfinite(value):
        raise ValueError(f"alpha must be a finite number, got {float(value)!r}")
    return float(value)


def _float_param(module: nn.Module) -> torch.Tensor | None:
    """``module``'s first floating-point parameter (else buffer), or ``None``."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t
    return None


class Residual(nn.Module):
    """``x + alpha * module(x)``: a module attached in a slot, blended in by ``alpha``.

    ``alpha`` starts at 0 by default, so attaching leaves the function unchanged; it is a
    0-dim parameter (trainable unless ``trainable_alpha=False``) that a blending schedule
    may also set directly. It must be finite, and takes the device and floating dtype of
    ``module``'s first floating parameter (float32 when it has none).

    Example:
        >>> r = Residual(nn.Linear(4, 4).double())
        >>> x = torch.randn(2, 4, dtype=torch.float64)
        >>> torch.equal(r(x), x), r.alpha.dtype
        (True, torch.float64)
    """

    def __init__(self, module: nn.Module, alpha: float = 0.0, *, trainable_alpha: bool = True):
        super().__init__()
        value = _check_alpha(alpha)
        ref = _float_param(module)
        dev, dtype = (ref.device, ref.dtype) if ref is not None else (None, None)
        self.module = module
        self.alpha = nn.Parameter(
            torch.tensor(value, device=dev, dtype=dtype), requires_grad=trainable_alpha
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.module(x)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha.detach()):.4g}"


class BranchableLayer(nn.Module):
    """Parallel branches of one layer mixed by softmax branch weights, grown one at a time.

    ``y = sum_i w_i * branch_i(x)`` with ``w = softmax(branch_logits + log max(branch_gates, 0))``,
    i.e. ``w_i = g_i·exp(l_i) / sum_j g_j·exp(l_j)`` with ``g = max(branch_gates, 0)``. The base
    branch has gate 1. :meth:`add_branch` appends a branch with gate **0**, so its weight is
    exactly 0 and the other weights are bitwise unchanged (its logit starts at the current
    maximum, which leaves the softmax shift unchanged): the function is exactly preserved. The
    gate is a trainable parameter whose gradient at 0 is not zero (``dy/dg = e^l (b(x) - y) /
    sum``), so training opens the branch when that lowers the loss; a gate driven below 0
    closes the branch (weight 0, no gradient) until it is set positive again. All branches must
    map the input to the base branch's output shape.

    Example:
        >>> layer = BranchableLayer(nn.Linear(4, 3))
        >>> x = torch.randn(2, 4); before = layer(x)
        >>> _ = layer.add_branch(nn.Linear(4, 3))
        >>> torch.equal(layer(x), before), layer.weights().tolist()
        (True, [1.0, 0.0])
    """

    def __init__(self, base_layer: nn.Module, max_branches: int = 4) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Module):
            raise TypeError(f"base_layer must be an nn.Module, got {type(base_layer).__name__}")
        if not isinstance(max_branches, int) or isinstance(max_branches, bool) or max_branches < 1:
            raise ValueError(f"max_branches must be an int >= 1, got {max_branches!r}")
        self.max_branches = max_branches
        ref = next(base_layer.parameters(), None)
        dev, dtype = (ref.device, ref.dtype) if ref is not None else (None, None)
        self.branch_logits = nn.Parameter(torch.zeros(1, device=dev, dtype=dtype))
        self.branch_gates = nn.Parameter(torch.ones(1, device=dev, dtype=dtype))
        self.branches = nn.ModuleList([base_layer])

    def weights(self) -> torch.Tensor:
        """The branch weights ``w`` (sum 1 unless every gate is closed)."""
        logits = self.branch_logits
        e = self.branch_gates.clamp_min(0) * torch.exp(logits - logits.detach().max())
        # cumsum: a sequential sum, so an appended 0 leaves the normaliser bitwise unchanged
        return e / e.cumsum(0)[-1].clamp_min(torch.finfo(e.dtype).tiny)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        out = w[0] * self.branches[0](x)
        for i in range(1, len(self.branches)):
            out = out + w[i] * self.branches[i](x)
        return out

    def grow(self, module: nn.Module) -> list[ParamChange]:
        """Append ``module`` as a closed branch (no engine event; see :meth:`add_branch`).

        Returns the parameter changes of ``branch_logits``/``branch_gates`` for
        :func:`dynarch.optim.transplant`.
        """
        n = len(self.branches)
        if n >= self.max_branches:
            raise ValueError(
                f"BranchableLayer already has {n} branches (max_branches={self.max_branches}); "
                "build it with a larger max_branches"
            )
        old_l, old_g = self.branch_logits, self.branch_gates
        with torch.no_grad():
            new_l = torch.cat([old_l, old_l.max().reshape(1)])
            new_g = torch.cat([old_g, old_g.new_zeros(1)])
        self.branch_logits = nn.Parameter(new_l, requires_grad=old_l.requires_grad)
        self.branch_gates = nn.Parameter(new_g, requires_grad=old_g.requires_grad)
        self.branches.append(module)
        idx = torch.cat([torch.arange(n), torch.tensor([-1])])
        return [
            ParamChange(old_l, self.branch_logits, {0: idx}),
            ParamChange(old_g, self.branch_gates, {0: idx}),
        ]

    def add_branch(
        self,
        module: nn.Module,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        reason: str = "",
    ) -> Event:
        """Add ``module`` as a new branch through the engine (see :func:`add_branch`).

        ``model`` is the model holding this layer (default: the layer itself), whose history
        records the ``"branch"`` event. Pass it whenever the layer sits inside a model: an
        event recorded on the layer alone cannot be replayed from the model's checkpoint, so
        :func:`dynarch.save` of that model refuses it.

        Example:
            >>> net = nn.Sequential(BranchableLayer(nn.Linear(4, 4)), nn.ReLU())
            >>> net[0].add_branch(nn.Linear(4, 4), model=net).target
            '0'
        """
        root = self if model is None else model
        names = [n for n, m in root.named_modules() if m is self]
        if not names:
            raise ValueError(
                "this BranchableLayer is not a submodule of the model given; pass the model "
                "that holds it as model="
            )
        return add_branch(root, names[0], module, optimizer=optimizer, reason=reason)

    def extra_repr(self) -> str:
        return f"max_branches={self.max_branches}"


def _probe_shape(layer: nn.Module, module: nn.Module) -> tuple[torch.Size, torch.Size] | None:
    base = layer
    if isinstance(base, nn.Linear):
        shape: tuple[int, ...] = (2, base.in_features)
    elif isinstance(base, nn.Conv2d):
        shape = (2, base.in_channels, 8, 8)
    else:
        return None
    probe = torch.zeros(shape, device=base.weight.device, dtype=base.weight.dtype)
    modes = (base.training, module.training)
    base.eval()
    module.eval()
    try:
        with torch.no_grad():
            return base(probe).shape, module(probe).shape
    finally:
        base.train(modes[0])
        module.train(modes[1])


def add_branch(
    model: nn.Module,
    target: str,
    module: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    reason: str = "",
    record: bool = True,
) -> Event:
    """Add ``module`` as a new (closed, gate 0) branch of the :class:`BranchableLayer` ``target``.

    One engine event (``op="branch"``): the function is exactly preserved, the optimizer keeps
    the state of the old branch logits/gates (index-mapped, zero for the new entry) and the new
    branch's parameters join the optimizer groups the way :func:`dynarch.attach`'s do (a new
    weight joins the group of the layer's weights, a new bias that of its biases, so a weight
    decay split by parameter kind is kept). ``module`` is moved to the device and floating
    dtype of the base branch. The event's details name the new branch as ``created`` and the
    branched layer as ``layer`` (so learning-rate strategies treat the branch as new and the
    layer as grown). :func:`dynarch.load` replays it (a custom branch class is passed to it as
    ``modules=``).

    Example:
        >>> net = nn.Sequential(BranchableLayer(nn.Linear(4, 4)), nn.ReLU())
        >>> event = add_branch(net, "0", nn.Linear(4, 4))
        >>> event.op, event.details["created"], event.details["layer"]
        ('branch', ['0.branches.1'], '0')
    """
    from .insert import _anchored
    from .spec import class_path, describe

    layer = model.get_submodule(target) if target else model
    if not isinstance(layer, BranchableLayer):
        known = [n for n, m in model.named_modules() if isinstance(m, BranchableLayer)]
        raise TypeError(
            f"'{target}' is a {type(layer).__name__}, not a BranchableLayer; "
            f"BranchableLayers of the model: {known}"
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    n = len(layer.branches)
    if n >= layer.max_branches:
        raise ValueError(
            f"BranchableLayer '{target}' already has {n} branches "
            f"(max_branches={layer.max_branches}); build it with a larger max_branches"
        )
    ref = _float_param(layer.branches[0])
    ref = layer.branch_logits if ref is None else ref
    module = module.to(device=ref.device, dtype=ref.dtype)
    shapes = _probe_shape(layer.branches[0], module)
    if shapes is not None and shapes[0] != shapes[1]:
        raise ValueError(
            f"the new branch of '{target}' returns shape {tuple(shapes[1])[1:]} but the base "
            f"branch returns {tuple(shapes[0])[1:]}; a branch must return the base's shape"
        )
    with transaction(model, "branch", target, reason=reason, record=record) as tx:
        changes = layer.grow(module)
        transplant(optimizer, changes, added=_anchored(model, list(module.parameters()), optimizer))
        if optimizer is not None and any(m._buffers.get("weight_mask") is not None
                                         for m in module.modules()):  # fmt: skip
            from .masks import enforce

            enforce(model, optimizer)  # a branch added already sparse keeps its masks
        prefix = f"{target}." if target else ""
        tx.details = {
            "branches": n + 1,
            "type": type(module).__name__,
            "created": [f"{prefix}branches.{n}"],
            "layer": target,
        }
        tx.replay = {"target": target, "module": describe(module) or {"class": class_path(module)}}
    assert tx.event is not None
    return tx.event


@register_replay("branch")
def _replay_branch(
    model: nn.Module, args: dict[str, Any], mods: dict[str, type[nn.Module]]
) -> None:
    from .spec import build

    spec = args["module"]
    if "type" in spec:
        module = build(spec)
    elif spec["class"] in mods:
        module = mods[spec["class"]]()
    else:
        raise ValueError(
            f"a custom branch '{spec['class']}' was added; pass "
            f"modules={{'{spec['class']}': <the class>}} to dynarch.load"
        )
    add_branch(model, args["target"], module, record=False)
