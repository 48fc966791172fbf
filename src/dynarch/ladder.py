"""Sparsity ladder: one architecture trained at a series of densities, to find the cliff.

:func:`run_ladder` trains the config once per density, method and seed through
:func:`dynarch.runner.execute` (the :class:`~dynarch.train.Trainer`, same data, epochs,
optimizer and seed for every rung; density 1 is the dense model, without masks, trained once
per seed and shared by all methods). ``static`` masks come from :func:`dynarch.masks.sparsify`;
any other method is a rewirer of :func:`dynarch.sparse.make_rewirer` (``sparsity.algorithm``).
The ladder directory then holds::

    runs/<method>-d<density>-s<seed>/   one complete run directory per run (dynarch inspect)
    ladder.json                         command, densities, methods, every run, the cliff
    ladder.md                           the accuracy table
    ladder.png                          accuracy vs density (log x), one line per method

The *cliff* of a method (:func:`find_cliff`) is the lowest density whose mean accuracy, and
that of every density above it, is within ``tolerance`` percentage points of dense.

Example:
    >>> runs = [{"method": "dense", "density": 1.0, "accuracy": 0.90},
    ...         {"method": "static", "density": 0.1, "accuracy": 0.895},
    ...         {"method": "static", "density": 0.01, "accuracy": 0.70}]
    >>> find_cliff(runs, tolerance=1.0)
    {'static': 0.1}
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import statistics
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ._config_errors import suggest
from ._images import save_figure
from .config import ALGORITHMS, ConfigError, RunConfig, validate_config
from .report import format_table
from .runner import make_run_dir

__all__ = [
    "LadderRun", "find_cliff", "ladder_markdown", "ladder_rows", "ladder_table",
    "mean_accuracy", "parse_densities", "plan_ladder", "plot_ladder", "run_ladder",
]  # fmt: skip

DENSE = "dense"
_EXAMPLE = {  # a finished ladder, for the examples below
    "methods": ["set"], "tolerance": 1.0, "dense_accuracy": 0.9, "cliff": {"set": 0.5},
    "runs": [{"method": "dense", "density": 1.0, "accuracy": 0.9, "active_params": 50},
             {"method": "set", "density": 0.5, "accuracy": 0.895, "active_params": 30}],
}  # fmt: skip


@dataclass(frozen=True)
class LadderRun:
    """One planned run of a ladder: its method, density, seed, name and validated config."""

    method: str
    density: float
    seed: int
    name: str
    config: RunConfig


def parse_densities(text: str | Sequence[float]) -> list[float]:
    """Densities from ``"1,0.5,0.1"`` (or a list), each checked to be in (0, 1], sorted
    from dense to sparse.

    Example:
        >>> parse_densities("0.1,1,0.5")
        [1.0, 0.5, 0.1]
        >>> parse_densities("1,0,0.5")
        Traceback (most recent call last):
        ...
        dynarch.config.ConfigError: --densities: 0 is not in (0, 1]; a density is the \
