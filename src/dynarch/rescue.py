"""Cliff rescue: can growth bring a network initialised *below* the sparsity cliff back?

:func:`run_rescue` trains one config's architecture as a sparse scaffold at ``density``
(well below the cliff a :mod:`dynarch.ladder` finds) with each method, for the same epochs,
optimizer, data and seeds, plus the dense model as the reference:

========== ===============================================================================
dense      the config's model, no masks (the reference accuracy and weight count)
static     the scaffold's random mask, fixed
set        the scaffold rewired by SET every ``delta_t`` steps, density fixed
patches    scaffold + ``rewire`` + extrema-guided patches every evaluation (growth.policy
           patches), never past ``budget`` × the dense parameter count
tournament scaffold + ``rewire`` + a tournament (patch / insert / widen / skip, ΔMI/ΔParams)
           every evaluation, same budget
widen      scaffold + ``rewire`` + Net2Net widening of the hidden layers on a validation-loss
           plateau, same budget
========== ===============================================================================

The config's own ``growth:`` settings are kept: keys every policy has (``trigger``,
``patience``, ``max_events``, ...) in every growth run, policy keys (``amount``,
``patch_size``, ``factor``, ...) in the run of that policy (its ``policy`` is ignored: the
method sets it; the budget is ``--budget``). Otherwise each method uses the table's settings.
Growth decisions look only at training data and a validation split held out of it
(``data.n_val``, default 5000 samples for the rescue); the accuracy reported is the test
accuracy, scored once at the end of each run. Runs go to worker processes (spawn, one thread
each). The result (``rescue.json``, the layout of ``bench/results/rescue.json``)::

    {"command", "config", "density", "budget", "dense_accuracy", "dense_weights",
     "results": [{"method", "seed", "accuracy", "weights", "seconds", "run_dir"}, ...]}

Example:
    >>> rows = [{"method": "dense", "seed": 0, "accuracy": 0.9, "weights": 100, "seconds": 2.0},
    ...         {"method": "set", "seed": 0, "accuracy": 0.8, "weights": 5, "seconds": 3.0}]
    >>> table = rescue_markdown({"results": rows, "dense_accuracy": 0.9, "dense_weights": 100})
    >>> for line in table.splitlines()[2:]:
    ...     print(line)
    | dense | 90.00 | 0.00 | 100 | 100.00 | 2.0 |
    | set | 80.00 | -10.00 | 5 | 5.00 | 3.0 |
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._config_errors import suggest
from .config import ConfigError, RunConfig, validate_config
from .runner import make_run_dir

__all__ = ["METHODS", "RescueRun", "plan_rescue", "rescue_markdown", "run_rescue"]

METHODS: tuple[str, ...] = ("dense", "static", "set", "patches", "tournament", "widen")
GROWTH: dict[str, dict[str, Any]] = {
    "patches": {"policy": "patches", "trigger": "every", "amount": 0.5},
    "tournament": {"policy": "tournament", "trigger": "every"},
    "widen": {"policy": "widen", "trigger": "plateau", "patience": 1, "factor": 1.5},
}


@dataclass(frozen=True)
class RescueRun:
    """One planned run: method, seed, name and its validated config."""

    method: str
    seed: int
    name: str
    config: RunConfig


def _check(methods: Sequence[str], density: float, budget: float, rewire: str) -> list[str]:
    chosen = list(dict.fromkeys(methods))
    for m in chosen:
        if m not in METHODS:
            raise ConfigError(
                f"--methods: {m!r} is not a rescue method{suggest(m, METHODS)}; "
                f"choose from {', '.join(METHODS)}"
            )
    if not chosen:
        raise ConfigError(f"--methods: give at least one of {', '.join(METHODS)}")
    for name, value in (("--density", density), ("--budget", budget)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ConfigError(f"{name}: {value!r} is not in (0, 1]; it is a fraction of weights")
    if budget < density:
        raise ConfigError(
            f"--budget {budget:g} is below the scaffold --density {density:g}: growth would have "
            "no room; give a budget above the density"
        )
    if rewire not in ("static", "set", "rigl"):
        raise ConfigError(f"--rewire: {rewire!r} is not allowed; use static, set or rigl")
    return chosen


def plan_rescue(
    cfg: RunConfig,
    methods: Sequence[str],
    *,
    seeds: int,
    density: float,
    budget: float,
    rewire: str = "set",
    root: Path,
) -> list[RescueRun]:
    """Every run of a rescue, each config validated (nothing trains yet).

    Example:
        >>> plan = plan_rescue(RunConfig(), ["dense", "patches"], seeds=1, density=0.01,
        ...                    budget=0.05, root=Path("/tmp/r"))
        >>> [r.name for r in plan], plan[1].config.growth.max_params
        (['dense-s0', 'patches-s0'], 0.05)
    """
    chosen = _check(methods, density, budget, rewire)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds: {seeds!r} is not allowed; give the number of seeds, >= 1")
    base = cfg.model_dump(mode="json")
    sparsity = base.get("sparsity") or {}
    own = _own_growth(cfg, chosen)
    data = {**base["data"], "n_val": base["data"].get("n_val") or 5000}
    plan = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        for method in chosen:
            name = f"{method}-s{seed}"
            run = {**base, "seed": seed, "data": data, "run_dir": str(root / "runs" / name)}
            run["growth"] = None
            if method == "dense":
                run["sparsity"] = None
            else:
                algorithm = method if method in ("static", "set") else rewire
                run["sparsity"] = {**sparsity, "density": density, "algorithm": algorithm,
                                   "snapshots": 0}  # fmt: skip
            if method in GROWTH:
                run["growth"] = {**GROWTH[method], **own.get(GROWTH[method]["policy"], {}),
                                 "max_params": budget}  # fmt: skip
            plan.append(RescueRun(method, seed, name, validate_config(run, source=name)))
    return plan


def _own_growth(cfg: RunConfig, chosen: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The config's own ``growth:`` settings for each growth policy the rescue runs: keys
    every policy has (trigger, patience, max_events, ...) go to all of them, policy keys
    (amount, factor, ...) to that policy's run; a key no chosen run can use is refused."""
    from ._config_growth import _ONLY

    g = cfg.growth
    if g is None:
        return {}
    if "max_params" in g.model_fields_set:
        raise ConfigError(
            f"growth.max_params: {g.max_params:g} is not used by the rescue, whose growth budget "
            "is --budget; remove it from the config and pass --budget"
        )
    policies = [GROWTH[m]["policy"] for m in chosen if m in GROWTH]
    keys = sorted(g.model_fields_set - {"policy"})
    values = g.model_dump(mode="json")
    own: dict[str, dict[str, Any]] = {p: {} for p in policies}
    for key in keys:
        users = [p for p in policies if key not in _ONLY or p in _ONLY[key]]
        if not users:
            raise ConfigError(
                f"growth.{key}: set in the config, but it applies to policy "
                f"{' or '.join(_ONLY[key])}, which none of --methods {list(chosen)} runs; "
                "remove it or add that method"
            )
        for p in users:
            own[p][key] = values[key]
    return own


