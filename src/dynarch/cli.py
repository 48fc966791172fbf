"""The ``dynarch`` command line: ``dynarch run CONFIG``, ``dynarch inspect RUN_DIR`` and
``dynarch ladder CONFIG --densities ...`` (:mod:`dynarch.ladder`).

``run`` validates the whole config before anything trains, then writes a run directory::

    <run_dir>/config.json      the validated config
    <run_dir>/metrics.jsonl    training and evaluation lines (the trainer)
    <run_dir>/events.jsonl     one structural event per line
    <run_dir>/checkpoint/      the final model and optimizer (dynarch.checkpoint)
    <run_dir>/summary.json     widths, parameters, final metrics, events with accuracies
    <run_dir>/density.png      sparse runs: density per layer, connections rewired per update
    <run_dir>/rewiring.png     (dynarch.plots), and masks/*.png: mask heatmaps and differences

Example:
    >>> from click.testing import CliRunner
    >>> CliRunner().invoke(main, ["--version"]).output.startswith("dynarch, version")
    True
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click
import torch

from . import report
from ._engine import count_params, set_seed
from .callbacks import Callback, CosineLR, EarlyStopping
from .config import ConfigError, RunConfig, build_optimizer, load_config
from .data import DataCorruptError, DataNotFoundError
from .models import build_model, layer_widths
from .report import RUN_FILES as RUN_FILES
from .report import UsageProblem, config_lines, event_rows, inspect_run, read_jsonl, summary_text
from .report import format_table as format_table
from .rescue import METHODS as RESCUE_METHODS

__all__ = ["execute", "inspect_run", "main"]


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
                drop_fraction=sp.drop_fraction,
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
        from .policies import growth_callbacks

        train_pair = train_data if eval_data is not None else (data.train_x, data.train_y)
        callbacks += growth_callbacks(cfg.growth, model, train_pair)
    if cfg.optimizer.schedule == "cosine":
        callbacks.append(CosineLR())
    if (es := cfg.train.early_stopping) is not None:
        callbacks.append(
            EarlyStopping(es.monitor, patience=es.patience, min_delta=es.min_delta, mode=es.mode)
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    widths_start, params_start = layer_widths(model), count_params(model)
    echo("\n".join(config_lines(cfg)))
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


def _save_checkpoint(path: Path, trainer: Any, cfg: RunConfig) -> None:
    from .checkpoint import save

    config = cfg.model_dump(mode="json")
    save(path, trainer.model, trainer.optimizer, trainer=trainer.state_dict(), config=config)


# --------------------------------------------------------------------------------- click


_overrides = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set train.epochs=5 (repeatable).",
)


def _run_dir(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``--run-dir`` option of a command that writes ``what``."""
    return click.option(
        "--run-dir", type=click.Path(file_okay=False, path_type=Path),
        help=f"Where to write the {what} (default: runs/<config stem>-<timestamp>).",
    )  # fmt: skip


