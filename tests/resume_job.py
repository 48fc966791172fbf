"""A training job run in separate processes by test_resume.py (not a test module itself).

    python resume_job.py full|first|second WORKDIR

``full`` trains 60 steps (widen at step 20, sparsify at step 40); ``first`` trains 30 steps
and saves a checkpoint; ``second`` (a fresh process) loads it and continues to step 60.
Each writes WORKDIR/<mode>.pt with the per-step losses, parameters and optimizer state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import dynarch
from dynarch.callbacks import At, LambdaCallback
from dynarch.masks import sparsify
from dynarch.train import Trainer

STEPS, STOP = 60, 30


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(200, 20, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0).long()
    return x, y


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 32),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def callbacks(losses: list[float]) -> list:
    return [
        At(20, lambda t: dynarch.widen(t.model, "0", 48, optimizer=t.optimizer, noise=0.1)),
        At(40, lambda t: sparsify(t.model, 0.5, optimizer=t.optimizer)),
        LambdaCallback(on_step_end=lambda t: losses.append(float(t.last_loss))),
    ]


def trainer(net: nn.Module, opt: torch.optim.Optimizer, losses: list[float], steps: int) -> Trainer:
    return Trainer(net, opt, data(), batch_size=32, epochs=100, max_steps=steps, seed=5,
                   callbacks=callbacks(losses), progress=False)  # fmt: skip


def main(mode: str, work: Path) -> None:
    losses: list[float] = []
    if mode in ("full", "first"):
        net = model()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
        t = trainer(net, opt, losses, STEPS if mode == "full" else STOP).fit()
        if mode == "first":
            dynarch.save(work / "ckpt", net, opt, trainer=t.state_dict())
    else:
        ck = dynarch.load(work / "ckpt")
        net = ck.model
        opt = ck.load_optimizer(torch.optim.Adam(net.parameters()))
        t = trainer(net, opt, losses, STEPS)
        t.load_state_dict(ck.state["trainer"])
        ck.restore_rng()
        t.fit()
    names = {id(p): n for n, p in net.named_parameters()}
    state = {names[id(p)]: dict(opt.state[p]) for g in opt.param_groups for p in g["params"]}
    torch.save({"losses": losses, "params": net.state_dict(), "opt": state, "step": t.step},
               work / f"{mode}.pt")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
