"""dynarch: neural networks that grow, prune and rewire themselves while they train."""

from __future__ import annotations

from ._engine import engine_state, history, set_seed
from .events import Event

__version__ = "0.1.0"

__all__ = ["Event", "__version__", "engine_state", "history", "set_seed"]
