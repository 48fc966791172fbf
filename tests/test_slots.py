"""Slot topology: ids, names, every legal and illegal transition, embargo timers, state."""

from __future__ import annotations

import json
import re

import pytest

from dynarch.slots import ALLOWED, Slot, SlotState, SlotTopology, SlotTransitionError

D, G, T, IN, P, E = (
    SlotState.DORMANT, SlotState.GERMINATED, SlotState.TRAINING,
    SlotState.INTEGRATED, SlotState.PRUNED, SlotState.EMBARGOED,
)  # fmt: skip
#: How to reach each state from dormant.
PATHS = {D: [], G: [G], T: [G, T], IN: [G, T, IN], P: [G, T, P], E: [G, T, P, E]}
LEGAL = [(a, b) for a in SlotState for b in ALLOWED[a]]
ILLEGAL = [(a, b) for a in SlotState for b in SlotState if b not in ALLOWED[a]]


def _at(state: SlotState, embargo_steps: int = 3) -> SlotTopology:
    topo = SlotTopology(1, 2, embargo_steps=embargo_steps)
    for s in PATHS[state]:
        topo.transition("r0c1", s, step=0)
    return topo


# ---------------------------------------------------------------- ids and lookup
def test_grid_ids_depths_and_parallel_indices() -> None:
    topo = SlotTopology(2, 3)
    assert [s.id for s in topo] == ["r0c0", "r0c1", "r0c2", "r1c0", "r1c1", "r1c2"]
    assert len(topo) == 6
    assert topo.get_slot("r1c2") == Slot("r1c2", depth=1, parallel_idx=2)
    assert [(s.id, s.depth, s.parallel_idx) for s in topo.slots_at_depth(1)] == [
        ("r1c0", 1, 0), ("r1c1", 1, 1), ("r1c2", 1, 2),
    ]  # fmt: skip
    assert topo.available_slots() == [s.id for s in topo]
    assert set(topo.states().values()) == {D}


def test_state_values_are_lowercase_names() -> None:
    assert [s.value for s in SlotState] == [
        "dormant", "germinated", "training", "integrated", "pruned", "embargoed",
    ]  # fmt: skip
    assert SlotState("pruned") is P
    assert ALLOWED == {D: (G,), G: (T,), T: (IN, P), IN: (), P: (E,), E: (D,)}


@pytest.mark.parametrize("depth", [-1, 2, 1.0, True])
def test_depth_out_of_range(depth: object) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"depth {depth!r} is out of range; rows are 0..1")
    ):
        SlotTopology(2, 2).slots_at_depth(depth)  # type: ignore[arg-type]


def test_unknown_slot_names_the_known_ones() -> None:
    topo = SlotTopology(1, 2, names={"residual_slot": "r0c1"})
    msg = "unknown slot 'r5c0'; known slots: ['r0c0', 'r0c1'], names: ['residual_slot']"
    for call in (
        lambda: topo.get_slot("r5c0"),
        lambda: topo.transition("r5c0", "germinated"),
        lambda: topo.resolve("r5c0"),
    ):
        with pytest.raises(KeyError, match=re.escape(msg)):
            call()


def test_layer_slots_and_functional_names() -> None:
    topo = SlotTopology(1, 1, names={"residual_slot": "after:fc1", "first": "r0c0"})
    slot = topo.add_slot("after:fc2", name="attention_slot")
    assert slot == Slot("after:fc2", anchor="fc2")
    assert [s.id for s in topo] == ["r0c0", "after:fc1", "after:fc2"]
    assert topo.get_slot("residual_slot").anchor == "fc1"
    assert topo.resolve("attention_slot") == "after:fc2"
    assert topo.resolve("first") == "r0c0"
    assert "attention_slot" in topo and "after:fc1" in topo and "nope" not in topo
    topo.transition("attention_slot", "germinated", step=4)
    assert topo.get_slot("after:fc2").state is G and topo.get_slot("after:fc2").since == 4


@pytest.mark.parametrize("bad", ["fc1", "after:", 3])
def test_bad_layer_slot_id(bad: object) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"a layer slot id is 'after:<module name>', got {bad!r}")
    ):
        SlotTopology(0, 0).add_slot(bad)  # type: ignore[arg-type]


def test_duplicate_layer_slot() -> None:
    topo = SlotTopology(0, 0)
    topo.add_slot("after:fc1")
    with pytest.raises(ValueError, match="slot 'after:fc1' already exists"):
        topo.add_slot("after:fc1")


@pytest.mark.parametrize("name", ["", "r0c0", "after:x", "taken"])
def test_bad_functional_name(name: str) -> None:
    topo = SlotTopology(1, 1, names={"taken": "r0c0"})
    with pytest.raises(ValueError, match=re.escape(f"functional slot name {name!r} must be")):
        topo.add_name(name, "r0c0")
    with pytest.raises(ValueError, match=re.escape(f"functional slot name {name!r} must be")):
        topo.add_slot("after:fc1", name=name)
    assert "after:fc1" not in topo  # nothing added by the refused call
    assert topo.add_slot("after:fc1", name="fc1_slot").id == "after:fc1"
    assert topo.resolve("fc1_slot") == "after:fc1"


