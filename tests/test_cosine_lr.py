"""CosineLR: per-step cosine decay, resumable, and the config's optimizer.schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dynarch.callbacks import Callback, CosineLR
from dynarch.config import validate_config
from dynarch.train import Trainer


def _fit(cb: CosineLR, epochs: int, lrs: list[float], opt: torch.optim.Optimizer) -> Trainer:
    torch.manual_seed(0)
    data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
    return Trainer(
        _MODEL, opt, data, epochs=epochs, batch_size=4, progress=False,
        callbacks=[cb, _Record(lrs)],
    )  # fmt: skip


class _Record(Callback):
    def __init__(self, lrs: list[float]) -> None:
        self.lrs = lrs

    def on_step_end(self, trainer: Trainer) -> None:
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])


class _Stop(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer: Trainer) -> None:
        trainer.should_stop = trainer.step >= self.at


_MODEL = nn.Linear(3, 2)


def test_cosine_curve_per_step_with_floor() -> None:
    opt = torch.optim.SGD(_MODEL.parameters(), lr=0.4)
    lrs: list[float] = []
    _fit(CosineLR(floor=0.25), 2, lrs, opt).fit()  # 4 batches x 2 epochs = 8 steps
    want = [0.4 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * t / 8))) for t in range(1, 9)]
    assert lrs == pytest.approx(want, abs=1e-12)
    assert lrs[-1] == pytest.approx(0.1)


def test_resume_continues_the_same_curve() -> None:
    opt = torch.optim.SGD(_MODEL.parameters(), lr=1.0)
    full: list[float] = []
    _fit(CosineLR(), 2, full, opt).fit()
    opt2 = torch.optim.SGD(_MODEL.parameters(), lr=1.0)
    first: list[float] = []
    cb = CosineLR()
    trainer = _fit(cb, 2, first, opt2)
    trainer.callbacks.append(_Stop(3))
    trainer.fit()
    assert len(first) == 3
    assert cb.state_dict() == {"base": [1.0]}
    resumed = CosineLR()
    rest: list[float] = []
    t2 = _fit(resumed, 2, rest, opt2)
    t2.callbacks.append(_Stop(99))
    t2.load_state_dict(trainer.state_dict())  # restores CosineLR's base rates too
    assert resumed.base == [1.0]
    t2.fit()
    assert first + rest == pytest.approx(full)


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"CosineLR floor must be a number in \[0, 1\], got 2"):
        CosineLR(floor=2)
    with pytest.raises(ValueError, match=r"CosineLR state must have keys \['base'\], got \['x'\]"):
        CosineLR().load_state_dict({"x": 1})
    cb = CosineLR()
    cb.load_state_dict({"base": [0.1, 0.2]})
    opt = torch.optim.SGD(_MODEL.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="CosineLR was started with 2 param groups, the "
                       "optimizer has 1; use a fresh CosineLR"):  # fmt: skip
        _fit(cb, 1, [], opt).fit()


def test_config_schedule() -> None:
    assert validate_config({}).optimizer.schedule == "constant"
    assert validate_config({"optimizer": {"schedule": "cosine"}}).optimizer.schedule == "cosine"
    with pytest.raises(Exception, match=r"optimizer.schedule"):
        validate_config({"optimizer": {"schedule": "step"}})
