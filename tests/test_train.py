"""The training loop and its callbacks: order, logging, exact resume, validation."""

from __future__ import annotations

import copy
import io
import json
import random
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from dynarch._engine import engine_state, transaction
from dynarch.callbacks import At, Callback, EarlyStopping, GrowOnPlateau, LambdaCallback
from dynarch.events import Event
from dynarch.train import Trainer, fit, resolve_device


def _data(n: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _mlp(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))


def _trainer(model: nn.Module | None = None, lr: float = 0.1, n: int = 10, **kw: Any) -> Trainer:
    """SGD on ``n`` samples, batch size 4 (10 samples: batches of 4, 4, 2)."""
    model = _mlp() if model is None else model
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 4)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=lr), _data(n), **kw)


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.calls.append("fit_start")

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.calls.append(f"epoch_start {trainer.epoch}")

    def on_after_backward(self, trainer: Trainer) -> None:
        self.calls.append(f"after_backward {trainer.step}")

    def on_step_end(self, trainer: Trainer) -> None:
        self.calls.append(f"step_end {trainer.step}")

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        assert metrics is trainer.metrics
        self.calls.append(f"evaluate {trainer.epoch}")

    def on_epoch_end(self, trainer: Trainer) -> None:
        self.calls.append(f"epoch_end {trainer.epoch}")

    def on_fit_end(self, trainer: Trainer) -> None:
        self.calls.append("fit_end")


def test_fit_decreases_loss() -> None:
    x, y = _data(128)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    t = Trainer(model, opt, (x, y), eval=(x, y), epochs=10, batch_size=32, progress=False)
    before = t.evaluate()
    assert t.fit() is t
    assert (t.step, t.epoch, t.batch_in_epoch) == (40, 10, 0)
    assert t.metrics["val_loss"] < 0.4 * before["val_loss"]
    assert t.metrics["val_accuracy"] >= 0.95
    assert t.best["val_loss"] <= t.metrics["val_loss"]
    other = _mlp()
    assert fit(other, torch.optim.SGD(other.parameters()), (x, y), progress=False).step == 1


def test_hook_order_two_epochs_two_batches() -> None:
    rec = Recorder()
    _trainer(n=8, epochs=2, eval=_data(8), callbacks=[rec]).fit()
    assert rec.calls == [
        "fit_start",
        "epoch_start 0",
        "after_backward 0",
        "step_end 1",
        "after_backward 1",
        "step_end 2",
        "evaluate 0",
        "epoch_end 0",
        "epoch_start 1",
        "after_backward 2",
        "step_end 3",
        "after_backward 3",
        "step_end 4",
        "evaluate 1",
        "epoch_end 1",
        "fit_end",
    ]