def test_name_for_unknown_slot() -> None:
    with pytest.raises(KeyError, match="unknown slot 'r3c3'"):
        SlotTopology(1, 1, names={"x": "r3c3"})


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"rows": -1, "cols": 1}, "rows must be an int >= 0, got -1"),
        ({"rows": 1, "cols": 1.5}, "cols must be an int >= 0, got 1.5"),
        ({"rows": 1, "cols": 1, "embargo_steps": -2}, "embargo_steps must be an int >= 0, got -2"),
    ],
)
def test_constructor_errors(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=re.escape(msg)):
        SlotTopology(**kwargs)


def test_anchors() -> None:
    topo = SlotTopology(2, 2, anchors=["a", "b"])
    assert [s.anchor for s in topo] == ["a", "a", "b", "b"]
    for bad in (["a"], ["a", "a"], ["a", ""]):
        with pytest.raises(ValueError, match="anchors must be"):
            topo.set_anchors(bad)
    topo.get_slot("r0c0").key = "after:a"  # as SlottedNetwork does when attaching
    with pytest.raises(ValueError, match=re.escape("while slots ['r0c0'] hold modules")):
        topo.set_anchors(["c", "d"])


# ---------------------------------------------------------------- transitions
@pytest.mark.parametrize(("src", "dst"), LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
@pytest.mark.parametrize("as_string", [False, True])
def test_every_legal_transition(src: SlotState, dst: SlotState, as_string: bool) -> None:
    topo = _at(src)
    step = 3 if dst is D else 1  # embargoed at step 0 with embargo_steps=3 -> free at 3
    slot = topo.transition("r0c1", dst.value if as_string else dst, step=step)
    assert slot.state is dst and slot.since == step
    assert topo.get_slot("r0c0").state is D  # the other slot is untouched


@pytest.mark.parametrize(("src", "dst"), ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_every_illegal_transition_is_refused(src: SlotState, dst: SlotState) -> None:
    topo = _at(src)
    before = topo.state_dict()
    moves = ", ".join(f"'{s.value}'" for s in ALLOWED[src]) or "none (it is terminal)"
    msg = (
        f"illegal transition of slot 'r0c1' to '{dst.value}': "
        f"slot 'r0c1' is '{src.value}'; allowed: {moves}"
    )
    with pytest.raises(SlotTransitionError, match=f"^{re.escape(msg)}$"):
        topo.transition("r0c1", dst.value, step=5)
    assert topo.state_dict() == before  # nothing changed


def test_example_message_from_the_issue() -> None:
    with pytest.raises(
        SlotTransitionError, match=re.escape("slot 'r0c1' is 'dormant'; allowed: 'germinated'")
    ):
        SlotTopology(1, 2).transition("r0c1", SlotState.TRAINING)


@pytest.mark.parametrize("bad", ["Dormant", "asleep", 3])
def test_unknown_state(bad: object) -> None:
    allowed = "'dormant', 'germinated', 'training', 'integrated', 'pruned', 'embargoed'"
    with pytest.raises(
        ValueError, match=re.escape(f"unknown slot state {bad!r}; allowed: {allowed}")
    ):
        SlotTopology(1, 1).transition("r0c0", bad)  # type: ignore[arg-type]


def test_transition_without_step_uses_the_last_tick() -> None:
    topo = SlotTopology(1, 1)
    topo.tick(7)
    assert topo.transition("r0c0", "germinated").since == 7
    topo.transition("r0c0", "training", step=9)
    assert topo.step == 9


# ---------------------------------------------------------------- embargo timers
def test_embargo_holds_until_step_plus_embargo_steps() -> None:
    topo = SlotTopology(1, 2, embargo_steps=5)
    for s in (G, T, P):
        topo.transition("r0c0", s, step=10)
    slot = topo.transition("r0c0", E, step=10)
    assert slot.embargo_until == 15
    assert topo.available_slots(14) == ["r0c1"]
    assert topo.get_slot("r0c0").state is E
    with pytest.raises(SlotTransitionError, match=re.escape(
        "slot 'r0c0' is 'embargoed' until step 15 (now step 14); "
        "it can become 'dormant' from step 15"
    )):  # fmt: skip
        topo.transition("r0c0", D)
    assert topo.available_slots(15) == ["r0c0", "r0c1"]
    assert topo.get_slot("r0c0") == Slot("r0c0", depth=0, parallel_idx=0, since=15)


def test_tick_returns_released_slots() -> None:
    topo = SlotTopology(1, 3, embargo_steps=2)
    for sid, step in (("r0c0", 1), ("r0c2", 2)):
        for s in (G, T, P, E):
            topo.transition(sid, s, step=step)
    assert topo.tick(2) == []
    assert topo.tick(3) == ["r0c0"]
    assert topo.tick(100) == ["r0c2"]
    assert topo.tick(101) == []
    assert topo.tick(101) == [] and topo.step == 101  # the same step again is fine
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        topo.tick(-1)


def test_zero_embargo_is_free_at_once() -> None:
    topo = SlotTopology(1, 1, embargo_steps=0)
    for s in (G, T, P, E):
        topo.transition("r0c0", s, step=4)
    assert topo.available_slots() == ["r0c0"]


# ---------------------------------------------------------------- state
def test_state_dict_round_trip_is_json() -> None:
    topo = SlotTopology(2, 2, embargo_steps=7, names={"res": "after:fc"}, anchors=["a", "b"])
    for s in (G, T, P, E):
        topo.transition("r1c0", s, step=3)
    topo.transition("res", G, step=4)
    state = json.loads(json.dumps(topo.state_dict()))
    back = SlotTopology.from_state_dict(state)
    assert back.state_dict() == topo.state_dict()
    assert back.get_slot("r1c0").embargo_until == 10
    assert back.get_slot("res").state is G
    assert back.available_slots(9) == ["r0c0", "r0c1", "r1c1"]
    assert back.available_slots(10) == ["r0c0", "r0c1", "r1c0", "r1c1"]


def test_load_state_dict_errors() -> None:
    state = SlotTopology(2, 2).state_dict()
    with pytest.raises(
        ValueError, match=re.escape("state is for a 2x2 slot grid; this topology is 1x2")
    ):
        SlotTopology(1, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="slot topology state must have keys"):
        SlotTopology(2, 2).load_state_dict({"rows": 2})
    state["slots"][0]["extra"] = 1
    with pytest.raises(ValueError, match="slot record must have keys"):
        SlotTopology(2, 2).load_state_dict(state)
    state["slots"][0].pop("extra")
    state["slots"][0]["state"] = "asleep"
    with pytest.raises(ValueError, match="unknown slot state 'asleep'"):
        SlotTopology(2, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="not a slot topology state"):
        SlotTopology.from_state_dict({"cols": 1})


def test_repr_counts_states() -> None:
    topo = SlotTopology(1, 3)
    topo.transition("r0c2", G, step=0)
    assert repr(topo) == "SlotTopology(rows=1, cols=3, states={'dormant': 2, 'germinated': 1})"


# ---------------------------------------------------------------- steps never go back
def test_transition_before_the_slots_last_transition_is_refused() -> None:
    topo = SlotTopology(1, 2, embargo_steps=5)
    for s in (G, T, P):
        topo.transition("r0c0", s, step=10)
    before = topo.state_dict()
    msg = (
        "cannot move slot 'r0c0' to 'embargoed' at step 9: its last transition was at step 10; "
        "steps must not decrease (give step >= 10)"
    )
    with pytest.raises(SlotTransitionError, match=f"^{re.escape(msg)}$"):
        topo.transition("r0c0", "embargoed", step=9)  # an embargo timed from the past
    with pytest.raises(SlotTransitionError, match=re.escape(msg)):
        topo.check("r0c0", E, 9)
    assert topo.state_dict() == before  # nothing changed
    # the step check names the slot through a functional name too, and only counts its own
    # last transition: another slot may still move at an earlier step than the clock
    topo.add_name("res", "r0c0")
    with pytest.raises(SlotTransitionError, match=r"^cannot move slot 'r0c0' to 'embargoed' "):
        topo.transition("res", E, step=0)
    assert topo.transition("r0c1", G, step=3).since == 3 and topo.step == 10
    slot = topo.transition("r0c0", E, step=10)  # the same step is fine
    assert (slot.state, slot.since, slot.embargo_until) == (E, 10, 15)


def test_illegal_move_is_reported_before_a_backward_step() -> None:
    topo = _at(T)  # r0c1 reached training at step 0
    topo.transition("r0c1", IN, step=4)
    with pytest.raises(SlotTransitionError, match="'integrated'; allowed: none"):
        topo.transition("r0c1", P, step=1)


def test_tick_backwards_is_refused() -> None:
    topo = SlotTopology(1, 1)
    topo.transition("r0c0", G, step=7)  # a transition moves the clock forward too
    assert topo.step == 7
    msg = (
        "cannot tick the slot topology back to step 6: its last step is 7; "
        "steps must not decrease (tick(step) with step >= 7)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        topo.tick(6)
    with pytest.raises(ValueError, match=re.escape("back to step 6: its last step is 7")):
        topo.available_slots(6)
    assert topo.step == 7 and topo.tick(7) == [] and topo.tick(8) == [] and topo.step == 8
