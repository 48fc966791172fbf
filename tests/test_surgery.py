"""Structural surgery: widen, shrink, deepen, attach, detach.

Function preservation (max |Δoutput| <= 1e-5 in float32) in train and eval mode, exact
weights after each op, masks, events, atomic failures, every error message, determinism.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import dynarch
from dynarch._engine import engine_state
from dynarch.graph import UnsupportedModelError, analyse
from dynarch.nn import Residual
from models import (
    RESNET_COUPLED,
    ZOO,
    CatModel,
    DataDependent,
    FoldedSequence,
    Twice,
    add_mask,
    batch,
    cnn,
    conv_k,
    custom_mlp,
    functional_cnn,
    layernorm_mlp,
    mlp,
    resnet,
)

TOL = 1e-5
CASES = [(zoo, layer) for zoo, (_, _, layers) in ZOO.items() for layer in layers]


def _width(module: nn.Module) -> int:
    return int(module.out_features if isinstance(module, nn.Linear) else module.out_channels)


def prepared(zoo: str, mode: str) -> tuple[nn.Module, Tensor]:
    """A zoo model in ``mode``; in eval mode its BatchNorm running stats are non-trivial."""
    factory, shape, _ = ZOO[zoo]
    model = factory()
    if mode == "eval":
        model.train()
        with torch.no_grad():
            for s in range(3):
                model(batch(shape, seed=10 + s) * 2 + 0.5)
        model.eval()
    else:
        model.train()
    return model, batch(shape)


def out(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


# --------------------------------------------------------------------------- widen


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("init", ["net2net", "zero"])
@pytest.mark.parametrize(("zoo", "layer"), CASES)
def test_widen_preserves_function(zoo: str, layer: str, init: str, mode: str) -> None:
    model, x = prepared(zoo, mode)
    before = out(model, x)
    old = _width(model.get_submodule(layer))
    coupled = analyse(model).group(layer).producers
    for width in (old + 1, old + 7):  # several widths, one after the other
        event = dynarch.widen(model, layer, width, init=init)
        assert diff(out(model, x), before) <= TOL
        assert {_width(model.get_submodule(p)) for p in coupled} == {width}
        assert event.details["new_width"] == width
    model.train()
    loss = model(x).square().mean()
    loss.backward()  # the widened model still trains
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize(("zoo", "layer"), CASES)
def test_widen_random_changes_function(zoo: str, layer: str) -> None:
    model, x = prepared(zoo, "eval")
    dynarch.set_seed(model, 1)
    before = out(model, x)
    dynarch.widen(model, layer, _width(model.get_submodule(layer)) + 6, init="random")
    assert diff(out(model, x), before) > 1e-3


def test_widen_coupled_residual_channels() -> None:
    model = resnet()
    event = dynarch.widen(model, "block1.conv2", 9)
    assert [_width(model.get_submodule(n)) for n in RESNET_COUPLED] == [9, 9, 9]
    assert model.block1.conv1.in_channels == model.block2.conv1.in_channels == 9
    assert model.bn.num_features == model.block1.bn2.num_features == 9
    assert model.fc1.in_features == 9
    assert model.block1.conv2.in_channels == 5  # its own input is another space
    assert event.details == {
        "old_width": 4, "new_width": 9, "producers": RESNET_COUPLED,
        "consumers": ["block1.conv1", "block2.conv1", "fc1"],
        "norms": ["bn", "block1.bn2", "block2.bn2"], "init": "net2net", "noise": 0.0,
    }  # fmt: skip


def _sources(seed: int, old: int, extra: int) -> Tensor:
    return torch.randint(0, old, (extra,), generator=torch.Generator().manual_seed(seed))


def test_widen_net2net_exact_weights() -> None:
    model = mlp()
    dynarch.set_seed(model, 5)
    w0, b0, w2 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[2].weight))
    dynarch.widen(model, "0", 16)
    index = torch.cat([torch.arange(10), _sources(5, 10, 6)])
    counts = torch.bincount(index, minlength=10).float()
    assert torch.equal(model[0].weight, w0[index])
    assert torch.equal(model[0].bias, b0[index])
    torch.testing.assert_close(model[2].weight, w2[:, index] / counts[index], rtol=0, atol=0)
    assert (model[0].in_features, model[0].out_features, model[2].in_features) == (6, 16, 16)


def test_widen_net2net_flatten_blocks_and_batchnorm() -> None:
    model, _ = prepared("cnn", "eval")
    dynarch.set_seed(model, 2)
    bn = {k: v.clone() for k, v in model[5].state_dict().items()}
    fc = model[9].weight.detach().clone()
    dynarch.widen(model, "4", 9)
    index = torch.cat([torch.arange(6), _sources(2, 6, 3)])
    counts = torch.bincount(index, minlength=6).float()
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(model[5], key), bn[key][index])
    assert torch.equal(model[5].num_batches_tracked, bn["num_batches_tracked"])
    cols = (index[:, None] * 4 + torch.arange(4)).reshape(-1)  # 2x2 positions per channel
    expected = fc[:, cols] / counts[index].repeat_interleave(4)
    torch.testing.assert_close(model[9].weight, expected, rtol=0, atol=0)
    assert (model[5].num_features, model[9].in_features) == (9, 36)


def test_widen_zero_and_random_init_values() -> None:
    model = cnn()
    model.eval()
    w4 = model[4].weight.detach().clone()
    dynarch.widen(model, "0", 8, init="zero")
    assert torch.equal(model[4].weight[:, 5:], torch.zeros(6, 3, 3, 3))
    assert torch.equal(model[4].weight[:, :5], w4)
    bound = 1 / (3 * 9) ** 0.5
    new_rows = model[0].weight.detach()[5:]
    assert float(new_rows.abs().max()) <= bound and float(new_rows.abs().min()) > 0
    bn = model[1]
    assert torch.equal(bn.weight[5:], torch.ones(3)) and torch.equal(bn.bias[5:], torch.zeros(3))
    assert torch.equal(bn.running_mean[5:], torch.zeros(3))
    assert torch.equal(bn.running_var[5:], torch.ones(3))

    model = mlp()
    w2 = model[2].weight.detach().clone()
    dynarch.widen(model, "0", 13, init="random")
    new_cols = model[2].weight[:, 10:]
    assert torch.equal(model[2].weight[:, :10], w2)
    assert bool((new_cols != 0).all()) and float(new_cols.detach().abs().max()) <= 1 / 13**0.5


def test_widen_noise_perturbs_only_the_copies() -> None:
    model, x = prepared("mlp", "eval")
    w0 = model[0].weight.detach().clone()
    dynarch.set_seed(model, 3)
    dynarch.widen(model, "0", 14, noise=0.1)
    src = _sources(3, 10, 4)
    assert torch.equal(model[0].weight[:10], w0)
    jitter = model[0].weight[10:] - w0[src]
    assert bool((jitter != 0).all())
    assert float(jitter.detach().abs().max()) < 0.1 * float(w0.std()) * 6
    assert 0 < diff(out(model, x), out(mlp(), x)) < 0.1


def test_widen_layernorm() -> None:
    for init in ("net2net", "zero"):
        with pytest.raises(
            UnsupportedModelError,
            match=rf"^cannot widen '0' with init='{init}': LayerNorm '1' normalises over the "
            r"widened units, so its mean and variance change and the function cannot be "
            r"preserved exactly; use init='random' to accept the change$",
        ):
            dynarch.widen(layernorm_mlp(), "0", 12, init=init)
    model = layernorm_mlp()
    dynarch.widen(model, "0", 12, init="random")
    assert model[1].normalized_shape == (12,)
    assert torch.equal(model[1].weight[8:], torch.ones(4))
    assert torch.equal(model[1].bias[8:], torch.zeros(4))
    assert out(model, batch((3, 6))).shape == (3, 3)


# --------------------------------------------------------------------------- shrink


def _zero_outgoing(model: nn.Module, layer: str, drop: list[int]) -> None:
    """Zero the input columns (blocks after a Flatten) of ``drop`` in every consumer."""
    group = analyse(model).group(layer)
    old = _width(model.get_submodule(layer))
    with torch.no_grad():
        for name, _flat in group.consumers:
            w = model.get_submodule(name).weight
            block = w.shape[1] // old
            cols = (torch.tensor(drop)[:, None] * block + torch.arange(block)).reshape(-1)
            w[:, cols] = 0


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("zoo", "layer"), CASES)
def test_shrink_of_silent_units_preserves_function(zoo: str, layer: str, mode: str) -> None:
    model, x = prepared(zoo, mode)
    old = _width(model.get_submodule(layer))
    drop = [1, old - 1]
    _zero_outgoing(model, layer, drop)
    before = out(model, x)
    rows = model.get_submodule(layer).weight.detach().clone()
    keep = [i for i in reversed(range(old)) if i not in drop]  # any order is accepted
    event = dynarch.shrink(model, layer, keep)
    assert diff(out(model, x), before) <= TOL
    assert _width(model.get_submodule(layer)) == old - 2
    assert torch.equal(model.get_submodule(layer).weight, rows[sorted(keep)])
    assert event.replay == {"target": layer, "width": old - 2}


def test_shrink_coupled_and_norms_exact() -> None:
    model = resnet()
    model.eval()
    bn = model.block1.bn2.running_mean.clone()
    fc1 = model.fc1.weight.detach().clone()
    dynarch.shrink(model, "stem", torch.tensor([3, 0]))
    assert [_width(model.get_submodule(n)) for n in RESNET_COUPLED] == [2, 2, 2]
    assert torch.equal(model.block1.bn2.running_mean, bn[[0, 3]])
    assert torch.equal(model.fc1.weight, fc1[:, [0, 3]])
    assert out(model, batch((2, 3, 6, 6))).shape == (2, 3)


# --------------------------------------------------------------------------- masks


def test_masks_follow_net2net_widen_and_shrink() -> None:
    model, x = prepared("mlp", "eval")
    m0, m2 = add_mask(model[0], seed=1), add_mask(model[2], seed=2)
    before = out(model, x)
    dynarch.set_seed(model, 4)
    dynarch.widen(model, "0", 15)
    index = torch.cat([torch.arange(10), _sources(4, 10, 5)])
    assert torch.equal(model[0].weight_mask, m0[index])  # rows copied from the sources
    assert torch.equal(model[2].weight_mask, m2[:, index])  # columns too
    assert "weight_mask" in dict(model[0].named_buffers())
    assert model[0].weight_mask.dtype == torch.bool
    for layer in (model[0], model[2]):
        assert bool((layer.weight[~layer.weight_mask] == 0).all())
    assert diff(out(model, x), before) <= TOL

    keep = [0, 2, 3, 11, 14]
    m0, m2 = model[0].weight_mask.clone(), model[2].weight_mask.clone()
    dynarch.shrink(model, "0", keep)
    assert torch.equal(model[0].weight_mask, m0[keep])
    assert torch.equal(model[2].weight_mask, m2[:, keep])


@pytest.mark.parametrize("init", ["zero", "random"])
def test_masks_of_fresh_units_have_the_layer_density(init: str) -> None:
    model = mlp()
    m0, m2 = add_mask(model[0], 0.5, seed=1), add_mask(model[2], 0.5, seed=2)
    dynarch.widen(model, "0", 14, init=init)
    assert torch.equal(model[0].weight_mask[:10], m0)
    assert torch.equal(model[2].weight_mask[:, :10], m2)
    k0 = round(float(m0.float().mean()) * 6)
    k2 = round(float(m2.float().mean()) * 12)
    assert model[0].weight_mask[10:].sum(1).tolist() == [k0] * 4
    assert model[2].weight_mask[:, 10:].sum(0).tolist() == [k2] * 4
    for layer in (model[0], model[2]):
        assert bool((layer.weight[~layer.weight_mask] == 0).all())


def test_mask_of_flattened_consumer_is_remapped_by_blocks() -> None:
    model = cnn()
    m9 = add_mask(model[9], seed=3)
    dynarch.set_seed(model, 6)
    dynarch.widen(model, "4", 8)
    index = torch.cat([torch.arange(6), _sources(6, 6, 2)])
    cols = (index[:, None] * 4 + torch.arange(4)).reshape(-1)
    assert torch.equal(model[9].weight_mask, m9[:, cols])
    assert bool((model[9].weight[~model[9].weight_mask] == 0).all())


# --------------------------------------------------------------------------- deepen


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_deepen_linear_after_the_activation(mode: str) -> None:
    model, x = prepared("mlp", mode)
    before = out(model, x)
    names = [n for n, _ in model.named_parameters()]
    event = dynarch.deepen(model, "0")
    assert list(model._modules) == ["0", "1", "1_deep", "1_deep_act", "2", "3", "4"]
    new, act = model.get_submodule("1_deep"), model.get_submodule("1_deep_act")
    assert isinstance(new, nn.Linear) and isinstance(act, nn.ReLU) and act is not model[1]
    assert torch.equal(new.weight, torch.eye(10)) and torch.equal(new.bias, torch.zeros(10))
    assert diff(out(model, x), before) <= TOL
    deep = ["1_deep.weight", "1_deep.bias"]
    assert [n for n, _ in model.named_parameters()] == [*names[:2], *deep, *names[2:]]
    assert event.details == {
        "anchor": "1", "inserted": ["1_deep", "1_deep_act"], "kind": "Linear", "activation": "ReLU"
    }  # fmt: skip
    dynarch.deepen(model, "0")  # again: fresh names, still the same function
    assert list(model._modules)[2:6] == ["1_deep2", "1_deep_act2", "1_deep", "1_deep_act"]
    assert diff(out(model, x), before) <= TOL


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_deepen_conv_dirac(kernel: int, mode: str) -> None:
    model = conv_k(kernel)
    x = batch((3, 3, 6, 6))
    if mode == "eval":
        model(batch((3, 3, 6, 6), seed=4) + 1)
        model.eval()
    before = out(model, x)
    event = dynarch.deepen(model, "0")  # through BatchNorm "1" to ReLU "2"
    assert event.details["anchor"] == "2"
    assert list(model._modules) == ["0", "1", "2", "2_deep", "2_deep_act", "3"]
    new = model.get_submodule("2_deep")
    assert isinstance(new, nn.Conv2d)
    assert (new.kernel_size, new.padding, new.in_channels, new.out_channels) == (
        (kernel, kernel), (kernel // 2, kernel // 2), 4, 4
    )  # fmt: skip
    dirac = torch.zeros(4, 4, kernel, kernel)
    dirac[range(4), range(4), kernel // 2, kernel // 2] = 1
    assert torch.equal(new.weight, dirac) and torch.equal(new.bias, torch.zeros(4))
    assert diff(out(model, x), before) <= TOL


def test_deepen_non_idempotent_activation_is_not_repeated() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x = batch((4, 3))
    before = out(model, x)
    event = dynarch.deepen(model, "0")
    assert list(model._modules) == ["0", "1", "1_deep", "2"]
    assert event.details["activation"] is None
    assert diff(out(model, x), before) <= TOL


@pytest.mark.parametrize(("zoo", "layer"), CASES)
def test_deepen_preserves_function_everywhere(zoo: str, layer: str) -> None:
    model, x = prepared(zoo, "eval")
    before = out(model, x)
    dynarch.deepen(model, layer)
    assert diff(out(model, x), before) <= TOL


def test_deepen_custom_and_functional_models_wrap_the_anchor() -> None:
    model = custom_mlp()
    x = batch((4, 5))
    before = out(model, x)
    event = dynarch.deepen(model, "fc1")
    assert event.details["inserted"] == ["act.act_deep", "act.act_deep_act"]
    assert isinstance(model.act, nn.Sequential)
    assert list(model.act._modules) == ["0", "act_deep", "act_deep_act"]
    assert [n for n, _ in model.named_parameters()] == [
        "fc1.weight", "fc1.bias", "act.act_deep.weight", "act.act_deep.bias", "fc2.weight",
        "fc2.bias",
    ]  # fmt: skip
    assert diff(out(model, x), before) <= TOL

    model2 = functional_cnn()  # torch.relu is not a module: the layer itself is the anchor
    x2 = batch((2, 3, 8, 8))
    before2 = out(model2, x2)
    event = dynarch.deepen(model2, "fc1")
    assert event.details == {
        "anchor": "fc1", "inserted": ["fc1.fc1_deep"], "kind": "Linear", "activation": None
    }  # fmt: skip
    assert [n for n, _ in model2.named_parameters()][2:6] == [
        "fc1.0.weight", "fc1.0.bias", "fc1.fc1_deep.weight", "fc1.fc1_deep.bias"
    ]  # fmt: skip
    assert diff(out(model2, x2), before2) <= TOL


def test_widen_after_deepen_preserves_function() -> None:
    model, x = prepared("cnn", "eval")
    before = out(model, x)
    dynarch.deepen(model, "4")
    dynarch.widen(model, "4", 10)
    dynarch.widen(model, "6_deep", 11)
    assert model.get_submodule("6_deep").in_channels == 10
    assert diff(out(model, x), before) <= TOL


# --------------------------------------------------------------------------- attach / detach


@pytest.mark.parametrize(
    ("factory", "shape", "slot", "branch"),
    [
        (mlp, (4, 6), "after:1", lambda: nn.Linear(10, 10)),
        (mlp, (4, 6), "2", lambda: nn.Sequential(nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 12))),
        (cnn, (2, 3, 8, 8), "after:2", lambda: nn.Conv2d(5, 5, 3, padding=1)),
        (custom_mlp, (4, 5), "after:fc1", lambda: nn.Linear(8, 8)),
        (resnet, (2, 3, 6, 6), "after:block1", lambda: nn.Conv2d(4, 4, 1)),
    ],
)
def test_attach_alpha_zero_preserves_and_detach_restores(
    factory: Callable[[], nn.Module],
    shape: tuple[int, ...],
    slot: str,
    branch: Callable[[], nn.Module],
) -> None:
    model = factory()
    model.eval()
    x = batch(shape)
    before, state, text = out(model, x), snapshot(model), repr(model)
    names = [n for n, _ in model.named_parameters()]
    event = dynarch.attach(model, slot, branch())
    canonical = "after:" + slot.removeprefix("after:")
    assert event.target == canonical
    wrapper = model.get_submodule(event.details["module"])
    assert isinstance(wrapper, Residual) and float(wrapper.alpha.detach()) == 0.0
    assert engine_state(model).slots == {canonical: event.details["module"]}
    assert diff(out(model, x), before) <= TOL
    with torch.no_grad():
        wrapper.alpha.fill_(0.5)
    assert diff(out(model, x), before) > 1e-4  # the branch is live
    dynarch.detach(model, slot)
    assert repr(model) == text
    assert [n for n, _ in model.named_parameters()] == names
    assert same_state(snapshot(model), state)
    assert torch.equal(out(model, x), before)
    assert engine_state(model).slots == {}


def test_attach_wraps_a_non_sequential_anchor() -> None:
    model = custom_mlp()
    event = dynarch.attach(model, "fc1", nn.Linear(8, 8), alpha=0.25, trainable_alpha=False)
    assert event.details == {"module": "fc1.fc1_slot", "alpha": 0.25, "type": "Linear"}
    assert [n for n, _ in model.named_parameters()][:2] == ["fc1.0.weight", "fc1.0.bias"]
    alpha = model.fc1.fc1_slot.alpha
    assert alpha.dim() == 0 and not alpha.requires_grad and float(alpha) == 0.25
    spec = {"type": "Linear", "args": {"in_features": 8, "out_features": 8, "bias": True}}
    assert event.replay == {
        "slot": "after:fc1",
        "module": spec,
        "alpha": 0.25,
        "trainable_alpha": False,
    }


def test_detach_inside_a_wrapper_holding_another_slot() -> None:
    model = custom_mlp()
    x = batch((3, 5))
    before = out(model, x)
    dynarch.attach(model, "after:fc1", nn.Linear(8, 8))
    dynarch.attach(model, "after:fc1.0", nn.Linear(8, 8))  # a sibling inside the wrapper
    dynarch.detach(model, "after:fc1")
    assert list(model.fc1._modules) == ["0", "0_slot"]  # the other slot survives
    dynarch.detach(model, "fc1.0")
    assert diff(out(model, x), before) <= TOL
    assert engine_state(model).slots == {}


def test_widen_through_an_attached_branch() -> None:
    """The branch's Linear reads and writes the widened space (coupled through the add)."""
    model, x = prepared("mlp", "eval")
    dynarch.attach(model, "after:1", nn.Linear(10, 10), alpha=0.7)
    before = out(model, x)
    event = dynarch.widen(model, "0", 13)
    assert event.details["producers"] == ["0", "1_slot.module"]
    assert event.details["consumers"] == ["1_slot.module", "2"]
    branch = model.get_submodule("1_slot.module")
    assert (branch.in_features, branch.out_features) == (13, 13)
    assert diff(out(model, x), before) <= TOL
    dynarch.detach(model, "after:1")
    assert list(model._modules) == ["0", "1", "2", "3", "4"]


