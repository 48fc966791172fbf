"""Dynamic sparse training algorithms: small :class:`~dynarch.sparse.Rewirer` subclasses.

=========  ====================================  ==========================================
name       drop (lowest go)                      grow (highest inactive come back)
=========  ====================================  ==========================================
static     nothing (the fixed-mask control)      nothing
set        ``|w|``                               uniformly at random
rigl       ``|w|``                               dense ``|grad|`` (mean over a window)
snfs       ``|w|``                               ``|momentum|``; counts redistributed
deep_r     ``|w|`` (``variant="design"``)        Gumbel-top-k of ``|grad| / temperature``
=========  ====================================  ==========================================

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> rw = make_rewirer("set", model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                   density=0.5, anneal="constant")
    >>> rw.name, sorted(ALGORITHMS)
    ('set', ['deep_r', 'rigl', 'set', 'snfs', 'static'])
"""

from __future__ import annotations

import math
import zlib
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._engine import engine_state, transaction
from ..budgets import check_choice
from ..events import Event
from . import _ops
from ._grads import GradientBuffer
from .base import Layer, Rewirer
from .schedule import check_count, check_positive

__all__ = ["ALGORITHMS", "SET", "SNFS", "DeepR", "RigL", "Static", "make_rewirer"]


class Static(Rewirer):
    """The control: the same random sparse start, a mask that never changes.

    ``update()`` changes nothing but still records a ``"rewire"`` event (all counts 0).

    Example:
        >>> import torch, torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(8, 8))
        >>> rw = Static(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.5)
        >>> rw.update().details["0"]
        {'dropped': 0, 'regrown': 0, 'active': 32, 'density': 0.5}
    """

    name = "static"
    rewires: ClassVar[bool] = False

    def drop_counts(self, layers: list[Layer], step: int) -> list[int]:
        return [0] * len(layers)


class SET(Rewirer):
    """Sparse Evolutionary Training (Mocanu et al. 2018): drop the smallest ``|w|``, regrow
    uniformly at random among inactive positions (engine-generator draws; sampled in O(k)).

    Example:
        >>> import torch, torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(8, 8))
        >>> rw = SET(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.5,
        ...          anneal="constant", drop_fraction=0.25)
        >>> rw.update().details["0"]
        {'dropped': 8, 'regrown': 8, 'active': 32, 'density': 0.5}
    """

    name = "set"


class RigL(SET):
    """Rigged Lottery (Evci et al. 2020): SET's drop; regrow where the dense gradient
    magnitude is largest, the gradient averaged over the last ``grad_accumulation`` steps
    before the update (captured only on those steps).

    Example:
        >>> import torch, torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(8, 8))
        >>> rw = RigL(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.5,
        ...           delta_t=100, grad_accumulation=4)
        >>> rw.grad_accumulation
        4
    """

    name = "rigl"
    uses_gradients = True

    def __init__(self, *args: Any, grad_accumulation: int = 1, **kwargs: Any) -> None:
        self.grad_accumulation = check_count(
            "grad_accumulation", grad_accumulation, 1, "steps of gradients averaged per update"
        )
        super().__init__(*args, **kwargs)

    def _validate(self) -> None:
        if self.grad_accumulation > self.schedule.delta_t:
            raise ValueError(
                f"grad_accumulation={self.grad_accumulation} exceeds delta_t="
                f"{self.schedule.delta_t}; it must be <= delta_t"
            )

    def grow_scores(self, layer: Layer) -> Tensor | None:
        return self.gradient(layer).abs()


