"""Dynamic sparse training: masks that drop and regrow connections while the model trains.

One engine (:class:`Rewirer`) and small algorithms on top: :class:`Static` (fixed mask),
:class:`SET`, :class:`RigL`, :class:`SNFS` (sparse momentum) and :class:`DeepR`; plus the
per-layer convenience :class:`DynamicSparseLinear`.

Example:
    >>> import torch, torch.nn as nn
    >>> from dynarch.sparse import make_rewirer
    >>> model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> rw = make_rewirer("rigl", model, opt, density=0.25, delta_t=1, t_end=100)
    >>> torch.nn.functional.cross_entropy(model(torch.randn(16, 8)),
    ...                                   torch.randint(0, 4, (16,))).backward()
    >>> opt.step()
    >>> rw.step().details["2"]
    {'dropped': 28, 'regrown': 28, 'active': 93, 'density': 0.36328125}
"""

from __future__ import annotations

from .algorithms import ALGORITHMS, SET, SNFS, DeepR, RigL, Static, apportion, make_rewirer
from .base import IdleScheduleWarning, Layer, Rewirer
from .layer import DynamicSparseLinear
from .schedule import ANNEALS, Schedule

__all__ = [
    "ALGORITHMS",
    "ANNEALS",
    "SET",
    "SNFS",
    "DeepR",
    "DynamicSparseLinear",
    "IdleScheduleWarning",
    "Layer",
    "Rewirer",
    "RigL",
    "Schedule",
    "Static",
    "apportion",
    "make_rewirer",
]  # fmt: skip
