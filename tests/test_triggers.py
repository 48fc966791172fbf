"""Triggers: exact Plateau behaviour, state round trip, validation and the registry."""

from __future__ import annotations

import io
import math

import pytest
import torch

from dynarch.triggers import TRIGGERS, Plateau, Trigger, make_trigger, register_trigger


def test_plateau_min_exact_sequence() -> None:
    p = Plateau(patience=3, threshold=0.1)
    values = [1.0, 0.8, 0.75, 0.71, 0.705, 0.69, 0.5, 0.45, 0.41, 0.42]
    fired = [p.update(v) for v in values]
    # 1.0 first (best); 0.8 improves; 0.75/0.71/0.705 are within 0.1 of 0.8 -> wait 1, 2, 3;
    # 0.69 improves on 0.8 by 0.11; 0.5 improves; 0.45, 0.41, 0.42 wait 1, 2, 3.
    assert fired == [False, False, False, False, True, False, False, False, False, True]
    assert p.best == 0.5 and p.wait == 3


def test_plateau_keeps_firing_until_reset() -> None:
    p = Plateau(patience=1, threshold=0.0)
    assert [p.update(v) for v in (2.0, 2.0, 2.0, 1.0)] == [False, True, True, False]
    p.update(1.0)
    p.reset()
    assert (p.best, p.wait) == (None, 0)
    assert p.update(5.0) is False  # first value after reset is the new best
    assert p.best == 5.0


def test_plateau_max_mode_and_threshold_is_strict() -> None:
    p = Plateau(patience=2, threshold=0.5, mode="max")
    # 1.5 is exactly best + threshold: not an improvement (must exceed it).
    fired = [p.update(v) for v in (1.0, 1.5, 1.4, 1.6, 0.0, 2.0)]
    assert fired == [False, False, True, False, False, True]
    assert p.best == 1.6


def test_plateau_nan_never_improves() -> None:
    p = Plateau(patience=2)
    assert [p.update(v) for v in (math.nan, math.nan)] == [False, True]
    assert p.best is None
    assert p.update(3.0) is False and p.best == 3.0


def test_plateau_state_round_trip_weights_only() -> None:
    p = Plateau(patience=3, threshold=0.01)
    for v in (1.0, 0.999, 0.998):
        p.update(v)
    buf = io.BytesIO()
    torch.save(p.state_dict(), buf)
    buf.seek(0)
    q = Plateau(patience=3, threshold=0.01)
    q.load_state_dict(torch.load(buf, weights_only=True))
    assert q.state_dict() == {"best": 1.0, "wait": 2}
    assert [q.update(0.995), p.update(0.995)] == [True, True]


def test_plateau_load_rejects_foreign_state() -> None:
    with pytest.raises(
        ValueError, match=r"Plateau state must have keys \['best', 'wait'\], got \['x'\]"
    ):
        Plateau().load_state_dict({"x": 1})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patience": 0}, "patience must be a positive int, got 0"),
        ({"patience": 1.5}, "patience must be a positive int, got 1.5"),
        ({"patience": True}, "patience must be a positive int, got True"),
        ({"threshold": -0.1}, r"threshold must be a finite number >= 0, got -0.1"),
        ({"threshold": math.inf}, "threshold must be a finite number >= 0, got inf"),
        ({"threshold": "0.1"}, "threshold must be a finite number >= 0, got '0.1'"),
        ({"mode": "best"}, "mode must be 'min' or 'max', got 'best'"),
    ],
)
def test_plateau_validates_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Plateau(**kwargs)  # type: ignore[arg-type]


def test_registry() -> None:
    assert TRIGGERS["plateau"] is Plateau and Plateau.name == "plateau"
    t = make_trigger("plateau", patience=2, mode="max")
    assert isinstance(t, Plateau) and (t.patience, t.mode) == (2, "max")
    with pytest.raises(
        ValueError, match=r"unknown trigger 'plato'; registered triggers: \[.*'plateau'"
    ):
        make_trigger("plato")

    @register_trigger("_test_always")
    class Always(Trigger):
        def update(self, value: float) -> bool:
            return True

    try:
        assert TRIGGERS["_test_always"] is Always and Always.name == "_test_always"
        assert make_trigger("_test_always").update(0.0) is True
        with pytest.raises(ValueError, match="'_test_always' is already registered to Always"):
            register_trigger("_test_always")(Always)
    finally:
        del TRIGGERS["_test_always"]
    with pytest.raises(TypeError, match=r"register_trigger\('x'\) needs a Trigger subclass"):
        register_trigger("x")(int)  # type: ignore[type-var]
