"""SlottedNetwork: modules grown into slots of a model through the engine, blended in by alpha.

See :mod:`dynarch.slots` for the lifecycle and how slots map to places in a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .._engine import engine_state
from .._validate import check_int, check_model, check_optimizer
from ..callbacks import Callback
from ..events import Event
from ..graph import ACTIVATIONS, NORMS, ModelGraph, UnsupportedModelError, analyse, resolve
from ..insert import attach, detach
from ..nn import BranchableLayer, Residual
from .topology import SlotState, SlotTopology, register_topology, topology_of

if TYPE_CHECKING:
    from ..train import Trainer

__all__ = ["AlphaSchedule", "LinearRamp", "SlottedNetwork", "default_anchors"]

S = SlotState


def _follow(graph: ModelGraph | None, name: str) -> str:
    """``name``, or the activation it feeds (through BatchNorm), when one follows it."""
    nodes = graph.calls.get(name, []) if graph is not None else []
    node, anchor = (nodes[0] if len(nodes) == 1 else None), name
    while graph is not None and node is not None and len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module" or len(graph.calls.get(str(user.target), [])) != 1:
            break
        mod = graph.modules[str(user.target)]
        node = user if isinstance(mod, NORMS) else None
        if isinstance(mod, (*NORMS, *ACTIVATIONS)):
            anchor = str(user.target)
    return anchor


def default_anchors(model: nn.Module) -> list[str]:
    """The anchor of each depth: every Linear/Conv2d/BranchableLayer but the last, in module
    order (not inside an attached module), followed through BatchNorm to its activation.

    Example:
        >>> default_anchors(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        ['1']
    """
    layers: list[str] = []
    skip: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(mod, Residual | BranchableLayer):
            skip.append(name)
        if isinstance(mod, nn.Linear | nn.Conv2d | BranchableLayer):
            layers.append(name)
    try:
        graph: ModelGraph | None = analyse(model)
    except UnsupportedModelError:
        graph = None
    return [_follow(graph, name) for name in layers[:-1]]


class AlphaSchedule(Protocol):
    """``alpha(t)`` for a slot ``t`` steps into training; ``done(t)``: it is integrated."""

    def __call__(self, t: int) -> float: ...

    def done(self, t: int) -> bool: ...


@dataclass(frozen=True)
class LinearRamp:
    """``alpha = min(1, t / steps)``; the slot is integrated once ``t >= steps``.

    Example:
        >>> ramp = LinearRamp(4)
        >>> [ramp(t) for t in range(6)], ramp.done(3), ramp.done(4)
        ([0.0, 0.25, 0.5, 0.75, 1.0, 1.0], False, True)
    """

    steps: int = 100

    def __post_init__(self) -> None:
        check_int("LinearRamp steps", self.steps, 1)

    def __call__(self, t: int) -> float:
        return min(1.0, max(t, 0) / self.steps)

    def done(self, t: int) -> bool:
        return t >= self.steps


def _topology(model: nn.Module, spec: object) -> SlotTopology:
    if spec is None:
        topo = topology_of(model)
        if topo is None:
            raise ValueError(
                "the model has no slot topology; pass a SlotTopology, a list of "
                "'after:<module>' slot ids or a {name: 'after:<module>'} mapping"
            )
        return topo
    if isinstance(spec, SlotTopology):
        return spec
    if isinstance(spec, Mapping):
        return SlotTopology(0, 0, names=spec)
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        topo = SlotTopology(0, 0)
        for slot_id in spec:
            topo.add_slot(slot_id)
        return topo
    raise TypeError(
        f"topology_or_slots must be a SlotTopology, a list of 'after:<module>' ids, a "
        f"{{name: id}} mapping or None, got {type(spec).__name__}"
    )


class SlottedNetwork(Callback):
    """Grows ``base`` in place by putting modules into the slots of a :class:`SlotTopology`.

    Not an ``nn.Module``: ``base`` itself is trained, saved and loaded (``net(x)`` is
    ``base(x)``); the topology is registered on it, so checkpoints keep the slot states and
    ``SlottedNetwork(loaded_model, None, ...)`` resumes from them. As a training callback it
    calls :meth:`update` after every step: germinated slots start training, training slots
    get ``alpha = alpha_schedule(steps since training started)`` and are integrated once
    ``alpha_schedule.done(...)``; expired embargoes end. With ``alpha_schedule=None`` alpha is
    a trainable parameter and slots stay training until :meth:`integrate`.

    Args:
        base: the model to grow.
        topology_or_slots: a :class:`SlotTopology`; a list of ``after:<module>`` ids; a
            ``{functional name: "after:<module>"}`` mapping; or ``None`` for the topology
            already registered on ``base`` (e.g. restored by :func:`dynarch.load`).
        optimizer: gets the new parameters (its state for old ones is kept). As a training
            callback, every ``on_fit_start`` replaces it with the trainer's optimizer: that is
            the one stepping, so modules grown during a fit (a later fit with a new optimizer
            included) join it and train.
        alpha_schedule: how a training slot's alpha grows (default ``LinearRamp(100)``).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> net = SlottedNetwork(model, ["after:1"], alpha_schedule=LinearRamp(2))
        >>> _ = net.add_module_to_slot("after:1", nn.Linear(8, 8))
        >>> for step in range(3):
        ...     net.update(step)
        >>> net.topology.get_slot("after:1").state.value, float(net.residual("after:1").alpha)
        ('integrated', 1.0)
    """

    def __init__(
        self,
        base: nn.Module,
        topology_or_slots: SlotTopology | Sequence[str] | Mapping[str, str] | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        alpha_schedule: AlphaSchedule | None = LinearRamp(100),
    ) -> None:
        check_model(base)
        check_optimizer(optimizer, optional=True)
        if alpha_schedule is not None and not (
            callable(alpha_schedule) and callable(getattr(alpha_schedule, "done", None))
        ):
            raise TypeError(
                "alpha_schedule must be None or have __call__(t) -> alpha and done(t) -> bool "
                f"(e.g. LinearRamp(100)), got {type(alpha_schedule).__name__}"
            )
        topo = _topology(base, topology_or_slots)
        registered = topology_of(base)
        if registered is not None and registered is not topo:
            raise ValueError(
                "the model already has another slot topology; pass None (or topology_of(model))"
            )
        grid = [s for s in topo if s.depth is not None]
        if any(s.anchor is None for s in grid):
            anchors = default_anchors(base)
            if len(anchors) < topo.rows:
                raise ValueError(
                    f"the topology has {topo.rows} rows but the model has {len(anchors)} hidden "
                    f"layers to anchor them at ({anchors}); pass anchors= to SlotTopology"
                )
            topo.set_anchors(anchors[: topo.rows])
        for slot in topo:
            if slot.key is None and slot.anchor is not None:
                try:
                    resolve(base, slot.anchor)
                except KeyError as exc:
                    raise KeyError(f"slot '{slot.id}' anchors at {exc.args[0]}") from None
        register_topology(base, topo)
        self.model, self.topology, self.optimizer = base, topo, optimizer
        self.alpha_schedule = alpha_schedule

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def _step(self, step: int | None = None) -> int:
        """``step``, or the engine's step when ``None``; a given step ahead of the engine's
        becomes the engine's (a hand-written loop's clock stamps the slot events too)."""
        st = engine_state(self.model)
        if step is None:
            return st.step
        step = check_int("step", step, 0)
        st.step = max(st.step, step)
        return step

    def _tail(self, anchor: str) -> str:
        """The module a new module on ``anchor`` is attached after: the end of its chain."""
        engine = engine_state(self.model).slots
        chain = [s for s in self.topology if s.anchor == anchor and s.key in engine]
        return engine[max(chain, key=lambda s: s.seq).key or ""] if chain else anchor

    def residual(self, slot_id: str) -> Residual | None:
        """The ``Residual`` holding the module in ``slot_id`` (``None`` when empty)."""
        slot = self.topology.get_slot(slot_id)
        name = engine_state(self.model).slots.get(slot.key or "")
        module = self.model.get_submodule(name) if name is not None else None
        return module if isinstance(module, Residual) else None

    def add_module_to_slot(
        self, slot_id: str, module: nn.Module, *, reason: str = "", step: int | None = None
    ) -> Event:
        """Attach ``module`` in the dormant slot ``slot_id`` (alpha 0): dormant → germinated.

        ``step`` defaults to the engine's step (the trainer keeps it current; in your own
        loop :meth:`update` with a step moves it).
        """
        step = self._step(step)
        self.topology.tick(step)
        slot = self.topology.check(slot_id, S.GERMINATED, step)
        if slot.anchor is None:
            raise ValueError(f"slot '{slot.id}' has no anchor; set anchors on the topology")
        key = "after:" + self._tail(slot.anchor)
        why = f"{reason}; slot {slot.id}" if reason else f"slot {slot.id}"
        event = attach(self.model, key, module, optimizer=self.optimizer,
                       trainable_alpha=self.alpha_schedule is None, reason=why)  # fmt: skip
        self.topology._seq += 1
        slot.key, slot.seq = key, self.topology._seq
        self.topology.transition(slot.id, S.GERMINATED, step)
        return event

    def remove_module_from_slot(
        self, slot_id: str, *, reason: str = "", step: int | None = None
    ) -> Event:
        """Detach the module of training slot ``slot_id``: training → pruned → embargoed
        (``step`` as in :meth:`add_module_to_slot`)."""
        step = self._step(step)
        self.topology.tick(step)
        slot = self.topology.check(slot_id, S.PRUNED, step)
        why = f"{reason}; slot {slot.id}" if reason else f"slot {slot.id}"
        event = detach(self.model, slot.key or "", optimizer=self.optimizer, reason=why)
        self.topology.transition(slot.id, S.PRUNED, step)
        self.topology.transition(slot.id, S.EMBARGOED, step)
        slot.key = None
        return event

    def start_training(self, slot_id: str, step: int | None = None) -> None:
        """germinated → training (:meth:`update` does this for every germinated slot)."""
        step = self._step(step)
        self.topology.transition(slot_id, S.TRAINING, step)
        self._set_alpha(slot_id, 0)

    def integrate(self, slot_id: str, step: int | None = None) -> None:
        """training → integrated (terminal: the module stays)."""
        self.topology.transition(slot_id, S.INTEGRATED, self._step(step))

    def _set_alpha(self, slot_id: str, t: int) -> None:
        res = self.residual(slot_id)
        if self.alpha_schedule is not None and res is not None:
            with torch.no_grad():
                res.alpha.fill_(float(self.alpha_schedule(t)))

    def update(self, step: int | None = None) -> None:
        """Advance the slots to ``step`` (default: the engine's step; a later step given
        here becomes the engine's, for a hand-written loop); see the class doc."""
        step = self._step(step)
        self.topology.tick(step)
        for slot in self.topology:
            if slot.state is S.GERMINATED:
                self.start_training(slot.id, step)
            elif slot.state is S.TRAINING and self.alpha_schedule is not None:
                t = step - slot.since
                self._set_alpha(slot.id, t)
                if self.alpha_schedule.done(t):
                    self.integrate(slot.id, step)

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.model is not self.model:
            raise ValueError(
                "the trainer trains another model than the SlottedNetwork grows; "
                "give the trainer the SlottedNetwork's model (net.model)"
            )
        self.optimizer = trainer.optimizer  # the one stepping: new modules must join it
        self.update()  # the engine's step: the trainer keeps it current across fits

    def on_step_end(self, trainer: Trainer) -> None:
        self.update()

    def state_dict(self) -> dict[str, Any]:
        return {"topology": self.topology.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"topology"}:
            raise ValueError(f"SlottedNetwork state must have key 'topology', got {state!r:.80}")
        self.topology.load_state_dict(state["topology"])
