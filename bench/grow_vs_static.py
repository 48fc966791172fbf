"""Grown vs static benchmark (issue 4 §6): Fashion-MNIST (60k train / 10k test), MLP of size S.

Every cell trains with the same data, epochs, batch size (128), optimizer (SGD, momentum 0.9,
lr 0.05 with per-step cosine decay to 0, no weight decay) and seed-ordered batches
(dynarch's Trainer); accuracy is the test accuracy after the last epoch, ``seconds`` the
wall time of the whole training, growth and the final evaluation included.

* ``static``: ``dynarch.models.mlp(784, S, 10)`` (Linear+ReLU, default S = 256-256) from
  scratch.
* ``grown``: the same architecture started at ``--start`` (32-32); every hidden layer is
  doubled (capped at S) every K epochs with ``dynarch.surgery.widen(model, name, width,
  optimizer=opt, init=...)`` (function-preserving; optimizer state carried) until it is
  exactly S (``--shrink F`` < 1 first multiplies every parameter and momentum buffer by F
  at each growth: shrink, Ash & Adams 2020, not function-preserving).
  K and ``init`` ("net2net" with ``--noise``, "zero", or "random": fresh incoming and
  outgoing weights, not function-preserving) are **chosen on a
  validation split, never on the test set**: each candidate of ``--schedules`` ("K:init")
  trains on the first 5/6 of the training set and is scored by its accuracy on the last
  1/6 (10k), with seeds 100.. (``--select-seeds``); the best mean wins. A single
  candidate skips the selection.
* ``grown_plateau``: starts at ``--start``; every hidden layer doubles (capped at S)
  whenever the loss on a fixed 10k subset of the *training* data stops improving by more
  than ``--plateau-threshold`` over an epoch (``dynarch.schedules.GrowAsNeeded`` with a
  ``Plateau(patience=1)`` trigger, evaluated each epoch, init of the chosen schedule). It
  may stop short of S.
* ``gromo``: the peer gromo 0.1.0, its GrowingMLP started at ``--start`` and grown with
  its TINY method toward (never beyond) S: one growth step every ``--gromo-every`` steps
  during the first ``--gromo-window`` of training (see bench/gromo_peer.py).

Cells run in parallel worker processes (spawn, one thread each, methods interleaved);
results are written atomically after each cell; ``--resume`` skips cells already done.

    python bench/grow_vs_static.py [--epochs 10] [--seeds 3] [--jobs 2] [--hidden 256,256]
        [--start 32,32] [--schedules 0.5:net2net,1:net2net,...] [--methods ...] [--shrink F]
        [--fanin-rescale] [--normalize] [--out bench/results/grow_vs_static.json] [--resume]
        [--limit-train N] [--readme]

``--normalize`` standardises the pixels by the mean and std of each cell's training part
(a selection cell's held-out samples are not looked at).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import shlex
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dst, gromo_peer, in workers too

import dst
from dst import CosineLR, _csv, _dataset, _positive, _resumed, _worker_init, write_atomic
from grow_report import METHODS, checks, choose, summarize, tables

INITS = ("net2net", "zero", "random")
DEFAULT_SCHEDULES = "0.5:net2net,1:net2net,2:net2net,0.5:zero,1:zero,2:zero"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "grow_vs_static.json"


@dataclass(frozen=True)
class Config:
    """Everything that must match for results to be comparable (checked on --resume)."""

    epochs: int
    hidden: str = "256,256"
    start: str = "32,32"
    schedules: str = DEFAULT_SCHEDULES
    select_seeds: int = 2
    noise: float = 0.01
    shrink: float = 1.0
    fanin_rescale: bool = False
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    plateau_threshold: float = 0.01
    gromo_every: int = 40
    gromo_window: float = 0.5
    gromo_samples: int = 2048
    normalize: bool = False
    limit_train: int | None = None
    limit_test: int | None = None


@dataclass(frozen=True)
class Cell:
    """One training run: ``Cell("grown", 0, "1:net2net")``; ``split="val"`` for selection."""

    method: str
    seed: int
    schedule: str = ""  # "K:init" for the grown methods
    split: str = "test"  # "val": a selection cell (5/6 of train, scored on the last 1/6)


def widths(text: str) -> list[int]:
    """Hidden widths from their command-line form.

    >>> widths("256,128")
    [256, 128]
    """
    return [int(w) for w in text.split(",")]


def parse_schedule(text: str) -> tuple[float, str]:
    """``"K:init"`` -> (K epochs between doublings, init); a ValueError says what is allowed.

    >>> parse_schedule("0.5:net2net")
    (0.5, 'net2net')
    """
    every, _, init = text.partition(":")
    try:
        k = float(every)
    except ValueError:
        k = math.nan
    if not (k > 0 and math.isfinite(k)) or init not in INITS:
        raise ValueError(
            f"schedule {text!r}: use 'K:init' with K > 0 epochs between doublings and init "
            f"one of {', '.join(INITS)} (e.g. '1:net2net')"
        )
    return k, init


def growth_steps(every: float, start: list[int], hidden: list[int], per_epoch: int) -> list[int]:
    """Steps after which the hidden layers double (capped at ``hidden``) until they reach it.

    >>> growth_steps(1.0, [32, 32], [256, 256], 100)
    [100, 200, 300]
    """
    rounds = max(math.ceil(math.log2(h / s) - 1e-9) for s, h in zip(start, hidden))
    return [max(1, round(i * every * per_epoch)) for i in range(1, rounds + 1)]


# ------------------------------------------------------------------------------ one cell
def _split(
    data: Any, cell: Cell, normalize: bool = False
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(train, eval) pairs: all/test, or first 5/6 / last 1/6 of train for selection. With
    ``normalize`` both are standardised by the mean and std of the train part alone."""
    n = len(data.train_y) if cell.split == "test" else len(data.train_y) - len(data.train_y) // 6
    if normalize:
        data = data.standardize(n_fit=n)
    x, y = data.train_x, data.train_y
    if cell.split == "test":
        return (x, y), (data.test_x, data.test_y)
    return (x[:n], y[:n]), (x[n:], y[n:])