def _batch_labels(seed: int) -> list[list[int]]:
    seen: list[list[int]] = []

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        seen.append(y.tolist())
        return out.sum() * 0.0

    model = nn.Linear(4, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = (torch.randn(10, 4), torch.arange(10))
    fit(model, opt, data, epochs=2, batch_size=4, loss_fn=loss_fn, seed=seed, progress=False)
    return seen


def test_batches_are_seeded_permutations_with_partial_last_batch() -> None:
    seen = _batch_labels(seed=0)
    assert [len(b) for b in seen] == [4, 4, 2, 4, 4, 2]
    epoch0 = [i for b in seen[:3] for i in b]
    epoch1 = [i for b in seen[3:] for i in b]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert _batch_labels(seed=0) == seen
    assert _batch_labels(seed=1) != seen


def test_after_backward_sees_gradients_before_the_step() -> None:
    model = _mlp()
    before: list[Tensor] = []
    checked: list[int] = []

    def after_backward(t: Trainer) -> None:
        params = list(t.model.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        assert all(torch.equal(p, q) for p, q in zip(params, before))  # not stepped yet
        checked.append(t.step)

    def step_end(t: Trainer) -> None:
        params = list(t.model.parameters())
        assert not all(torch.equal(p, q) for p, q in zip(params, before))  # stepped
        before[:] = [p.detach().clone() for p in params]

    def fit_start(t: Trainer) -> None:
        before[:] = [p.detach().clone() for p in t.model.parameters()]

    cb = LambdaCallback(
        on_fit_start=fit_start, on_after_backward=after_backward, on_step_end=step_end
    )
    _trainer(model, epochs=2, callbacks=[cb]).fit()
    assert checked == [0, 1, 2, 3, 4, 5]


def test_run_dir_metrics_and_events(tmp_path: Path) -> None:
    model = _mlp()
    losses: dict[int, float] = {}

    def step_end(t: Trainer) -> None:
        assert t.last_loss is not None
        losses[t.step] = t.last_loss.item()
        if t.step == 4:
            with transaction(t.model, "fake", "0", reason="test") as tx:
                tx.details["n"] = 1

    run = tmp_path / "run" / "a"
    cb = LambdaCallback(on_step_end=step_end)
    t = _trainer(model, epochs=2, eval=_data(6, seed=1), callbacks=[cb], run_dir=run, log_every=2)
    t.fit()
    assert t.run_dir == run
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    n_params = 4 * 16 + 16 + 16 * 2 + 2
    assert [sorted(d) for d in lines] == [
        ["epoch", "loss", "lr", "params", "step"],
        ["epoch", "params", "step", "val_accuracy", "val_loss"],
        ["epoch", "loss", "lr", "params", "step"],
        ["epoch", "loss", "lr", "params", "step"],
        ["epoch", "params", "step", "val_accuracy", "val_loss"],
    ]
    assert [(d["step"], d["epoch"]) for d in lines] == [(2, 0), (3, 0), (4, 1), (6, 1), (6, 1)]
    assert [d["loss"] for d in lines if "loss" in d] == [losses[2], losses[4], losses[6]]
    assert all(d["params"] == n_params for d in lines)
    assert all(d["lr"] == 0.1 for d in lines if "lr" in d)
    assert lines[-1]["val_loss"] == t.metrics["val_loss"]
    assert lines[-1]["val_accuracy"] == t.metrics["val_accuracy"]
    events = [json.loads(s) for s in (run / "events.jsonl").read_text().splitlines()]
    assert len(events) == 1
    assert Event.from_dict(events[0]) == engine_state(model).history[0]
    assert (events[0]["step"], events[0]["op"], events[0]["reason"]) == (4, "fake", "test")
    assert events[0]["details"] == {"n": 1}
    assert engine_state(model).listeners == []  # removed at fit end
    assert engine_state(model).step == 6


def test_second_fit_appends_to_run_dir(tmp_path: Path) -> None:
    t = _trainer(max_steps=2, run_dir=tmp_path, log_every=1)
    t.fit()
    t.max_steps = 3
    t.fit()
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == [1, 2, 3]
    assert (tmp_path / "events.jsonl").read_text() == ""


def test_progress_bar_on_a_tty(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    t = _trainer(epochs=2, eval=_data(), log_every=1, progress=True)
    t.fit()
    err = capsys.readouterr().err
    assert "6/6" in err and "loss=" in err and "val_acc=" in err
    assert t._bar is None
    _trainer(epochs=1, progress=False).fit()  # progress=False wins over a tty
    assert capsys.readouterr().err == ""


def test_early_stopping_stops_at_exact_epoch() -> None:
    stop = EarlyStopping(patience=2)
    rec = Recorder()
    t = _trainer(lr=0.0, epochs=10, eval=_data(), callbacks=[stop, rec])
    t.fit()
    # Constant val_loss: epoch 0 sets the best, epochs 1 and 2 do not improve -> stop after 2.
    assert stop.stopped_epoch == 2
    assert (t.epoch, t.step, t.should_stop) == (3, 9, True)
    assert rec.calls[-3:] == ["evaluate 2", "epoch_end 2", "fit_end"]
    state = _roundtrip(stop.state_dict())
    assert state == {"plateau": {"best": t.metrics["val_loss"], "wait": 2}, "stopped_epoch": 2}
    other = EarlyStopping(patience=2)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_early_stopping_max_mode_and_missing_metric() -> None:
    stop = EarlyStopping(monitor="val_accuracy", mode="max", patience=1)
    t = _trainer(lr=0.0, epochs=5, eval=_data(), callbacks=[stop])
    t.fit()
    assert (stop.stopped_epoch, t.epoch) == (1, 2)
    bad = EarlyStopping(monitor="val_f1")
    with pytest.raises(
        ValueError,
        match=r"EarlyStopping monitors 'val_f1' but the evaluation produced "
        r"\['val_accuracy', 'val_loss'\]; set monitor=",
    ):
        _trainer(eval=_data(), callbacks=[bad]).fit()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"monitor": ""}, "monitor must be a metric name such as 'val_loss', got ''"),
        ({"patience": 0}, "EarlyStopping: patience must be a positive int, got 0"),
        ({"min_delta": -1.0}, "EarlyStopping: min_delta must be a finite number >= 0, got -1.0"),
        ({"mode": "up"}, "EarlyStopping: mode must be 'min' or 'max', got 'up'"),
    ],
)
def test_early_stopping_validates(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EarlyStopping(**kwargs)


def test_at_fires_once_at_exact_step() -> None:
    calls: list[tuple[int, int, int]] = []
    at = At(5, lambda t: calls.append((t.step, t.epoch, t.batch_in_epoch)))
    t = _trainer(epochs=3, callbacks=[at])
    t.fit()
    assert t.step == 9 and calls == [(5, 1, 2)]
    assert at.state_dict() == {"fired": True}
    t.max_steps, t.epochs = None, 4
    t.fit()
    assert calls == [(5, 1, 2)]
    fresh = At(5, lambda t: calls.append((0, 0, 0)))
    fresh.load_state_dict({"fired": True})
    _trainer(epochs=3, callbacks=[fresh]).fit()
    assert calls == [(5, 1, 2)]
    with pytest.raises(ValueError, match=r"At: step must be a positive int \(steps count from 1\)"):
        At(0, print)
    with pytest.raises(TypeError, match="At: fn must be callable, got 3"):
        At(1, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"At state must have keys \['fired'\], got \[\]"):
        at.load_state_dict({})


def test_lambda_callback_validates() -> None:
    with pytest.raises(ValueError, match="LambdaCallback got unknown hook 'on_step'; allowed: "):
        LambdaCallback(on_step=print)
    with pytest.raises(TypeError, match="LambdaCallback hook 'on_fit_end' must be callable"):
        LambdaCallback(on_fit_end=1)  # type: ignore[arg-type]


def _resume_trainer(
    model: nn.Module, opt: torch.optim.Optimizer, max_steps: int, losses: list[float]
) -> Trainer:
    def record(t: Trainer) -> None:
        assert t.last_loss is not None
        losses.append(t.last_loss.item())

    return Trainer(
        model,
        opt,
        _data(10),
        eval=_data(6, seed=1),
        epochs=5,
        max_steps=max_steps,
        batch_size=4,
        seed=3,
        progress=False,
        callbacks=[LambdaCallback(on_step_end=record), EarlyStopping(patience=50)],
    )


def test_exact_resume_mid_epoch() -> None:
    full: list[float] = []
    model_a = _mlp(dropout=0.3)
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-2)
    a = _resume_trainer(model_a, opt_a, 12, full).fit()
    assert (a.step, a.epoch, a.batch_in_epoch) == (12, 4, 0)

    first: list[float] = []
    model_b = _mlp(dropout=0.3)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-2)
    b = _resume_trainer(model_b, opt_b, 5, first).fit()
    assert (b.step, b.epoch, b.batch_in_epoch) == (5, 1, 2)  # stopped mid-epoch
    assert first == full[:5]
    saved = _roundtrip(
        {
            "trainer": b.state_dict(),
            "rng": Trainer.capture_rng(),
            "model": model_b.state_dict(),
            "optimizer": opt_b.state_dict(),
        }
    )

    def resume(restore_rng: bool) -> tuple[Trainer, list[float]]:
        torch.manual_seed(12345)  # scramble the global RNGs
        random.seed(5)
        np.random.seed(5)
        rest: list[float] = []
        model = _mlp(dropout=0.3)
        model.load_state_dict(saved["model"])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        opt.load_state_dict(copy.deepcopy(saved["optimizer"]))
        c = _resume_trainer(model, opt, 12, rest)
        c.load_state_dict(saved["trainer"])
        if restore_rng:
            Trainer.restore_rng(saved["rng"])
        c.fit()
        assert (c.step, c.epoch, c.batch_in_epoch) == (12, 4, 0)
        assert engine_state(model).step == 12
        return c, rest

    c, rest = resume(restore_rng=True)
    assert rest == full[5:]
    assert c.metrics == a.metrics and c.best == a.best
    assert c.callbacks[1].state_dict() == a.callbacks[1].state_dict()
    for p, q in zip(model_a.parameters(), c.model.parameters()):
        assert torch.equal(p, q)
    _, diverged = resume(restore_rng=False)  # dropout masks differ without the RNG state
    assert diverged != full[5:]

    # Calling fit() again on the same trainer continues as well (no reseeding).
    more: list[float] = []
    model_d = _mlp(dropout=0.3)
    d = _resume_trainer(model_d, torch.optim.Adam(model_d.parameters(), lr=1e-2), 5, more).fit()
    d.max_steps = 12
    d.fit()
    assert more == full