# --------------------------------------------------------------------------- events


def test_events_record_every_op() -> None:
    model = mlp()
    engine_state(model).step = 7
    e1 = dynarch.widen(model, "0", 14, reason="plateau")
    e2 = dynarch.shrink(model, "2", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    e3 = dynarch.deepen(model, "0")
    e4 = dynarch.attach(model, "after:3", nn.Linear(10, 10))
    e5 = dynarch.detach(model, "after:3")
    assert dynarch.history(model) == [e1, e2, e3, e4, e5]
    rows = [
        (e.step, e.op, e.target, e.params_before, e.params_after, e.replay)
        for e in (e1, e2, e3, e4, e5)
    ]
    spec = {"type": "Linear", "args": {"in_features": 10, "out_features": 10, "bias": True}}
    assert rows == [
        (7, "widen", "0", 241, 317, {"target": "0", "width": 14}),  # 6*14+14 + 14*12+12 + 12*3+3
        (7, "shrink", "2", 317, 281, {"target": "2", "width": 10}),  # 6*14+14 + 14*10+10 + 10*3+3
        (7, "deepen", "0", 281, 491, {"after": "0"}),  # + 14*14+14
        (7, "attach", "after:3", 491, 602, {"slot": "after:3", "module": spec, "alpha": 0.0,
                                            "trainable_alpha": True}),  # + 10*10+10 + alpha
        (7, "detach", "after:3", 602, 491, {"slot": "after:3"}),
    ]  # fmt: skip
    assert e1.reason == "plateau" and e1.details["init"] == "net2net"
    assert e2.details == {
        "old_width": 12, "new_width": 10, "producers": ["2"], "consumers": ["4"], "norms": []
    }  # fmt: skip
    assert e5.details == {"module": "3_slot"}
    assert engine_state(model).version == 2 * 5  # bumped on entry and exit of each op
    assert all(
        e.to_dict() == type(e).from_dict(e.to_dict()).to_dict() for e in (e1, e2, e3, e4, e5)
    )


def test_record_false_appends_nothing() -> None:
    model = mlp()
    event = dynarch.widen(model, "0", 11, record=False)
    assert event.op == "widen" and dynarch.history(model) == []
    assert engine_state(model).version == 2


# --------------------------------------------------------------------------- errors

Factory = Callable[[], nn.Module]
Op = Callable[[nn.Module], Any]

# fmt: off
ERRORS: list[tuple[Factory, Op, type[Exception], str]] = [
    (mlp, lambda m: dynarch.widen(m, "0", 10), ValueError,
     r"^new width of '0' must be an int greater than its current width 10, got 10 "
     r"\(use dynarch\.shrink to remove units\)$"),
    (mlp, lambda m: dynarch.widen(m, "0", 5), ValueError, r"current width 10, got 5 \(use"),
    (mlp, lambda m: dynarch.widen(m, "0", 12.0), ValueError, r"current width 10, got 12\.0 \(use"),
    (mlp, lambda m: dynarch.widen(m, "0", True), ValueError, r"current width 10, got True \(use"),
    (mlp, lambda m: dynarch.widen(m, "0", 12, init="xavier"), ValueError,
     r"^unknown init 'xavier' for widen; allowed: net2net, zero, random$"),
    (mlp, lambda m: dynarch.widen(m, "0", 12, noise=-0.1), ValueError,
     r"^noise must be a finite number >= 0, got -0\.1$"),
    (mlp, lambda m: dynarch.widen(m, "0", 12, noise=float("nan")), ValueError,
     r"^noise must be a finite number >= 0, got nan$"),
    (mlp, lambda m: dynarch.widen(m, "0", 12, noise="1"), ValueError,
     r"^noise must be a finite number >= 0, got '1'$"),
    (custom_mlp, lambda m: dynarch.widen(m, "fc", 12), KeyError,
     r"model has no submodule named 'fc'; did you mean one of \['fc1', 'fc2'\]\?"),
    (custom_mlp, lambda m: dynarch.shrink(m, "fc_1", [0]), KeyError,
     r"model has no submodule named 'fc_1'; did you mean one of \['fc1'"),
    (mlp, lambda m: dynarch.widen(m, "1", 12), TypeError,
     r"^'1' is a ReLU; expected one of: Linear, Conv2d$"),
    (mlp, lambda m: dynarch.widen(m, "4", 12), UnsupportedModelError,
     r"^cannot widen '4': its output is an output of the model \(resizing it would change the "
     r"output shape\) \(coupled layers: \['4'\]\)$"),
    (CatModel, lambda m: dynarch.widen(m, "fc1", 12), UnsupportedModelError,
     r"^cannot widen 'fc1': 'cat' in CatModel\.forward is not supported on a changed channel"),
    (CatModel, lambda m: dynarch.shrink(m, "fc2", [0]), UnsupportedModelError,
     r"^cannot shrink 'fc2': 'cat' in CatModel\.forward is not supported"),
    (DataDependent, lambda m: dynarch.widen(m, "fc1", 12), UnsupportedModelError,
     r"^cannot trace DataDependent with torch\.fx .*data-dependent control flow$"),
    (Twice, lambda m: dynarch.widen(m, "fc", 6), UnsupportedModelError,
     r"^cannot widen 'fc': 'fc' is called 2 times on inputs of different channel spaces"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 3, groups=2)),
     lambda m: dynarch.widen(m, "0", 6), UnsupportedModelError,
     r"^cannot widen '0': '1' is a grouped or flattened Conv2d consumer "
     r"\(coupled layers: \['0'\]\)$"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2)),
     lambda m: dynarch.widen(m, "0", 6), UnsupportedModelError,
     r"^cannot widen '0': PReLU '1' has one parameter per channel \(coupled layers: \['0'\]\)$"),
    (FoldedSequence, lambda m: dynarch.widen(m, "fc1", 7), UnsupportedModelError,
     r"^cannot change 'fc1': 'fc2' takes 15 inputs, not the 5 units of 'fc1' \(they were "
     r"reshaped on the way\)$"),
    (mlp, lambda m: dynarch.shrink(m, "0", [1, 1, 2]), ValueError,
     r"^keep holds duplicate indices for '0'$"),
    (mlp, lambda m: dynarch.shrink(m, "0", [0, 10]), ValueError,
     r"^keep holds indices outside \[0, 10\) for '0' \(min 0, max 10\)$"),
    (mlp, lambda m: dynarch.shrink(m, "0", torch.tensor([-1, 3])), ValueError,
     r"^keep holds indices outside \[0, 10\) for '0' \(min -1, max 3\)$"),
    (mlp, lambda m: dynarch.shrink(m, "0", []), ValueError,
     r"^keep must be a non-empty 1-D tensor of unit indices, got torch\.float32 of shape \(0,\)$"),
    (mlp, lambda m: dynarch.shrink(m, "0", [0.0, 1.0]), ValueError,
     r"^keep must be a non-empty 1-D tensor of unit indices, got torch\.float32 of shape \(2,\)$"),
    (mlp, lambda m: dynarch.shrink(m, "0", torch.ones(10, dtype=torch.bool)), ValueError,
     r"got torch\.bool of shape \(10,\)$"),
    (mlp, lambda m: dynarch.shrink(m, "0", [[0, 1]]), ValueError,
     r"got torch\.int64 of shape \(1, 2\)$"),
    (lambda: conv_k(1).append(nn.Conv2d(2, 2, 2)), lambda m: dynarch.deepen(m, "4"), ValueError,
     r"^cannot deepen after Conv2d with kernel_size \(2, 2\): an identity \(Dirac\) conv needs "
     r"odd kernel sizes$"),
    (Twice, lambda m: dynarch.deepen(m, "fc"), UnsupportedModelError,
     r"^'fc' is called 2 times in forward; dynarch can only insert after a module called "
     r"exactly once$"),
    (mlp, lambda m: dynarch.deepen(m, "0", init="zero"), ValueError,
     r"^unknown init 'zero' for deepen; allowed: identity \(for a zero-initialised residual "
     r"branch use dynarch\.attach\)$"),
    (mlp, lambda m: dynarch.deepen(m, "3"), TypeError,
     r"^'3' is a ReLU; expected one of: Linear, Conv2d$"),
    (mlp, lambda m: dynarch.attach(m, "after:9", nn.Linear(10, 10)), KeyError,
     r"unknown slot 'after:9': a slot is 'after:<module name>' naming a module of the model "
     r"\(model has no submodule named '9'\)"),
    (mlp, lambda m: dynarch.attach(m, "after:1", "linear"), TypeError,  # type: ignore[arg-type]
     r"^module must be an nn\.Module, got str$"),
    (mlp, lambda m: dynarch.attach(m, "after:0", nn.Linear(10, 5)), ValueError,
     r"^module attached at 'after:0' maps width 10 to shape \(5,\); it must return its "
     r"input's shape$"),
    (mlp, lambda m: dynarch.attach(m, "after:3", nn.Linear(12, 6)), ValueError,
     r"^module attached at 'after:3' maps width 12 to shape \(6,\)"),  # found through the ReLU
    (mlp, lambda m: dynarch.attach(m, "after:1", nn.Linear(12, 12)), ValueError,
     r"^module cannot read the output of slot 'after:1' \(width 10\): mat1 and mat2 shapes"),
    (cnn, lambda m: dynarch.attach(m, "after:3", nn.Conv2d(5, 4, 1)), ValueError,
     r"^module attached at 'after:3' maps width 5 to shape \(4, 8, 8\); it must return"),
    (mlp, lambda m: dynarch.detach(m, "after:1"), KeyError,
     r"nothing is attached at slot 'after:1'; occupied slots: none"),
]
# fmt: on


