"""Optimal seed finder: the smallest sparse network that still learns the task.

:func:`find_seed` trains every combination of hidden widths (``hidden_options``), densities
and seeds as a sparse MLP (:func:`dynarch.models.mlp`, masked to the density with ERK budgets
and random positions from the engine generator seeded with the run's seed) for ``epochs``
epochs, and reports its test accuracy. A configuration *learns* when its mean accuracy over
the seeds exceeds the random baseline — the larger of the majority-class share of the test
labels and ``1 / num_classes`` — by ``margin``. The winner is the learning configuration with
the fewest active weights (ties: higher mean accuracy, then the order given).

A configuration whose density is too low for its network (some layer would keep no weight,
see :func:`dynarch.budgets.layer_budgets`) is not trained: it is found before any training
and reported as a row marked ``feasible=False`` (``why`` names the minimal density that
works); only when no configuration is feasible is the search refused.

Runs are independent and seeded (weights from ``torch.manual_seed(seed)``, trainer and
engine seeded with ``seed``), so the results do not depend on ``jobs``. ``jobs > 1`` runs them
in a :class:`concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start method, each
worker with ``torch.set_num_threads(1)`` and the data sent once per worker; ``jobs=1`` runs
in this process (global RNG state restored afterwards).

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(200, 6, generator=g); y = (x[:, 0] > 0).long()
    >>> search = find_seed(((x, y), (x, y)), hidden_options=[(), (4,)], densities=[0.5],
    ...                    seeds=[0], epochs=3)
    >>> search.winner["hidden"], search.winner["weights"]
    ((), 6)
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import rng
from .._validate import check_int
from ..budgets import DISTRIBUTIONS, check_choice, layer_budgets

__all__ = ["SeedSearch", "find_seed"]

_DATA: dict[str, Any] = {}  # per worker process: the data and settings, sent once


def _init_worker(data: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    _DATA.clear()
    _DATA.update(data)


def _run(job: tuple[tuple[int, ...], float, int]) -> dict[str, Any]:
    """Train one seed network (in a worker or in-process); returns its result row."""
    from ..masks import sparsify
    from ..models import mlp
    from ..train import Trainer
    from .candidates import active_params

    hidden, density, seed = job
    d = _DATA
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = mlp(d["in_features"], list(hidden), d["num_classes"])
    if density < 1.0:
        from .._engine import set_seed

        set_seed(model, seed)
        sparsify(model, density, distribution=d["distribution"], score="random")
    opt = torch.optim.Adam(model.parameters(), lr=d["lr"])
    trainer = Trainer(model, opt, d["train"], eval=d["test"], epochs=d["epochs"],
                      batch_size=d["batch_size"], seed=seed, progress=False)  # fmt: skip
    trainer.fit()
    acc = trainer.evaluate(d["test"])["val_accuracy"]
    return {
        "hidden": tuple(hidden), "density": density, "seed": seed,
        "weights": active_params(model)[1], "params": active_params(model)[0],
        "accuracy": float(acc), "seconds": time.perf_counter() - t0,
    }  # fmt: skip


@dataclass
class SeedSearch:
    """Results of :func:`find_seed`.

    ``runs``: one dict per (hidden, density, seed) run in job order; ``rows``: one per
    configuration (``hidden``, ``density``, ``weights``, ``params``, ``mean_accuracy``,
    ``min_accuracy``, ``seeds``, ``learns``, ``feasible``, ``why``), fewest weights first
    (ties: higher mean accuracy), then the ``infeasible`` configurations (``{"hidden",
    "density", "why"}``, not trained: ``weights``, ``params`` and the accuracies ``None``,
    ``seeds`` 0, ``learns`` False) in the order given; ``baseline``: the random baseline;
    ``threshold``: baseline + margin; ``winner``: the first learning row, or ``None``.
    """

    runs: list[dict[str, Any]]
    baseline: float
    threshold: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    infeasible: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        groups: dict[tuple[tuple[int, ...], float], list[dict[str, Any]]] = {}
        for r in self.runs:
            groups.setdefault((r["hidden"], r["density"]), []).append(r)
        rows = []
        for i, ((hidden, density), runs) in enumerate(groups.items()):
            accs = [r["accuracy"] for r in runs]
            mean = sum(accs) / len(accs)
            rows.append({
                "hidden": hidden, "density": density, "weights": runs[0]["weights"],
                "params": runs[0]["params"], "mean_accuracy": mean, "min_accuracy": min(accs),
                "seeds": len(runs), "learns": mean > self.threshold, "feasible": True,
                "why": "", "_order": i,
            })  # fmt: skip
        rows.sort(key=lambda r: (r["weights"], -r["mean_accuracy"], r["_order"]))
        self.rows = [{k: v for k, v in r.items() if k != "_order"} for r in rows]
        self.rows += [
            {"hidden": tuple(c["hidden"]), "density": c["density"], "weights": None,
             "params": None, "mean_accuracy": None, "min_accuracy": None, "seeds": 0,
             "learns": False, "feasible": False, "why": c["why"]}
            for c in self.infeasible
        ]  # fmt: skip

    @property
    def winner(self) -> dict[str, Any] | None:
        """The smallest configuration that learns (``None`` when none does)."""
        return next((r for r in self.rows if r["learns"]), None)

    def table(self) -> str:
        """The configurations as a markdown table (winner marked ``*``).

        Example:
            >>> s = SeedSearch([{"hidden": (), "density": 0.5, "seed": 0, "weights": 6,
            ...                  "params": 8, "accuracy": 0.9}], baseline=0.5, threshold=0.55)
            >>> print(s.table())
            | hidden | density | weights | params | mean acc | min acc | seeds | learns |
            |---|---|---|---|---|---|---|---|
            | [] | 0.5 | 6 | 8 | 0.9000 | 0.9000 | 1 | yes * |
        """
        head = "| hidden | density | weights | params | mean acc | min acc | seeds | learns |"
        lines = [head, "|---" * 8 + "|"]
        win = self.winner
        for r in self.rows:
            if not r["feasible"]:
                lines.append(f"| {list(r['hidden'])} | {r['density']:g} | - | - | - | - | 0 | "
                             "infeasible |")  # fmt: skip
                continue
            learns = ("yes" if r["learns"] else "no") + (" *" if r is win else "")
            lines.append(
                f"| {list(r['hidden'])} | {r['density']:g} | {r['weights']} | {r['params']} | "
                f"{r['mean_accuracy']:.4f} | {r['min_accuracy']:.4f} | {r['seeds']} | {learns} |"
            )
        return "\n".join(lines)


def _data(data: object) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], int]:
    if all(hasattr(data, a) for a in ("train_x", "train_y", "test_x", "test_y")):
        d: Any = data
        train, test = (d.train_x, d.train_y), (d.test_x, d.test_y)
        classes = int(getattr(d, "num_classes", 0))
    elif isinstance(data, tuple | list) and len(data) == 2 and all(len(p) == 2 for p in data):
        train, test = (data[0][0], data[0][1]), (data[1][0], data[1][1])
        classes = 0
    else:
        raise TypeError(
            "data must be a dynarch.data.Dataset or ((train_x, train_y), (test_x, test_y)), "
            f"got {type(data).__name__}"
        )
    for x, y in (train, test):
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or y.dtype != torch.int64:
            raise TypeError("data must hold tensors x and int64 class labels y")
        if not x.is_floating_point():
            raise TypeError(f"data inputs x must be floating point, got {x.dtype}")
    # the seed networks are float32: inputs of another float dtype are converted
    train, test = (train[0].float(), train[1]), (test[0].float(), test[1])
    classes = max(classes, int(train[1].max()) + 1, int(test[1].max()) + 1)
    return train, test, classes


def _infeasible(
    hidden: tuple[int, ...], density: float, sizes: tuple[int, int], distribution: str
) -> str:
    """Why ``hidden`` at ``density`` cannot be sparsified ('' when it can)."""
    if density >= 1.0:
        return ""
    widths = [sizes[0], *hidden, sizes[1]]
    names = [f"fc{i}" for i in range(1, len(hidden) + 1)] + ["out"]  # as dynarch.models.mlp
    shapes = {n: (b, a) for n, a, b in zip(names, widths[:-1], widths[1:], strict=True)}
    try:
        layer_budgets(shapes, density, distribution)
    except ValueError as exc:
        return str(exc)
    return ""


def find_seed(
    data: object,
    *,
    hidden_options: Sequence[Sequence[int]] = ((), (16,), (32,)),
    densities: Sequence[float] = (0.02, 0.05, 0.1),
    seeds: Sequence[int] = (0, 1),
    epochs: int = 3,
    jobs: int = 1,
    margin: float = 0.05,
    lr: float = 1e-2,
    batch_size: int = 128,
    distribution: str = "erk",
) -> SeedSearch:
    """Search sparse MLP seeds for the smallest that learns above the random baseline.

    See the module docstring. ``hidden_options``: hidden widths per candidate (``()`` is a
    single sparse ``in → classes`` layer); ``densities`` in ``(0, 1]`` (1: dense). A
    configuration too sparse for its network is reported as an infeasible row, untrained; if
    every configuration is, a ``ValueError`` names the first and the minimal density.

    Example:
        >>> import torch
        >>> x = torch.randn(100, 4); y = (x[:, 1] > 0).long()
        >>> s = find_seed(((x, y), (x, y)), hidden_options=[()], densities=[1.0], seeds=[0])
        >>> len(s.runs), s.rows[0]["weights"]
        (1, 8)
    """
    train, test, classes = _data(data)
    if isinstance(hidden_options, str) or not hidden_options:
        raise ValueError(f"hidden_options must be a non-empty list of width lists, "
                         f"got {hidden_options!r}")  # fmt: skip
    hidden = [tuple(check_int("hidden width", w, 1) for w in h) for h in hidden_options]
    if not densities or any(
        isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d <= 1 for d in densities
    ):
        raise ValueError(f"densities must be a non-empty list of numbers in (0, 1], got "
                         f"{densities!r}")  # fmt: skip
    if not seeds:
        raise ValueError("seeds must be a non-empty list of ints >= 0")
    seeds = [check_int("seed", s, 0) for s in seeds]
    for what, values in (("seeds", seeds), ("densities", [float(d) for d in densities]),
                         ("hidden_options", hidden)):  # fmt: skip
        twice = sorted({repr(v) for v in values if values.count(v) > 1})  # type: ignore[arg-type]
        if twice:
            raise ValueError(f"{what} lists {', '.join(twice)} more than once; give each once")
    check_int("epochs", epochs, 1)
    check_int("jobs", jobs, 1)
    if not isinstance(margin, int | float) or margin < 0:
        raise ValueError(f"margin must be a number >= 0, got {margin!r}")
    if not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    check_choice("distribution", distribution, DISTRIBUTIONS)
    shared = {
        "train": train, "test": test, "num_classes": classes, "epochs": epochs, "lr": lr,
        "batch_size": check_int("batch_size", batch_size, 1), "distribution": distribution,
        "in_features": int(train[0][0].numel()),
    }  # fmt: skip
    sizes = (int(train[0][0].numel()), classes)
    configs = [(h, float(d)) for h in hidden for d in densities]
    why = {c: _infeasible(*c, sizes, distribution) for c in configs}  # before any training
    infeasible = [{"hidden": h, "density": d, "why": why[h, d]} for h, d in configs if why[h, d]]
    if len(infeasible) == len(configs):
        raise ValueError(
            "no configuration can be sparsified to its density (e.g. hidden "
            f"{list(configs[0][0])} at density {configs[0][1]:g}: {why[configs[0]]}); give "
            "higher densities"
        )
    jobs_list = [(h, d, s) for h, d in configs if not why[h, d] for s in seeds]
    if jobs == 1:
        state, threads = rng.capture_rng(), torch.get_num_threads()
        try:
            _init_worker(shared)
            runs = [_run(j) for j in jobs_list]
        finally:
            _DATA.clear()
            torch.set_num_threads(threads)
            rng.restore_rng(state)
    else:
        ctx, workers = mp.get_context("spawn"), min(jobs, len(jobs_list))
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(shared,)) as pool:  # fmt: skip
            runs = list(pool.map(_run, jobs_list))
    counts = torch.bincount(test[1], minlength=classes)
    baseline = max(float(counts.max()) / test[1].numel(), 1.0 / classes)
    return SeedSearch(
        runs, baseline=baseline, threshold=baseline + float(margin), infeasible=infeasible
    )