def test_load_state_dict_errors() -> None:
    t = _trainer(callbacks=[EarlyStopping()])
    state = t.state_dict()
    assert state["callbacks"] == [
        {
            "class": "EarlyStopping",
            "state": {"plateau": {"best": None, "wait": 0}, "stopped_epoch": None},
        }
    ]
    with pytest.raises(
        ValueError,
        match=r"saved trainer state has callbacks \['EarlyStopping'\] but this trainer has "
        r"\['At'\]; pass the same callbacks in the same order",
    ):
        _trainer(callbacks=[At(1, print)]).load_state_dict(state)
    with pytest.raises(ValueError, match=r"trainer state must have keys \['batch_in_epoch', "):
        t.load_state_dict({"step": 1})


def test_rng_round_trip_weights_only() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    np.random.standard_normal()  # leave a cached gaussian in the numpy state
    random.gauss(0, 1)
    rng = _roundtrip(Trainer.capture_rng())
    expected = (torch.rand(3), np.random.standard_normal(2), random.gauss(0, 1), random.random())
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    Trainer.restore_rng(rng)
    got = (torch.rand(3), np.random.standard_normal(2), random.gauss(0, 1), random.random())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]
    assert rng["torch"].dtype == torch.uint8


def test_seeding_at_fit_start() -> None:
    model = _mlp()
    _trainer(model, epochs=0, seed=7).fit()
    draws = (torch.rand(2), np.random.rand(), random.random())
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    assert torch.equal(draws[0], torch.rand(2))
    assert draws[1:] == (np.random.rand(), random.random())
    assert engine_state(model).seed == 7
    # A model that has already been changed keeps its engine generator.
    grown = _mlp()
    with transaction(grown, "fake", "*"):
        pass
    gen_state = engine_state(grown).generator.get_state()
    _trainer(grown, epochs=0, seed=7).fit()
    assert engine_state(grown).seed == 0
    assert torch.equal(engine_state(grown).generator.get_state(), gen_state)


