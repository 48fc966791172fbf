"""Speed of dynamic sparse training: per-step engine overhead and amortised update cost.

Model: the 784-1000-1000-1000-10 MLP on Fashion-MNIST batches (batch 128), sparse at ERK
density 0.1, rewired every ``delta_t = 100`` steps. For each algorithm (SET, RigL) and
optimizer (SGD with momentum 0.9, Adam, fused Adam), interleaved blocks of steps are timed:

* ``dense``: a plain PyTorch step (``zero_grad``, forward, backward, ``optimizer.step()``) of a
  dense copy of the model, no dynarch at all;
* ``sparse``: the same step of the sparse model plus ``rewirer.step()``, on steps that do not
  update (end to end: includes the optimizer's own arithmetic on the sparse state);
* ``engine``: the engine's own per-step work alone: the mask enforcer's pre/post-step hooks
  around one step (on real dense gradients) and ``rewirer.step()`` (schedule and
  gradient-capture checks);
* ``update``: the work of an update step beyond a normal step: the capture of the dense
  gradients (RigL) and ``rewirer.update()``.

``step_overhead = engine / dense`` (target <= 5%), ``end_to_end_step_ratio = sparse / dense
- 1`` (for reference: default Adam is slower on sparse state because ``torch.sqrt`` is slow
on zeros on the CPU, see ``sqrt``; fused Adam is not), ``update_amortised = update /
(delta_t * sparse)`` (target <= 1%); medians over repeats. Writes
``bench/results/dst_speed.json``.

On ``--device cuda`` the clocks read after ``torch.cuda.synchronize()``, so each timed block
counts all the device work it queued (and nothing of the block before it).

    python bench/dst_speed.py [--repeats 15] [--block 10] [--threads N] [--device cuda]
        [--out ...]
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

from core import mlp  # the same 784-1000-1000-1000-10 MLP as bench/core.py
from dynarch.data import load
from dynarch.masks import get_enforcer
from dynarch.sparse import make_rewirer
from dynarch.train import resolve_device

DELTA_T = 100
BATCH = 128


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    "adam_fused": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--block", type=int, default=10, help="steps per timed block")
    parser.add_argument("--out", default="bench/results/dst_speed.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    device = resolve_device(args.device)
    global clock
    if device.type == "cuda":
        clock = _synchronized(device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load("fashion-mnist", progress=False)
    gen = torch.Generator().manual_seed(0)
    n_batches = 64
    batches = []
    for _ in range(n_batches):
        idx = torch.randint(0, len(data.train_y), (BATCH,), generator=gen)
        batches.append((data.train_x[idx].to(device), data.train_y[idx].to(device)))
    results = []
    for opt_name, make_opt in OPTIMIZERS.items():
        for algo in ("set", "rigl"):
            results.append(
                bench(algo, opt_name, make_opt, batches, args.repeats, args.block, device)
            )
            r = results[-1]
            print(
                f"{algo:5s} {opt_name:13s} dense {r['dense_step_ms_median']:6.2f} ms  "
                f"sparse {r['sparse_step_ms_median']:6.2f} ms ({r['end_to_end_step_ratio']:+.1%})"
                f"  engine {r['engine_step_ms_median']:5.2f} ms ({r['step_overhead']:.2%})  "
                f"update {r['update_ms_median']:6.2f} ms (amortised {r['update_amortised']:.2%})",
                flush=True,
            )
    out = {
        "command": "python " + " ".join(sys.argv),
        "model": "mlp 784-1000-1000-1000-10",
        "data": "fashion-mnist",
        "density": 0.1,
        "distribution": "erk",
        "delta_t": DELTA_T,
        "batch_size": BATCH,
        "repeats": args.repeats,
        "block_steps": args.block,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "targets": {"step_overhead_max": 0.05, "update_amortised_max": 0.01},
        "results": results,
        "sqrt": sqrt_of_zeros() if device.type == "cpu" else None,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


def bench(
    algo: str,
    opt_name: str,
    make_opt: Callable[[nn.Module], torch.optim.Optimizer],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    repeats: int,
    block: int,
    device: torch.device,
) -> dict:
    torch.manual_seed(0)
    dense = mlp().to(device)
    sparse = copy.deepcopy(dense)
    dense_opt, sparse_opt = make_opt(dense), make_opt(sparse)
    rw = make_rewirer(algo, sparse, sparse_opt, density=0.1, distribution="erk",
                      delta_t=DELTA_T, t_end=10**9)  # fmt: skip
    it = iter(range(10**9))

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        x, y = batches[next(it) % len(batches)]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def dense_block() -> float:
        t0 = clock()
        for _ in range(block):
            step(dense, dense_opt)
        return (clock() - t0) / block

    def sparse_block() -> float:
        t0 = clock()
        for _ in range(block):
            step(sparse, sparse_opt)
            assert rw.step() is None  # never an update step inside a block
        return (clock() - t0) / block

    def update_step() -> float:
        """One training step (untimed), then the update as it runs on an update step: the
        capture of the dense gradients (RigL) and ``rewirer.update()``."""
        step(sparse, sparse_opt)
        t0 = clock()
        if rw.needs_gradients:
            rw.capture()
        event = rw.update()
        elapsed = clock() - t0
        assert event.op == "rewire"
        return elapsed

    enforcer = get_enforcer(sparse, sparse_opt)
    assert enforcer is not None

    def engine_block() -> float:
        """The engine's own work per non-update step, alone: the enforcer's pre- and
        post-step hooks around one optimizer step (on real dense gradients) and the
        rewirer's ``step()`` bookkeeping (schedule and capture checks)."""
        step(sparse, sparse_opt)  # untimed: fresh dense gradients
        rw.step()
        skip_updates()
        t0 = clock()
        for _ in range(block):
            enforcer._pre(sparse_opt, (), {})
            enforcer._post(sparse_opt, (), {})
            assert rw.step() is None
        return (clock() - t0) / block

    def skip_updates() -> None:
        """Untimed steps until the next ``block`` steps hold no scheduled update."""
        while any(rw.is_update_step(rw.current_step + i) for i in range(1, block + 1)):
            step(sparse, sparse_opt)
            rw.step()

    for _ in range(3):  # warm-up: allocator, optimizer state, updates
        dense_block()
        skip_updates()
        sparse_block()
        engine_block()
        update_step()
    dense_ms, sparse_ms, engine_ms, update_ms = [], [], [], []
    for _ in range(repeats):
        dense_ms.append(1e3 * dense_block())
        skip_updates()
        sparse_ms.append(1e3 * sparse_block())
        engine_ms.append(1e3 * engine_block())
        update_ms.append(1e3 * update_step())
    d, s, e, u = (statistics.median(v) for v in (dense_ms, sparse_ms, engine_ms, update_ms))
    return {
        "algorithm": algo,
        "optimizer": opt_name,
        "dense_step_ms_median": round(d, 3),
        "sparse_step_ms_median": round(s, 3),
        "engine_step_ms_median": round(e, 3),
        "update_ms_median": round(u, 3),
        "step_overhead": round(e / d, 4),
        "end_to_end_step_ratio": round(s / d - 1, 4),
        "update_amortised": round(u / (DELTA_T * s), 5),
        "meets_step_target": e / d <= 0.05,
        "meets_update_target": u / (DELTA_T * s) <= 0.01,
        "dense_step_ms": [round(v, 3) for v in dense_ms],
        "sparse_step_ms": [round(v, 3) for v in sparse_ms],
        "engine_step_ms": [round(v, 3) for v in engine_ms],
        "update_ms": [round(v, 3) for v in update_ms],
    }


clock: Callable[[], float] = time.perf_counter


def _synchronized(device: torch.device) -> Callable[[], float]:
    def now() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def sqrt_of_zeros() -> dict:
    """``torch.sqrt`` on 1M zeros vs 1M positive values (Adam's ``exp_avg_sq.sqrt()`` sees
    zeros at every masked position, whatever keeps them zero)."""
    out = {}
    for name, t in (("zeros", torch.zeros(10**6)), ("positive", torch.rand(10**6) + 0.5)):
        times = []
        for _ in range(21):
            t0 = clock()
            t.sqrt()
            times.append(clock() - t0)
        out[f"sqrt_1M_{name}_ms"] = round(1e3 * statistics.median(times), 3)
    return out


if __name__ == "__main__":
    main()
