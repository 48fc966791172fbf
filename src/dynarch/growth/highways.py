"""Dead-neuron highways: repurpose dead units as long-range forward skips.

For each layer ``L`` with dead units ``D`` (e.g. :meth:`dynarch.activity.Extrema.dead_units`)
and the chain of layers after it, ``L → P1 → … → P_span`` (each the single layer reading the
previous one's units, found on the traced graph), :func:`highways` does, in one ``"highway"``
event per layer:

1. **re-point**: the incoming weights of the units ``D`` of ``L`` are re-drawn from
   ``U(-b, b)``, ``b = 1/sqrt(fan_in)`` (engine generator; masked positions stay zero) and
   their biases set to 0, so they carry ``L``'s input again; their optimizer state is reset;
2. **reroute**: their outgoing connections in ``P1`` (the input columns ``D``) are zeroed
   (and switched off in ``P1``'s mask when it is masked; optimizer state reset), and so are
   the columns ``D`` of every earlier skip reading ``L``'s post-activation output (a skip
   reading ``L``'s units before the activation is refused);
3. **highway**: a zero-initialised, masked skip projection (:mod:`dynarch.growth.skip`) from
   ``L``'s post-activation output to ``P_span``'s output, whose only active connections are
   the columns ``D`` (``len(D) × width(P_span)`` weights), bypassing ``P1 … P_{span-1}``.

A BatchNorm between ``L`` and its activation is reset for the units ``D`` too (weight 1,
bias 0, running mean 0, running variance 1, optimizer state 0): its per-unit shift or scale
is often what killed them, and left alone it would keep them dead.

The function is unchanged on every input where the dead units output exactly 0 (every input
where they were inactive, so every observed sample): their old outgoing weights only ever
multiplied zeros, their new outputs meet zero columns, and the highway starts at zero. Hence
the activation after ``L`` (through BatchNorms) must output exactly 0 for an inactive unit:
``ReLU``, ``ReLU6``, ``Hardtanh(min_val=0)``, ``LeakyReLU(0)`` or a functional ``relu``. Any
other activation (LeakyReLU, GELU, SiLU, ELU, Tanh, ...; or none) is refused, as is a norm
between the activation and ``P1`` (it turns a dead unit's 0 into a constant): zeroing the
outgoing weights of units that output non-zero values would change the function. ``span``
must be at least 2 (``span=1`` would route them back to ``P1``). Pass ``optimizer`` so the
highway's mask is enforced and its weight trains. A layer whose units a LayerNorm normalises
together is refused: re-pointing some of them would change the LayerNorm's mean and variance,
hence every unit's output.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
    ...                       nn.Linear(6, 2))
    >>> with torch.no_grad():
    ...     model[0].bias[:2] = -100.0  # units 0 and 1 are dead
    >>> x = torch.randn(8, 4); before = model(x)
    >>> (event,) = highways(model, {"0": torch.tensor([0, 1])})
    >>> event.details["target"], event.details["active"]
    ('4', 4)
    >>> torch.equal(model(x), before)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .._engine import engine_state, transaction
from .._validate import check_int, check_optimizer
from ..activity import Extrema, carrier, post_activation
from ..events import Event
from ..graph import NORMS, ModelGraph, UnsupportedModelError, analyse
from ..masks import MASK
from ..remap import out_units
from ..sparse._ops import fan_in_bound, state_tensors
from ._units import check_reason, get_layer, unit_indices
from .skip import _details, _join, _skip_replay, build_skip, plan_skip, skips

__all__ = ["chain", "highways"]


def chain(graph: ModelGraph, name: str, span: int) -> list[str]:
    """The ``span`` layers after ``name``, each the single reader of the previous one's units.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 1))
        >>> chain(analyse(net), "0", 2)
        ['2', '3']
    """
    path: list[str] = []
    cur = name
    for _ in range(span):
        group = graph.group(cur)
        if len(group.producers) != 1:
            raise UnsupportedModelError(
                f"cannot route a highway through '{cur}': its units are shared with "
                f"{group.producers} through a residual add"
            )
        readers = [c for c, _ in group.consumers]
        if len(readers) != 1:
            raise UnsupportedModelError(
                f"a highway from '{name}' with span={span} needs a chain of {span} layers each "
                f"read by exactly one layer, but '{cur}' is read by {readers or 'no layer'}; "
                f"leave '{name}' out of the units (an Extrema leaves such layers out) or give a "
                "smaller span"
            )
        cur = readers[0]
        path.append(cur)
    return path


def _has_chain(graph: ModelGraph, name: str, span: int) -> bool:
    try:
        chain(graph, name, span)
    except UnsupportedModelError:
        return False
    return True


def _dead_of(model: nn.Module, units: Any) -> dict[str, Tensor]:
    if isinstance(units, Extrema):
        if units.model is not model:
            raise ValueError("the Extrema given watches another model than the one to change")
        found = {n: units.dead_units(n) for n in units.layers}
    elif isinstance(units, Mapping):
        found = {n: unit_indices(u, get_layer(model, n), n) for n, u in units.items()}
    else:
        raise TypeError(
            f"units must be {{layer name: unit indices}} or an Extrema, got {type(units).__name__}"
        )
    return {n: t for n, t in found.items() if t.numel()}


def _reset(t: Tensor, optimizer: torch.optim.Optimizer | None, idx: Tensor, dim: int) -> None:
    for state in state_tensors(optimizer, t):
        state.index_fill_(dim, idx, 0)


def highways(
    model: nn.Module,
    extrema_or_units: Extrema | Mapping[str, Tensor | Sequence[int]],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    span: int = 2,
    reason: str = "",
) -> list[Event]:
    """Turn the dead units of each layer into a highway to the layer ``span`` steps ahead.

    ``extrema_or_units`` is an :class:`~dynarch.activity.Extrema` (its dead units) or
    ``{layer: unit indices}``. See the module doc for what happens exactly. Returns one
    ``"highway"`` event per layer with dead units (none: ``[]``); details: ``layer``,
    ``units``, ``consumer`` (``P1``), ``span``, and the skip's ``source``, ``target``,
    ``module``, ``kind``, ``in``, ``out``, ``params``, ``active``. All layers are checked
    before anything changes. Given an Extrema, layers no highway can start from (without a
    chain of ``span`` single-reader layers after them, e.g. the last hidden layer) are left
    out; given explicit units, such a layer is an error.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(),
        ...                       nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [e.details["target"] for e in highways(model, {"0": [2]}, span=3)]
        ['6']
    """
    check_optimizer(optimizer, optional=True)
    check_int("span", span, 2)
    check_reason(reason)
    dead = _dead_of(model, extrema_or_units)
    if not dead:
        return []
    graph = analyse(model)
    if isinstance(extrema_or_units, Extrema):  # leave out the layers no highway can leave
        dead = {n: u for n, u in dead.items() if _has_chain(graph, n, span)}
    plans = {}
    for name in dead:
        norms = graph.group(name).layernorm_over_channels
        if norms:
            raise UnsupportedModelError(
                f"cannot route the dead units of '{name}' into a highway: LayerNorm '{norms[0]}' "
                "normalises over its units, so re-pointing them would change every unit's output; "
                "highways need layers without a LayerNorm over their units"
            )
        path = chain(graph, name, span)
        width, cols = out_units(get_layer(model, name)), get_layer(model, path[0]).weight.shape[1]
        if cols != width:
            raise UnsupportedModelError(
                f"'{path[0]}' reads the {width} units of '{name}' as {cols} inputs (flattened); "
                "a highway needs a layer reading them one column each"
            )
        bns = _zero_when_dead(graph, name)
        source = post_activation(graph, name)
        readers = _skip_readers(model, graph, name, source)
        plans[name] = (path, source, plan_skip(model, source, path[-1], graph), readers, bns)
    gen = engine_state(model).generator
    events = []
    for name, units in dead.items():
        path, source, (kind, n_in, n_out), readers, bns = plans[name]
        layer, first = get_layer(model, name), get_layer(model, path[0])
        mask = torch.zeros(n_out, n_in, *((1, 1) if kind == "Conv2d" else ()), dtype=torch.bool)
        mask[:, units] = True
        with transaction(model, "highway", name, reason=reason) as tx:
            _repoint(layer, units, optimizer, gen)
            for bn in bns:
                _reset_norm(model.get_submodule(bn), units, optimizer)
            _reroute(first, units, optimizer)
            for reader in readers:  # earlier skips reading these units: their columns too
                _reroute(reader, units, optimizer)
            skip_name, skip = build_skip(
                model, source, path[-1], kind=kind, n_in=n_in, n_out=n_out, mask=mask
            )
            _join(model, skip, optimizer)
            tx.details = {"layer": name, "units": units.tolist(), "consumer": path[0],
                          "span": span} | _details(skip_name, skip, kind, n_in, n_out)  # fmt: skip
            tx.replay = _skip_replay(skip_name, skip, kind, n_in, n_out)
        assert tx.event is not None
        events.append(tx.event)
    return events


#: Activations whose output is exactly 0 wherever the unit is inactive (output <= 0).
_ZERO_FUNCS: set[Any] = {F.relu, torch.relu, torch.relu_, F.relu6}
_ZERO_METHODS = {"relu", "relu_"}
_BEFORE_ACT = (nn.Dropout, nn.Identity)  # map x <= 0 to x' <= 0 and 0 to 0


def _zero_act(mod: nn.Module) -> bool:
    if isinstance(mod, nn.ReLU):
        return True
    if isinstance(mod, nn.Hardtanh):  # ReLU6 too
        return float(mod.min_val) == 0.0
    return isinstance(mod, nn.LeakyReLU) and float(mod.negative_slope) == 0.0


def _zero_when_dead(graph: ModelGraph, name: str) -> list[str]:
    """The BatchNorms between ``name`` and its activation, after checking that a dead unit of
    ``name`` outputs exactly 0 (a zero-when-inactive activation follows it, through norms,
    dropout and identities, and no norm of its units follows that activation)."""
    fix = (
        "highways need ReLU, ReLU6, Hardtanh(min_val=0) or a functional relu right after the "
        "layer (through BatchNorms); for other activations grow with clone_units or add_patches"
    )
    calls = graph.calls.get(name, [])
    if len(calls) != 1:
        raise UnsupportedModelError(
            f"cannot route the dead units of '{name}' into a highway: it is called "
            f"{len(calls)} times in forward; highways need a layer called once"
        )
    node: fx.Node = calls[0]
    norms: list[str] = []
    found = "nothing"
    while len(node.users) == 1:
        user = next(iter(node.users))
        target = str(user.target)
        mod = graph.modules.get(target) if user.op == "call_module" else None
        if isinstance(mod, (*NORMS, *_BEFORE_ACT)):
            norms += [target] if isinstance(mod, NORMS) else []
            node = user
            continue
        if (
            (mod is not None and _zero_act(mod))
            or (user.op == "call_function" and user.target in _ZERO_FUNCS)
            or (user.op == "call_method" and user.target in _ZERO_METHODS)
        ):
            after = [n for n in graph.group(name).norms if n not in norms]
            if after:
                raise UnsupportedModelError(
                    f"cannot route the dead units of '{name}' into a highway: norm '{after[0]}' "
                    "normalises its units after the activation, turning a dead unit's 0 into a "
                    f"non-zero value, so zeroing their outgoing weights would change the "
                    f"function; {fix}"
                )
            bn = (nn.BatchNorm1d, nn.BatchNorm2d)
            return [n for n in norms if isinstance(graph.modules[n], bn)]
        found = f"'{target}' ({mod!r})" if mod is not None else f"'{user.name}' ({user.op})"
        break
    else:
        if len(node.users) > 1:
            found = f"{len(node.users)} uses of its output"
    raise UnsupportedModelError(
        f"cannot route the dead units of '{name}' into a highway: it is followed by {found}, "
        "whose output for a dead unit (positive on fewer than eps of the samples) is not "
        f"exactly 0, so zeroing their outgoing weights would change the function; {fix}"
    )


def _reset_norm(norm: nn.Module, units: Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """BatchNorm defaults for channels ``units``: weight 1, bias 0, running mean 0, var 1."""
    assert isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d)
    with torch.no_grad():
        for t, value in ((norm.weight, 1.0), (norm.bias, 0.0), (norm.running_mean, 0.0),
                         (norm.running_var, 1.0)):  # fmt: skip
            if t is not None:
                t.index_fill_(0, units.to(t.device), value)
                if isinstance(t, nn.Parameter):
                    _reset(t, optimizer, units.to(t.device), 0)


def _skip_readers(
    model: nn.Module, graph: ModelGraph, name: str, source: str
) -> list[nn.Linear | nn.Conv2d]:
    """Projections of the skips reading ``name``'s units (from its post-activation output
    ``source``); a skip reading them elsewhere (before the activation) is refused, since
    re-pointing the dead units changes what it receives."""
    modules = {id(m): n for n, m in model.named_modules()}
    found = []
    for skip_name, skip in skips(model).items():
        src = modules.get(id(skip.__dict__.get("_source_module")))
        if src is None or carrier(graph, src) != name:
            continue
        if src != source:
            raise UnsupportedModelError(
                f"cannot route the dead units of '{name}' into a highway: skip '{skip_name}' "
                f"reads them from '{src}', not from the post-activation output '{source}', so "
                "re-pointing them would change what it receives; remove that skip first"
            )
        found.append(skip.proj)
    return found


def _repoint(
    layer: nn.Linear | nn.Conv2d,
    units: Tensor,
    optimizer: torch.optim.Optimizer | None,
    gen: torch.Generator,
) -> None:
    """Fresh fan-in uniform incoming weights (masked positions stay 0) and zero biases."""
    w = layer.weight
    rows = units.to(w.device)
    bound = fan_in_bound(w)
    values = (torch.rand((units.numel(), *w.shape[1:]), generator=gen) * 2 - 1) * bound
    values = values.to(w.device, w.dtype)
    mask = layer._buffers.get(MASK)
    with torch.no_grad():
        if mask is not None:
            values *= mask.index_select(0, rows)
        w.index_copy_(0, rows, values)
        _reset(w, optimizer, rows, 0)
        if layer.bias is not None:
            layer.bias.index_fill_(0, rows, 0.0)
            _reset(layer.bias, optimizer, rows, 0)


def _reroute(
    consumer: nn.Linear | nn.Conv2d, units: Tensor, optimizer: torch.optim.Optimizer | None
) -> None:
    """Zero (and mask off) ``consumer``'s input columns ``units``."""
    w = consumer.weight
    cols = units.to(w.device)
    with torch.no_grad():
        w.index_fill_(1, cols, 0.0)
        _reset(w, optimizer, cols, 1)
        mask = consumer._buffers.get(MASK)
        if mask is not None:
            mask.index_fill_(1, cols, False)