def test_device_resolution_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(
            RuntimeError,
            match=rf"device '{dev}' requested but CUDA is not available \(torch.cuda.is_available"
            r"\(\) is False\); use device='cpu' or 'auto'",
        ):
            _trainer(device=dev)
    for dev in ("tpu", "mps", "gpu0"):
        with pytest.raises(
            ValueError, match=rf"device '{dev}' is not supported; use 'cpu', 'cuda'"
        ):
            resolve_device(dev)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(
        RuntimeError, match=r"device 'cuda:3' requested but only 1 CUDA device\(s\)"
    ):
        resolve_device("cuda:3")


def test_input_validation() -> None:
    x, y = _data(10)
    with pytest.raises(
        ValueError,
        match=r"train: x and y must have the same first dimension, got x shape \(10, 4\) and "
        r"y shape \(9,\)",
    ):
        _trainer_on((x, y[:9]))
    with pytest.raises(ValueError, match=r"eval: x and y must have the same first dimension"):
        _trainer_on((x, y), eval=(x[:3], y))
    with pytest.raises(ValueError, match=r"train has no samples \(x shape \(0, 4\)\)"):
        _trainer_on((x[:0], y[:0]))
    with pytest.raises(
        TypeError,
        match=r"train must be a pair \(x, y\) of tensors or an object with train_x/train_y "
        r"attributes \(a dynarch.data.Dataset\), got Tensor",
    ):
        _trainer_on(x)
    with pytest.raises(
        TypeError, match="train: x and y must be torch tensors, got Tensor and list"
    ):
        _trainer_on((x, y.tolist()))
    with pytest.raises(TypeError, match=r"eval must be a pair .* with test_x/test_y attributes"):
        _trainer_on((x, y), eval=types.SimpleNamespace(train_x=x, train_y=y))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        Trainer("mlp", torch.optim.SGD(_mlp().parameters()), (x, y))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got list"):
        Trainer(_mlp(), [], (x, y))  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"callbacks\[1\] is a function, not a dynarch.callbacks.Callback; wrap functions "
        r"with LambdaCallback\(on_step_end=fn\)",
    ):
        _trainer(callbacks=[At(1, print), lambda t: None])
    with pytest.raises(
        ValueError, match=r"no evaluation data: pass eval=\.\.\. to Trainer or data="
    ):
        _trainer().evaluate()