def _check_data_and_budget(
    cfg: RunConfig, plan: Sequence[RescueRun], density: float, budget: float
) -> None:
    """Before anything trains: the validation split leaves training samples, and the growth
    runs' ``budget`` is above the active parameters of the scaffold (biases count too)."""
    from ._engine import count_params
    from .models import build_model
    from .policies import check_sparsity, start_active_params
    from .runner import _load_data

    first = plan[0].config
    whole = first.model_copy(update={"data": first.data.model_copy(update={"n_val": 0})})
    data = _load_data(whole, progress=False)  # the training set before the split
    n, n_val = len(data.train_y), first.data.n_val
    if n_val >= n:
        default = "" if cfg.data.n_val else " (the rescue's default validation split)"
        raise ConfigError(
            f"data.n_val: {n_val}{default} leaves no training samples (the training set has "
            f"{n}); use fewer, e.g. --set data.n_val={max(1, n // 10)}"
        )
    sparse = next((r for r in plan if r.config.sparsity is not None), None)
    grown = next((r for r in plan if r.config.growth is not None), None)
    if sparse is None and grown is None:
        return
    try:
        model = build_model(first.model, data.input_shape, data.num_classes)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    if sparse is not None:
        check_sparsity(sparse.config, model, what=f"--density: {density:g}")
    if grown is None:
        return
    assert grown.config.growth is not None
    dense = count_params(model)
    cap, start = grown.config.growth.budget(dense), start_active_params(grown.config, model)
    if cap is not None and cap <= start:
        fix = (
            f"give a budget above {start / dense:.4g}"
            if start < dense
            else "give a lower --density (this scaffold already has every parameter)"
        )
        raise ConfigError(
            f"--budget {budget:g} allows {cap} active parameters, but the scaffold at --density "
            f"{density:g} starts with {start} (biases and norms count), so growth would have no "
            f"room; {fix}"
        )


def _check_out(out: Path) -> None:
    """``--out`` must name a file in a directory that exists (or can be made) and is writable."""
    if out.is_dir():
        raise ConfigError(f"--out: {str(out)!r} is a directory; give a file name, e.g. rescue.json")
    make_run_dir(out.parent, "--out")