fraction of weights kept, e.g. 1,0.5,0.1
    """
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(item, bool) or not 0 < value <= 1:
            bad = f"{item} is not in (0, 1]" if value == value else f"{item!r} is not a number"
            raise ConfigError(
                f"--densities: {bad}; a density is the fraction of weights kept, e.g. 1,0.5,0.1"
            )
        values.append(value)
    if not values or 1.0 not in values:
        raise ConfigError(
            f"--densities: {text!r} does not include 1, the dense model the ladder and its "
            "cliff are measured against; e.g. 1,0.5,0.1"
        )
    if len(values) == 1:
        raise ConfigError(
            f"--densities: {text!r} has no sparse rung, so there is no ladder to climb; add "
            "densities below 1, e.g. 1,0.5,0.1"
        )
    twice = sorted({v for v in values if values.count(v) > 1}, reverse=True)
    if twice:
        raise ConfigError(
            f"--densities: {text!r} lists {', '.join(f'{v:g}' for v in twice)} twice; give each "
            "density once"
        )
    return sorted(values, reverse=True)


def _check_methods(methods: Sequence[str]) -> list[str]:
    chosen = list(dict.fromkeys(methods)) or ["static"]
    for m in chosen:
        if m not in ALGORITHMS:
            raise ConfigError(
                f"--method: {m!r} is not a sparse training method{suggest(m, ALGORITHMS)}; "
                f"choose from {', '.join(ALGORITHMS)}"
            )
    dynamic = [m for m in chosen if m != "static"]
    if dynamic:
        try:
            from .sparse import ALGORITHMS as AVAILABLE
        except ImportError as exc:
            raise ConfigError(f"--method {dynamic[0]} needs dynarch.sparse: {exc}") from None
        missing = [m for m in dynamic if m not in AVAILABLE]
        if missing:
            raise ConfigError(
                f"--method: {missing} not registered in dynarch.sparse.ALGORITHMS "
                f"({', '.join(AVAILABLE)})"
            )
    return chosen


def plan_ladder(
    cfg: RunConfig, densities: Sequence[float], methods: Sequence[str], seeds: int, root: Path
) -> list[LadderRun]:
    """Every run of a ladder, each config validated (nothing trains yet).

    Example:
        >>> plan = plan_ladder(RunConfig(), [1.0, 0.5, 0.1], ["static"], 2, Path("/tmp/l"))
        >>> [r.name for r in plan][:4]
        ['dense-s0', 'static-d0.5-s0', 'static-d0.1-s0', 'dense-s1']
        >>> plan[2].config.sparsity.density, plan[2].config.run_dir
        (0.1, '/tmp/l/runs/static-d0.1-s0')
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds: {seeds!r} is not allowed; give the number of seeds, >= 1")
    methods = _check_methods(methods)
    if cfg.growth is not None:
        raise ConfigError(
            "growth: the ladder trains one fixed architecture at each density, but the config "
            "has a growth: section; remove it (e.g. --set growth=null)"
        )
    base = cfg.model_dump(mode="json")
    sparsity = base.get("sparsity") or {}
    plan = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        for density in densities:
            for method in [DENSE] if density == 1 else methods:
                name = f"{method}-s{seed}" if density == 1 else f"{method}-d{density:g}-s{seed}"
                data = {**base, "seed": seed, "run_dir": str(root / "runs" / name)}
                data["sparsity"] = None if density == 1 else {
                    **sparsity, "density": density, "algorithm": method, "snapshots": 0,
                }  # fmt: skip
                run = validate_config(data, source=f"ladder run {name}")
                plan.append(LadderRun(method, density, seed, name, run))
    return plan


def mean_accuracy(
    results: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, float], tuple[float, float, int]]:
    """``(mean, standard deviation, runs)`` of the accuracy per ``(method, density)``.

    Example:
        >>> mean_accuracy([{"method": "set", "density": 0.1, "accuracy": a} for a in (.5, 1)])
        {('set', 0.1): (0.75, 0.3535533905932738, 2)}
    """
    groups: dict[tuple[str, float], list[float]] = {}
    for r in results:
        groups.setdefault((r["method"], float(r["density"])), []).append(float(r["accuracy"]))
    return {
        key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
        for key, v in groups.items()
    }


def _dense_reference(results: Sequence[Mapping[str, Any]]) -> float:
    dense = [float(r["accuracy"]) for r in results if float(r["density"]) == 1.0]
    if not dense:
        got = sorted({float(r["density"]) for r in results}, reverse=True)
        raise ValueError(f"the ladder needs dense runs (density 1) as its reference; got {got}")
    return statistics.fmean(dense)


def _check_tolerance(tolerance: object) -> None:
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not (
        0 <= tolerance < math.inf
    ):  # fmt: skip
        raise ConfigError(
            f"--tolerance: {tolerance!r} is not allowed; give accuracy points >= 0, e.g. 1.0"
        )


