"""Audit 10: highways with norms and non-ReLU activations, multi-scale masks, tournament
misuse, infeasible seed configurations, patch messages, and prune argument handling."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynarch
from dynarch.activity import Extrema
from dynarch.graph import UnsupportedModelError
from dynarch.growth import (
    MultiScale,
    Tournament,
    add_patches,
    find_seed,
    hierarchical_init,
    highways,
)
from dynarch.growth.multiscale import downsample
from dynarch.masks import sparsify
from dynarch.models import mlp
from dynarch.prune import (
    GradientImportance,
    magnitude_prune,
    scheduled_sparsity,
    structured_prune,
)

X = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- 1. highways reset the BatchNorm that killed the units ---------------------------------


def test_highway_resets_the_batchnorm_of_the_repointed_units() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(X).sum().backward()
    opt.step()  # momentum buffers exist
    with torch.no_grad():
        model[1].bias[:2] = -50.0  # the BatchNorm shift kills units 0 and 1
        model[1].weight[2] = 3.0
    model.eval()
    ex = Extrema(model, layers=["0"])
    ex.observe(X)
    assert ex.dead_units("0").tolist() == [0, 1]
    before = model(X)
    (event,) = highways(model, ex, optimizer=opt)
    assert (event.details["units"], event.details["target"]) == ([0, 1], "6")
    assert torch.equal(model(X), before)  # eval: function preserved
    bn = model[1]
    assert bn.weight[:2].tolist() == [1.0, 1.0] and bn.bias[:2].tolist() == [0.0, 0.0]
    assert bn.running_mean[:2].tolist() == [0.0, 0.0]
    assert bn.running_var[:2].tolist() == [1.0, 1.0]
    assert bn.weight[2].item() == 3.0  # other units untouched
    for p in (bn.weight, bn.bias):
        assert opt.state[p]["momentum_buffer"][:2].eq(0).all()
    again = Extrema(model, layers=["0"])
    again.observe(X)
    assert again.dead_units("0").tolist() == []  # alive in eval
    model.train()
    h = model[2](model[1](model[0](X)))
    assert bool((h[:, :2] > 0).float().mean(0).gt(0.2).all())  # alive in train mode too


def test_highway_train_mode_function_preserved_with_batchnorm() -> None:
    torch.manual_seed(1)
    model = mlp(10, [8, 8, 6], 3, batchnorm=True)
    with torch.no_grad():
        model.bn1.bias[[1, 4]] = -50.0
    model.train()
    before = model(X)
    highways(model, {"fc1": [1, 4]})
    torch.testing.assert_close(model(X), before, atol=0.0, rtol=0.0)


# -- 2. activations whose dead units do not output exactly 0 are refused --------------------


@pytest.mark.parametrize(
    ("act", "shown"),
    [(nn.LeakyReLU(), "LeakyReLU(negative_slope=0.01)"), (nn.GELU(), "GELU(approximate='none')"),
     (nn.SiLU(), "SiLU()"), (nn.ELU(), "ELU(alpha=1.0)"), (nn.Tanh(), "Tanh()"),
     (nn.Hardtanh(-1.0, 1.0), "Hardtanh(min_val=-1.0, max_val=1.0)")],
)  # fmt: skip
def test_highway_refuses_activations_with_non_zero_dead_output(act: nn.Module, shown: str) -> None:
    model = nn.Sequential(nn.Linear(10, 8), act, nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    state = _state(model)
    with pytest.raises(
        UnsupportedModelError,
        match=r"cannot route the dead units of '0' into a highway: it is followed by '1' \("
        + re.escape(shown)
        + r"\), whose output for a dead unit "
        r"\(positive on fewer than eps of the samples\) is not exactly 0, so zeroing their "
        r"outgoing weights would change the function; highways need ReLU, ReLU6, "
        r"Hardtanh\(min_val=0\) or a functional relu right after the layer",
    ):
        highways(model, {"0": [0, 1]})
    assert dynarch.history(model) == [] and all(
        torch.equal(v, state[k]) for k, v in model.state_dict().items()
    )


def test_highway_refuses_a_layer_without_activation_or_a_norm_after_it() -> None:
    linear = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(UnsupportedModelError, match=r"it is followed by '1' \(Linear\("):
        highways(linear, {"0": [0]})
    after = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 8),
                          nn.ReLU(), nn.Linear(8, 3))  # fmt: skip
    with pytest.raises(
        UnsupportedModelError,
        match=r"norm '2' normalises its units after the activation, turning a dead unit's 0 "
        r"into a non-zero value",
    ):
        highways(after, {"0": [0]})
    assert dynarch.history(linear) == [] and dynarch.history(after) == []


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(10, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize(
    "make",
    [lambda: nn.ReLU6(), lambda: nn.Hardtanh(0.0, 2.0), lambda: nn.LeakyReLU(0.0), None],
)
def test_highway_accepts_zero_when_inactive_activations(make: object) -> None:
    torch.manual_seed(2)
    if make is None:
        model: nn.Module = _Functional()
        first = "a"
    else:
        model = nn.Sequential(nn.Linear(10, 8), make(), nn.Linear(8, 8), nn.ReLU(),  # type: ignore[operator]
                              nn.Linear(8, 3))  # fmt: skip
        first = "0"
    with torch.no_grad():
        model.get_submodule(first).bias[:2] = -100.0
    before = model(X)
    (event,) = highways(model, {first: [0, 1]})
    assert event.op == "highway"
    assert torch.equal(model(X), before)


# -- 3. multi-scale initialisation refuses a masked larger network -------------------------


def _mlp(side: int, density: float | None = None) -> nn.Sequential:
    m = nn.Sequential(nn.Flatten(), nn.Linear(side * side, 16), nn.ReLU(), nn.Linear(16, 4))
    if density is not None:
        sparsify(m, density, distribution="uniform")
    return m


def test_hierarchical_init_refuses_a_masked_large_model_and_accepts_a_masked_small() -> None:
    torch.manual_seed(0)
    small, large = _mlp(4, 0.3), _mlp(8, 0.3)
    state = _state(large)
    with pytest.raises(
        ValueError,
        match=r"the large model is masked \('1' has a weight_mask\): multi-scale initialisation "
        r"writes whole rows and blocks of its weights, which its mask would forbid; build that "
        r"network dense",
    ):
        hierarchical_init(small, large, (1, 4, 4), (1, 8, 8))
    assert all(torch.equal(v, state[k]) for k, v in large.state_dict().items())
    dense = _mlp(8)
    hierarchical_init(small, dense, (1, 4, 4), (1, 8, 8))
    x = torch.rand(16, 1, 8, 8)
    torch.testing.assert_close(dense(x), small(downsample(x, 4)), atol=1e-6, rtol=1e-5)
    assert int((dense[1].weight[:, :] == 0).sum()) >= int((~small[1].weight_mask).sum()) * 4


def test_multiscale_refuses_sparse_later_scales_before_training() -> None:
    built: list[int] = []

    def build(s: int) -> nn.Module:
        built.append(s)
        return _mlp(s, 0.5)

    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 4, (32,))
    with pytest.raises(
        ValueError,
        match=r"the scale-8 model is masked \('1' has a weight_mask\).*let build\(\) return "
        r"dense networks for every scale after the first \(only the first may be masked\), or "
        r"use init='none'",
    ):
        MultiScale([4, 8], build, epochs_per_scale=50).run(((x, y), (x, y)))
    assert built == [4, 8]
    rows = MultiScale([4, 8], lambda s: _mlp(s, 0.5 if s == 4 else None)).run(((x, y), (x, y)))
    assert rows.rows[1]["accuracy_at_init"] == rows.rows[0]["accuracy"]


# -- 4. the tournament refuses misuse instead of rejecting every candidate -----------------


def _deep() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_tournament_checks_dtypes_and_converts_labels() -> None:
    model = _deep().double()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    with pytest.raises(
        ValueError,
        match=r"data: x has dtype torch.float32 but the model's parameters are torch.float64; "
        r"convert one of them \(e.g. x.to\(torch.float64\)\)",
    ):
        Tournament(model, data=(x, y))
    with pytest.raises(ValueError, match=r"probe_data: x has dtype torch.float32"):
        Tournament(model, data=(x.double(), y), probe_data=(x, y))
    t = Tournament(model, data=(x.double(), y.int()), probe_steps=2, seed=0,
                   candidates=("insert", "widen"))  # fmt: skip
    assert t.held_out[1].dtype == t.probe_data[1].dtype == torch.int64
    event = t.run()
    assert event is not None and event.op == "tournament"


def test_tournament_raises_when_every_candidate_fails_the_same_way() -> None:
    model = _deep()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    t = Tournament(model, data=(x, y), probe_steps=2, seed=0, candidates=("insert", "widen"))
    model.double()  # changed after the tournament was built
    with pytest.raises(
        RuntimeError,
        match=r"every tournament candidate \(insert:0, widen:0, insert:2, widen:2\) failed with "
        r"the same error, so the model or the data is at fault, not a candidate: RuntimeError: ",
    ):
        t.run()
    assert [e.op for e in dynarch.history(model)] == []


# -- 5. find_seed reports infeasible configurations without training them ------------------


def test_find_seed_marks_infeasible_configurations() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, generator=g)
    y = (x[:, 0] > 0).long()
    data = ((x[:80], y[:80]), (x[80:], y[80:]))
    s = find_seed(data, hidden_options=[()], densities=[0.02, 1.0], seeds=[0], epochs=1)
    assert [r["density"] for r in s.runs] == [1.0]  # the infeasible one never trained
    (bad,) = s.infeasible
    assert bad["hidden"] == () and bad["density"] == 0.02
    assert (
        "layer 'out' (16 weights, shape (2, 8)) would get 0 active weights at density "
        in (bad["why"])
    )
    assert "the minimal density that works is" in bad["why"]
    assert [r["feasible"] for r in s.rows] == [True, False]
    last = s.rows[-1]
    assert (last["weights"], last["learns"], last["seeds"]) == (None, False, 0)
    assert s.table().splitlines()[-1] == "| [] | 0.02 | - | - | - | - | 0 | infeasible |"
    with pytest.raises(
        ValueError,
        match=r"no configuration can be sparsified to its density \(e.g. hidden \[\] at density "
        r"0.02: layer 'out'.*\); give higher densities",
    ):
        find_seed(data, hidden_options=[()], densities=[0.02, 0.01], seeds=[0], epochs=1)


# -- 6. add_patches: empty explicit units ---------------------------------------------------


def test_add_patches_empty_units_message() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sparsify(model, 0.2, distribution="uniform")
    with pytest.raises(
        ValueError,
        match=r"^no units to patch: every layer given \(\['0'\]\) has no units; name at least "
        r"one unit of a layer$",
    ):
        add_patches(model, {"0": []})
    with pytest.raises(ValueError, match=r"^no units to patch: no layer given;"):
        add_patches(model, {})
    with pytest.raises(ValueError, match=r"no units to patch \(the Extrema found no dead"):
        add_patches(model, Extrema(model))


# -- 7. GradientImportance names frozen layers ---------------------------------------------


def test_gradient_importance_names_frozen_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    imp = GradientImportance(model, mode="taylor")
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    dynarch.fit(model, opt, (x, y), epochs=1, batch_size=16, callbacks=[imp], progress=False)
    with pytest.raises(
        ValueError,
        match=r"no gradient importance accumulated for layers \['0'\] in 2 accumulated steps: "
        r"their weights do not require grad \(frozen\); leave them out with "
        r"GradientImportance\(..., exclude=\['0'\]\) or unfreeze them",
    ):
        imp.prune(0.5, optimizer=opt)
    with pytest.raises(ValueError, match=r"call accumulate\(\) after backward"):
        GradientImportance(model).prune(0.5)
    ok = GradientImportance(model, exclude=["0"])
    model(x).sum().backward()
    ok.accumulate()
    assert ok.prune(0.5, optimizer=opt).details["pruned"] == 15


# -- 8. real scalars of any kind ------------------------------------------------------------


def test_prune_accepts_numpy_and_tensor_scalars_and_refuses_bools() -> None:
    for value in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.int64(0)):
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        event = magnitude_prune(model, value)  # type: ignore[arg-type]
        assert event.details["target"] == float(value)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    for bad, shown in ((True, "True"), (np.bool_(False), "np.False_|False"),
                       (torch.tensor(True), r"tensor\(True\)"),
                       (torch.tensor([0.5]), r"tensor\(\[0.5000\]\)")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"sparsity must be a number in \[0, 1\) .*({shown})"):
            magnitude_prune(model, bad)  # type: ignore[arg-type]
    assert structured_prune(model, "0", np.int64(1)).details["new_width"] == 5  # type: ignore[arg-type]
    assert model[0].out_features == 5
    structured_prune(model, "0", torch.tensor(2))  # type: ignore[arg-type]
    structured_prune(model, "0", np.float32(0.34))  # type: ignore[arg-type]
    assert model[0].out_features == 2
    with pytest.raises(ValueError, match=r"amount must be an int .* got np.True_|got True"):
        structured_prune(model, "0", np.bool_(True))  # type: ignore[arg-type]


# -- 9. scheduled_sparsity validates --------------------------------------------------------


def test_scheduled_sparsity_validates() -> None:
    with pytest.raises(ValueError, match=r"final must be a number in \[0, 1\) .* got 1.5"):
        scheduled_sparsity(5, initial=0.0, final=1.5, start=0, end=10)
    with pytest.raises(ValueError, match=r"initial must be a number in \[0, 1\) .* got -0.1"):
        scheduled_sparsity(5, initial=-0.1, final=0.5, start=0, end=10)
    with pytest.raises(ValueError, match=r"end must be an int >= 11, got 4"):
        scheduled_sparsity(7, initial=0.0, final=0.8, start=10, end=4)
    with pytest.raises(ValueError, match=r"end must be an int >= 6, got 5"):
        scheduled_sparsity(5, initial=0.0, final=0.8, start=5, end=5)
    with pytest.raises(ValueError, match=r"initial 0.6 must not exceed final 0.2"):
        scheduled_sparsity(5, initial=0.6, final=0.2, start=0, end=10)
    with pytest.raises(ValueError, match=r"step must be an int >= 0, got 2.5"):
        scheduled_sparsity(2.5, initial=0.0, final=0.5, start=0, end=10)  # type: ignore[arg-type]
    assert scheduled_sparsity(5, initial=0.0, final=0.8, start=0, end=10, schedule="linear") == 0.4
    assert scheduled_sparsity(np.int64(20), initial=np.float32(0.25), final=0.5, start=0,  # type: ignore[arg-type]
                              end=10) == 0.5  # fmt: skip


# -- 10. structured_prune refuses an amount that removes nothing -----------------------------


def test_structured_prune_refuses_an_amount_removing_no_unit() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    state = _state(model)
    with pytest.raises(
        ValueError,
        match=r"^amount 0.05 removes no unit of the 6 units of '0' \(round\(0.05 \* 6\) = 0\); "
        r"give at least 1 unit \(or a fraction of at least one unit\)$",
    ):
        structured_prune(model, "0", 0.05)
    with pytest.raises(ValueError, match=r"^amount 0 removes no unit of the 6 units of '0'; "):
        structured_prune(model, "0", 0)
    with pytest.raises(
        ValueError, match=r"amount must leave at least one unit \(1 <= amount <= 5\)"
    ):
        structured_prune(model, "0", 6)
    assert dynarch.history(model) == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