def _trainer_on(train: Any, **kw: Any) -> Trainer:
    model = _mlp()
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), train, **kw)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": -1}, "epochs must be an int >= 0, got -1"),
        ({"max_steps": 0}, "max_steps must be an int >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"batch_size": 2.0}, r"batch_size must be an int >= 1, got 2.0"),
        ({"eval_batch_size": -4}, "eval_batch_size must be an int >= 1, got -4"),
        ({"log_every": True}, "log_every must be an int >= 1, got True"),
        ({"eval_every_epochs": 0}, "eval_every_epochs must be an int >= 1, got 0"),
        ({"seed": -1}, "seed must be an int >= 0, got -1"),
    ],
)
def test_trainer_argument_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _trainer(**kwargs)


def test_dataset_object_provides_eval_split() -> None:
    x, y = _data(10)
    tx, ty = _data(6, seed=1)
    ds = types.SimpleNamespace(train_x=x, train_y=y, test_x=tx, test_y=ty)
    t = _trainer_on(ds, progress=False, batch_size=4, epochs=2, eval_every_epochs=2)
    assert t.train_data[0] is x and t.eval_data is not None and t.eval_data[0] is tx
    rec = Recorder()
    t.callbacks.append(rec)
    t.fit()
    assert [c for c in rec.calls if c.startswith("evaluate")] == ["evaluate 1"]
    assert t.metrics == t.evaluate((tx, ty)) == t.evaluate(ds)
    assert _trainer_on(ds, eval=(tx[:2], ty[:2])).eval_data[0].shape[0] == 2  # type: ignore[index]