@pytest.mark.parametrize(("factory", "op", "exc", "match"), ERRORS)
def test_errors_leave_the_model_unchanged(
    factory: Callable[[], nn.Module],
    op: Callable[[nn.Module], Any],
    exc: type[Exception],
    match: str,
) -> None:
    model = factory()
    state, text, version = snapshot(model), repr(model), engine_state(model).version
    with pytest.raises(exc, match=match):
        op(model)
    assert same_state(snapshot(model), state)
    assert repr(model) == text
    assert dynarch.history(model) == []
    assert engine_state(model).version == version


def test_occupied_and_empty_slots() -> None:
    model = mlp()
    dynarch.attach(model, "after:1", nn.Linear(10, 10))
    state = snapshot(model)
    for slot in ("after:1", "1"):  # the same slot, however it is spelt
        with pytest.raises(
            ValueError, match=r"^slot 'after:1' is occupied by '1_slot'; detach it first$"
        ):
            dynarch.attach(model, slot, nn.Linear(10, 10))
    with pytest.raises(
        KeyError, match=r"nothing is attached at slot 'after:3'; occupied slots: \['after:1'\]"
    ):
        dynarch.detach(model, "3")
    assert same_state(snapshot(model), state) and len(dynarch.history(model)) == 1


# --------------------------------------------------------------------------- determinism