def find_cliff(results: Sequence[Mapping[str, Any]], tolerance: float) -> dict[str, float | None]:
    """Per method, the lowest density whose mean accuracy, and that of every density of the
    method above it, is within ``tolerance`` percentage points of the dense mean (None when
    even the densest sparse rung is not).

    ``results`` are dicts with ``method``, ``density`` and ``accuracy`` (a fraction); runs
    at density 1 (any method) are the dense reference.

    Example:
        >>> runs = [{"method": "dense", "density": 1, "accuracy": 0.9},
        ...         {"method": "set", "density": 0.5, "accuracy": 0.85}]
        >>> find_cliff(runs, 1.0), find_cliff(runs, 5.0)
        ({'set': None}, {'set': 0.5})
    """
    _check_tolerance(tolerance)
    reference = _dense_reference(results)
    means = mean_accuracy(results)
    cliffs: dict[str, float | None] = {}
    for method in dict.fromkeys(m for m, d in means if d != 1.0):
        cliff = None
        for density in sorted((d for m, d in means if m == method and d != 1.0), reverse=True):
            if 100 * (reference - means[method, density][0]) > tolerance + 1e-9:
                break
            cliff = density
        cliffs[method] = cliff
    return cliffs


def ladder_rows(ladder: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the ladder table: one row per density, one column per method.

    Example:
        >>> runs = [{"method": "dense", "density": 1.0, "accuracy": 0.9, "active_params": 50},
        ...         {"method": "set", "density": 0.5, "accuracy": 0.85, "active_params": 30}]
        >>> ladder_rows({"runs": runs, "methods": ["set"]})
        (['density', 'active params', 'set'], [[1.0, 50, '90.00%'], [0.5, 30, '85.00%']])
    """
    runs, methods = ladder["runs"], list(ladder["methods"])
    means = mean_accuracy(runs)
    dense = means.get((DENSE, 1.0)) or next(v for (_, d), v in means.items() if d == 1.0)
    active = {float(r["density"]): r["active_params"] for r in runs}

    def cell(value: tuple[float, float, int] | None) -> str | None:
        if value is None:
            return None
        mean, std, n = value
        return f"{100 * mean:.2f}%" + (f" ± {100 * std:.2f}" if n > 1 else "")

    rows = []
    for density in sorted(active, reverse=True):
        row: list[Any] = [density, active[density]]
        row += [cell(dense if density == 1.0 else means.get((m, density))) for m in methods]
        rows.append(row)
    return ["density", "active params", *methods], rows


def _cliff_lines(ladder: Mapping[str, Any]) -> list[str]:
    head = (
        f"cliff: lowest density within {ladder['tolerance']:g} accuracy "
        f"point{'' if ladder['tolerance'] == 1 else 's'} of dense "
        f"({100 * ladder['dense_accuracy']:.2f}%)"
    )
    return [
        head,
        *(f"  {m}: {'none' if d is None else f'{d:g}'}" for m, d in ladder["cliff"].items()),
    ]


def ladder_table(ladder: Mapping[str, Any]) -> str:
    """The ladder as a plain-text table followed by the cliff of each method.

    Example:
        >>> print(ladder_table(_EXAMPLE))
        density  active params  set
        -------  -------------  ------
            1.0             50  90.00%
            0.5             30  89.50%
        <BLANKLINE>
        cliff: lowest density within 1 accuracy point of dense (90.00%)
          set: 0.5
    """
    headers, rows = ladder_rows(ladder)
    return "\n".join([format_table(headers, rows), "", *_cliff_lines(ladder)])


def ladder_markdown(ladder: Mapping[str, Any]) -> str:
    """The ladder as a Markdown table (``ladder.md``) followed by the cliffs.

    Example:
        >>> ladder_markdown(_EXAMPLE).splitlines()[4:7]
        ['| density | active params | set |', '|---:|---:|---:|', '| 1.0 | 50 | 90.00% |']
    """
    headers, rows = ladder_rows(ladder)

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join("-" if c is None else str(c) for c in cells) + " |"

    body = [line(headers), "|" + "---:|" * len(headers), *map(line, rows)]
    title = f"# Sparsity ladder\n\n`{ladder.get('command', '')}`\n"
    return "\n".join([title, *body, "", *_cliff_lines(ladder)]) + "\n"


def plot_ladder(ladder: Mapping[str, Any], out_png: str | Path) -> Path:
    """Draw accuracy vs density (log x): one line per method, dense as a reference line with
    the tolerance band below it, each method's cliff starred.

    Example:
        >>> import tempfile
        >>> plot_ladder(_EXAMPLE, tempfile.mkdtemp() + "/ladder.png").name
        'ladder.png'
    """
    means = mean_accuracy(ladder["runs"])
    dense, tol = 100 * ladder["dense_accuracy"], ladder["tolerance"]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.axhline(dense, color="grey", linestyle="--", label=f"dense ({dense:.2f}%)")
    ax.axhspan(
        dense - tol,
        dense,
        color="grey",
        alpha=0.12,
        label=f"within {tol:g} point{'' if tol == 1 else 's'}",
    )
    for method in ladder["methods"]:
        xs = sorted((d for m, d in means if m == method and d != 1.0), reverse=True)
        ys = [100 * means[method, d][0] for d in xs]
        errs = [100 * means[method, d][1] for d in xs]
        drawn = ax.errorbar([1.0, *xs], [dense, *ys], yerr=[0.0, *errs], marker="o",
                            markersize=4, capsize=3, label=method)  # fmt: skip
        cliff = ladder["cliff"].get(method)
        if cliff is not None:
            ax.plot([cliff], [100 * means[method, cliff][0]], marker="*", markersize=14,
                    color=drawn.lines[0].get_color(), linestyle="none")  # fmt: skip
    densities = sorted({float(r["density"]) for r in ladder["runs"]})
    ax.set_xscale("log")
    ax.set_xticks(densities, [f"{d:g}" for d in densities])
    ax.minorticks_off()
    ax.set_xlabel("density (fraction of weights kept, log scale)")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title("accuracy vs density (★ cliff)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, out_png)


def _check_densities(plan: Sequence[LadderRun]) -> None:
    """Before anything trains: every run ends with an evaluation of its final model
    (:func:`_check_steps`) and every sparse rung leaves each layer at least one weight."""
    from .models import build_model
    from .policies import check_sparsity
    from .runner import _load_data

    if not plan:
        return
    data = _load_data(plan[0].config, progress=False)
    _check_steps(plan[0].config, len(data.train_y) - plan[0].config.data.n_val)
    sparse = [r for r in plan if r.config.sparsity is not None]
    if not sparse:
        return
    try:
        model = build_model(sparse[0].config.model, data.input_shape, data.num_classes)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    for run in sorted(sparse, key=lambda r: r.density):
        check_sparsity(run.config, model, what=f"--densities: {run.density:g}")


def _check_steps(cfg: RunConfig, n_train: int) -> None:
    """Refuse a ``train.max_steps`` that stops the runs (of ``n_train`` training samples)
    where no evaluation is taken: mid-epoch, or at the end of an epoch that is not evaluated
    (``train.eval_every_epochs``). The ladder compares the accuracy of each final model.

    Example:
        >>> cfg = validate_config({"train": {"epochs": 2, "batch_size": 100, "max_steps": 4}})
        >>> _check_steps(cfg, 250)
        Traceback (most recent call last):
        ...
        dynarch.config.ConfigError: train.max_steps 4 stops each ladder run mid-epoch (3 steps \
an epoch), where no evaluation is taken, but the ladder compares the final models' val \
accuracies; set it to 3 or 6, or remove it (--set train.max_steps=null)
    """
    t = cfg.train
    batches = -(-n_train // t.batch_size)
    if t.max_steps is None or t.max_steps >= t.epochs * batches:
        return
    epochs, rest = divmod(t.max_steps, batches)
    if rest == 0 and epochs % t.eval_every_epochs == 0:
        return
    where = (
        f"mid-epoch ({batches} steps an epoch)"
        if rest
        else f"after epoch {epochs}, which train.eval_every_epochs {t.eval_every_epochs} "
        "does not evaluate"
    )
    every = batches * t.eval_every_epochs
    fits = sorted({every * k for k in range(1, t.epochs // t.eval_every_epochs + 1)}
                  | {t.epochs * batches})  # fmt: skip
    options = [n for n in fits if n < t.max_steps][-1:] + [n for n in fits if n > t.max_steps][:1]
    raise ConfigError(
        f"train.max_steps {t.max_steps} stops each ladder run {where}, where no evaluation is "
        "taken, but the ladder compares the final models' val accuracies; set it to "
        f"{' or '.join(map(str, options))}, or remove it (--set train.max_steps=null)"
    )


def _execute(run: LadderRun, progress: bool) -> dict[str, Any]:
    """Train one rung (in this process or a worker) and return its row of ``ladder.json``."""
    import torch

    from .runner import execute

    if mp.parent_process() is not None:  # a worker: one thread each
        torch.set_num_threads(1)
    summary = execute(run.config, progress=progress, echo=lambda s: None, plots=False)
    accuracy = summary["final"].get("val_accuracy")
    if accuracy is None:
        raise ConfigError(
            f"ladder run {run.name} ended without an evaluation (train.max_steps stopped it "
            "mid-epoch?); the ladder compares final val accuracies"
        )
    return {
        "name": run.name, "method": run.method, "density": run.density, "seed": run.seed,
        "accuracy": accuracy, "best_accuracy": summary["best"].get("val_accuracy"),
        "seconds": summary["seconds"], "params": summary["params"]["end"],
        "active_params": summary["params"]["active"], "run_dir": summary["run_dir"],
    }  # fmt: skip


def run_ladder(
    cfg: RunConfig,
    densities: Sequence[float],
    methods: Sequence[str] = ("static",),
    *,
    seeds: int = 1,
    tolerance: float = 1.0,
    run_dir: str | Path | None = None,
    command: str = "",
    progress: bool = False,
    echo: Callable[[str], None] = print,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train the ladder, write ``ladder.json``/``.md``/``.png`` to ``run_dir`` (default:
    ``cfg.run_dir``) and return the ``ladder.json`` dict. Every config is checked first.
    ``jobs`` > 1 trains the runs in that many worker processes (spawn, one thread each);
    the result does not depend on it.

    Example:
        >>> cfg = validate_config({"data": {"n_train": 128, "n_test": 64},
        ...                        "train": {"epochs": 1}})
        >>> import tempfile
        >>> ladder = run_ladder(cfg, [1, 0.5], run_dir=tempfile.mkdtemp(), echo=lambda s: None)
        >>> sorted(ladder["cliff"]), [r["name"] for r in ladder["runs"]]
        (['static'], ['dense-s0', 'static-d0.5-s0'])
    """
    densities = parse_densities(list(densities))
    _check_tolerance(tolerance)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs: {jobs!r} is not allowed; give the number of processes, >= 1")
    root = Path(run_dir if run_dir is not None else cfg.run_dir or "runs/ladder")
    if (root / "ladder.json").exists():
        raise ConfigError(f"{str(root)!r} already holds a ladder (ladder.json); choose another")
    methods = _check_methods(methods)
    plan = plan_ladder(cfg, densities, methods, seeds, root)
    taken = [r.name for r in plan if (root / "runs" / r.name / "config.json").exists()]
    if taken:
        raise ConfigError(f"{str(root)!r} already holds runs {taken}; choose another --run-dir")
    _check_densities(plan)
    make_run_dir(root, "--run-dir")
    if jobs == 1:
        done: Any = (_execute(run, progress) for run in plan)
    else:
        pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"))
        done = (f.result() for f in as_completed([pool.submit(_execute, r, False) for r in plan]))
    rows: dict[str, dict[str, Any]] = {}
    try:
        for i, row in enumerate(done, 1):
            rows[row["name"]] = row
            echo(f"[{i}/{len(plan)}] {row['name']:<24} val acc {100 * row['accuracy']:6.2f}%  "
                 f"{row['active_params']} active params  {row['seconds']:.1f} s")  # fmt: skip
    finally:
        if jobs > 1:
            pool.shutdown(cancel_futures=True)
    runs = [rows[run.name] for run in plan]  # in plan order, however the workers finished
    cliffs = find_cliff(runs, tolerance)
    ladder = {
        "command": command, "config": cfg.model_dump(mode="json"), "densities": densities,
        "methods": methods, "seeds": sorted({r.seed for r in plan}), "tolerance": tolerance,
        "dense_accuracy": _dense_reference(runs), "cliff": {m: cliffs.get(m) for m in methods},
        "runs": runs,
    }  # fmt: skip
    (root / "ladder.json").write_text(json.dumps(ladder, indent=2) + "\n")
    (root / "ladder.md").write_text(ladder_markdown(ladder))
    plot_ladder(ladder, root / "ladder.png")
    echo("\n" + ladder_table(ladder) + f"\n\nladder dir: {root}")
    return ladder
