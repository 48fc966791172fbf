"""Benchmark of the structural engine: latency of each op vs one training step, and output error.

For a 784-1000-1000-1000-10 MLP and a 64-channel CNN (Fashion-MNIST inputs), each op is
applied to a trained-for-a-few-steps copy of the model with an Adam optimizer (so the
optimizer transplant is part of the cost), timed, and the max |Δoutput| on a real test batch
(eval mode) is measured. One training step (batch 128, Adam, forward+backward+step) of the
same model is timed in the same run. Repeated over seeds; writes bench/results/core.json.

    python bench/core.py [--seeds 3] [--repeats 5] [--out bench/results/core.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import dynarch
from dynarch.data import load
from dynarch.masks import sparsify

Op = Callable[[nn.Module, torch.optim.Optimizer], None]


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 1000),
        nn.ReLU(),
        nn.Linear(1000, 1000),
        nn.ReLU(),
        nn.Linear(1000, 1000),
        nn.ReLU(),
        nn.Linear(1000, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def _noop(model: nn.Module) -> None:
    return None


def _zero_outgoing(consumer: str, width: int) -> Callable[[nn.Module], None]:
    """Zero the outgoing weights of the last quarter of the units (so shrinking keeps the
    function); done before the 'before' output is measured, and not timed."""

    def prepare(model: nn.Module) -> None:
        with torch.no_grad():
            model.get_submodule(consumer).weight[:, width - width // 4 :] = 0

    return prepare


def ops_for(kind: str) -> dict[str, tuple[Callable[[nn.Module], None], Op, bool]]:
    """op name -> (untimed preparation, op, whether it preserves the function)."""
    first, consumer, width, wide = ("1", "3", 1000, 1250) if kind == "mlp" else ("0", "4", 64, 80)
    keep = torch.arange(width - width // 4)

    def attach(m: nn.Module, o: torch.optim.Optimizer) -> None:
        if kind == "mlp":
            branch = nn.Sequential(nn.Linear(1000, 64), nn.ReLU(), nn.Linear(64, 1000))
        else:
            branch = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
        dynarch.attach(m, "after:2", branch, optimizer=o)

    return {
        "widen_net2net": (_noop, lambda m, o: dynarch.widen(m, first, wide, optimizer=o), True),
        "widen_zero": (
            _noop,
            lambda m, o: dynarch.widen(m, first, wide, optimizer=o, init="zero"),
            True,
        ),
        "deepen": (_noop, lambda m, o: dynarch.deepen(m, first, optimizer=o), True),
        "shrink": (
            _zero_outgoing(consumer, width),
            lambda m, o: dynarch.shrink(m, first, keep, optimizer=o),
            True,
        ),
        "attach": (_noop, attach, True),
        "sparsify_erk_0.1": (
            _noop,
            lambda m, o: sparsify(m, 0.1, distribution="erk", optimizer=o),
            False,
        ),
    }


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def bench_model(kind: str, data: dynarch.data.Dataset, seeds: int, repeats: int) -> list[dict]:
    rows: dict[str, dict] = {}
    step_times: list[float] = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = mlp() if kind == "mlp" else cnn()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(3):  # warm up and give the optimizer real state
            idx = torch.randint(0, len(data.train_y), (128,), generator=gen)
            train_step(model, opt, data.train_x[idx], data.train_y[idx])
        for _ in range(repeats):
            idx = torch.randint(0, len(data.train_y), (128,), generator=gen)
            t0 = time.perf_counter()
            train_step(model, opt, data.train_x[idx], data.train_y[idx])
            step_times.append(time.perf_counter() - t0)
        xb = data.test_x[:512]
        for name, (prepare, op, preserves) in ops_for(kind).items():
            row = rows.setdefault(name, {"times": [], "errors": [], "preserves": preserves})
            for _ in range(repeats):
                m = copy.deepcopy(model)
                o = torch.optim.Adam(m.parameters(), lr=1e-3)
                o.load_state_dict(opt.state_dict())
                dynarch.set_seed(m, seed)
                prepare(m)
                m.eval()
                with torch.no_grad():
                    before = m(xb)
                t0 = time.perf_counter()
                op(m, o)
                row["times"].append(time.perf_counter() - t0)
                with torch.no_grad():
                    row["errors"].append(float((m(xb) - before).abs().max()))
    step_ms = 1000 * statistics.median(step_times)
    out = []
    for name, row in rows.items():
        ms = [1000 * t for t in row["times"]]
        err = max(row["errors"])
        out.append(
            {
                "model": kind,
                "op": name,
                "latency_ms_median": round(statistics.median(ms), 3),
                "latency_ms_mean": round(statistics.mean(ms), 3),
                "latency_ms_std": round(statistics.stdev(ms), 3),
                "train_step_ms_median": round(step_ms, 3),
                "ratio_to_step": round(statistics.median(ms) / step_ms, 3),
                "max_abs_error": err,
                "preserves_function": row["preserves"],
                "meets_latency_target": statistics.median(ms) < step_ms,
                "meets_error_target": (err <= 1e-5) if row["preserves"] else None,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/core.json")
    args = parser.parse_args()
    data = load("fashion-mnist")
    results = [
        r for kind in ("mlp", "cnn") for r in bench_model(kind, data, args.seeds, args.repeats)
    ]
    payload = {
        "command": "python " + " ".join(sys.argv),
        "data": "fashion-mnist",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "seeds": args.seeds,
        "repeats": args.repeats,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"{'model':5} {'op':18} {'ms (median)':>12} {'step ms':>8} {'ratio':>6} {'max |Δy|':>10}")
    for r in results:
        print(
            f"{r['model']:5} {r['op']:18} {r['latency_ms_median']:12.2f} "
            f"{r['train_step_ms_median']:8.2f} "
            f"{r['ratio_to_step']:6.2f} {r['max_abs_error']:10.2e}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