def test_engine_seed_decides_net2net_sources() -> None:
    def widened(seed: int) -> dict[str, Tensor]:
        model = mlp()
        dynarch.set_seed(model, seed)
        dynarch.widen(model, "0", 30, noise=0.01)
        return snapshot(model)

    assert same_state(widened(3), widened(3))
    assert not torch.equal(widened(3)["0.weight"], widened(4)["0.weight"])
    model = mlp()
    dynarch.set_seed(model, 3)
    w0 = model[0].weight.detach().clone()
    dynarch.widen(model, "0", 30)
    assert torch.equal(model[0].weight, w0[torch.cat([torch.arange(10), _sources(3, 10, 20)])])


BRANCH = nn.Linear(10, 10)  # built outside the checked region (its init uses global RNG)


@pytest.mark.parametrize(
    "op",
    [
        lambda m: dynarch.widen(m, "0", 14),
        lambda m: dynarch.widen(m, "2", 14, noise=0.5),
        lambda m: dynarch.widen(m, "0", 14, init="zero"),
        lambda m: dynarch.widen(m, "2", 14, init="random"),
        lambda m: dynarch.shrink(m, "0", [0, 4]),
        lambda m: dynarch.deepen(m, "2"),
        lambda m, branch=BRANCH: dynarch.attach(m, "after:1", branch),
    ],
)
def test_global_rng_is_not_consumed(op: Callable[[nn.Module], Any]) -> None:
    model = mlp()
    add_mask(model[2])
    rng = torch.get_rng_state()
    op(model)
    assert torch.equal(torch.get_rng_state(), rng)


