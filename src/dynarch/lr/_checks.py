"""Argument checks shared by the learning-rate strategies and the plan (one wording each)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_factor", "check_ops", "check_state", "check_steps"]


def check_state(owner: str, state: object, keys: set[str]) -> dict[str, Any]:
    """``state`` if it is a dict with exactly ``keys``, else a clear error."""
    if not isinstance(state, dict) or set(state) != keys:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{owner} state must have keys {sorted(keys)}, got {got}")
    return state


def check_factor(owner: str, name: str, value: object, *, positive: bool = False) -> float:
    """``float(value)`` if it is a finite number >= 0 (> 0 if ``positive``), else an error."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):  # type: ignore[operator]
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{owner}: {name} must be a finite number {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_steps(owner: str, name: str, value: object, low: int = 1) -> int:
    """``value`` if it is an int >= ``low``, else an error."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")
    return value


def check_ops(owner: str, ops: object, name: str = "ops") -> tuple[str, ...] | None:
    """``None`` or a tuple of op names, else an error."""
    if ops is None:
        return None
    if (
        isinstance(ops, str)
        or not isinstance(ops, list | tuple | set | frozenset)
        or not all(isinstance(o, str) and o for o in ops)
    ):
        raise ValueError(f"{owner}: {name} must be None or a list of op names, got {ops!r}")
    return tuple(sorted(ops)) if isinstance(ops, set | frozenset) else tuple(ops)
