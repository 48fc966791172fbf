"""The growth tournament: propose candidate actions, score each by ΔMI/ΔParams, apply the best.

Candidates (one per eligible hidden layer and kind):

* ``"patch"`` — dense patches of connections into the dead/saturated units of a *masked*
  layer (:func:`dynarch.growth.patches.add_patches`; units found by
  :class:`dynarch.activity.Extrema` on the held-out batch);
* ``"insert"`` — an identity layer after the layer (:func:`dynarch.deepen`), optionally
  masked to ``insert_density`` keeping its diagonal (function unchanged either way);
* ``"widen"`` — ``widen_units`` more units, Net2Net split (:func:`dynarch.widen`);
* ``"skip"`` — a zero-initialised forward skip from the layer to a later layer that is not
  its direct consumer (:func:`dynarch.growth.skip.add_skip`).

**Score.** Every candidate preserves the function (a widen up to its symmetry-breaking
``widen_noise``; pass ``widen_noise=0`` for an exact copy), so its mutual information with the
labels right after it is applied equals the model's: ΔMI would be 0. The tournament therefore looks
ahead: the model is deep-copied (engine listeners left out, the engine generator continued
from the model's state), the candidate is applied to the copy and the copy is trained for
``probe_steps`` full-batch SGD steps on the probe batch; an unchanged copy gets the same
steps. ``ΔMI = MI(candidate copy) − MI(unchanged copy)`` (bits, measured on the held-out
batch with :func:`dynarch.growth.mi.mutual_information` on the model output, or on the module
``monitor``) isolates what the new structure lets the same training achieve, and
``score = ΔMI / ΔParams`` with ``ΔParams`` the active parameters it adds (masked weights do
not count). Cost: one copy plus ``probe_steps`` small steps per candidate.

**Economy.** Only candidates the economy (any object with ``can_afford`` / ``spend``, e.g.
:class:`dynarch.triggers.CreditEconomy`) can afford are scored; the best is applied and paid
for. Units are charged only when the economy prices them (``cost_per_unit`` not ``None``),
otherwise a unit's price is its connections. With nothing affordable, nothing happens.

**Determinism.** The probe seed is ``seed`` or, when ``None``, one draw from the model's
engine generator; global RNG is restored after probing. Same model, data and seed: same
scores and the same choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._engine import engine_state, transaction
from .._validate import check_int, check_model, check_optimizer
from ..activity import Extrema, forward_layers, post_activation, try_analyse
from ..events import Event
from ..graph import ModelGraph
from ..masks import MASK
from ..remap import out_units
from ._tournament_callback import TournamentCallback
from .candidates import KINDS, Candidate, Economy, active_params, scratch_copy
from .mi import METHODS, probe_mi

__all__ = ["Tournament", "TournamentCallback"]

_LAYERS = (nn.Linear, nn.Conv2d)


def _pair(data: object, role: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise TypeError(f"{role} must be a pair (x, y) of tensors, got {type(data).__name__}")
    x, y = data
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.shape[:1] != y.shape[:1]:
        raise ValueError(f"{role} must be tensors x, y with the same first dimension")
    return x, y


def _labels(data: tuple[Tensor, Tensor], role: str) -> tuple[Tensor, Tensor]:
    """``data`` with its labels as int64 (any integer dtype is accepted and converted)."""
    x, y = data
    if y.dim() != 1 or y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"{role}: y must be a 1-D tensor of integer class indices (mutual information is "
            f"measured against class labels), got dtype {y.dtype} and shape {tuple(y.shape)}"
        )
    return x, y.long()


def _inputs(model: nn.Module, data: tuple[Tensor, Tensor], role: str) -> None:
    """Refuse floating inputs of another dtype than the model's floating parameters."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    x = data[0]
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        raise ValueError(
            f"{role}: x has dtype {x.dtype} but the model's parameters are {dtype}; convert one "
            f"of them (e.g. x.to({dtype})), otherwise every candidate fails to run"
        )


def _fraction(name: str, value: object) -> None:
    if value is not None and not (
        isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1
    ):
        raise ValueError(f"{name} must be None or a number in (0, 1], got {value!r}")


