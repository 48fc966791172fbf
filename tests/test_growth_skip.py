"""Forward skips (``add_skip``) and dead-neuron highways (``highways``).

Function preservation, stable state_dict keys, sparse projections, optimizer membership,
widen/shrink through a skip, deepcopy, torch.compile, checkpoint round trips, errors.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import dynarch
from dynarch.activity import Extrema
from dynarch.graph import UnsupportedModelError
from dynarch.growth import SkipConnection, add_skip, highways, skips
from dynarch.growth.skip import replay_skip
from dynarch.masks import sparsify
from dynarch.models import mlp

X = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return mlp(6, [8, 7, 5], 3)


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
        nn.Conv2d(5, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 1),
    )  # fmt: skip


def test_add_skip_preserves_function_and_keys() -> None:
    model = net()
    keys = list(model.state_dict())
    before = model(X)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    event = add_skip(model, "act1", "fc3", optimizer=opt, reason="grow")
    assert torch.equal(model(X), before)
    assert list(model.state_dict()) == [*keys[:6], "fc3.skip.proj.weight", *keys[6:]]
    assert event.op == "skip" and event.target == "fc3" and event.reason == "grow"
    assert event.details == {"source": "act1", "target": "fc3", "module": "fc3.skip",
                             "kind": "Linear", "in": 8, "out": 5, "params": 40, "active": 40,
                             "density": None}  # fmt: skip
    assert event.params_after - event.params_before == 40
    params = [id(p) for p in opt.param_groups[0]["params"]]
    assert params.index(id(model.fc3.skip.proj.weight)) == params.index(id(model.fc3.bias)) + 1
    assert list(skips(model)) == ["fc3.skip"]
    opt.zero_grad()
    model(X).pow(2).sum().backward()
    assert model.fc3.skip.proj.weight.grad is not None
    assert bool(model.fc3.skip.proj.weight.grad.abs().sum() > 0)
    opt.step()
    assert not torch.equal(model(X), before)


def test_sparse_skip_exact_count_and_enforced_mask() -> None:
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    event = add_skip(model, "act1", "fc3", optimizer=opt, density=0.3)
    mask = model.fc3.skip.proj.weight_mask
    assert event.details["active"] == round(0.3 * 40) == int(mask.sum())
    for _ in range(2):
        opt.zero_grad()
        model(X).pow(2).sum().backward()
        opt.step()
    w = model.fc3.skip.proj.weight.detach()
    assert bool((w[~mask] == 0).all()) and bool((w[mask] != 0).any())


def test_conv_skip_and_spatial_mismatch() -> None:
    model = convnet()
    x = torch.randn(2, 2, 6, 6)
    before = model(x)
    event = add_skip(model, "1", "4")
    assert event.details["kind"] == "Conv2d"
    assert model[4].skip.proj.weight.shape == (3, 4, 1, 1)
    assert torch.equal(model(x), before)
    with pytest.raises(
        UnsupportedModelError,
        match=r"cannot add a skip from '3' to '7': '6' \(MaxPool2d\) between them can change the "
        r"feature maps' spatial size, and a 1x1 skip needs maps of the same size; pick a target",
    ):
        add_skip(model, "3", "7")  # 6x6 maps to 3x3 ones
    strided = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1),
                            nn.ReLU(), nn.Conv2d(4, 4, 3, padding="same"))  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=r"'2' \(Conv2d\) between them"):
        add_skip(strided, "1", "4")
    add_skip(strided, "3", "4")  # stride 1, 'same' padding: the size is kept
    assert strided(x).shape == (2, 4, 3, 3)
    assert [e.op for e in dynarch.history(model)] == ["skip"]


def test_widen_and_shrink_through_a_skip() -> None:
    model = net()
    add_skip(model, "act1", "fc3", density=0.5)
    before = model(X)
    dynarch.widen(model, "fc1", 11)
    dynarch.widen(model, "fc3", 9)
    assert model.fc3.skip.proj.weight.shape == (9, 11)
    assert model.fc3.skip.proj.weight_mask.shape == (9, 11)
    assert (model(X) - before).abs().max() <= 1e-5
    widened = model(X)
    dynarch.widen(model, "fc1", 13, init="zero")  # new units: zero outgoing weights
    assert model.fc3.skip.proj.weight.shape == (9, 13)
    assert (model(X) - widened).abs().max() <= 1e-5
    dynarch.shrink(model, "fc1", torch.arange(11))  # removing them again changes nothing
    assert model.fc3.skip.proj.weight.shape == (9, 11)
    assert (model(X) - widened).abs().max() <= 1e-5


def test_deepcopy_and_compile() -> None:
    model = net()
    add_skip(model, "act1", "fc3")
    with torch.no_grad():
        model.fc3.skip.proj.weight.fill_(0.1)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(X), model(X))
    with torch.no_grad():
        twin.fc3.skip.proj.weight.zero_()
    assert not torch.equal(twin(X), model(X))  # the copy's hooks use the copy's skip
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    torch.testing.assert_close(compiled(X), model(X), rtol=0, atol=0)
    assert counter.frame_count >= 1
    torch._dynamo.reset()


def test_checkpoint_round_trip_with_skips_and_later_widen() -> None:
    model = net()
    sparsify(model, 0.5, distribution="uniform")
    add_skip(model, "act1", "fc3", density=0.5)
    add_skip(model, "act2", "out")
    with torch.no_grad():
        for s in skips(model).values():
            s.proj.weight.normal_()
            s.proj.weight.mul_(s.proj._buffers.get("weight_mask", torch.tensor(True)))
    dynarch.widen(model, "fc1", 12)
    path = dynarch.save(tempfile.mkdtemp() + "/ck", model)
    loaded = dynarch.load(path).model
    assert torch.equal(loaded(X), model(X))
    assert list(loaded.state_dict()) == list(model.state_dict())


def test_add_skip_errors() -> None:
    model = net()
    with pytest.raises(ValueError, match="'act1' runs before 'act3' in forward; a skip goes"):
        add_skip(model, "act3", "act1")
    with pytest.raises(ValueError, match="a skip needs two different modules, got source = target"):
        add_skip(model, "fc1", "fc1")
    with pytest.raises(ValueError, match=r"skip target '' is the whole model; name one of its"):
        add_skip(model, "fc1", "")
    nested = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"skip target '1' is a container \(Sequential\)"):
        add_skip(nested, "0", "1")
    with pytest.raises(ValueError, match=r"density must be None \(dense\) or a number in \(0, 1\]"):
        add_skip(model, "act1", "fc3", density=0.0)
    with pytest.raises(KeyError, match="model has no submodule named 'fc9'"):
        add_skip(model, "fc9", "fc3")
    add_skip(model, "act1", "fc3")
    with pytest.raises(ValueError, match=r"skip source 'fc3\.skip\.proj' belongs to a skip"):
        add_skip(model, "fc3.skip.proj", "out")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="both ends must carry Linear units or both"):
        add_skip(conv, "1", "3")
    with pytest.raises(UnsupportedModelError, match="cannot tell the width of skip target '2'"):
        add_skip(conv, "0", "2")
    with pytest.raises(ValueError, match="skip replay args need keys"):
        replay_skip(model, {"source": "fc1"})


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent: fx cannot trace it
            return x
        return self.b(torch.relu(self.a(x)))


def test_untraceable_model_is_checked_at_the_first_forward() -> None:
    model = Untraceable()
    add_skip(model, "b", "a")  # wrong order, unknown without a trace
    with pytest.raises(RuntimeError, match="'a' ran before 'b' in this forward pass"):
        model(torch.randn(2, 3))
    ok = Untraceable()
    x = torch.randn(2, 3)
    before = ok(x)
    add_skip(ok, "a", "b")
    assert torch.equal(ok(x), before)
    assert isinstance(ok.b.skip, SkipConnection)


# -- highways ------------------------------------------------------------------------------


def dead_net() -> nn.Sequential:
    model = net()
    with torch.no_grad():
        model.fc1.bias[[1, 4]] = -100.0
    return model


def test_highway_preserves_function_and_reroutes() -> None:
    model = dead_net()
    ex = Extrema(model, layers=["fc1"])
    ex.observe(X)
    assert ex.dead_units("fc1").tolist() == [1, 4]
    before = model(X)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    (event,) = highways(model, ex, optimizer=opt, reason="dead")
    assert torch.equal(model(X), before)
    assert event.op == "highway" and event.target == "fc1" and event.reason == "dead"
    assert event.details == {"layer": "fc1", "units": [1, 4], "consumer": "fc2", "span": 2,
                             "source": "act1", "target": "fc3", "module": "fc3.skip",
                             "kind": "Linear", "in": 8, "out": 5, "params": 40,
                             "active": 10}  # fmt: skip
    assert bool((model.fc2.weight[:, [1, 4]] == 0).all())
    assert bool((model.fc1.bias[[1, 4]] == 0).all())
    mask = model.fc3.skip.proj.weight_mask
    assert mask.nonzero()[:, 1].unique().tolist() == [1, 4] and int(mask.sum()) == 10
    assert bool((torch.relu(model.fc1(X))[:, [1, 4]] > 0).any())  # alive again
    for _ in range(2):
        opt.zero_grad()
        model(X).pow(2).sum().backward()
        opt.step()
    w = model.fc3.skip.proj.weight.detach()
    assert bool((w[:, [1, 4]] != 0).any()) and bool((w[~mask] == 0).all())


def test_highway_with_masked_layers_and_round_trip() -> None:
    model = dead_net()
    sparsify(model, 0.5, distribution="uniform")
    before = model(X)
    mask1 = model.fc1.weight_mask.clone()
    highways(model, {"fc1": [1, 4]}, span=3)
    assert torch.equal(model(X), before)
    assert bool((model.fc1.weight[~mask1] == 0).all())
    assert not bool(model.fc2.weight_mask[:, [1, 4]].any())
    assert list(skips(model)) == ["out.skip"]
    path = dynarch.save(tempfile.mkdtemp() + "/ck", model)
    loaded = dynarch.load(path).model
    assert torch.equal(loaded(X), model(X))


def test_highway_nothing_dead_and_errors() -> None:
    model = net()
    assert highways(model, {"fc1": []}) == []
    with pytest.raises(ValueError, match="span must be an int >= 2, got 1"):
        highways(model, {"fc1": [0]}, span=1)
    with pytest.raises(
        UnsupportedModelError,
        match=r"but 'out' is read by no layer; leave 'fc2' out of the units \(an Extrema leaves "
        r"such layers out\) or give a smaller span",
    ):
        highways(model, {"fc2": [0]}, span=3)
    with pytest.raises(TypeError, match=r"units must be \{layer name: unit indices\} or an"):
        highways(model, [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the Extrema given watches another model"):
        highways(model, Extrema(net()))
    assert not dynarch.history(model)


def test_highway_zeroes_the_dead_units_in_earlier_skips() -> None:
    model = dead_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    add_skip(model, "act1", "fc3", optimizer=opt)
    with torch.no_grad():
        model.fc3.skip.proj.weight.normal_()  # as if trained
    before = model(X)
    highways(model, {"fc1": [1, 4]}, optimizer=opt)
    assert torch.equal(model(X), before)
    assert bool((model.fc3.skip.proj.weight[:, [1, 4]] == 0).all())
    assert bool((model.fc3.skip.proj.weight[:, [0, 2, 3]] != 0).all())
    assert list(skips(model)) == ["fc3.skip", "fc3.skip2"]


def test_highway_refuses_a_skip_reading_the_units_before_their_activation() -> None:
    model = dead_net()
    add_skip(model, "fc1", "fc3")
    with pytest.raises(
        UnsupportedModelError,
        match=r"skip 'fc3.skip' reads them from 'fc1', not from the post-activation output "
        r"'act1', so re-pointing them would change what it receives; remove that skip first",
    ):
        highways(model, {"fc1": [1, 4]})
    assert [e.op for e in dynarch.history(model)] == ["skip"]


def test_highways_from_an_extrema_leave_out_layers_without_a_chain() -> None:
    model = net()
    with torch.no_grad():
        model.fc1.bias[[1, 4]] = -100.0
        model.fc3.bias[0] = -100.0  # only 'out' reads fc3: no chain of 2 after it
    ex = Extrema(model, layers=["fc1", "fc3"])
    ex.observe(X)
    assert 0 in ex.dead_units("fc3").tolist()
    before = model(X)
    events = highways(model, ex)
    assert [(e.details["layer"], e.details["target"]) for e in events] == [("fc1", "fc3")]
    assert torch.equal(model(X), before)
    with pytest.raises(UnsupportedModelError, match=r"leave 'fc3' out of the units"):
        highways(model, {"fc3": [0]})
