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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click

from .config import ConfigError, load_config
from .data import DataCorruptError, DataNotFoundError
from .report import RUN_FILES as RUN_FILES
from .report import UsageProblem, inspect_run
from .report import event_rows as event_rows
from .report import format_table as format_table
from .rescue import METHODS as RESCUE_METHODS
from .runner import RewireFromStart as RewireFromStart
from .runner import SparsifyAtStart as SparsifyAtStart
from .runner import _load_data as _load_data
from .runner import _splits as _splits
from .runner import execute

__all__ = ["execute", "inspect_run", "main"]


# --------------------------------------------------------------------------------- click


@contextmanager
def _cli_errors() -> Iterator[None]:
    """Config problems exit as usage errors (code 2), missing/damaged data as errors (1)."""
    try:
        yield
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    except (DataNotFoundError, DataCorruptError) as exc:
        raise click.ClickException(str(exc)) from None


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
    with _cli_errors():
        cfg = load_config(config, overrides)
        if run_dir is not None:
            cfg.run_dir = str(run_dir)
        execute(cfg, progress=not no_progress, echo=click.echo)


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

    with _cli_errors():
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

    with _cli_errors():
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


if __name__ == "__main__":
    main()
