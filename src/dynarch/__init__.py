"""dynarch: neural networks that grow, prune and rewire themselves while they train."""

from __future__ import annotations

from ._engine import engine_state, history, set_seed
from .events import Event
from .graph import UnsupportedModelError
from .insert import attach, deepen, detach
from .nn import Residual
from .surgery import shrink, widen

__version__ = "0.1.0"

__all__ = [
    "Event",
    "Residual",
    "UnsupportedModelError",
    "__version__",
    "attach",
    "deepen",
    "detach",
    "engine_state",
    "history",
    "set_seed",
    "shrink",
    "widen",
]
