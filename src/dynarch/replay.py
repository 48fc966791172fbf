"""How each kind of structural event is rebuilt when a checkpoint is loaded.

An event's ``replay`` dict holds the arguments that redo its *structure* on a fresh copy of
the base model (weights come from the checkpoint afterwards). Every structural op registers
a replay function here; a later op (from a new module or a user extension) registers its own
with :func:`register_replay`. Events with an empty ``replay`` (e.g. mask rewiring) change no
structure and are skipped.

Example:
    >>> replay_function("widen") is not None
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["ReplayFn", "register_replay", "replay_function"]

ReplayFn = Callable[[nn.Module, dict[str, Any], dict[str, type[nn.Module]]], None]
_REPLAY: dict[str, ReplayFn] = {}
_BUILTINS_REGISTERED = False


def register_replay(op: str) -> Callable[[ReplayFn], ReplayFn]:
    """Register how to rebuild the structure of events of kind ``op`` (decorator)."""

    def deco(fn: ReplayFn) -> ReplayFn:
        _REPLAY[op] = fn
        return fn

    return deco


def replay_function(op: str) -> ReplayFn | None:
    """The replay registered for ``op`` (built-in ops are registered on first use)."""
    _ensure_builtins()
    return _REPLAY.get(op)


def _ensure_builtins() -> None:
    """Register the built-in ops' replays (deferred to avoid import cycles)."""
    global _BUILTINS_REGISTERED
    if _BUILTINS_REGISTERED:
        return
    _BUILTINS_REGISTERED = True
    from . import insert, masks, surgery
    from .spec import build as build_spec

    register_replay("widen")(lambda m, a, _: surgery.replay_resize(m, a))
    register_replay("shrink")(lambda m, a, _: surgery.replay_resize(m, a))
    register_replay("deepen")(lambda m, a, _: (insert.deepen(m, a["after"], record=False), None)[1])
    register_replay("detach")(lambda m, a, _: (insert.detach(m, a["slot"], record=False), None)[1])
    register_replay("sparsify")(lambda m, a, _: masks.replay(m, a))
    register_replay("prune")(lambda m, a, _: masks.replay(m, a))

    @register_replay("attach")
    def _attach(m: nn.Module, a: dict[str, Any], mods: dict[str, type[nn.Module]]) -> None:
        spec = a["module"]
        if "type" in spec:
            module = build_spec(spec)
        elif spec["class"] in mods:
            module = mods[spec["class"]]()
        else:
            raise ValueError(
                f"a custom module '{spec['class']}' was attached; pass "
                f"modules={{'{spec['class']}': <the class>}} to dynarch.load"
            )
        insert.attach(
            m,
            a["slot"],
            module,
            alpha=a["alpha"],
            trainable_alpha=a["trainable_alpha"],
            record=False,
        )
