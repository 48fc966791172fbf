"""The growth tournament: candidates, ΔMI/ΔParams scores, economy, determinism, callback."""

from __future__ import annotations

import copy
import json
import tempfile

import pytest
import torch
from torch import nn

import dynarch
from dynarch.checkpoint import load, save
from dynarch.events import Event
from dynarch.growth.candidates import Candidate, active_params, scratch_copy
from dynarch.growth.tournament import Tournament, TournamentCallback
from dynarch.masks import sparsify
from dynarch.models import mlp
from dynarch.train import Trainer
from dynarch.triggers import CreditEconomy


def _data(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(6, [8, 8], 3)


def _tournament(model: nn.Module, **kwargs: object) -> Tournament:
    opts: dict = {"data": _data(), "seed": 0, "widen_units": 2, "insert_density": 0.25}
    opts.update(kwargs)
    return Tournament(model, **opts)


def test_propose_names_and_measures_what_each_candidate_adds() -> None:
    t = _tournament(_model())
    got = [(c.name, c.params, c.connections, c.units) for c in t.propose()]
    assert got == [
        ("insert:fc1", 24, 16, 8),  # 8x8 identity masked to 25% (16 weights) + 8 biases
        ("widen:fc1", 30, 28, 2),  # 2 rows of 6 (+2 biases) and 2 columns of 8 in fc2
        ("skip:act1->out", 24, 24, 0),  # bias-free 8 -> 3 projection
        ("insert:fc2", 24, 16, 8),
        ("widen:fc2", 24, 22, 2),  # 2 rows of 8 (+2 biases) and 2 columns of 3 in out
    ]
    assert t.rejected == []


def test_patch_candidates_need_masks_and_count_active_weights_only() -> None:
    model = _model()
    sparsify(model, 0.5)
    t = _tournament(model, candidates=("patch", "widen"), insert_density=None)
    cands = t.propose()
    assert [c.kind for c in cands] == ["patch", "widen", "patch", "widen"]
    before = active_params(model)
    for c in cands:
        trial = scratch_copy(model)
        c.apply(trial)
        after = active_params(trial)
        assert (c.params, c.connections) == (after[0] - before[0], after[1] - before[1])
    assert cands[0].options["units"] and len(cands[0].options["units"]) <= t.patch_units


def test_run_applies_the_best_scoring_candidate_and_records_all_scores() -> None:
    model = _model()
    seen: list[Event] = []
    dynarch._engine.engine_state(model).add_listener(seen.append)
    t = _tournament(model)
    event = t.run()
    assert event is not None and event.op == "tournament"
    scores = {c.name: c.score for c in t.last}
    best = max(scores, key=lambda n: scores[n] or 0.0)
    assert event.details["chosen"] == best == "skip:act1->out"
    recorded = {c["name"]: c["score"] for c in event.details["candidates"]}
    assert recorded == scores
    assert json.loads(event.to_json())["details"]["chosen"] == best  # events.jsonl-ready
    for c in t.last:
        assert c.score == pytest.approx((c.delta_mi or 0.0) / c.params)
    # only the real change and the tournament record reach the model (no trial events)
    assert [e.op for e in seen] == ["skip", "tournament"]
    assert event.params_after - event.params_before == 24


def test_function_preserving_candidates_keep_the_output() -> None:
    model = _model()
    x = _data()[0]
    before = model(x)
    event = _tournament(model, candidates=("insert",)).run()
    assert event is not None and event.details["applied"] == ["deepen", "sparsify"]
    assert torch.equal(model(x), before)


def test_optimizer_receives_the_new_parameters() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _tournament(model, candidates=("widen",)).run(opt)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}


def test_economy_limits_the_choice_to_affordable_candidates_and_pays() -> None:
    economy = CreditEconomy(initial=23.0)  # skip (24) and widen:fc1 (28) unaffordable
    model = _model()
    t = _tournament(model, economy=economy)
    event = t.run()
    assert event is not None
    affordable = {c.name: c.affordable for c in t.last}
    assert affordable == {"insert:fc1": True, "widen:fc1": False, "skip:act1->out": False,
                          "insert:fc2": True, "widen:fc2": True}  # fmt: skip
    assert all(c.score is None for c in t.last if not c.affordable)
    pool = [c for c in t.last if c.affordable]
    best = max(pool, key=lambda c: c.score or 0.0)
    assert event.details["chosen"] == best.name != "skip:act1->out"
    assert economy.balance == 23.0 - best.connections
    assert economy.spent == best.connections


def test_units_are_charged_when_the_economy_prices_them() -> None:
    economy = CreditEconomy(initial=1000.0, cost_per_connection=1.0, cost_per_unit=10.0)
    t = _tournament(_model(), economy=economy, candidates=("widen",))
    t.run()
    chosen = next(c for c in t.last if c.name == t.events[0].details["chosen"])
    assert economy.spent == chosen.connections + 10.0 * chosen.units