class SNFS(SET):
    """Sparse momentum (Dettmers & Zettlemoyer 2019): SET's drop; regrow where the gradient
    momentum is largest, and redistribute regrowth across layers.

    The momentum is the rewirer's own dense buffer ``m <- momentum * m + (1 - momentum) *
    grad``, updated on every step (the optimizer's momentum is zero at masked positions, so
    it cannot score them). All layers together regrow exactly as many weights as they
    dropped; layer ``l`` gets a share proportional to the mean ``|m|`` of its active weights
    (largest-remainder rounding, capped at the layer's free positions, and at least one for
    a layer the drop emptied), so per-layer counts drift while the total is preserved and no
    layer is left without weights.

    Example:
        >>> import torch, torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(8, 8))
        >>> SNFS(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.5).momentum
        0.9
    """

    name = "snfs"
    uses_gradients = True

    def __init__(self, *args: Any, momentum: float = 0.9, **kwargs: Any) -> None:
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, int | float)
            or not (0 <= momentum < 1)
        ):
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        super().__init__(*args, **kwargs)
        self.grads = GradientBuffer(momentum=self.momentum)

    def _capture_due(self, step: int) -> bool:
        return self.schedule.t_end is None or step < self.schedule.t_end

    def grow_scores(self, layer: Layer) -> Tensor | None:
        return self.gradient(layer).abs()

    def grow_counts(self, layers: list[Layer], drops: list[int]) -> list[int]:
        if not layers:
            return []
        device = layers[0].mask.device
        sums = []
        for x in layers:
            active = self.gradient(x).reshape(-1).index_select(0, self.active_positions(x))
            sums.append(active.abs().sum().float().to(device))
        means = [s / max(1, x.active) for s, x in zip(torch.stack(sums).tolist(), layers)]
        caps = [x.numel - x.active + d for x, d in zip(layers, drops)]
        # a layer the drop emptied gets one weight back: an empty layer's mean momentum is 0,
        # so it would never regrow and the network would stay cut
        floors = [int(x.active - d <= 0 and d > 0) for x, d in zip(layers, drops)]
        return apportion(sum(drops), means, caps, fallback=drops, floors=floors)


def apportion(
    total: int,
    weights: list[float],
    caps: list[int],
    fallback: list[int],
    floors: list[int] | None = None,
) -> list[int]:
    """Split ``total`` over layers in proportion to ``weights``, each at most its cap and at
    least its floor (default 0).

    The floors are given first and the rest is split: largest remainders (ties: first layer)
    make the counts add up exactly; a layer whose share exceeds its cap gets the cap and the
    rest is re-solved. Non-finite or all-zero weights give ``fallback``.

    Example:
        >>> apportion(10, [1.0, 1.0, 2.0], [10, 1, 10], fallback=[4, 3, 3])
        [3, 1, 6]
        >>> apportion(10, [0.0, 1.0, 2.0], [10, 1, 10], fallback=[4, 3, 3], floors=[1, 0, 0])
        [1, 1, 8]
    """
    floors = [0] * len(caps) if floors is None else list(floors)
    if not len(weights) == len(caps) == len(fallback) == len(floors):
        raise ValueError(
            f"weights, caps, fallback and floors must have one entry per layer, got lengths "
            f"{len(weights)}, {len(caps)}, {len(fallback)}, {len(floors)}"
        )
    if any(f < 0 or f > c for f, c in zip(floors, caps)) or not sum(floors) <= total <= sum(caps):
        raise ValueError(
            f"cannot split {total} between floors {floors} and caps {caps}: need 0 <= floor "
            "<= cap per layer and sum(floors) <= total <= sum(caps)"
        )
    if any(floors):
        room = [c - f for c, f in zip(caps, floors)]
        base = [max(0, b - f) for b, f in zip(fallback, floors)]
        if sum(base) != total - sum(floors):  # a fallback that does not fit: rescaled
            scale = [float(b) for b in base] if sum(base) > 0 else [1.0] * len(caps)
            base = apportion(total - sum(floors), scale, room, base)
        split = apportion(total - sum(floors), weights, room, base)
        return [a + f for a, f in zip(split, floors)]
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        return list(fallback)
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(caps)) if i not in capped]
        rest = total - sum(caps[i] for i in capped)
        mass = sum(weights[i] for i in free)
        over = {i for i in free if mass > 0 and rest * weights[i] / mass > caps[i]}
        if not over:
            break
        capped |= over
    out = [caps[i] if i in capped else 0 for i in range(len(caps))]
    shares = {i: rest * weights[i] / mass if mass > 0 else 0.0 for i in free}
    for i in free:
        out[i] = min(math.floor(shares[i]), caps[i])
    order = sorted(free, key=lambda i: (out[i] - shares[i], i))  # largest remainder first
    left = total - sum(out)
    while left > 0:
        room = [i for i in order if out[i] < caps[i]] or [
            i for i in range(len(caps)) if out[i] < caps[i]
        ]
        for i in room[:left]:
            out[i] += 1
        left = total - sum(out)
    return out