def test_evaluate_restores_modes_and_handles_regression() -> None:
    model = _mlp(dropout=0.5)
    t = _trainer(model)
    model.train()
    model[2].eval()  # mixed modes are restored module by module
    m1 = t.evaluate((torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])))
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    m2 = t.evaluate((torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])))
    assert sorted(m1) == sorted(m2) == ["val_accuracy", "val_loss"]
    # val_loss is the exact mean over all samples across eval batches.
    x, y = torch.randn(7, 4), torch.tensor([0, 1, 1, 0, 1, 0, 0])
    small = Trainer(model, t.optimizer, (x, y), eval_batch_size=3, progress=False)
    with torch.no_grad():
        model.eval()
        out = model(x)
        model.train()
    got = small.evaluate((x, y))
    assert got["val_loss"] == pytest.approx(nn.functional.cross_entropy(out, y).item(), abs=1e-6)
    assert got["val_accuracy"] == (out.argmax(1) == y).sum().item() / 7
    reg = nn.Linear(4, 1)
    x, target = torch.randn(8, 4), torch.randn(8, 1)
    r = Trainer(
        reg,
        torch.optim.SGD(reg.parameters(), lr=0.1),
        (x, target),
        loss_fn=nn.functional.mse_loss,
        progress=False,
    )
    expected = nn.functional.mse_loss(reg(x), target).item()
    assert r.evaluate((x, target)) == {"val_loss": pytest.approx(expected)}


def _deep_mlp(first: int = 10) -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Linear(4, first), nn.ReLU(), nn.Linear(first, 7), nn.ReLU(), nn.Linear(7, 2)
    )


