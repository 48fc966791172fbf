"""dynarch: neural networks that grow, prune and rewire themselves while they train.

The structural engine (``widen``, ``shrink``, ``deepen``, ``attach``, ``detach``,
``sparsify``), checkpoints (``save``/``load``), the training loop (``Trainer``/``fit``) and
the event history (``history``) are available at the top level.
"""

from __future__ import annotations

from . import (
    activity,
    callbacks,
    data,
    growth,
    lr,
    masks,
    prune,
    schedules,
    slots,
    sparse,
    triggers,
)
from ._engine import engine_state, history, set_seed
from .checkpoint import Checkpoint, CheckpointError, load, save
from .events import Event
from .graph import UnsupportedModelError
from .insert import attach, deepen, detach
from .masks import sparsify
from .nn import Residual
from .surgery import shrink, widen
from .train import Trainer, fit

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Event",
    "Residual",
    "Trainer",
    "UnsupportedModelError",
    "__version__",
    "activity",
    "attach",
    "callbacks",
    "data",
    "deepen",
    "detach",
    "engine_state",
    "fit",
    "growth",
    "history",
    "load",
    "lr",
    "masks",
    "prune",
    "save",
    "schedules",
    "set_seed",
    "shrink",
    "slots",
    "sparse",
    "sparsify",
    "triggers",
    "widen",
]
