"""Slots: named places where modules grow into a model, each with a lifecycle.

A :class:`SlotTopology` names the slots and tracks their :class:`SlotState`::

    dormant -> germinated -> training -> integrated (terminal)
                                      -> pruned -> embargoed -> dormant (after embargo_steps)

Slot ids are grid ids ``r{row}c{col}`` (row = depth, col = parallel index), layer-based ids
``after:<module name>`` (added with :meth:`SlotTopology.add_slot`) and functional names
(aliases such as ``"residual_slot"`` for one of those ids). :meth:`SlotTopology.transition`
refuses every other move with a :class:`SlotTransitionError` naming the slot, its state and
the allowed moves. A slot pruned at step ``s`` is embargoed until ``s + embargo_steps``.

:class:`SlottedNetwork` grows a model in place through the engine: a module put in a slot is
attached with :func:`dynarch.attach` as ``x + alpha * module(x)`` with ``alpha = 0`` (the
function is unchanged), then blended in by an alpha schedule while the slot is training;
removing it is a :func:`dynarch.detach` (the slot is then pruned and embargoed).
:class:`BranchableLayer` grows parallel branches of one layer mixed by softmax weights
(:func:`add_branch`, exactly function-preserving).

**Where grid slots attach.** Row ``r`` reads the output of anchor module ``anchors[r]``
(given to :class:`SlotTopology`, or the first ``rows`` of :func:`default_anchors`: the hidden
layers in module order, each followed through BatchNorm to its activation). A layer slot
``after:<name>`` has the module ``<name>`` as anchor. Slots that share an anchor form a
chain: a new module is attached after the last module still attached on that anchor, so the
columns of a row are residual branches applied one after the other, in the order they were
filled (each is the identity at ``alpha = 0``).

The topology is registered on the model, so :func:`dynarch.save` writes the slot states and
:func:`dynarch.load` restores them (:func:`topology_of` gives them back).

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> net = SlottedNetwork(model, SlotTopology(1, 2), alpha_schedule=LinearRamp(10))
    >>> x = torch.randn(3, 4); before = model(x)
    >>> _ = net.add_module_to_slot("r0c0", nn.Linear(8, 8))
    >>> slot = net.topology.get_slot("r0c0")
    >>> slot.state.value, slot.anchor, torch.equal(model(x), before)
    ('germinated', '1', True)
"""

from __future__ import annotations

from ..nn import BranchableLayer, add_branch
from .network import AlphaSchedule, LinearRamp, SlottedNetwork, default_anchors
from .topology import (
    ALLOWED,
    Slot,
    SlotState,
    SlotTopology,
    SlotTransitionError,
    register_topology,
    topology_of,
)

__all__ = [
    "ALLOWED",
    "AlphaSchedule",
    "BranchableLayer",
    "LinearRamp",
    "Slot",
    "SlotState",
    "SlotTopology",
    "SlotTransitionError",
    "SlottedNetwork",
    "add_branch",
    "default_anchors",
    "register_topology",
    "topology_of",
]