class DeepR(Rewirer):
    """Deep Rewiring, in two variants.

    ``variant="design"`` (default; the design document's): SET's magnitude drop on the usual
    schedule, then stochastic gradient-guided regrowth: inactive positions are sampled
    without replacement with probability ``softmax(|grad| / temperature)`` (Gumbel-top-k on
    engine-generator draws), ``grad`` the dense gradient captured before masking.

    ``variant="bellec"`` (Bellec et al. 2018): every connection has a fixed sign (that of its
    initial weight, random where it is 0 or inactive; drawn again the same way for a layer
    whose shape a structural change altered). After every optimizer step (``delta_t``,
    ``drop_fraction`` and ``anneal`` are ignored; ``t_end`` still ends it) optional ``l1``
    shrinkage (``w -= lr * l1 * sign``) and, with ``noise=True``, Gaussian noise
    ``sqrt(2 * lr * temperature) * N(0, 1)`` are added to active weights; every active
    connection whose weight now has the opposite sign goes dormant (weight 0), and as many
    dormant connections of the same layer (the just-dormant included) are reactivated
    uniformly at random with zero magnitude (their sign stays fixed). ``regrow_init`` must
    be ``"zero"``; an event is recorded only on steps that rewired something.

    Example:
        >>> import torch, torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(8, 8))
        >>> DeepR(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.5,
        ...       variant="bellec", noise=True).variant
        'bellec'
    """

    name = "deep_r"
    uses_gradients = True

    def __init__(
        self,
        *args: Any,
        temperature: float = 1.0,
        variant: str = "design",
        noise: bool = False,
        l1: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.temperature = check_positive("temperature", temperature, "softmax / noise scale")
        check_choice("variant", variant, ("design", "bellec"))
        self.variant = variant
        if not isinstance(noise, bool):
            raise ValueError(f"noise must be True or False (bellec variant), got {noise!r}")
        if (
            isinstance(l1, bool)
            or not isinstance(l1, int | float)
            or not (math.isfinite(l1) and l1 >= 0)
        ):
            raise ValueError(f"l1 must be a finite number >= 0, got {l1!r}")
        if variant == "design" and (noise or l1):
            raise ValueError("noise and l1 apply to variant='bellec' only")
        self.noise, self.l1 = noise, float(l1)
        super().__init__(*args, **kwargs)
        self.signs: dict[str, Tensor] = {}
        if variant == "bellec":
            for x in self.layers():
                self._sign(x)

    def _sign(self, x: Layer) -> Tensor:
        """The fixed signs of ``x``; drawn afresh (:func:`_initial_signs`) for a layer that is
        new or changed shape (structural surgery: which old positions survived is unknown)."""
        sign = self.signs.get(x.name)
        if sign is None or sign.shape != x.weight.shape:
            seed = engine_state(self.model).seed
            sign = self.signs[x.name] = _initial_signs(x.weight.detach(), seed, x.name)
        return sign

    def _validate(self) -> None:
        if self.variant == "bellec" and self.regrow_init != "zero":
            raise ValueError(
                "variant='bellec' reactivates connections at zero magnitude; "
                f"regrow_init must be 'zero', got {self.regrow_init!r}"
            )

    @property
    def needs_gradients(self) -> bool:
        return self.variant == "design"

    def grow_scores(self, layer: Layer) -> Tensor | None:
        grad = self.gradient(layer)
        return _ops.gumbel_scores(grad, self.temperature, engine_state(self.model).generator)

    # ----------------------------------------------------------------- bellec variant
    def _first_update(self) -> int:
        return super()._first_update() if self.variant == "design" else 1  # every step

    def is_update_step(self, step: int) -> bool:
        if self.variant == "design":
            return super().is_update_step(step)
        return step >= 1 and (self.t_end is None or step < self.t_end)

    def update(self) -> Event:
        if self.variant == "design":
            return super().update()
        event = self._bellec(always=True)
        assert event is not None
        return event

    def _after_step(self) -> Event | None:
        if self.variant == "design":
            return super()._after_step()
        return self._bellec(always=False) if self.is_update_step(self._step) else None

    def _lr(self, weight: Tensor) -> float:
        for group in self.optimizer.param_groups:
            if any(p is weight for p in group["params"]):
                return float(group["lr"])
        return 0.0

    def _bellec(self, always: bool) -> Event | None:
        layers = self.layers()
        gen = engine_state(self.model).generator
        flips = []
        with torch.no_grad():
            for x in layers:
                sign, w = self._sign(x), x.weight
                lr = self._lr(w)
                if self.noise:
                    noise = torch.randn(w.shape, generator=gen).to(w).mul_(x.mask)
                    w.add_(noise, alpha=math.sqrt(2 * lr * self.temperature))
                if self.l1:
                    w.sub_((sign * x.mask).to(w), alpha=lr * self.l1)
                flips.append(x.mask & (w * sign < 0))
            sums = torch.stack([f.sum() for f in flips]).tolist() if flips else []
            counts = [int(c) for c in sums]
            if not (always or any(counts)):
                return None
            changes = {}
            with transaction(self.model, "rewire", "*", reason=self.name) as tx:
                for x, flip, k in zip(layers, flips, counts):
                    if k:
                        changes[x.module] = (x.mask._version, *self._reactivate(x, flip, k, gen))
                    tx.details[x.name] = self._details(x, k, k)
        return self._finish(layers, tx.event, changes)

    def _reactivate(
        self, x: Layer, flip: Tensor, k: int, gen: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        dormant = _ops.active_indices(flip)
        _ops.put(x.mask, dormant, False)
        grow = _ops.grow_uniform(x.mask, x.numel - x.active + k, k, gen)
        _ops.put(x.mask, grow, True)
        changed = torch.cat([dormant, grow])
        for t in (x.weight, *_ops.state_tensors(self.optimizer, x.weight)):
            _ops.put(t, changed, 0)
        return dormant, grow

    def _extra_state(self) -> dict[str, Any]:
        return {"signs": {n: s.clone() for n, s in self.signs.items()}}

    def _load_extra(self, extra: dict[str, Any]) -> None:
        self.signs = {n: s.clone() for n, s in extra.get("signs", {}).items()}


def _initial_signs(weight: Tensor, seed: int, name: str) -> Tensor:
    """int8 signs: the weight's where nonzero, else a fair coin from a generator seeded by
    ``(engine seed, layer name)`` (the engine generator is not consumed, so a rewirer built
    on a restored checkpoint leaves it exactly where the checkpoint put it)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    coin = torch.randint(0, 2, weight.shape, generator=gen, dtype=torch.int8).mul_(2).sub_(1)
    return torch.where(weight != 0, weight.sign().to(torch.int8), coin.to(weight.device))


ALGORITHMS: dict[str, type[Rewirer]] = {cls.name: cls for cls in (Static, SET, RigL, SNFS, DeepR)}


def make_rewirer(
    name: str, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any
) -> Rewirer:
    """Build the rewirer registered as ``name`` (see :data:`ALGORITHMS`) with ``kwargs``.

    Example:
        >>> import torch, torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(8, 8))
        >>> type(make_rewirer("rigl", m, torch.optim.SGD(m.parameters(), lr=0.1),
        ...                   density=0.5)).__name__
        'RigL'
    """
    cls = ALGORITHMS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown rewirer {name!r}; allowed: {', '.join(map(repr, ALGORITHMS))}")
    return cls(model, optimizer, **kwargs)
