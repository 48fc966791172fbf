"""Running one experiment from a validated config: ``execute(cfg)`` (what ``dynarch run``,
``dynarch ladder`` and ``dynarch rescue`` do for each run).

It loads the data (with an optional validation split), builds the model and optimizer,
adds the callbacks the config asks for (masks and rewiring, growth policies, a cosine
schedule, early stopping), trains with :class:`~dynarch.train.Trainer`, and writes the run
directory: ``config.json``, ``metrics.jsonl``, ``events.jsonl``, ``checkpoint/``,
``summary.json`` and, for sparse runs, the plots.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import report
from ._engine import count_params, set_seed
from .callbacks import Callback, CosineLR, EarlyStopping
from .config import ConfigError, RunConfig, build_optimizer
from .models import build_model, layer_widths
from .report import config_lines, event_rows, read_jsonl, summary_text

__all__ = ["RewireFromStart", "SparsifyAtStart", "execute", "idle_settings", "make_run_dir"]


class SparsifyAtStart(Callback):
    """Mask the model to ``density`` when training starts (the event lands in events.jsonl).

    Example:
        >>> cb = SparsifyAtStart(0.5, "erk")
    """

    def __init__(self, density: float, distribution: str) -> None:
        self.density, self.distribution = density, distribution

    def on_fit_start(self, trainer: Any) -> None:
        from .masks import sparsify

        sparsify(
            trainer.model,
            self.density,
            distribution=self.distribution,
            optimizer=trainer.optimizer,
            reason="config",
        )


class RewireFromStart(Callback):
    """Build a rewirer (:func:`dynarch.sparse.make_rewirer`) when training starts and pass it
    every hook; built inside the run, its initial sparsify event lands in events.jsonl.
    A float ``t_end`` in (0, 1) is a fraction of the trainer's total optimizer steps.

    Example:
        >>> cb = RewireFromStart("rigl", 0.1, "erk", delta_t=50)
    """

    def __init__(self, algorithm: str, density: float, distribution: str, **kwargs: Any) -> None:
        from .sparse import ALGORITHMS  # fails here, before a run starts, not at its first step

        if algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown sparse training algorithm {algorithm!r}; registered: {list(ALGORITHMS)}"
            )
        self.algorithm, self.density, self.distribution = algorithm, density, distribution
        self.kwargs = kwargs
        self.rewirer: Callback | None = None
        self._state: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Any) -> None:
        if self.rewirer is None:
            from .sparse import make_rewirer

            t_end = self.kwargs.get("t_end")
            if isinstance(t_end, float):  # a fraction of the run's optimizer steps
                self.kwargs["t_end"] = max(1, round(t_end * trainer.total_steps))
            self.rewirer = make_rewirer(
                self.algorithm, trainer.model, trainer.optimizer, density=self.density,
                distribution=self.distribution, **self.kwargs,
            )  # fmt: skip
            if self._state is not None:
                self.rewirer.load_state_dict(self._state)
        self.rewirer.on_fit_start(trainer)

    def _hook(self, hook: str, trainer: Any, *args: Any) -> None:
        if self.rewirer is not None:
            getattr(self.rewirer, hook)(trainer, *args)

    def on_epoch_start(self, trainer: Any) -> None:
        self._hook("on_epoch_start", trainer)

    def on_after_backward(self, trainer: Any) -> None:
        self._hook("on_after_backward", trainer)

    def on_step_end(self, trainer: Any) -> None:
        self._hook("on_step_end", trainer)

    def on_epoch_end(self, trainer: Any) -> None:
        self._hook("on_epoch_end", trainer)

    def on_evaluate(self, trainer: Any, metrics: dict[str, float]) -> None:
        self._hook("on_evaluate", trainer, metrics)

    def on_fit_end(self, trainer: Any) -> None:
        self._hook("on_fit_end", trainer)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.rewirer is None else self.rewirer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.rewirer is None:
            self._state = dict(state)  # applied once the rewirer is built
        else:
            self.rewirer.load_state_dict(state)


def _sparsity_callbacks(cfg: RunConfig) -> list[Callback]:
    """The callbacks ``sparsity:`` asks for: masks (static or rewired) and mask snapshots."""
    sp = cfg.sparsity
    if sp is None:
        return []
    callbacks: list[Callback] = []
    if sp.algorithm == "static":
        callbacks.append(SparsifyAtStart(sp.density, sp.distribution))
    else:
        callbacks.append(
            RewireFromStart(
                sp.algorithm, sp.density, sp.distribution, delta_t=sp.delta_t,
                drop_fraction=sp.drop_fraction, t_end=sp.t_end, anneal=sp.anneal,
                regrow_init=sp.regrow_init,
            )
        )  # fmt: skip
    if sp.snapshots:
        from .plots import MaskSnapshots

        callbacks.append(MaskSnapshots(count=max(sp.snapshots, 2), draw=False))
    return callbacks


# ----------------------------------------------------------------------------- running


def _load_data(cfg: RunConfig, progress: bool) -> Any:
    from .data import load

    d = cfg.data
    data = load(d.name, root=d.root, download=d.download, progress=progress)
    for key, n, have in (
        ("n_train", d.n_train, len(data.train_y)),
        ("n_test", d.n_test, len(data.test_y)),
    ):
        if n is not None and n > have:
            raise ConfigError(f"data.{key}: {n} is more than the {have} samples of {d.name}")
    if d.n_train is not None or d.n_test is not None:
        data = data.subset(d.n_train, d.n_test)
    if d.n_val >= len(data.train_y):
        raise ConfigError(
            f"data.n_val: {d.n_val} leaves no training samples (the training set has "
            f"{len(data.train_y)}); use fewer"
        )
    return data


def _splits(cfg: RunConfig, data: Any) -> tuple[Any, Any]:
    """(training data, evaluation data during training): with ``data.n_val`` the last
    ``n_val`` training samples are the evaluation set; otherwise the test set."""
    n = cfg.data.n_val
    if not n:
        return data, None
    x, y = data.train_x, data.train_y
    return (x[:-n], y[:-n]), (x[-n:], y[-n:])


def execute(
    cfg: RunConfig,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    plots: bool = True,
) -> dict[str, Any]:
    """Run the experiment ``cfg`` describes; returns (and writes) its ``summary.json``.

    Everything that can be checked is checked before the run directory is created. With
    ``plots``, a sparse run also gets its plots (:func:`dynarch.plots.write_run_plots`).

    Example:
        >>> from dynarch.config import validate_config
        >>> cfg = validate_config({"data": {"n_train": 256, "n_test": 128},
        ...                        "train": {"epochs": 1}, "run_dir": "/tmp/dynarch-doc"})
        >>> import shutil; shutil.rmtree("/tmp/dynarch-doc", ignore_errors=True)
        >>> execute(cfg, progress=False, echo=lambda s: None)["steps"]
        2
    """
    from .masks import layer_density
    from .train import Trainer

    if cfg.run_dir is None:
        raise ConfigError("run_dir is not set; pass --run-dir or set run_dir in the config")
    run_dir = Path(cfg.run_dir)
    if (run_dir / "config.json").exists():
        raise ConfigError(
            f"run directory {str(run_dir)!r} already holds a run (config.json); "
            "choose another --run-dir or remove it"
        )
    data = _load_data(cfg, progress)
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model, data.input_shape, data.num_classes)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    set_seed(model, cfg.seed)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    callbacks = _sparsity_callbacks(cfg)
    train_data, eval_data = _splits(cfg, data)
    if cfg.growth is not None:
        from .policies import check_growth, growth_callbacks

        check_growth(cfg, model)
        train_pair = train_data if eval_data is not None else (data.train_x, data.train_y)
        callbacks += growth_callbacks(cfg.growth, model, train_pair)
    if cfg.optimizer.schedule == "cosine":
        callbacks.append(CosineLR())
    stopper = None
    if (es := cfg.train.early_stopping) is not None:
        stopper = EarlyStopping(es.monitor, patience=es.patience, min_delta=es.min_delta,
                                mode=es.mode)  # fmt: skip
        callbacks.append(stopper)
    config_json = json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n"
    make_run_dir(run_dir, "run_dir")
    (run_dir / "config.json").write_text(config_json)
    widths_start, params_start = layer_widths(model), count_params(model)
    echo("\n".join(config_lines(cfg)))
    n_train = len(data.train_y) - cfg.data.n_val  # the training split
    batches = -(-n_train // cfg.train.batch_size)
    for line in idle_settings(cfg, batches):
        echo(f"note       {line}")
    echo(f"run dir    {run_dir}\n")
    t = cfg.train
    started, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        trainer = Trainer(
            model, optimizer, train_data, eval=eval_data, epochs=t.epochs, max_steps=t.max_steps,
            batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, callbacks=callbacks,
            run_dir=run_dir, device=cfg.device, seed=cfg.seed, progress=progress,
            log_every=t.log_every, eval_every_epochs=t.eval_every_epochs,
        ).fit()  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    # with a validation split, the test set is scored once, after training
    test = trainer.evaluate((data.test_x, data.test_y)) if eval_data is not None else None
    _save_checkpoint(run_dir / "checkpoint", trainer, cfg)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = [m for m in metrics if "val_loss" in m]
    summary = {
        "run_dir": str(run_dir),
        "data": {
            "name": data.name, "n_train": len(data.train_y), "n_test": len(data.test_y),
            "input_shape": list(data.input_shape), "num_classes": data.num_classes,
        },
        "steps": trainer.step,
        "epochs": trainer.epoch,
        "seconds": round(seconds, 3),
        "params": {
            "start": params_start, "end": count_params(trainer.model),
            "active": report.active_params(trainer.model),
            "weights": report.active_weights(trainer.model),
        },
        "widths": {"start": widths_start, "end": layer_widths(trainer.model)},
        "density": layer_density(trainer.model),
        "final": evals[-1] if evals else {},
        "best": dict(trainer.best),
        "stopped_early": None if stopper is None or stopper.stopped_epoch is None else {
            "epoch": stopper.stopped_epoch, "of": t.epochs, "monitor": stopper.monitor,
            "patience": stopper.plateau.patience,
        },
        "test": test,
        "events": event_rows(read_jsonl(run_dir / "events.jsonl"), metrics),
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if plots and summary["density"]:
        from .plots import MaskSnapshots, write_run_plots

        for cb in callbacks:
            if isinstance(cb, MaskSnapshots):
                cb.write(run_dir / "masks")
        write_run_plots(run_dir)
    echo(summary_text(summary))
    return summary


def idle_settings(cfg: RunConfig, batches: int) -> list[str]:
    """Settings of ``cfg`` that can never act in a run of ``batches`` steps an epoch (a mask
    never rewired, a growth trigger that never fires), each as a sentence; ``dynarch run``
    prints them as notes before it trains.

    Example:
        >>> from dynarch.config import validate_config
        >>> cfg = validate_config({"train": {"epochs": 2}, "growth": {"patience": 2},
        ...                        "sparsity": {"density": 0.5, "algorithm": "set"}})
        >>> for line in idle_settings(cfg, 30):
        ...     print(line)
        sparsity.delta_t 100 >= the run's 60 optimizer steps: the set mask is never rewired
        growth.patience 2 needs more than the run's 2 evaluations: the plateau trigger never fires
    """
    t, notes = cfg.train, []
    steps = t.epochs * batches if t.max_steps is None else min(t.epochs * batches, t.max_steps)
    epochs = t.epochs if t.max_steps is None else min(t.epochs, t.max_steps // batches)
    evals = sum((e + 1) % t.eval_every_epochs == 0 or e + 1 == t.epochs for e in range(epochs))
    sp = cfg.sparsity
    if sp is not None and sp.algorithm != "static":
        t_end = sp.t_end if not isinstance(sp.t_end, float) else max(1, round(sp.t_end * steps))
        if sp.delta_t >= steps:
            notes.append(
                f"sparsity.delta_t {sp.delta_t} >= the run's {steps} optimizer steps: the "
                f"{sp.algorithm} mask is never rewired"
            )
        elif t_end is not None and t_end <= sp.delta_t:
            notes.append(
                f"sparsity.t_end {sp.t_end} ({t_end} steps) is not after the first update at "
                f"step {sp.delta_t}: the {sp.algorithm} mask is never rewired"
            )
    g = cfg.growth
    if g is not None and g.trigger == "every" and g.every > evals:
        notes.append(
            f"growth.every {g.every} is more than the run's {evals} evaluations: the every "
            "trigger never fires"
        )
    elif g is not None and g.trigger == "plateau" and g.patience >= evals:
        notes.append(
            f"growth.patience {g.patience} needs more than the run's {evals} evaluations: the "
            "plateau trigger never fires"
        )
    return notes


def make_run_dir(path: Path, what: str) -> None:
    """Create directory ``path`` (and its parents) and check that it is writable; a
    :class:`~dynarch.config.ConfigError` naming ``what`` (e.g. ``--out``) when it cannot be.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as f:  # a directory under a file
        ...     make_run_dir(Path(f.name) / "run", "--run-dir")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dynarch.config.ConfigError: --run-dir: cannot create '.../run': Not a directory; ...
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{what}: cannot create {str(path)!r}: {exc.strerror or exc}; choose a writable "
            "directory"
        ) from None
    try:  # a real write: permission bits say nothing for root or on special file systems
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{what}: cannot write in {str(path)!r}: {exc.strerror or exc}; choose a writable "
            "directory"
        ) from None


def _save_checkpoint(path: Path, trainer: Any, cfg: RunConfig) -> None:
    from .checkpoint import save

    config = cfg.model_dump(mode="json")
    save(path, trainer.model, trainer.optimizer, trainer=trainer.state_dict(), config=config)
