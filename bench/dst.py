"""Dynamic sparse training benchmark: LeNet-300-100 on Fashion-MNIST (60k train / 10k test).

Every (method, density, seed) cell trains the same 784-300-100-10 ReLU MLP (same initial
weights per seed, same batches per seed through dynarch's Trainer) with the same optimizer
(SGD, momentum 0.9, lr 0.05 with per-step cosine decay to 0, batch 128, no weight decay; with
``--normalize`` the pixels are standardised by the training set's mean and std) for the same
number of epochs, then records the test accuracy at the end, the median training
step time and the measured overall density of the three Linear weights. dynarch's methods
(static, SET, DEEP R, RigL, SNFS) run through ``dynarch.sparse.make_rewirer(...,
distribution="erk", drop_fraction=0.3, anneal="cosine")`` as Trainer callbacks; the peer
``rigl-torch`` 0.5.2 runs through :mod:`rigl_torch_peer` (uniform per-layer density, its only
distribution); ``rigl_uniform`` (not in the default list) is dynarch's RigL with that uniform
distribution. Topology updates every ``--delta-t`` steps until 75% of training (``--t-end``).
Two dense-to-sparse methods: ``gmp`` (``dynarch.prune.GradualMagnitudePruning``, cubic
schedule, global ranking, from ``--gmp-start`` to ``--t-end``) and ``granet`` (the same plus
a RigL drop-and-regrow after each pruning step). ``--validation N`` scores on the last N
training samples instead of the test set, for choosing settings. See bench/README.md for
the measured results.

Cells run in parallel worker processes (spawn, one thread each). Results are written
atomically after each finished cell; ``--resume`` skips cells already in the JSON.

    python bench/dst.py [--epochs 10] [--seeds 3] [--densities 0.1,0.05,0.02,0.01]
        [--methods dense,static,set,deep_r,rigl,snfs,rigl-torch] [--jobs 2]
        [--out bench/results/dst.json] [--resume] [--limit-train N] [--normalize]
        [--schedule cosine|constant] [--optimizer sgd|adam] [--t-end 0.75] [--gmp-start 0]
        [--validation N] [--readme]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # rigl_torch_peer, in workers too

from dst_report import METHODS, checks, tables

# bench method -> dynarch.sparse algorithm; rigl_uniform: dynarch's RigL with rigl-torch's
# uniform per-layer distribution (an extra, matched-distribution comparison)
DYNARCH = {m: m for m in ("static", "set", "deep_r", "rigl", "snfs")} | {"rigl_uniform": "rigl"}
DEFAULT_METHODS = "dense,static,set,deep_r,rigl,snfs,rigl-torch"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "dst.json"


@dataclass(frozen=True)
class Config:
    """Everything that must match for results to be comparable (checked on --resume)."""

    epochs: int
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    delta_t: int = 100
    drop_fraction: float = 0.3
    t_end_fraction: float = 0.75
    gmp_start_fraction: float = 0.0
    schedule: str = "cosine"
    normalize: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    validation: int | None = None  # hold out the last N training samples; score on them


@dataclass(frozen=True)
class Cell:
    method: str
    density: float
    seed: int


# ------------------------------------------------------------------------------ one cell
class CosineLR:
    """Per-step cosine decay of the learning rate from ``base`` to 0 over ``total`` steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, base: float, total: int) -> None:
        self.optimizer, self.base, self.total = optimizer, base, total

    def on_step_end(self, trainer: Any) -> None:
        lr = self.base * 0.5 * (1 + math.cos(math.pi * min(trainer.step, self.total) / self.total))
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class StepTimer:
    """Wall time between consecutive step ends within an epoch (a full training step,
    batch gathering and every callback of that step included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last: float | None = None

    def on_epoch_start(self, trainer: Any) -> None:
        self.last = None

    def on_step_end(self, trainer: Any) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


_DATA: dict[tuple[int | None, int | None, bool, int | None], Any] = {}


def _dataset(
    limit_train: int | None,
    limit_test: int | None,
    normalize: bool = False,
    validation: int | None = None,
) -> Any:
    """Fashion-MNIST (with ``normalize``: standardised by the training pixels' mean and std).

    With ``validation=N`` the last N training samples replace the test set (for choosing
    settings without looking at the test set) and the rest is the training set.
    """
    from dynarch.data import Dataset, load

    key = (limit_train, limit_test, normalize, validation)
    if key not in _DATA:
        data = load("fashion-mnist", progress=False).subset(limit_train, limit_test)
        if validation is not None:
            n = len(data.train_y) - validation
            if n < 2:
                raise ValueError(f"--validation {validation} leaves {n} training samples")
            data = Dataset(
                data.name, data.train_x[:n], data.train_y[:n], data.train_x[n:],
                data.train_y[n:], data.num_classes, data.input_shape,
            )  # fmt: skip
        _DATA[key] = data.standardize() if normalize else data
    return _DATA[key]


def build_model(seed: int) -> nn.Sequential:
    """LeNet-300-100 (784-300-100-10, ReLU; Linear layers fc1, fc2, out), seeded init."""
    from dynarch.models import mlp

    torch.manual_seed(seed)
    return mlp(784, [300, 100], 10)


def _overall(masks: dict[str, Tensor], model: nn.Module) -> dict[str, Any]:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    active = torch.stack(
        [
            masks[n].sum() if n in masks else torch.tensor(m.weight.numel())
            for n, m in linears.items()
        ]
    ).tolist()
    nonzero = torch.stack([(m.weight != 0).sum() for m in linears.values()]).tolist()
    sizes = [m.weight.numel() for m in linears.values()]
    return {
        "density_measured": sum(active) / sum(sizes),
        "nonzero_density": sum(nonzero) / sum(sizes),
        "layer_density": {n: a / s for n, a, s in zip(linears, active, sizes)},
    }


def run_cell(cell: Cell, config: Config) -> dict[str, Any]:
    """Train one cell in this process and return its result row."""
    from dynarch._engine import engine_state, set_seed
    from dynarch.callbacks import Callback, LambdaCallback
    from dynarch.train import Trainer

    data = _dataset(config.limit_train, config.limit_test, config.normalize, config.validation)
    model = build_model(cell.seed)
    opt: torch.optim.Optimizer
    if config.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    steps = config.epochs * -(-len(data.train_y) // config.batch_size)
    t_end = max(1, int(config.t_end_fraction * steps))
    callbacks: list[Callback] = []
    peer = None
    if cell.method in DYNARCH:
        from dynarch.sparse import make_rewirer

        set_seed(model, cell.seed)  # the random initial mask and any random regrowth
        distribution = "uniform" if cell.method == "rigl_uniform" else "erk"
        callbacks.append(
            make_rewirer(
                DYNARCH[cell.method],
                model,
                opt,
                density=cell.density,
                distribution=distribution,
                delta_t=config.delta_t,
                t_end=t_end,
                drop_fraction=config.drop_fraction,
                anneal="cosine",
            )
        )
    elif cell.method in ("gmp", "granet"):
        from dynarch.prune import GradualMagnitudePruning

        # dense-to-sparse: global magnitude pruning on Zhu & Gupta's cubic schedule from
        # gmp_start_fraction of training to t_end, every delta_t steps; the rest of
        # training fine-tunes the final mask
        callbacks.append(
            GradualMagnitudePruning(
                model,
                opt,
                1 - cell.density,
                start_step=int(config.gmp_start_fraction * steps),
                end_step=t_end,
                frequency=config.delta_t,
                scope="global",
            )
        )
        if cell.method == "granet":
            from dynarch.sparse import make_rewirer

            # GraNet (Liu et al. 2021): the same pruning schedule, and after each pruning
            # step RigL drops the weakest of the remaining weights and regrows as many
            # where the dense gradient is largest (masks start dense, density 1.0)
            set_seed(model, cell.seed)
            callbacks.append(
                make_rewirer(
                    "rigl",
                    model,
                    opt,
                    density=1.0,
                    delta_t=config.delta_t,
                    t_end=t_end,
                    drop_fraction=config.drop_fraction,
                    anneal="cosine",
                )
            )
    elif cell.method == "rigl-torch":
        from rigl_torch_peer import RigLTorchPeer

        torch.manual_seed(cell.seed)  # rigl-torch draws its initial mask from the global RNG
        peer = RigLTorchPeer(
            model,
            opt,
            density=cell.density,
            delta_t=config.delta_t,
            alpha=config.drop_fraction,
            t_end=t_end,
        )
        callbacks.append(peer)
    timer = StepTimer()
    if config.schedule == "cosine":
        callbacks.append(LambdaCallback(on_step_end=CosineLR(opt, config.lr, steps).on_step_end))
    callbacks.append(
        LambdaCallback(on_epoch_start=timer.on_epoch_start, on_step_end=timer.on_step_end)
    )
    trainer = Trainer(
        model,
        opt,
        data,
        epochs=config.epochs,
        batch_size=config.batch_size,
        callbacks=callbacks,
        seed=cell.seed,
        progress=False,
        eval_every_epochs=config.epochs,
    )
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    if peer is not None:
        masks, updates = peer.masks(), peer.updates
    else:
        masks = {
            n: m._buffers["weight_mask"]
            for n, m in model.named_modules()
            if m._buffers.get("weight_mask") is not None
        }
        updates = sum(  # updates that changed the mask (static records empty ones)
            (e.op == "rewire" and any(d.get("dropped", 0) for d in e.details.values()))
            or (e.op == "prune" and e.details.get("pruned", 0) > 0)
            for e in engine_state(model).history
        )
    times = timer.times or [seconds]
    return {
        **asdict(cell),
        "accuracy": trainer.metrics["val_accuracy"],
        "seconds": round(seconds, 3),
        "step_ms": round(1000 * statistics.median(times), 4),
        "step_ms_mean": round(1000 * statistics.fmean(times), 4),
        "updates": int(updates),
        **_overall(masks, model),
    }


def _worker_init() -> None:
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------ the grid
def _key(method: str, density: float, seed: int) -> tuple[str, float, int]:
    return method, round(float(density), 6), int(seed)


def plan(methods: list[str], densities: list[float], seeds: int) -> list[Cell]:
    """All cells: dense once per seed (density 1.0), every other method per density; methods
    interleaved (density, seed, method order) so each sees the machine in similar states."""
    cells = []
    for i, d in enumerate(densities):
        for s in range(seeds):
            cells += [Cell(m, 1.0, s) if m == "dense" else Cell(m, d, s)
                      for m in methods if m != "dense" or i == 0]  # fmt: skip
    return cells


def _sort(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(results, key=lambda r: (METHODS.index(r["method"]), -r["density"], r["seed"]))


def _payload(command: str, config: Config, results: list[dict[str, Any]]) -> dict[str, Any]:
    dense = [r["accuracy"] for r in results if r["method"] == "dense"]
    return {
        "command": command,
        "dense_accuracy": statistics.fmean(dense) if dense else None,
        "config": asdict(config),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "threads_per_cell": 1,
        },
        "results": _sort(results),
    }


def write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def _resumed(path: Path, config: Config) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    if saved.get("config") != asdict(config):
        diff = {
            k: (saved.get("config", {}).get(k), v)
            for k, v in asdict(config).items()
            if saved.get("config", {}).get(k) != v
        }
        raise SystemExit(
            f"--resume: {path} was written with other settings (saved, now): {diff}; "
            "use the same settings or another --out"
        )
    return list(saved["results"])


# ------------------------------------------------------------------------------ CLI
def _csv(kind: type, allowed: tuple[str, ...] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        bad = [x for x in items if allowed is not None and x not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed are {', '.join(allowed or [])}")
        if kind is float and not all(0 < x < 1 for x in items):
            raise argparse.ArgumentTypeError(f"densities must be in (0, 1), got {text!r}")
        return items

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description="Dynamic sparse training benchmark (bench/dst.py).")
    p.add_argument("--epochs", type=_positive, default=10)
    p.add_argument("--seeds", type=_positive, default=3, help="seeds 0..N-1")
    p.add_argument("--densities", type=_csv(float), default=[0.1, 0.05, 0.02, 0.01])
    p.add_argument("--methods", type=_csv(str, METHODS), default=DEFAULT_METHODS.split(","))
    p.add_argument("--jobs", type=_positive, default=2, help="parallel worker processes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--resume", action="store_true", help="skip cells already in --out")
    p.add_argument("--limit-train", type=_positive, default=None)
    p.add_argument("--limit-test", type=_positive, default=None)
    p.add_argument("--delta-t", type=_positive, default=100, help="steps between updates")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=None, help="peak lr (sgd 0.05, adam 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--drop-fraction", type=float, default=0.3)
    p.add_argument(
        "--t-end", type=float, default=0.75, help="fraction of training where updates stop"
    )
    p.add_argument(
        "--gmp-start", type=float, default=0.0, help="fraction of training where gmp starts"
    )
    p.add_argument(
        "--validation",
        type=_positive,
        default=None,
        help="score on the last N training samples instead of the test set",
    )
    p.add_argument(
        "--schedule", choices=("cosine", "constant"), default="cosine", help="learning rate"
    )
    p.add_argument(
        "--normalize", action="store_true", help="standardise pixels (training mean and std)"
    )
    p.add_argument("--readme", action="store_true", help="print the tables of --out and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the grid (or print the tables with --readme); 1 if any cell failed."""
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.readme:
        payload = json.loads(args.out.read_text())
        print(tables(payload) + "\n\n" + "\n".join(f"- {c}" for c in checks(payload)))
        return 0
    if "rigl-torch" in args.methods:
        from rigl_torch_peer import import_rigl_scheduler

        import_rigl_scheduler()  # a clear error now rather than in every worker
    config = Config(
        epochs=args.epochs,
        optimizer=args.optimizer,
        lr=args.lr if args.lr is not None else (0.05 if args.optimizer == "sgd" else 1e-3),
        weight_decay=args.weight_decay,
        drop_fraction=args.drop_fraction,
        t_end_fraction=args.t_end,
        gmp_start_fraction=args.gmp_start,
        delta_t=args.delta_t,
        schedule=args.schedule,
        normalize=args.normalize,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        validation=args.validation,
    )
    if not 0 <= config.gmp_start_fraction < config.t_end_fraction <= 1:
        raise SystemExit(
            f"need 0 <= --gmp-start < --t-end <= 1, got {config.gmp_start_fraction} and "
            f"{config.t_end_fraction}"
        )
    command = shlex.join(["python", "bench/dst.py", *argv])
    results = _resumed(args.out, config) if args.resume else []
    done = {_key(r["method"], r["density"], r["seed"]) for r in results}
    todo = [
        c
        for c in plan(args.methods, args.densities, args.seeds)
        if _key(c.method, c.density, c.seed) not in done
    ]
    print(f"{len(todo)} cells to run ({len(done)} done), {args.jobs} jobs", flush=True)
    failed, start = 0, time.perf_counter()
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init) as pool:
        futures = {pool.submit(run_cell, c, config): c for c in todo}
        for fut in as_completed(futures):
            cell = futures[fut]
            try:
                row = fut.result()
            except Exception:
                failed += 1
                print(f"FAILED {cell}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                continue
            results.append(row)
            write_atomic(args.out, _payload(command, config, results))
            print(
                f"[{time.perf_counter() - start:7.0f}s] {cell.method:>12} d={cell.density:<5g} "
                f"seed={cell.seed} acc={row['accuracy']:.4f} step={row['step_ms']:.2f}ms "
                f"({row['seconds']:.0f}s)",
                flush=True,
            )
    if results:
        payload = _payload(command, config, results)
        write_atomic(args.out, payload)
        print("\n" + tables(payload) + "\n\n" + "\n".join(f"- {c}" for c in checks(payload)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