@click.group("dynarch", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("dynarch"), prog_name="dynarch")
def main() -> None:
    """dynarch: neural networks that grow, prune and rewire while they train."""


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@_overrides
@_run_dir("run")
@click.option("--no-progress", is_flag=True, help="Do not show a progress bar.")
def run(config: Path, overrides: tuple[str, ...], run_dir: Path | None, no_progress: bool) -> None:
    """Train the experiment described by the YAML file CONFIG."""
    try:
        cfg = load_config(config, overrides)
        if run_dir is not None:
            cfg.run_dir = str(run_dir)
        execute(cfg, progress=not no_progress, echo=click.echo)
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    except (DataNotFoundError, DataCorruptError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def inspect(run_dir: Path) -> None:
    """Show the config, layer widths, events and final metrics of RUN_DIR."""
    from .checkpoint import CheckpointError

    try:
        click.echo(inspect_run(run_dir))
    except (ConfigError, CheckpointError, json.JSONDecodeError) as exc:
        raise UsageProblem(f"cannot inspect {str(run_dir)!r}: {exc}") from None


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--densities", required=True, metavar="D1,D2,...",
    help="Densities to train at, each in (0, 1]; 1 (dense) is required, e.g. 1,0.5,0.1,0.01.",
)  # fmt: skip
@click.option(
    "--method", "methods", multiple=True, metavar="NAME",
    help="static (default), set, deep_r, rigl or snfs; repeat to compare several.",
)  # fmt: skip
@click.option("--seeds", default=1, show_default=True, help="Seeds per rung (seed, seed+1, ...).")
@click.option(
    "--tolerance", default=1.0, show_default=True,
    help="The cliff: the lowest density within this many accuracy points of dense.",
)  # fmt: skip
@_overrides
@_run_dir("ladder")
@click.option("--no-progress", is_flag=True, help="Do not show progress bars.")
def ladder(
    config: Path, densities: str, methods: tuple[str, ...], seeds: int, tolerance: float,
    overrides: tuple[str, ...], run_dir: Path | None, no_progress: bool,
) -> None:  # fmt: skip
    """Train CONFIG's architecture at each density and report where accuracy falls off."""
    import shlex

    from .ladder import parse_densities, run_ladder

    try:
        dens = parse_densities(densities)
        cfg = load_config(config, overrides)
        root = Path(run_dir if run_dir is not None else str(cfg.run_dir))
        argv = ["dynarch", "ladder", str(config), "--densities", densities]
        argv += [f"--method={m}" for m in methods] + [f"--seeds={seeds}"]
        argv += [f"--tolerance={tolerance:g}", f"--run-dir={root}"]
        argv += [f"--set={o}" for o in overrides]
        run_ladder(
            cfg, dens, methods or ("static",), seeds=seeds, tolerance=tolerance, run_dir=root,
            command=shlex.join(argv), progress=not no_progress, echo=click.echo,
        )  # fmt: skip
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    except (DataNotFoundError, DataCorruptError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--methods", default=",".join(RESCUE_METHODS), show_default=True, metavar="M1,M2,...",
    help="Which of dense, static, set, patches, tournament, widen to run (dense is required).",
)  # fmt: skip
@click.option("--density", default=0.01, show_default=True, help="Scaffold density (ERK).")
@click.option(
    "--budget", default=0.05, show_default=True,
    help="Growth cap: active parameters as a fraction of the dense model's.",
)  # fmt: skip
@click.option(
    "--rewire", default="set", show_default=True,
    help="Rewiring of the growth methods' scaffold: static, set or rigl.",
)  # fmt: skip
@click.option("--seeds", default=3, show_default=True, help="Seeds per method (seed, seed+1, ...).")
@click.option("--jobs", default=1, show_default=True, help="Worker processes (one thread each).")
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the result JSON here (e.g. bench/results/rescue.json).",
)  # fmt: skip
@_overrides
@_run_dir("runs")
def rescue(
    config: Path, methods: str, density: float, budget: float, rewire: str, seeds: int,
    jobs: int, out: Path | None, overrides: tuple[str, ...], run_dir: Path | None,
) -> None:  # fmt: skip
    """Cliff rescue: train CONFIG's model as a sub-cliff sparse scaffold with and without
    growth, against the dense model."""
    import shlex

    from .rescue import run_rescue

    try:
        cfg = load_config(config, overrides)
        root = Path(run_dir if run_dir is not None else str(cfg.run_dir))
        argv = ["dynarch", "rescue", str(config), f"--methods={methods}"]
        argv += [f"--density={density:g}", f"--budget={budget:g}", f"--rewire={rewire}"]
        argv += [f"--seeds={seeds}", f"--jobs={jobs}", f"--run-dir={root}"]
        argv += ([] if out is None else [f"--out={out}"]) + [f"--set={o}" for o in overrides]
        run_rescue(
            cfg, [m.strip() for m in methods.split(",") if m.strip()], seeds=seeds,
            density=density, budget=budget, rewire=rewire, jobs=jobs, run_dir=root, out=out,
            command=shlex.join(argv), echo=click.echo,
        )  # fmt: skip
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    except (DataNotFoundError, DataCorruptError) as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