def test_set_seed_validation() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"^seed must be a non-negative int, got {bad!r}$"):
            dynarch.set_seed(mlp(), bad)  # type: ignore[arg-type]


def test_deepcopy_model_keeps_working() -> None:
    model = mlp()
    dynarch.widen(model, "0", 12)
    twin = copy.deepcopy(model)
    dynarch.widen(twin, "0", 13)
    assert (model[0].out_features, twin[0].out_features) == (12, 13)


def test_replay_resize_rebuilds_the_structure() -> None:
    from dynarch.surgery import replay_resize

    grown = mlp()
    widen_event = dynarch.widen(grown, "0", 15)
    shrink_event = dynarch.shrink(grown, "2", [1, 4, 6])
    fresh = mlp()
    replay_resize(fresh, widen_event.replay)
    replay_resize(fresh, shrink_event.replay)
    shapes = {k: v.shape for k, v in grown.state_dict().items()}
    assert {k: v.shape for k, v in fresh.state_dict().items()} == shapes
    assert dynarch.history(fresh) == []  # replays are not recorded
    fresh.load_state_dict(grown.state_dict())
    x = batch((2, 6))
    assert torch.equal(out(fresh, x), out(grown, x))


def test_residual_module() -> None:
    branch = nn.Linear(3, 3)
    res = Residual(branch, alpha=0.5)
    x = batch((2, 3))
    assert torch.equal(out(res, x), x + 0.5 * out(branch, x))
    assert repr(res).splitlines()[1].strip() == "alpha=0.5"
    assert res.alpha.requires_grad and res.alpha.dim() == 0
    frozen = Residual(nn.Identity(), trainable_alpha=False)
    assert not frozen.alpha.requires_grad and torch.equal(out(frozen, x), x)


def test_attach_refuses_an_anchor_called_twice() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.conv2(self.relu(self.conv1(x))) + x)

    model = Block()
    with pytest.raises(
        UnsupportedModelError,
        match=re.escape(
            "'relu' is called 2 times in forward, so a module attached after it would run at "
            "each call; attach after a module called once (give each use of 'relu' its own "
            "module)"
        ),
    ):
        dynarch.attach(model, "after:relu", nn.Conv2d(4, 4, 1))
    assert dynarch.history(model) == [] and not hasattr(model, "relu_slot")
    dynarch.attach(model, "after:conv1", nn.Conv2d(4, 4, 1))  # called once: fine