@pytest.fixture
def fake_widen(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace dynarch.surgery.widen by a recorder (widths stay unchanged)."""
    calls: list[dict[str, Any]] = []

    def widen(model: nn.Module, target: str, width: int, **kw: Any) -> Event:
        calls.append({"step": engine_state(model).step, "target": target, "width": width, **kw})
        return Event(
            step=engine_state(model).step,
            op="widen",
            target=target,
            params_before=0,
            params_after=0,
            reason=kw["reason"],
        )

    monkeypatch.setattr("dynarch.surgery.widen", widen)
    return calls


def test_grow_on_plateau_schedule(fake_widen: list[dict[str, Any]]) -> None:
    grow = GrowOnPlateau(
        ["0", "2"],
        patience=2,
        factor=1.5,
        max_width=12,
        cooldown=1,
        max_events=2,
        init="zero",
        noise=0.1,
    )
    t = _trainer(_deep_mlp(), lr=0.0, epochs=10, eval=_data(), callbacks=[grow])
    t.fit()
    # Constant val_loss: evals 0 (best), 1, 2 -> fire at epoch 2 (step 9); epoch 3 is cooldown;
    # 4 (best after the reset), 5, 6 -> fire at step 21; then max_events is reached.
    assert [(c["step"], c["target"], c["width"]) for c in fake_widen] == [
        (9, "0", 12),
        (9, "2", 11),
        (21, "0", 12),
        (21, "2", 11),
    ]
    assert all(c["optimizer"] is t.optimizer for c in fake_widen)
    assert {(c["init"], c["noise"], c["reason"]) for c in fake_widen} == {("zero", 0.1, "plateau")}
    assert [e.step for e in grow.events] == [9, 9, 21, 21]
    state = _roundtrip(t.state_dict())["callbacks"][0]["state"]
    assert state == {"trigger": {"best": None, "wait": 0}, "rounds": 2, "cooldown_left": 1}
    again = GrowOnPlateau(["0", "2"])
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_grow_on_plateau_caps_widths(fake_widen: list[dict[str, Any]]) -> None:
    t = _trainer(_deep_mlp(first=12))
    grow = GrowOnPlateau(["0", "2"], factor=1.5, max_width=12)
    grow.trigger.update(1.0)
    assert [e.target for e in grow.grow(t)] == ["2"]  # "0" is already at the cap
    assert [(c["target"], c["width"]) for c in fake_widen] == [("2", 11)]
    assert (grow.rounds, grow.trigger.best) == (1, None)
    capped = GrowOnPlateau(["0"], max_width=12)
    assert capped.grow(t) == [] and capped.rounds == 0
    fake_widen.clear()
    GrowOnPlateau(["2"], factor=1.1).grow(t)  # 7 * 1.1 = 7.7 -> 8; 10 * 1.1 must give 11
    GrowOnPlateau(["0"], factor=1.1).grow(_trainer(_deep_mlp(first=10)))
    assert [c["width"] for c in fake_widen] == [8, 11]


def test_grow_on_plateau_checks_targets_at_fit_start() -> None:
    with pytest.raises(
        ValueError,
        match=r"GrowOnPlateau target 'fc' is not a module of the model; Linear/Conv2d modules: "
        r"\['0', '2', '4'\]",
    ):
        _trainer(_deep_mlp(), callbacks=[GrowOnPlateau(["fc"])]).fit()
    with pytest.raises(ValueError, match="target '1' is a ReLU; only Linear and Conv2d layers"):
        _trainer(_deep_mlp(), callbacks=[GrowOnPlateau(["1"])]).fit()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ([], {}, r"targets must be a non-empty list of module names, got \[\]"),
        ("0", {}, "targets must be a non-empty list of module names, got '0'"),
        ([0], {}, r"targets must be a non-empty list of module names, got \[0\]"),
        (["0"], {"monitor": None}, "monitor must be a metric name such as 'val_loss', got None"),
        (["0"], {"factor": 1.0}, "factor must be a finite number > 1, got 1.0"),
        (["0"], {"max_width": 0}, "max_width must be None or a positive int, got 0"),
        (["0"], {"max_events": 1.5}, "max_events must be None or a positive int, got 1.5"),
        (["0"], {"cooldown": -1}, r"cooldown must be an int >= 0 \(evaluations\), got -1"),
        (["0"], {"init": ""}, "unknown init '' for widen; allowed: net2net, zero, random"),
        (["0"], {"noise": -0.1}, "noise must be a finite number >= 0, got -0.1"),
        (["0"], {"mode": "low"}, "mode must be 'min' or 'max', got 'low'"),
        (["0"], {"patience": 0}, "patience must be a positive int, got 0"),
        (["0"], {"threshold": -1}, "threshold must be a finite number >= 0, got -1"),
    ],
)
def test_grow_on_plateau_validates(args: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GrowOnPlateau(args, **kwargs)


def test_grow_on_plateau_with_real_widen(tmp_path: Path) -> None:
    model = _mlp(dropout=0.2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grow = GrowOnPlateau(["0"], patience=1, threshold=10.0, factor=2.0, max_events=1)
    t = Trainer(
        model,
        opt,
        _data(10),
        eval=_data(6, seed=1),
        epochs=4,
        batch_size=4,
        callbacks=[grow],
        run_dir=tmp_path,
        log_every=1,
        progress=False,
    )
    t.fit()
    assert (model[0].out_features, model[3].in_features) == (32, 32)
    assert t.step == 12 and t.last_loss is not None and torch.isfinite(t.last_loss)
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    events = [json.loads(s) for s in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["op"], e["target"], e["reason"]) for e in events] == [
        (6, "widen", "0", "plateau")
    ]
    params = {
        d["step"]: d["params"]
        for d in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
        if "loss" in d
    }
    assert params[6] == 4 * 16 + 16 + 16 * 2 + 2 and params[7] == 4 * 32 + 32 + 32 * 2 + 2


def test_a_second_fit_continues_the_engine_clock() -> None:
    model = _mlp()
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), _data(), epochs=2, batch_size=4,
        progress=False)  # fmt: skip
    assert engine_state(model).step == 6
    with transaction(model, "mark", "*") as tx:
        tx.details = {}
    second = _trainer(model, epochs=1)
    seen: list[tuple[int, int]] = []
    second.callbacks.append(
        LambdaCallback(on_step_end=lambda t: seen.append((t.step, engine_state(model).step)))
    )
    second.fit()
    assert second.step_offset == 6 and seen == [(1, 7), (2, 8), (3, 9)]
    state = _roundtrip(second.state_dict())
    third = _trainer(model, epochs=2, callbacks=[LambdaCallback()])
    engine_state(model).step = 9  # as dynarch.load restores it
    third.load_state_dict(state)
    assert third.step_offset == 6
    third.fit()
    assert engine_state(model).step == 12 and third.step == 6
    with transaction(model, "mark", "*") as tx:
        tx.details = {}
    assert [e.step for e in engine_state(model).history] == [6, 12]
