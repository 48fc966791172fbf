"""Audit (session 10): the Trainer checks its optimizer after structural events, models that
return tuples train, DynamicSparseLinear compiles and takes surgery, rewirer states resume
alone, capture() keeps RigL's window, idle schedules warn, sparsify refuses an optimizer
that does not train its layers, and checkpoints keep modules a container holds twice."""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

import dynarch
from dynarch.callbacks import At
from dynarch.masks import sparsify
from dynarch.prune import magnitude_prune
from dynarch.sparse import SET, DeepR, DynamicSparseLinear, IdleScheduleWarning, RigL
from dynarch.train import Trainer


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)
    )


def _data(n: int = 64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _fit(model: nn.Module, opt: torch.optim.Optimizer, callbacks: list, steps: int = 8) -> Trainer:
    return Trainer(model, opt, _data(), batch_size=16, epochs=10, max_steps=steps,
                   callbacks=callbacks, progress=False).fit()  # fmt: skip


DEAD = (
    r"the optimizer holds 3 parameter\(s\) that are no longer in the model \(shapes "
    r"\[\(12, 6\), \(12,\), \(10, 12\)\]\): a structural change \(widen, shrink, deepen, "
    r"attach, prune, dynarch.load, ...\) was made without optimizer=, so the changed layers "
    r"would not train; pass optimizer= \(inside a callback: trainer.optimizer\) to it, or "
    r"build the optimizer from model.parameters\(\) after the change"
)


def test_a_change_without_the_optimizer_inside_training_is_an_error_not_a_frozen_layer() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    widen = At(3, lambda t: dynarch.widen(t.model, "0", 14))  # optimizer= forgotten
    with pytest.raises(ValueError, match=DEAD):
        _fit(model, opt, [widen])
    # the same change made before fit: refused before the first step
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dynarch.widen(model, "0", 14)
    with pytest.raises(ValueError, match=DEAD):
        _fit(model, opt, [])
    # with the optimizer it trains on
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _fit(model, opt, [At(3, lambda t: dynarch.widen(t.model, "0", 14, optimizer=t.optimizer))])
    assert model[0].weight.shape == (14, 6)


def test_masks_added_without_the_optimizer_during_training_stay_enforced() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _fit(model, opt, [At(2, lambda t: magnitude_prune(t.model, 0.5))], steps=10)
    for layer in (model[0], model[2], model[4]):
        mask = layer.weight_mask
        assert int(mask.sum()) == mask.numel() - mask.numel() // 2
        assert torch.all(layer.weight[~mask] == 0)  # 8 more steps did not regrow them


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.relu(self.body(x))
        return self.a(h), self.b(h)


def test_a_model_returning_a_tuple_trains_and_evaluates() -> None:
    torch.manual_seed(0)
    model = _TwoHeads()

    def loss(out: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        return F.cross_entropy(out[0], y) + out[1].pow(2).mean()

    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), _data(), eval=_data(),
                batch_size=16, loss_fn=loss, progress=False).fit()  # fmt: skip
    assert isinstance(t.last_output, tuple) and not t.last_output[0].requires_grad
    assert set(t.evaluate()) == {"val_loss"}  # no accuracy for a tuple


def test_dynamic_sparse_linear_compiles_once_and_keeps_masks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        DynamicSparseLinear(8, 16, 0.3), nn.ReLU(), DynamicSparseLinear(16, 4, 0.5)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(5, 8)
    for i in range(6):
        opt.zero_grad()
        compiled(x).sum().backward()
        opt.step()
        if i == 2:
            model[0].store_gradients()
            model[0].rewire("deep_r", 0.3)
        if i == 1:
            frames = counter.frame_count
    assert counter.frame_count == frames  # no recompilation through steps and a rewire
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    for layer in (model[0], model[2]):
        assert torch.all(layer.weight[~layer.weight_mask] == 0)