def _execute(run: RescueRun) -> dict[str, Any]:
    """Train one run in this (worker) process; its result row."""
    import torch

    from .runner import execute

    torch.set_num_threads(1)
    summary = execute(run.config, progress=False, echo=lambda s: None, plots=False)
    scored = summary.get("test") or summary["final"]
    return {
        "method": run.method, "seed": run.seed, "accuracy": scored.get("val_accuracy"),
        "weights": summary["params"]["weights"], "params": summary["params"]["active"],
        "seconds": summary["seconds"], "events": len(summary["events"]),
        "run_dir": summary["run_dir"],
    }  # fmt: skip


def _write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def _mean(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    values = [float(r[key]) for r in rows]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rescue_markdown(payload: dict[str, Any]) -> str:
    """The rescue table (mean ± std over seeds): test accuracy, its distance to dense, final
    weights, their share of the dense weights, wall time."""
    dense_acc, dense_w = payload["dense_accuracy"], payload["dense_weights"]
    methods = list(dict.fromkeys(r["method"] for r in payload["results"]))
    lines = [
        "| method | test accuracy (%) | Δ vs dense (points) | final weights | % of dense "
        "| wall time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        rows = [r for r in payload["results"] if r["method"] == m]
        (acc, acc_sd), (w, _), (sec, _) = (_mean(rows, k) for k in ("accuracy", "weights",
                                                                   "seconds"))  # fmt: skip
        pm = f" ± {100 * acc_sd:.2f}" if len(rows) > 1 else ""
        lines.append(
            f"| {m} | {100 * acc:.2f}{pm} | {100 * (acc - dense_acc):.2f} | {w:.0f} | "
            f"{100 * w / dense_w:.2f} | {sec:.1f} |"
        )
    return "\n".join(lines)


def run_rescue(
    cfg: RunConfig,
    methods: Sequence[str] = METHODS,
    *,
    seeds: int = 3,
    density: float = 0.01,
    budget: float = 0.05,
    rewire: str = "set",
    jobs: int = 1,
    run_dir: str | Path,
    out: str | Path | None = None,
    command: str = "",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every run of the rescue (``jobs`` worker processes), write ``rescue.json`` and
    ``rescue.md`` in ``run_dir`` (and the JSON to ``out`` too), return the payload."""
    root = Path(run_dir)
    if (root / "rescue.json").exists():
        raise ConfigError(f"{str(root)!r} already holds a rescue (rescue.json); choose another")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs: {jobs!r} is not allowed; give the number of processes, >= 1")
    plan = plan_rescue(cfg, methods, seeds=seeds, density=density, budget=budget,
                       rewire=rewire, root=root)  # fmt: skip
    if "dense" not in {r.method for r in plan}:
        raise ConfigError("--methods must include dense: the rescue is measured against it")
    _check_data_and_budget(cfg, plan, density, budget)
    if out is not None:
        _check_out(Path(out))
    make_run_dir(root, "--run-dir")
    payload: dict[str, Any] = {
        "command": command, "config": cfg.model_dump(mode="json"), "density": density,
        "budget": budget, "rewire": rewire, "dense_accuracy": None, "dense_weights": None,
        "results": [],
    }  # fmt: skip
    echo(f"{len(plan)} runs, {jobs} worker process{'es' if jobs > 1 else ''}")
    if jobs == 1:
        rows = (_execute(r) for r in plan)
        done: Any = rows
    else:
        pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"))
        done = (f.result() for f in as_completed([pool.submit(_execute, r) for r in plan]))
    try:
        for i, row in enumerate(done, 1):
            payload["results"].append(row)
            dense = [r for r in payload["results"] if r["method"] == "dense"]
            if dense:
                payload["dense_accuracy"] = statistics.fmean(r["accuracy"] for r in dense)
                payload["dense_weights"] = dense[0]["weights"]
            _write(root / "rescue.json", payload)
            echo(f"[{i}/{len(plan)}] {row['method']:<10} seed {row['seed']}  test acc "
                 f"{100 * row['accuracy']:6.2f}%  weights {row['weights']:>7}  "
                 f"{row['seconds']:.1f} s")  # fmt: skip
    finally:
        if jobs > 1:
            pool.shutdown(cancel_futures=True)
    table = rescue_markdown(payload)
    (root / "rescue.md").write_text(f"# Cliff rescue\n\n`{command}`\n\n{table}\n")
    if out is not None:
        _write(Path(out), payload)
    echo("\n" + table + f"\n\nrescue dir: {root}")
    return payload