def test_nothing_affordable_changes_and_spends_nothing() -> None:
    economy = CreditEconomy(initial=5.0)
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    t = _tournament(model, economy=economy)
    assert t.run() is None
    assert economy.balance == 5.0 and economy.spent == 0.0
    assert dynarch.history(model) == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [c.affordable for c in t.last] == [False] * 5
    assert all(c.score is None for c in t.last)


def test_min_score_refuses_weak_candidates() -> None:
    model = _model()
    assert _tournament(model, min_score=1.0).run() is None
    assert dynarch.history(model) == []


def test_same_seed_same_scores_and_choice() -> None:
    a = _model()
    b = copy.deepcopy(a)
    ta, tb = _tournament(a, seed=7), _tournament(b, seed=7)
    ea, eb = ta.run(), tb.run()
    assert ea is not None and eb is not None
    assert ea.details["candidates"] == eb.details["candidates"]
    assert ea.details["chosen"] == eb.details["chosen"]
    x = _data()[0]
    assert torch.equal(a(x), b(x))


def test_seed_none_draws_from_the_engine_generator() -> None:
    a, b = _model(), _model()
    dynarch.set_seed(a, 11)
    dynarch.set_seed(b, 11)
    ea, eb = _tournament(a, seed=None).run(), _tournament(b, seed=None).run()
    assert ea is not None and eb is not None
    assert ea.details["seed"] == eb.details["seed"]
    assert ea.details["candidates"] == eb.details["candidates"]


def test_global_rng_is_untouched() -> None:
    model = _model()
    torch.manual_seed(99)
    state = torch.get_rng_state()
    _tournament(model, candidates=("widen", "insert")).run()
    assert torch.equal(torch.get_rng_state(), state)


def test_scratch_copy_leaves_listeners_and_history_behind() -> None:
    model = _model()
    calls: list[Event] = []
    st = dynarch._engine.engine_state(model)
    st.add_listener(calls.append)
    dynarch.set_seed(model, 4)
    clone = scratch_copy(model)
    cst = dynarch._engine.engine_state(clone)
    assert cst.listeners == [] and cst is not st
    assert torch.equal(cst.generator.get_state(), st.generator.get_state())
    dynarch.widen(clone, "fc1", 10)
    assert calls == [] and dynarch.history(model) == []
    assert model.fc1.out_features == 8


def test_grown_model_checkpoint_round_trip() -> None:
    model = _model()
    _tournament(model, candidates=("insert",)).run()
    x = _data()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = load(save(tmp + "/ckpt", model))
    assert torch.equal(ckpt.model(x), model(x))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"candidates": ("grow",)}, ValueError, r"candidates must be a non-empty list from"),
        ({"candidates": "widen"}, ValueError, r"candidates must be a non-empty list"),
        ({"mi_method": "knn"}, ValueError, r"unknown mi_method 'knn'; allowed: binned, probe"),
        ({"probe_lr": 0}, ValueError, r"probe_lr must be a finite number > 0, got 0"),
        ({"insert_density": 0}, ValueError, r"insert_density must be None or a number in"),
        ({"widen_units": 0}, ValueError, r"widen_units must be an int >= 1, got 0"),
        ({"economy": object()}, TypeError, r"economy must have can_afford\(\) and spend\(\)"),
        ({"data": (torch.zeros(3, 6), torch.zeros(3))}, ValueError, r"at least 4 samples"),
        ({"data": [1]}, TypeError, r"data must be a pair \(x, y\) of tensors, got list"),
        ({"layers": ["act1"]}, ValueError, r"layers \['act1'\] are not Linear/Conv2d modules"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _tournament(_model(), **kwargs).propose()


def test_candidate_errors_and_names() -> None:
    with pytest.raises(ValueError, match=r"unknown candidate kind 'grow'; allowed: patch"):
        Candidate("grow", "fc1").apply(_model())
    assert Candidate("skip", "act1", {"to": "out"}).name == "skip:act1->out"


def test_failing_candidates_are_rejected_with_the_reason() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3))
    x = torch.randn(16, 1, 4, 4)
    t = Tournament(model, data=(x, torch.randint(0, 3, (16,))), candidates=("insert", "widen"))
    assert [c.name for c in t.propose()] == ["widen:0"]
    assert t.rejected == [
        (
            "insert:0",
            "ValueError: cannot deepen after Conv2d with kernel_size (2, 2): an identity "
            "(Dirac) conv needs odd kernel sizes",
        ),
    ]
    dense = _tournament(_model(), candidates=("patch",))
    assert dense.propose() == [] and dense.run() is None  # patches need masked layers


