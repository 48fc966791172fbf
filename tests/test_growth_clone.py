"""Vertical cloning (``clone_units``) and ``widen(..., sources=...)``.

The clone copies its source's incoming weights, bias and mask row; consumers' columns are
split equally; the function is unchanged; optimizer state is carried; checkpoints rebuild.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch import nn

import dynarch
from dynarch.growth import clone_units
from dynarch.masks import sparsify
from dynarch.models import cnn, mlp

X = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return mlp(6, [8, 8], 3)


def test_clone_copies_rows_splits_columns_and_keeps_function() -> None:
    model = net()
    before = model(X)
    w1, b1 = model.fc1.weight.detach().clone(), model.fc1.bias.detach().clone()
    w2 = model.fc2.weight.detach().clone()
    event = clone_units(model, "fc1", [5, 1, 5], reason="saturated")
    assert (model(X) - before).abs().max() <= 1e-5
    assert model.fc1.out_features == 11 and model.fc2.in_features == 11
    assert event.op == "widen" and event.reason == "saturated"
    assert event.details["sources"] == [5, 1, 5] and event.details["init"] == "net2net"
    assert torch.equal(model.fc1.weight[8:], w1[[5, 1, 5]])
    assert torch.equal(model.fc1.bias[8:], b1[[5, 1, 5]])
    torch.testing.assert_close(model.fc2.weight[:, 5], w2[:, 5] / 3, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(model.fc2.weight[:, 8], w2[:, 5] / 3, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(model.fc2.weight[:, 9], w2[:, 1] / 2, rtol=1e-6, atol=1e-8)
    assert torch.equal(model.fc2.weight[:, 0], w2[:, 0])


def test_clone_conv_with_batchnorm_in_eval() -> None:
    torch.manual_seed(0)
    model = cnn(3, 4, channels=(4, 6), input_size=8)
    x = torch.randn(2, 3, 8, 8)
    model.train()
    for _ in range(2):
        model(x)
    model.eval()
    before = model(x)
    name = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    clone_units(model, name, [0, 3])
    assert (model(x) - before).abs().max() <= 1e-5


def test_masked_clone_copies_mask_row_and_columns() -> None:
    model = net()
    sparsify(model, 0.4, distribution="uniform")
    before = model(X)
    m1, m2 = model.fc1.weight_mask.clone(), model.fc2.weight_mask.clone()
    clone_units(model, "fc1", [2])
    assert (model(X) - before).abs().max() <= 1e-5
    assert torch.equal(model.fc1.weight_mask[8], m1[2])
    assert torch.equal(model.fc2.weight_mask[:, 8], m2[:, 2])
    assert torch.equal(model.fc2.weight_mask[:, :8], m2)


def test_noise_jitters_only_the_clones() -> None:
    model = net()
    w = model.fc1.weight.detach().clone()
    clone_units(model, "fc1", [3], noise=0.1)
    assert torch.equal(model.fc1.weight[:8], w)
    assert not torch.equal(model.fc1.weight[8], w[3])


def test_optimizer_state_carried_clones_start_at_zero() -> None:
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(X).sum().backward()
    opt.step()
    avg = opt.state[model.fc1.weight]["exp_avg"].clone()
    clone_units(model, "fc1", [4], optimizer=opt)
    state = opt.state[model.fc1.weight]
    assert torch.equal(state["exp_avg"][:8], avg)
    assert bool((state["exp_avg"][8] == 0).all())
    assert model.fc1.weight in opt.param_groups[0]["params"]
    model(X).sum().backward()
    opt.step()  # still a working optimizer


def test_checkpoint_round_trip() -> None:
    model = net()
    sparsify(model, 0.5, distribution="uniform")
    clone_units(model, "fc2", [0, 7])
    path = dynarch.save(tempfile.mkdtemp() + "/ck", model)
    loaded = dynarch.load(path).model
    assert torch.equal(loaded(X), model(X))
    assert loaded.fc2.out_features == 10


def test_errors() -> None:
    model = net()
    with pytest.raises(ValueError, match="no units given to clone in 'fc1'"):
        clone_units(model, "fc1", [])
    with pytest.raises(ValueError, match=r"units of 'fc1' must be a 1-D tensor or list of unit"):
        clone_units(model, "fc1", torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"sources holds indices outside \[0, 8\) for 'fc1'"):
        clone_units(model, "fc1", [8])
    with pytest.raises(ValueError, match="sources holds 1 unit indices but widening 'fc1' from 8"):
        dynarch.widen(model, "fc1", 10, sources=[1])
    with pytest.raises(ValueError, match="which only init='net2net' does; got init='zero'"):
        dynarch.widen(model, "fc1", 9, init="zero", sources=[1])
    with pytest.raises(ValueError, match="sources must be a 1-D tensor or list of unit indices"):
        dynarch.widen(model, "fc1", 9, sources=[1.0])
    with pytest.raises(TypeError, match="'act1' is a ReLU; expected one of: Linear, Conv2d"):
        clone_units(model, "act1", [0])
    assert model.fc1.out_features == 8 and not dynarch.history(model)