def run_cell(cell: Cell, config: Config) -> dict[str, Any]:
    """Train one cell in this process and return its result row."""
    from dynarch._engine import engine_state
    from dynarch.callbacks import At, Callback, LambdaCallback
    from dynarch.events import Event
    from dynarch.models import layer_widths, mlp
    from dynarch.surgery import widen
    from dynarch.train import Trainer

    hidden, start = widths(config.hidden), widths(config.start)
    names = [f"fc{i}" for i in range(1, len(hidden) + 1)]
    train, evaluation = _split(
        _dataset(config.limit_train, config.limit_test), cell, config.normalize
    )
    per_epoch = -(-train[0].shape[0] // config.batch_size)
    total = config.epochs * per_epoch

    def make_optimizer(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
        )

    torch.manual_seed(cell.seed)
    model: nn.Module
    callbacks: list[Callback] = []
    if cell.method == "gromo":
        from gromo_peer import GromoGrowth, build_growing_mlp

        model = build_growing_mlp(784, start, 10)
        gromo = GromoGrowth(
            model,
            hidden,
            every=config.gromo_every,
            until=max(1, int(config.gromo_window * total)),
            samples=min(config.gromo_samples, train[0].shape[0]),
            make_optimizer=make_optimizer,
            seed=cell.seed,
        )
        callbacks.append(gromo)
    else:
        model = mlp(784, hidden if cell.method == "static" else start, 10)
    opt = make_optimizer(list(model.parameters()), config.lr)
    every, init = parse_schedule(cell.schedule) if cell.schedule else (0.0, "")

    def double(trainer: Any, reason: str = "schedule") -> list[Event]:
        """Double every hidden layer below its size in S (capped there); the widen events."""
        noise = config.noise if init == "net2net" else 0.0
        if config.shrink != 1.0:  # shrink (Ash & Adams 2020): scale the trained weights first
            shrink_all(trainer.model, trainer.optimizer, config.shrink)
        fan_in = {n: m.in_features for n, m in trainer.model.named_modules()
                  if isinstance(m, nn.Linear)}  # fmt: skip
        events = [widen(trainer.model, name, min(2 * width, target), optimizer=trainer.optimizer,
                        init=init, noise=noise, reason=reason)
                  for name, target in zip(names, hidden)
                  if (width := layer_widths(trainer.model)[name]) < target]  # fmt: skip
        if config.fanin_rescale:
            rescale_kept_inputs(trainer.model, fan_in)
        return events

    if cell.method == "grown":

        def on_schedule(trainer: Any) -> None:
            double(trainer)

        callbacks += [At(s, on_schedule) for s in growth_steps(every, start, hidden, per_epoch)]
    plateau, final_eval = cell.method == "grown_plateau", evaluation
    if plateau:  # the monitored loss is that of a fixed subset of the training data
        from dynarch.schedules import GrowAsNeeded
        from dynarch.triggers import Plateau

        trigger = Plateau(patience=1, threshold=config.plateau_threshold)
        callbacks.append(GrowAsNeeded(trigger, double))
        sub = train[0].shape[0] // 6
        evaluation = (train[0][:sub], train[1][:sub])
    lr = CosineLR(opt, config.lr, total)

    def cosine(trainer: Any) -> None:
        lr.optimizer = trainer.optimizer  # gromo replaces the optimizer when it grows
        lr.on_step_end(trainer)

    callbacks.append(LambdaCallback(on_step_end=cosine))
    trainer = Trainer(
        model,
        opt,
        train,
        eval=evaluation,
        epochs=config.epochs,
        batch_size=config.batch_size,
        callbacks=callbacks,
        seed=cell.seed,
        progress=False,
        eval_every_epochs=1 if plateau else config.epochs,
    )
    begin = time.perf_counter()
    trainer.fit()
    metrics = trainer.evaluate(final_eval) if plateau else trainer.metrics
    seconds = time.perf_counter() - begin
    if cell.method == "gromo":
        from gromo_peer import hidden_widths, weight_count

        final, weights = hidden_widths(model), weight_count(model)
        grew = [r["step"] for r in gromo.log if r["added"]]
    else:
        final = [layer_widths(model)[n] for n in names]
        weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        grew = [e.step for e in engine_state(model).history if e.op == "widen"]
    if cell.split == "val":
        return {"schedule": cell.schedule, "seed": cell.seed,
                "val_accuracy": metrics["val_accuracy"], "seconds": round(seconds, 3),
                "hidden": final}  # fmt: skip
    return {
        "method": cell.method,
        "seed": cell.seed,
        "accuracy": metrics["val_accuracy"],
        "seconds": round(seconds, 3),
        "weights": int(weights),
        "params": sum(p.numel() for p in model.parameters()),
        "hidden": final,
        "schedule": cell.schedule,
        "growth_steps": sorted(set(grew)),  # steps after which the network grew
    }


# ------------------------------------------------------------------------------ report
def _schedules(text: str) -> str:
    try:
        return ",".join(parse_schedule(s.strip()) and s.strip() for s in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _widths(text: str) -> str:
    if not all(w.strip().isdigit() and int(w) > 0 for w in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive hidden widths like 256,256")
    return ",".join(str(int(w)) for w in text.split(","))


def _factor(text: str) -> float:
    """A shrink factor in (0, 1]; an argparse error otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a factor in (0, 1]")
    return value


def rescale_kept_inputs(model: nn.Module, fan_in: dict[str, int]) -> None:
    """Scale the kept input columns of every Linear whose input grew from ``fan_in[name]``
    by ``sqrt(old / new)``, the ratio of the default init's scales. The first ``old``
    columns are the kept ones. Optimizer buffers are left as they are, and the function
    changes.

    >>> m = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1))
    >>> w = m[1].weight.detach().clone()
    >>> rescale_kept_inputs(m, {"0": 2, "1": 1})  # layer "1" grew from 1 input to 4
    >>> torch.equal(m[1].weight[:, :1], w[:, :1] * 0.5), torch.equal(m[1].weight[:, 1:], w[:, 1:])
    (True, True)
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            old = fan_in.get(name)
            if isinstance(module, nn.Linear) and old is not None and module.in_features > old:
                module.weight[:, :old] *= (old / module.in_features) ** 0.5


def shrink_all(model: nn.Module, optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiply every parameter and its SGD momentum buffer by ``factor`` (in place).

    >>> m = nn.Linear(2, 1); w = m.weight.detach().clone()
    >>> shrink_all(m, torch.optim.SGD(m.parameters(), lr=0.1), 0.5)
    >>> torch.equal(m.weight, w * 0.5)
    True
    """
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if isinstance(buf, Tensor):
                buf.mul_(factor)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description="Grown vs static benchmark (bench/grow_vs_static.py).")
    add = p.add_argument
    add("--epochs", type=_positive, default=10)
    add("--seeds", type=_positive, default=3, help="seeds 0..N-1")
    add("--methods", type=_csv(str, METHODS), default=list(METHODS))
    add("--hidden", type=_widths, default="256,256", help="final size S")
    add("--start", type=_widths, default="32,32", help="starting widths")
    add("--schedules", type=_schedules, default=DEFAULT_SCHEDULES, help="candidates K:init")
    add("--select-seeds", type=_positive, default=2, help="seeds of the schedule selection")
    add("--noise", type=float, default=0.01, help="net2net symmetry-breaking noise")
    add("--shrink", type=_factor, default=1.0,
        help="grown methods: multiply every parameter (and momentum) by this before each "
             "growth (shrink, Ash & Adams 2020; 1 = off, function-preserving growth)")  # fmt: skip
    add("--plateau-threshold", type=float, default=0.01)
    add("--gromo-every", type=_positive, default=40, help="steps between gromo growth steps")
    add("--gromo-window", type=float, default=0.5, help="fraction of training gromo grows in")
    add("--gromo-samples", type=_positive, default=2048, help="samples per gromo statistics")
    add("--jobs", type=_positive, default=2, help="parallel worker processes")
    add("--out", type=Path, default=DEFAULT_OUT)
    add("--resume", action="store_true", help="skip cells already in --out")
    add("--fanin-rescale", action="store_true",
        help="grown methods: after each doubling scale the kept input weights of every grown "
             "layer by sqrt(old/new fan-in), as the default init would have them")  # fmt: skip
    add("--normalize", action="store_true",
        help="standardise the pixels by the mean and std of the training part")  # fmt: skip
    add("--limit-train", type=_positive, default=None)
    add("--limit-test", type=_positive, default=None)
    add("--readme", action="store_true", help="print the tables of --out and exit")
    args = p.parse_args(argv)
    hidden, start = widths(args.hidden), widths(args.start)
    if len(hidden) != len(start) or any(s > h for s, h in zip(start, hidden)):
        p.error(f"--start {args.start} must give one width <= --hidden {args.hidden} per layer")
    if "gromo" in args.methods and len(set(start)) != 1:
        p.error(f"--start {args.start}: gromo's GrowingMLP needs equal starting widths")
    for text in args.schedules.split(","):
        last = growth_steps(parse_schedule(text)[0], start, hidden, 1000)[-1] / 1000
        if last >= args.epochs:
            p.error(f"schedule {text} reaches --hidden only after epoch {last:g}; "
                    f"it must grow within the {args.epochs} epochs")  # fmt: skip
    return args


def _payload(command: str, config: Config, results: list[dict[str, Any]],
             selection: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    order = {m: i for i, m in enumerate(METHODS)}
    return {
        "command": command,
        "config": asdict(config),
        "machine": dst._payload("", cast(Any, config), [])["machine"],  # the same machine record
        "selection": selection,
        "results": sorted(results, key=lambda r: (order[r["method"]], r["seed"])),
        "summary": summarize(results, widths(config.hidden)),
    }


def _run(pool: ProcessPoolExecutor, cells: list[Cell], config: Config, done: Any) -> int:
    """Run ``cells`` in ``pool``; ``done(cell, row)`` after each; returns the failures."""
    failed, start = 0, time.perf_counter()
    futures = {pool.submit(run_cell, c, config): c for c in cells}
    for fut in as_completed(futures):
        cell = futures[fut]
        try:
            row = fut.result()
        except Exception:
            failed += 1
            print(f"FAILED {cell}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            continue
        done(cell, row)
        acc = row.get("accuracy", row.get("val_accuracy"))
        print(f"[{time.perf_counter() - start:6.0f}s] {cell.split} {cell.method:>13} "
              f"{cell.schedule:>11} seed={cell.seed} acc={acc:.4f} ({row['seconds']:.0f}s) "
              f"hidden={row['hidden']}", flush=True)  # fmt: skip
    return failed


def main(argv: list[str] | None = None) -> int:
    """Select the schedule, run the benchmark (or print the tables with --readme)."""
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.readme:
        payload = json.loads(args.out.read_text())
        print(tables(payload) + "\n\n" + "\n".join(f"- {c}" for c in checks(payload)))
        return 0
    if "gromo" in args.methods:
        from gromo_peer import import_growing_mlp

        import_growing_mlp()  # a clear error now rather than in every worker
    config = Config(
        epochs=args.epochs, hidden=args.hidden, start=args.start, schedules=args.schedules,
        select_seeds=args.select_seeds, noise=args.noise, shrink=args.shrink,
        fanin_rescale=args.fanin_rescale,
        plateau_threshold=args.plateau_threshold, gromo_every=args.gromo_every,
        gromo_window=args.gromo_window, gromo_samples=args.gromo_samples,
        normalize=args.normalize, limit_train=args.limit_train, limit_test=args.limit_test,
    )  # fmt: skip
    command = shlex.join(["python", "bench/grow_vs_static.py", *argv])
    results = _resumed(args.out, cast(Any, config)) if args.resume else []
    saved = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    candidates = args.schedules.split(",")
    selection = {"candidates": candidates, "chosen": None,
                 "results": saved.get("selection", {}).get("results", [])}  # fmt: skip

    def save(cell: Cell, row: dict[str, Any]) -> None:
        (selection["results"] if cell.split == "val" else results).append(row)
        write_atomic(args.out, _payload(command, config, results, selection))

    grows = {"grown", "grown_plateau"} & set(args.methods)
    seen = {(r["schedule"], r["seed"]) for r in selection["results"]}
    todo = [Cell("grown", 100 + s, c, "val") for s in range(args.select_seeds)
            for c in candidates if (c, 100 + s) not in seen and grows]  # fmt: skip
    todo = todo if len(candidates) > 1 else []
    failed = 0
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init) as pool:
        print(f"{len(todo)} selection cells to run, {args.jobs} jobs", flush=True)
        failed += _run(pool, todo, config, save)
        if failed:
            return 1
        chosen = choose(selection["results"], candidates) if grows else ""
        selection["chosen"] = chosen
        print(f"chosen schedule (validation split): {chosen or '-'}", flush=True)
        done = {(r["method"], r["seed"]) for r in results}
        cells = [Cell(m, s, chosen if m in grows else "") for s in range(args.seeds)
                 for m in METHODS if m in args.methods and (m, s) not in done]  # fmt: skip
        print(f"{len(cells)} cells to run ({len(done)} done)", flush=True)
        failed += _run(pool, cells, config, save)
    if results:
        payload = _payload(command, config, results, selection)
        write_atomic(args.out, payload)
        print("\n" + tables(payload) + "\n\n" + "\n".join(f"- {c}" for c in checks(payload)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
