"""Tests of dynarch.schedules: Embargo, event_places and the registered actions."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

import dynarch
from dynarch._engine import count_params, engine_state
from dynarch.callbacks import Callback
from dynarch.events import Event
from dynarch.masks import sparsify
from dynarch.models import cnn as make_cnn
from dynarch.models import mlp
from dynarch.prune import OverparameterizeThenPrune as PruneOTP
from dynarch.prune import magnitude_prune, structured_prune
from dynarch.schedules import (
    ACTIONS,
    Action,
    Embargo,
    FunctionAction,
    MagnitudePruneAction,
    OverparameterizeThenPrune,
    StructuredPruneAction,
    WidenAction,
    as_action,
    event_places,
    make_action,
    register_action,
    widen_cost,
)
from dynarch.train import Trainer
from models import RESNET_COUPLED, resnet

DATA = (torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(8, [10, 6], 3)


def trainer(model: nn.Module) -> Trainer:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Trainer(model, opt, DATA, eval=DATA, progress=False)


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------ embargo
def test_embargo_blocks_pruned_place_for_exactly_n_steps() -> None:
    model = net()
    embargo = Embargo(model, 10)
    engine_state(model).step = 5
    magnitude_prune(model, 0.5, include=["fc1"])
    assert embargo.until == {"fc1": 15}
    assert [embargo.allowed("fc1", s) for s in (5, 14, 15, 40)] == [False, False, True, True]
    assert [embargo.remaining("fc1", s) for s in (5, 14, 15, 40)] == [10, 1, 0, 0]
    assert embargo.allowed("fc2", 5) and embargo.remaining("fc2", 5) == 0
    assert embargo.blocked(5) == {"fc1": 10} and embargo.blocked(15) == {}
    engine_state(model).step = 12  # step=None: the engine's current step
    assert embargo.remaining("fc1") == 3 and not embargo.allowed("fc1")
    embargo.close()


def test_embargo_later_event_extends_and_earlier_end_never_shortens() -> None:
    model = net()
    embargo = Embargo(model, 10)
    engine_state(model).step = 20
    magnitude_prune(model, 0.5, include=["fc1"])
    embargo.embargo("fc1", step=3)  # ends at 13 < 30: kept at 30
    assert embargo.until == {"fc1": 30}
    engine_state(model).step = 25
    magnitude_prune(model, 0.6, include=["fc1", "fc2"])
    assert embargo.until == {"fc1": 35, "fc2": 35}


def test_embargo_only_listens_to_its_ops() -> None:
    model = net()
    embargo = Embargo(model, 10)
    dynarch.widen(model, "fc1", 12)
    sparsify(model, 0.5)
    assert embargo.until == {}
    structured_prune(model, "fc2", 2)
    assert embargo.until == {"fc2": 10}
    rewiring = Embargo(model, 4, ops=("rewire",))
    engine_state(model).step = 1
    structured_prune(model, "fc1", 1)
    assert rewiring.until == {} and embargo.until == {"fc2": 10, "fc1": 11}


def test_embargo_nested_places_and_hand_embargo() -> None:
    embargo = Embargo(nn.Linear(2, 2), 5)
    embargo.embargo("block", step=10)
    assert not embargo.allowed("block.conv", 12) and not embargo.allowed("block", 12)
    assert embargo.allowed("blockade", 12) and embargo.allowed("block.conv", 15)


def test_embargo_close_and_context_manager_remove_the_listener() -> None:
    model = net()
    with Embargo(model, 3) as embargo:
        assert embargo._on_event in engine_state(model).listeners
    assert embargo._on_event not in engine_state(model).listeners
    magnitude_prune(model, 0.5)
    assert embargo.until == {}


def test_embargo_state_round_trip() -> None:
    model = net()
    embargo = Embargo(model, 7)
    engine_state(model).step = 2
    magnitude_prune(model, 0.5, include=["fc2"])
    other = Embargo(net(), 7)
    other.load_state_dict(roundtrip(embargo.state_dict()))
    assert other.until == {"fc2": 9} and other.blocked(3) == embargo.blocked(3) == {"fc2": 6}
    assert isinstance(embargo, Callback)


def test_event_places() -> None:
    def ev(op: str, target: str, **details: Any) -> Event:
        return Event(1, op, target, 0, 0, details=details)

    assert event_places(ev("prune", "*", layers={"a": {}, "b": {}}, pruned=3)) == ["a", "b"]
    assert event_places(ev("shrink", "a", producers=["a", "b"], consumers=["c"])) == ["a", "b"]
    assert event_places(ev("detach", "after:fc1", module="fc1_slot")) == ["after:fc1", "fc1_slot"]
    assert event_places(ev("rewire", "*", fc1={"dropped": 2}, **{"": {"dropped": 1}})) == ["fc1"]
    assert event_places(ev("sparsify", "*", fc1={"density": 0.5})) == []


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"model": "net"}, TypeError, "model must be a torch.nn.Module, got str"),
        ({"steps": -1}, ValueError, r"Embargo: steps must be an int >= 0, got -1"),
        ({"steps": True}, ValueError, r"Embargo: steps must be an int >= 0, got True"),
        ({"ops": "prune"}, ValueError, r"ops must be a non-empty sequence of op names .*'prune'"),
        ({"ops": ()}, ValueError, r"ops must be a non-empty sequence of op names .* got \(\)"),
    ],
)
def test_embargo_construction_errors(kwargs: dict[str, Any], exc: type, match: str) -> None:
    args = {"model": net(), "steps": 3} | kwargs
    with pytest.raises(exc, match=match):
        Embargo(args.pop("model"), args.pop("steps"), **args)


def test_embargo_usage_errors() -> None:
    embargo = Embargo(net(), 3)
    with pytest.raises(ValueError, match=r"Embargo: step must be an int >= 0, got -1"):
        embargo.allowed("fc1", -1)
    with pytest.raises(TypeError, match=r"Embargo: target must be a module name \(str\), got 3"):
        embargo.allowed(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Embargo: place must be a non-empty module name"):
        embargo.embargo("")
    with pytest.raises(ValueError, match=r"Embargo state must have keys \['until'\], got \[\]"):
        embargo.load_state_dict({})
    with pytest.raises(ValueError, match=r"Embargo state 'until' must map place names to steps"):
        embargo.load_state_dict({"until": {"fc1": 2.5}})


# ------------------------------------------------------------------------------ actions
@pytest.mark.parametrize(
    ("build", "target", "width"),
    [
        (lambda: mlp(8, [16, 12], 3, batchnorm=True), "fc1", 21),
        (lambda: mlp(8, [16, 12], 3, layernorm=True), "fc2", 13),
        (lambda: make_cnn(1, 10, channels=(4, 6), input_size=8, hidden=16), "conv2", 9),
        (lambda: make_cnn(1, 10, channels=(4, 6), input_size=8, hidden=16), "fc", 20),
        (resnet, "block1.conv2", 7),
        (resnet, "block1.conv1", 8),
    ],
)
def test_widen_cost_is_exactly_the_parameter_growth(build: Any, target: str, width: int) -> None:
    model = build()
    before = count_params(model)
    cost = widen_cost(model, target, width)
    dynarch.widen(model, target, width, init="random")
    assert cost == count_params(model) - before > 0


def test_widen_cost_errors() -> None:
    with pytest.raises(ValueError, match=r"width of 'fc1' must be an int >= its current width 10"):
        widen_cost(net(), "fc1", 9)
    with pytest.raises(KeyError, match="model has no submodule named 'fc9'"):
        widen_cost(net(), "fc9", 12)


def test_widen_action_widths_targets_and_places() -> None:
    model = net()
    assert WidenAction(["fc1"]).new_width(model, "fc1") == 15  # default factor 1.5
    assert WidenAction(["fc1"], factor=1.1).new_width(model, "fc1") == 11
    assert WidenAction(["fc1"], amount=3).new_width(model, "fc1") == 13
    capped = WidenAction(["fc1", "fc2"], factor=2.0, max_width=10)
    assert capped.targets(model) == ["fc2"] and capped.new_width(model, "fc2") == 10
    assert WidenAction().targets(model) == ["fc1", "fc2"]  # every hidden layer
    assert WidenAction().targets(model, hint=["fc2"]) == ["fc2"]
    assert WidenAction(["fc1"], amount=2).cost(model, "fc1") == 2 * (8 + 1 + 6)
    coupled = resnet()
    assert WidenAction().places(coupled, "stem") == RESNET_COUPLED


def test_widen_action_apply_carries_reason_and_optimizer() -> None:
    model = net()
    t = trainer(model)
    events = WidenAction(["fc1", "fc2"], amount=2).apply(t, ["fc1", "fc2"], "why")
    assert [(e.op, e.target, e.reason) for e in events] == [
        ("widen", "fc1", "why"),
        ("widen", "fc2", "why"),
    ]
    assert (model.fc1.out_features, model.fc2.out_features) == (12, 8)
    assert model.fc1.weight in {p for g in t.optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": "fc1"}, r"widen: layers must be None or a non-empty list .* got 'fc1'"),
        ({"layers": []}, r"widen: layers must be None or a non-empty list .* got \[\]"),
        ({"amount": 2, "factor": 2.0}, r"give amount .* or factor .*, not both; got amount=2"),
        ({"amount": 0}, r"widen: amount must be a positive int \(units added\), got 0"),
        ({"factor": 1}, r"widen: factor must be a finite number > 1, got 1"),
        ({"init": "copy"}, r"widen: unknown init 'copy'; allowed: net2net, zero, random"),
        ({"noise": -1.0}, r"widen: noise must be a finite number >= 0, got -1.0"),
        ({"max_width": 0}, r"widen: max_width must be None or a positive int, got 0"),
    ],
)
def test_widen_action_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WidenAction(**kwargs)


def test_widen_action_check_names_missing_layer() -> None:
    with pytest.raises(KeyError, match="model has no submodule named 'fc3'"):
        WidenAction(["fc3"]).check(net())
    with pytest.raises(TypeError, match="'act1' is a ReLU; expected one of: Linear, Conv2d"):
        WidenAction(["act1"]).check(net())


def test_prune_actions() -> None:
    model = net()
    t = trainer(model)
    mag = make_action("magnitude_prune", sparsity=0.5, include=["fc*"])
    assert isinstance(mag, MagnitudePruneAction) and mag.targets(model) == ["fc1", "fc2"]
    (event,) = mag.apply(t, mag.targets(model), "cut")
    assert (event.op, event.reason, sorted(event.details["layers"])) == (
        "prune",
        "cut",
        ["fc1", "fc2"],
    )
    shrink = StructuredPruneAction(["fc1", "fc2"], 0.5)
    assert [shrink.count(model, n) for n in ("fc1", "fc2")] == [5, 3]
    events = shrink.apply(t, shrink.targets(model), "cut")
    assert [(e.op, e.target) for e in events] == [("shrink", "fc1"), ("shrink", "fc2")]
    assert (model.fc1.out_features, model.fc2.out_features) == (5, 3)
    assert StructuredPruneAction(["fc1"], 5).targets(model) == []  # would leave no unit
    assert StructuredPruneAction(["fc2"], 0.1).targets(model) == []  # rounds to 0 units


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("fc1", 2), r"structured_prune: layers must be a non-empty list .* got 'fc1'"),
        (
            (["fc1"], 0),
            r"amount must be a unit count \(int >= 1\) or a fraction in \(0, 1\), got 0",
        ),
        ((["fc1"], 1.0), r"amount must be a unit count .* got 1.0"),
        ((["fc1"], True), r"amount must be a unit count .* got True"),
    ],
)
def test_structured_prune_action_errors(args: tuple[Any, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StructuredPruneAction(*args)


def test_magnitude_prune_action_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown scope 'net'; allowed: 'layer', 'global'"):
        MagnitudePruneAction(0.5, scope="net")
    with pytest.raises(ValueError, match=r"sparsity must be"):
        MagnitudePruneAction(1.5)


def test_function_action() -> None:
    model = net()
    t = trainer(model)
    with_reason = FunctionAction(
        lambda tr, reason: dynarch.widen(tr.model, "fc1", 11, reason=reason)
    )
    assert with_reason.takes_reason and not with_reason.planned
    (event,) = with_reason.apply(t, [], "because")
    assert event.reason == "because"
    assert FunctionAction(lambda tr: None).apply(t, [], "x") == []
    assert not FunctionAction(lambda tr: None).takes_reason
    assert FunctionAction(lambda tr, **kw: []).takes_reason
    both = FunctionAction(lambda tr: [event, event]).apply(t, [], "x")
    assert both == [event, event]
    with pytest.raises(
        TypeError, match=r"returned int; expected a dynarch Event, a list of Events"
    ):
        FunctionAction(lambda tr: 3).apply(t, [], "x")
    with pytest.raises(TypeError, match="FunctionAction needs a callable, got 3"):
        FunctionAction(3)  # type: ignore[arg-type]


def test_action_registry_and_as_action() -> None:
    assert {"widen", "magnitude_prune", "structured_prune"} <= set(ACTIONS)
    assert as_action("x", "widen", {"amount": 2}).amount == 2  # type: ignore[attr-defined]
    assert as_action("x", {"name": "widen", "factor": 3.0}).factor == 3.0  # type: ignore[attr-defined]
    act = WidenAction()
    assert as_action("x", act) is act
    assert isinstance(as_action("x", lambda t: None), FunctionAction)
    assert act.state_dict() == {} and Action().targets(net()) == []

    @register_action("test-noop")
    class Noop(Action):
        def apply(self, trainer: Trainer, targets: list[str], reason: str) -> list[Event]:
            return []

    try:
        assert make_action("test-noop").name == "test-noop"
        with pytest.raises(
            ValueError, match="action name 'test-noop' is already registered to Noop"
        ):
            register_action("test-noop")(Noop)
    finally:
        del ACTIONS["test-noop"]
    with pytest.raises(TypeError, match=r"register_action\('bad'\) needs an Action subclass"):
        register_action("bad")(int)  # type: ignore[type-var]
    with pytest.raises(ValueError, match=r"unknown action 'grow'; registered actions: \["):
        make_action("grow")
    with pytest.raises(TypeError, match=r"x: action keyword arguments \['amount'\] need a named"):
        as_action("x", act, {"amount": 2})
    with pytest.raises(ValueError, match=r"x: an action mapping needs a 'name' key .* got keys"):
        as_action("x", {"amount": 2})
    with pytest.raises(TypeError, match=r"x: action must be a dynarch.schedules.Action, .* got 3"):
        as_action("x", 3)
    with pytest.raises(ValueError, match=r"WidenAction state must have keys \[\], got \['a'\]"):
        act.load_state_dict({"a": 1})
    with pytest.raises(NotImplementedError):
        Action().apply(trainer(net()), [], "")


def test_overparameterize_then_prune_is_exported_trainer_callback() -> None:
    assert OverparameterizeThenPrune is PruneOTP and issubclass(PruneOTP, Callback)
