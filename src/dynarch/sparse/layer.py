"""A self-contained dynamic sparse layer, in the words of the design document.

:class:`DynamicSparseLinear` *is* an ``nn.Linear`` with a ``weight_mask`` buffer, so every
part of dynarch (masks, :class:`~dynarch.sparse.Rewirer`, surgery, checkpoints) treats it as a
masked Linear; its own :meth:`~DynamicSparseLinear.rewire` runs the same per-layer update code
as the rewirers.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> layer = DynamicSparseLinear(100, 50, density=0.2)
    >>> layer(torch.randn(8, 100)).sum().backward()
    >>> layer.store_gradients()
    >>> layer.rewire(method="deep_r", prune_rate=0.2).details[""]["dropped"]
    200
    >>> round(layer.get_sparsity(), 6)
    0.8
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._engine import engine_state, set_seed, transaction
from ..budgets import check_choice, check_density
from ..events import Event
from ..masks import CLEAN, MASK, check_held, get_enforcer, mark_clean
from . import _ops

OWNER = "_dynarch_owner"  # weakref to the model a Trainer trains this layer in

__all__ = ["DynamicSparseLinear"]

METHODS = ("set", "deep_r")


@torch.compiler.disable
def _rezero(layer: DynamicSparseLinear) -> None:
    """Zero ``layer``'s masked weights if the weight changed since they were last known zero.

    Kept out of ``torch.compile`` (a guard on the weight's version counter would recompile
    at every step) and reads the tensors from the module's dicts, so ``torch.fx`` traces the
    forward as the plain ``F.linear`` it is.
    """
    weight = layer._parameters["weight"]
    assert weight is not None
    if weight._version != layer.__dict__.get(CLEAN):
        with torch.no_grad():
            weight.mul_(layer.mask)
        mark_clean(layer)


class DynamicSparseLinear(torch.nn.Linear):
    """``nn.Linear`` whose weight is masked to ``density`` and can be rewired in place.

    The initial mask keeps exactly ``round(density * in * out)`` (at least 1) random
    positions, drawn from the global RNG like the weights themselves (``torch.manual_seed``
    controls both). Masked weights are zero; the forward re-zeroes them only if the weight
    changed since they were last known zero (an optimizer without
    :func:`dynarch.masks.enforce`), so gradients stay dense for :meth:`store_gradients`.
    Rewiring records a ``"rewire"`` event and draws from an engine generator: the model's
    when the layer is trained by a :class:`~dynarch.train.Trainer` or ``model=`` is given
    to :meth:`rewire` (the event is then in the model's history and run directory), else
    the layer's own, seeded from the global RNG when the layer is built (reseed it with
    ``dynarch.set_seed(layer, seed)``).

    Example:
        >>> layer = DynamicSparseLinear(4, 3, density=0.5, bias=False)
        >>> int(layer.weight_mask.sum()), layer.get_sparsity()
        (6, 0.5)
    """

    _dynarch_leaf = True  # traced as the Linear it is (dynarch.graph.LEAF)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        density: float,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.density = check_density(density)
        n = self.weight.numel()
        keep = torch.randperm(n)[: max(1, round(self.density * n))].to(self.weight.device)
        mask = torch.zeros(n, dtype=torch.bool, device=self.weight.device)
        mask[keep] = True
        self.register_buffer(MASK, mask.view_as(self.weight), persistent=True)
        with torch.no_grad():
            self.weight.mul_(self.mask)
        mark_clean(self)
        # the layer's own generator (for rewires outside a model): seeded from the global
        # RNG too, so two layers never draw the same regrowth
        set_seed(self, int(torch.randint(0, 2**62, ())))
        self.stored_grad: Tensor | None = None

    @property
    def mask(self) -> Tensor:
        """The ``weight_mask`` buffer (True: active connection)."""
        mask = self._buffers[MASK]
        assert mask is not None
        return mask

    def forward(self, input: Tensor) -> Tensor:
        _rezero(self)
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density}"

    def store_gradients(self) -> None:
        """Keep a copy of the current dense ``weight.grad`` for the next :meth:`rewire`."""
        if self.weight.grad is None:
            raise ValueError("store_gradients: weight.grad is None; call loss.backward() first")
        self.stored_grad = self.weight.grad.detach().clone()

    def get_sparsity(self) -> float:
        """Fraction of masked (zero) positions: ``1 - active / (in * out)``."""
        mask = self.mask
        return 1.0 - int(mask.sum()) / mask.numel()

    def rewire(
        self,
        method: str = "set",
        prune_rate: float = 0.3,
        temperature: float = 1.0,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        regrow_init: str = "zero",
        model: nn.Module | None = None,
    ) -> Event:
        """One update of this layer; the active count is preserved exactly.

        Drops ``min(round(prune_rate * active), inactive)`` active weights of smallest
        ``|w|``, then regrows as many positions among all inactive ones (just-dropped
        included): ``"set"`` uniformly at random, ``"deep_r"`` sampled with probability
        ``softmax(|g| / temperature)`` (``g``: :meth:`store_gradients`' copy, used by this
        rewire only, else the current ``weight.grad``). With ``optimizer`` the state of
        changed positions is zeroed. ``regrow_init`` as in :class:`~dynarch.sparse.Rewirer`.
        ``model``, the model holding this layer, records the ``"rewire"`` event (details under
        the layer's name) so its history and run directory show it, and its engine generator
        draws. By default that is the model a :class:`~dynarch.train.Trainer` trains the layer
        in, else the layer itself.

        Example:
            >>> layer = DynamicSparseLinear(10, 10, density=0.3)
            >>> layer.rewire("set", prune_rate=0.5).details[""]
            {'dropped': 15, 'regrown': 15, 'active': 30, 'density': 0.3}
        """
        check_choice("method", method, METHODS)
        check_choice("regrow_init", regrow_init, _ops.GROW_INITS)
        if (
            isinstance(prune_rate, bool)
            or not isinstance(prune_rate, int | float)
            or not (0 <= prune_rate <= 1)
        ):
            raise ValueError(f"prune_rate must be a number in [0, 1], got {prune_rate!r}")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not (math.isfinite(temperature) and temperature > 0)
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        grad = self.stored_grad if self.stored_grad is not None else self.weight.grad
        if grad is not None and grad.shape != self.weight.shape:
            grad = None  # stale copy from before a structural change
        if grad is None and (method == "deep_r" or regrow_init == "gradient"):
            raise ValueError(
                f"rewire(method={method!r}, regrow_init={regrow_init!r}) needs a gradient: "
                "call loss.backward() (and store_gradients()) first"
            )
        owner: nn.Module = self
        name = ""
        trained = self.__dict__.get(OWNER)  # the model a Trainer trains this layer in
        holder = model if model is not None else (trained() if trained is not None else None)
        if holder is not None:
            names = [n for n, m in holder.named_modules() if m is self]
            if names:
                owner, name = holder, names[0]
            elif model is not None:
                raise ValueError(
                    "this DynamicSparseLinear is not a submodule of the model given; pass the "
                    "model that holds it as model="
                )
        mask = self.mask
        active, n = int(mask.sum()), mask.numel()
        k = min(round(prune_rate * active), n - active)
        gen = engine_state(owner).generator
        if method == "deep_r":
            assert grad is not None

            def grow() -> Tensor | None:
                assert grad is not None
                return _ops.gumbel_scores(grad, temperature, gen)
        else:

            def grow() -> Tensor | None:
                return None

        if optimizer is not None:
            check_held(optimizer, {"this layer": self}, owner="DynamicSparseLinear.rewire")
        states = [] if optimizer is None else _ops.state_tensors(optimizer, self.weight)
        stale = self.weight._version != self.__dict__.get(CLEAN)  # stepped since last zeroed
        with torch.no_grad(), transaction(owner, "rewire", name or "*", reason=method) as tx:
            if stale:  # re-zero before mark_clean below vouches for the masked weights
                self.weight.mul_(mask)
            _ops.rewire_layer(
                mask, self.weight, _ops.active_indices(mask), (k, k),
                lambda idx: self.weight.detach().reshape(-1).index_select(0, idx).abs(), grow,
                regrow_init, lambda: grad, states, gen,
            )  # fmt: skip
            tx.details[name] = {"dropped": k, "regrown": k, "active": active, "density": active / n}
        self.stored_grad = None  # the copy served this rewire; later ones read weight.grad
        mark_clean(self)
        for holder in {id(owner): owner, id(self): self}.values():
            enforcer = None if optimizer is None else get_enforcer(holder, optimizer)
            if enforcer is not None:
                enforcer.resync()
        assert tx.event is not None
        return tx.event