def test_dynamic_sparse_linear_takes_surgery() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(DynamicSparseLinear(8, 16, 0.3), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    before = model(x).detach()
    dynarch.widen(model, "0", 20)
    torch.testing.assert_close(model(x), before)
    assert model[0].weight_mask.shape == (20, 8) and isinstance(model[0], DynamicSparseLinear)
    dynarch.deepen(model, "0")
    torch.testing.assert_close(model(x), before)
    assert [e.op for e in dynarch.history(model)] == ["widen", "deepen"]


def test_standalone_layers_draw_their_own_regrowth() -> None:
    torch.manual_seed(0)
    a, b = DynamicSparseLinear(40, 40, 0.2), DynamicSparseLinear(40, 40, 0.2)
    grown = []
    for layer in (a, b):
        before = layer.weight_mask.clone()
        layer.rewire("set", 0.5)
        grown.append(layer.weight_mask & ~before)
    assert int((grown[0] & grown[1]).sum()) < 0.3 * int(grown[0].sum())  # ~ chance (6%)


def _set_run(steps: int, state: dict | None = None) -> nn.Module:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rw = SET(model, opt, density=0.3, delta_t=2, t_end=100)
    if state is not None:
        state = copy.deepcopy(state)  # Optimizer.load_state_dict aliases the state tensors
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rw.load_state_dict(state["rw"])
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rw.step()
    model.__dict__["_test_state"] = {"model": model.state_dict(), "opt": opt.state_dict(),
                                     "rw": rw.state_dict()}  # fmt: skip
    return model


def test_rewirer_state_alone_resumes_exactly() -> None:
    full = _set_run(7)
    first = _set_run(3)
    assert "generator" in first.__dict__["_test_state"]["rw"]
    resumed = _set_run(4, first.__dict__["_test_state"])
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    old = {k: v for k, v in first.__dict__["_test_state"]["rw"].items() if k != "generator"}
    _set_run(1, {**first.__dict__["_test_state"], "rw": old})  # an older state still loads


def test_capture_on_a_step_that_feeds_no_update_does_nothing() -> None:
    def run(capture_every_step: bool) -> Tensor:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rw = RigL(model, opt, density=0.3, delta_t=4, t_end=100, grad_accumulation=1)
        x, y = _data()
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if capture_every_step:
                rw.capture()
            opt.step()
            rw.step()
        return torch.cat([model[i].weight_mask.flatten() for i in (0, 2, 4)])

    assert torch.equal(run(True), run(False))


def test_idle_schedules_warn_and_busy_ones_do_not() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(IdleScheduleWarning, match=r"t_end=8 is not after the first update \(step "
                      r"delta_t=100\)"):  # fmt: skip
        _fit(model, opt, [SET(model, opt, density=0.5)])  # the horizon: 8 steps
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdleScheduleWarning)
        DeepR(model, opt, density=0.5, variant="bellec", t_end=50)  # updates every step
    with pytest.warns(IdleScheduleWarning, match=r"t_end=1 is not after the first update "
                      r"\(step 1\), so the mask will never change; give t_end > 1"):  # fmt: skip
        DeepR(model, opt, variant="bellec", t_end=1)


def test_sparsify_refuses_an_optimizer_that_does_not_train_all_its_layers() -> None:
    model = _mlp()
    body = torch.optim.SGD([*model[0].parameters(), *model[2].parameters()], lr=0.1)
    with pytest.raises(ValueError, match=r"sparsify: layers \['4'\] train, but not by the "
                       r"optimizer given, which could not keep their masks"):  # fmt: skip
        sparsify(model, 0.5, optimizer=body)
    assert not hasattr(model[0], "weight_mask")  # nothing done
    sparsify(model, 0.5, optimizer=body, exclude=["4"])
    model[4].requires_grad_(False)  # a frozen layer needs no optimizer
    sparsify(model, 0.4, optimizer=body)


def test_a_tied_embedding_is_not_called_dense() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.dec = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
            self.dec.weight = self.emb.weight

        def forward(self, x: Tensor) -> Tensor:
            return self.dec(self.emb(x))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(Tied(), 0.5)
    with pytest.warns(UserWarning, match=r"sparsify leaves emb \(Embedding\) dense"):
        sparsify(nn.ModuleDict({"emb": nn.Embedding(10, 4), "dec": nn.Linear(4, 10)}), 0.5)


def test_checkpoints_keep_modules_a_container_holds_twice() -> None:
    torch.manual_seed(0)
    act, lin = nn.ReLU(), nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), act, lin, act, lin, nn.Linear(4, 2))
    x = torch.randn(5, 3)
    ck = dynarch.load(dynarch.save(tempfile.mkdtemp() + "/ck", model))
    torch.testing.assert_close(ck.model(x), model(x), rtol=0, atol=0)
    assert ck.model[1] is ck.model[3] and ck.model[2] is ck.model[4]


def test_a_config_key_given_twice_is_an_error(tmp_path: Path) -> None:
    from dynarch.config import ConfigError, load_config

    path = tmp_path / "dup.yaml"
    path.write_text("data:\n  name: mnist1d\ntrain:\n  epochs: 2\ndata:\n  n_train: 200\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line 5, column 1: key 'data' "
                       r"is given twice in one mapping \(the first would be ignored\); merge "
                       r"the two"):  # fmt: skip
        load_config(path)


def test_grow_on_plateau_refuses_an_unknown_init_when_built() -> None:
    from dynarch.callbacks import GrowOnPlateau

    with pytest.raises(ValueError, match=r"unknown init 'net2nett' for widen; allowed: net2net, "
                       r"zero, random"):  # fmt: skip
        GrowOnPlateau(["0"], init="net2nett")


def test_frozen_layers_are_named_as_frozen() -> None:
    model = _mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    frozen = (
        r"magnitude pruning: the optimizer does not hold the weights of layers \['0'\]: they "
        r"are frozen \(requires_grad=False\), so no optimizer step changes them; leave them out "
        r"with exclude=\['0'\]"
    )
    with pytest.raises(ValueError, match=frozen):
        magnitude_prune(model, 0.5, optimizer=opt, include=["0"])