class Tournament:
    """Propose growth candidates for ``model``, score them by ΔMI/ΔParams, apply the best.

    ``data=(x, y)`` is the held-out batch. Without ``probe_data`` its first half trains the
    trial copies and its second half measures MI. Labels ``y`` are integer class indices
    (converted to int64); floating inputs ``x`` must have the dtype of the model's parameters.
    ``layers`` restricts the layers candidates grow from (default: every Linear/Conv2d but
    the last, in module order); a skip goes from such a layer to every Linear/Conv2d at least
    two places later. ``widen_units`` defaults
    to a quarter of the layer's width; ``extrema`` holds keyword arguments for
    :class:`dynarch.activity.Extrema`, which finds a patch's units (at most ``patch_units``;
    default ``{"quantile": 0.9}``: the 10% most active units, then dead ones — zero-initialised
    patches into dead units receive no gradient, so they score 0).
    See the module docstring for the score, the economy and determinism.

    Example:
        >>> import torch
        >>> from dynarch.models import mlp
        >>> _ = torch.manual_seed(0); model = mlp(6, [8], 3)
        >>> x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
        >>> t = Tournament(model, data=(x, y), candidates=("widen", "insert"), seed=0)
        >>> [c.name for c in t.propose()]
        ['insert:fc1', 'widen:fc1']
        >>> t.run().op
        'tournament'
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        data: tuple[Tensor, Tensor],
        candidates: Sequence[str] = KINDS,
        economy: Economy | None = None,
        layers: Sequence[str] | None = None,
        probe_data: tuple[Tensor, Tensor] | None = None,
        probe_steps: int = 20,
        probe_lr: float = 0.05,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        monitor: str | None = None,
        mi_method: str = "binned",
        bins: int = 10,
        widen_units: int | None = None,
        widen_noise: float = 0.01,
        insert_density: float | None = None,
        patch_units: int = 8,
        patch_size: int | None = None,
        skip_density: float | None = None,
        extrema: dict[str, Any] | None = None,
        seed: int | None = None,
        min_score: float | None = None,
        reason: str = "tournament",
    ) -> None:
        self.model = check_model(model)
        if isinstance(candidates, str) or not candidates or any(k not in KINDS for k in candidates):
            raise ValueError(
                f"candidates must be a non-empty list from {list(KINDS)}, got {candidates!r}"
            )
        if mi_method not in METHODS:
            raise ValueError(f"unknown mi_method {mi_method!r}; allowed: {', '.join(METHODS)}")
        x, y = _pair(data, "data")
        if probe_data is None:
            if x.shape[0] < 4:
                raise ValueError(f"data needs at least 4 samples to split, got {x.shape[0]}")
            half = x.shape[0] // 2
            probe_data, data = (x[:half], y[:half]), (x[half:], y[half:])
        self.held_out = _labels(_pair(data, "data"), "data")
        self.probe_data = _labels(_pair(probe_data, "probe_data"), "probe_data")
        _inputs(self.model, self.held_out, "data")
        _inputs(self.model, self.probe_data, "probe_data")
        for arg, value, low in (("probe_steps", probe_steps, 0), ("patch_units", patch_units, 1),
                                ("bins", bins, 2)):  # fmt: skip
            check_int(arg, value, low)
        for arg, opt in (("widen_units", widen_units), ("seed", seed)):
            if opt is not None:
                check_int(arg, opt, 1 if arg == "widen_units" else 0)
        _fraction("insert_density", insert_density)
        _fraction("skip_density", skip_density)
        if not (isinstance(probe_lr, int | float) and math.isfinite(probe_lr) and probe_lr > 0):
            raise ValueError(f"probe_lr must be a finite number > 0, got {probe_lr!r}")
        if economy is not None and not all(hasattr(economy, a) for a in ("can_afford", "spend")):
            raise TypeError(
                "economy must have can_afford() and spend() (e.g. a CreditEconomy), got "
                f"{type(economy).__name__}"
            )
        self.kinds, self.economy, self.layers = tuple(candidates), economy, layers
        self.probe_steps, self.probe_lr, self.loss_fn = probe_steps, float(probe_lr), loss_fn
        self.monitor, self.mi_method, self.bins = monitor, mi_method, bins
        self.widen_units, self.widen_noise = widen_units, float(widen_noise)
        self.insert_density, self.skip_density = insert_density, skip_density
        self.patch_units, self.patch_size = patch_units, patch_size
        self.extrema_kwargs = {"quantile": 0.9} if extrema is None else dict(extrema)
        self.seed, self.min_score, self.reason = seed, min_score, reason
        self.last: list[Candidate] = []  # the candidates of the last run, with their scores
        self.rejected: list[tuple[str, str]] = []  # (candidate, why) from the last propose()
        self.events: list[Event] = []
        self._round_seed = 0

    def _hidden(self) -> tuple[list[str], list[str], ModelGraph | None]:
        graph = try_analyse(self.model)
        names = forward_layers(self.model, graph)
        if self.layers is None:
            return names[:-1], names, graph
        bad = [n for n in self.layers if n not in names]
        if bad:
            raise ValueError(f"layers {bad} are not Linear/Conv2d modules; available: {names}")
        return list(self.layers), names, graph

    def _extreme_units(self, names: list[str]) -> dict[str, list[int]]:
        if not names:
            return {}
        ext = Extrema(self.model, names, **self.extrema_kwargs)
        ext.observe(self.held_out[0])
        found = {}
        for n in names:  # saturated units first: zero-initialised patches into dead ones stay 0
            units = torch.cat([ext.saturated_units(n), ext.dead_units(n)]).tolist()
            found[n] = list(dict.fromkeys(units))[: self.patch_units]
        return {n: units for n, units in found.items() if units}

    def propose(self) -> list[Candidate]:
        """The candidates for the model's current structure, each measured on a trial copy
        (``params``, ``connections``, ``units``); failing or empty ones go to ``rejected``,
        but when every candidate (two or more) fails with the same error, that error is raised
        (as a ``RuntimeError`` naming it): it is a misuse, not a candidate's limit.
        Fixes the round's probe seed (drawn from the engine generator when ``seed`` is None)."""
        self._to_model_device()
        if self.seed is not None:
            self._round_seed = self.seed
        else:
            gen = engine_state(self.model).generator
            self._round_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        hidden, names, graph = self._hidden()
        masked = [n for n in hidden if self.model.get_submodule(n)._buffers.get(MASK) is not None]
        patches = self._extreme_units(masked) if "patch" in self.kinds else {}
        out: list[Candidate] = []
        for name in hidden:
            if name in patches:
                out.append(Candidate("patch", name, {"units": patches[name],
                                                     "patch_size": self.patch_size}))  # fmt: skip
            if "insert" in self.kinds:
                out.append(Candidate("insert", name, {"density": self.insert_density}))
            if "widen" in self.kinds:
                k = self.widen_units or max(1, out_units(self.model.get_submodule(name)) // 4)
                out.append(Candidate("widen", name, {"units": k, "noise": self.widen_noise}))
            if "skip" in self.kinds:
                src = post_activation(graph, name)
                for to in names[names.index(name) + 2 :] if name in names else []:
                    out.append(Candidate("skip", src, {"to": to, "density": self.skip_density}))
        self.rejected, kept, before = [], [], active_params(self.model)
        errors: dict[str, Exception] = {}
        for c in out:
            try:
                net, c.units = self._trial(c)
                self._runs(net)
            except (ValueError, TypeError, KeyError, NotImplementedError, RuntimeError) as exc:
                why = f"{type(exc).__name__}: {exc}"
                self.rejected.append((c.name, why))
                errors.setdefault(why, exc)
                continue
            after = active_params(net)
            c.params, c.connections = after[0] - before[0], after[1] - before[1]
            if c.params <= 0:
                self.rejected.append((c.name, "adds no active parameters"))
            else:
                kept.append(c)
        if len(out) > 1 and len(errors) == 1 and len(self.rejected) == len(out):
            (why, cause), names = next(iter(errors.items())), [c.name for c in out]
            raise RuntimeError(
                f"every tournament candidate ({', '.join(names)}) failed with the same error, "
                f"so the model or the data is at fault, not a candidate: {why}"
            ) from cause
        return kept

    def _to_model_device(self) -> None:
        """Keep the held-out and probe batches on the device of the model (a trainer may
        have moved it to CUDA after the tournament was built)."""
        p = next(self.model.parameters(), None)
        if p is not None and self.held_out[0].device != p.device:
            self.held_out = (self.held_out[0].to(p.device), self.held_out[1].to(p.device))
            self.probe_data = (self.probe_data[0].to(p.device), self.probe_data[1].to(p.device))

    def _runs(self, net: nn.Module) -> None:
        """Forward two held-out samples through a trial copy (eval mode, no grad): a candidate
        that builds but cannot run (e.g. a skip between feature maps of different sizes)
        raises here and is rejected instead of failing the round."""
        mode = net.training
        net.eval()
        try:
            with torch.no_grad():
                net(self.held_out[0][:2])
        finally:
            net.train(mode)

    def _trial(self, c: Candidate) -> tuple[nn.Module, int]:
        """A scratch copy with ``c`` applied, and the number of units it added (``widen``: the
        new units; ``insert``: the new layer's; patches and skips add none)."""
        net = scratch_copy(self.model)
        events = c.apply(net, None, reason=self.reason)
        if c.kind == "widen":
            return net, int(c.options["units"])
        if c.kind == "insert":
            return net, sum(out_units(net.get_submodule(n)) for n in events[0].details["inserted"]
                            if isinstance(net.get_submodule(n), _LAYERS))  # fmt: skip
        return net, 0

    def _probe(self, net: nn.Module) -> float:
        return probe_mi(net, self.probe_data, self.held_out, steps=self.probe_steps,
                        lr=self.probe_lr, seed=self._round_seed, loss_fn=self.loss_fn,
                        monitor=self.monitor, method=self.mi_method, bins=self.bins)  # fmt: skip

    def baseline_mi(self) -> float:
        """MI (bits) of an unchanged copy of the model after the probe steps."""
        self._to_model_device()
        return self._probe(scratch_copy(self.model))

    def score(self, candidate: Candidate, baseline: float | None = None) -> float:
        """``ΔMI / ΔParams`` of ``candidate`` (also stored on it, with ``delta_mi``) against
        ``baseline`` (default: :meth:`baseline_mi`); uses the seed fixed by the last
        :meth:`propose`."""
        base = self.baseline_mi() if baseline is None else baseline
        net, _ = self._trial(candidate)
        candidate.delta_mi = self._probe(net) - base
        candidate.score = candidate.delta_mi / max(candidate.params, 1)
        return candidate.score

    def _units(self, c: Candidate) -> int:
        return c.units if getattr(self.economy, "cost_per_unit", 0) is not None else 0

    def run(self, optimizer: torch.optim.Optimizer | None = None) -> Event | None:
        """Propose, score the affordable candidates, apply and pay for the best one.

        Returns the ``"tournament"`` event (``details``: ``chosen``, every candidate with its
        score, the ``applied`` ops, ``baseline_mi``, ``seed``) wrapping the structural event(s)
        of the applied op, or ``None`` when nothing is affordable or the best score is below
        ``min_score`` (nothing is changed or spent then).
        """
        check_optimizer(optimizer, optional=True)
        self.last = cands = self.propose()
        for c in cands:
            c.affordable = self.economy is None or bool(
                self.economy.can_afford(connections=c.connections, units=self._units(c))
            )
        pool = [c for c in cands if c.affordable]
        if not pool:
            return None
        base = self.baseline_mi()
        scores = [self.score(c, base) for c in pool]
        best = pool[scores.index(max(scores))]  # ties: the first proposed
        if self.min_score is not None and max(scores) < self.min_score:
            return None
        with transaction(self.model, "tournament", best.target, reason=self.reason) as tx:
            applied = best.apply(self.model, optimizer, reason=self.reason)
            tx.details = {"chosen": best.name, "candidates": [c.to_dict() for c in cands],
                          "applied": [e.op for e in applied], "baseline_mi": base,
                          "seed": self._round_seed}  # fmt: skip
        if self.economy is not None:
            self.economy.spend(connections=best.connections, units=self._units(best))
        assert tx.event is not None
        self.events.append(tx.event)
        return tx.event