def _trainer(model: nn.Module, cb: TournamentCallback, epochs: int) -> Trainer:
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Trainer(model, opt, (x, y), eval=(x, y), epochs=epochs, batch_size=64,
                   callbacks=[cb], progress=False)  # fmt: skip


def test_callback_runs_every_n_evaluations_with_the_trainer_optimizer() -> None:
    model = _model()
    cb = TournamentCallback(_tournament(model, candidates=("widen",)), every=1, max_rounds=2)
    trainer = _trainer(model, cb, epochs=3).fit()
    ops = [e.op for e in dynarch.history(model)]
    assert ops == ["widen", "tournament", "widen", "tournament"]
    assert cb.rounds == 2 and cb.evaluations == 3
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}
    fresh = TournamentCallback(_tournament(model), every=1)
    fresh.load_state_dict(cb.state_dict())
    assert fresh.state_dict() == {"evaluations": 3, "rounds": 2, "plateau": None}


def test_callback_does_not_grow_after_the_last_step() -> None:
    model = _model()
    cb = TournamentCallback(_tournament(model, candidates=("widen",)), every=1)
    _trainer(model, cb, epochs=2).fit()  # the second evaluation follows the last step
    assert (cb.evaluations, cb.rounds) == (2, 1)
    assert [e.op for e in dynarch.history(model)] == ["widen", "tournament"]


def test_callback_on_plateau() -> None:
    model = _model()
    t = _tournament(model, candidates=("insert",))
    cb = TournamentCallback(t, patience=1, threshold=100.0)
    _trainer(model, cb, epochs=3).fit()
    assert cb.rounds == 1  # eval 2 stalls (fires, resets), eval 3 starts a new best
    assert cb.state_dict()["plateau"] == {"best": cb.plateau.best, "wait": 0}


def test_callback_errors() -> None:
    t = _tournament(_model())
    with pytest.raises(ValueError, match=r"give every=<evaluations> and/or patience="):
        TournamentCallback(t)
    with pytest.raises(TypeError, match=r"tournament must be a Tournament, got int"):
        TournamentCallback(3, every=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"every must be an int >= 1, got 0"):
        TournamentCallback(t, every=0)
    with pytest.raises(ValueError, match=r"built for another model"):
        _trainer(_model(), TournamentCallback(t, every=1), epochs=1).fit()
    cb = TournamentCallback(_tournament(m := _model()), patience=1, monitor="val_f1")
    with pytest.raises(ValueError, match=r"monitors 'val_f1' but the evaluation produced"):
        _trainer(m, cb, epochs=1).fit()


def test_monitor_layer_and_probe_estimator() -> None:
    model = _model()
    t = _tournament(model, candidates=("widen",), monitor="act2", mi_method="probe", probe_steps=5)
    event = t.run()
    assert event is not None and event.details["chosen"] in {"widen:fc1", "widen:fc2"}
    assert [c.name for c in t.last] == ["widen:fc1", "widen:fc2"]
    assert all(isinstance(c.delta_mi, float) for c in t.last)
    assert t.baseline_mi() == t.baseline_mi()  # deterministic look-ahead


def test_cnn_skip_across_pooling_is_rejected_not_fatal() -> None:
    """A skip between feature maps of different sizes is refused when planned: the candidate
    is rejected (with the reason) and the round goes on with the other candidates."""
    from dynarch.models import cnn

    torch.manual_seed(0)
    model = cnn(1, 3, channels=[4, 6, 8], hidden=8, input_size=16)
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 3, (32,))
    t = Tournament(model, data=(x, y), candidates=("skip", "widen"), seed=0, probe_steps=2)
    names = [c.name for c in t.propose()]
    reasons = dict(t.rejected)
    assert any(n.startswith("widen:") for n in names)
    assert "spatial size" in reasons["skip:act1->conv3"]  # 16x16 maps into 4x4 ones
    assert reasons["skip:act1->conv3"].startswith(
        "UnsupportedModelError: cannot add a skip from 'act1' to 'conv3': 'pool1' (MaxPool2d)"
    )
    assert t.run() is not None  # a round completes with the runnable candidates


def test_data_follows_the_model_device() -> None:
    model = mlp(6, [8], 3)
    t = Tournament(model, data=(torch.randn(16, 6), torch.randint(0, 3, (16,))), seed=0)
    held = t.held_out
    t._to_model_device()
    assert t.held_out is held  # already on the model's device: nothing copied
    model.to("meta")  # a device other than the data's (CUDA in real use)
    t._to_model_device()
    assert {a.device.type for a in (*t.held_out, *t.probe_data)} == {"meta"}
