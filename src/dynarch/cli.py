"""The ``dynarch`` command line: ``dynarch run CONFIG``, ``dynarch resume RUN_DIR``,
``dynarch inspect RUN_DIR``,
``dynarch ladder CONFIG --densities ...`` (:mod:`dynarch.ladder`) and ``dynarch rescue
CONFIG`` (:mod:`dynarch.rescue`). Each override needs its own ``--set KEY=VALUE``.

Exit codes: 0 done; 2 a problem the user can fix, found before anything trains (a bad
config, override, option or path, a run directory that is taken or not writable, a growth
section that could never grow the model), printed as one ``Error:`` line without a
traceback; 1 missing or damaged data files.

``run`` validates the whole config before anything trains, then writes a run directory::

    <run_dir>/config.json      the validated config
    <run_dir>/metrics.jsonl    training and evaluation lines (the trainer)
    <run_dir>/events.jsonl     one structural event per line
    <run_dir>/checkpoint/      the final model and optimizer (dynarch.checkpoint); with
                               train.checkpoint_every: N, also saved every N epochs, and
                               `dynarch resume <run_dir>` continues an interrupted run
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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import click

from ._cli_files import _read_json, _read_lines
from ._engine import count_params
from .config import ConfigError, load_config, validate_config
from .data import DataCorruptError, DataNotFoundError
from .report import RUN_FILES as RUN_FILES
from .report import (
    UsageProblem,
    _events_table,
    _layers_table,
    _pct,
    _stopped_line,
    active_params,
    config_lines,
    mask_counts,
)
from .report import event_rows as event_rows
from .report import format_table as format_table
from .rescue import METHODS as RESCUE_METHODS
from .runner import RewireFromStart as RewireFromStart
from .runner import SparsifyAtStart as SparsifyAtStart
from .runner import _load_data as _load_data
from .runner import _splits as _splits
from .runner import execute, resume

__all__ = ["execute", "inspect_run", "main"]


def inspect_run(run_dir: str | Path) -> str:
    """The report ``dynarch inspect`` prints for a run directory.

    Example:
        >>> inspect_run("/nonexistent")
        Traceback (most recent call last):
        ...
        dynarch.report.UsageProblem: '/nonexistent' is not a run directory: it does not exist
    """
    root = Path(run_dir)
    if root.is_file():
        raise UsageProblem(
            f"{str(root)!r} is a file, not a run directory (give the directory `dynarch run` "
            "wrote, e.g. runs/demo-20250101-120000)"
        )
    if not root.is_dir():
        raise UsageProblem(f"{str(root)!r} is not a run directory: it does not exist")
    from .checkpoint import load, recover
    from .models import layer_widths

    recover(root / "checkpoint")  # a save interrupted between its renames
    missing = [name for name in RUN_FILES if not (root / name).exists()]
    kind = next((k for k in ("ladder", "rescue") if (root / f"{k}.json").is_file()), None)
    if missing and kind is not None:  # a directory of runs: point at them
        runs = sorted(p.name for p in (root / "runs").glob("*") if p.is_dir())
        raise UsageProblem(
            f"{str(root)!r} is a {kind} directory ({kind}.md has its table); inspect one of its "
            f"runs: {', '.join(str(root / 'runs' / r) for r in runs[:3])}"
            + (f" ({len(runs)} in all)" if len(runs) > 3 else "")
        )
    if missing:
        raise UsageProblem(
            f"{str(root)!r} is not a run directory: missing {', '.join(missing)} "
            "(a run directory is written by `dynarch run`)"
        )
    cfg = validate_config(_read_json(root / "config.json"), source="config.json")
    ckpt = load(root / "checkpoint")
    model = ckpt.model
    summary_path = root / "summary.json"
    summary = _read_json(summary_path) if summary_path.exists() else {}
    unfinished = (
        []
        if summary
        else [
            f"status          not finished (no summary.json): the model below is the last "
            f"checkpoint's, at step {ckpt.step}; the metrics and events may go further; "
            f"`dynarch resume {root}` continues the run"
        ]
    )
    metrics = _read_lines(root / "metrics.jsonl")
    evals = [m for m in metrics if "val_loss" in m]
    final = evals[-1] if evals else {}
    start = summary.get("widths", {}).get("start")
    counts = mask_counts(model)
    density = {name: a / t for name, (a, t) in counts.items()}
    params = f"{count_params(model)}"
    if counts:
        active, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
        params += (
            f" ({active_params(model)} active; masks keep {active} of {total} weights, "
            f"density {active / total:.4f})"
        )
    parts = [
        f"run {root}",
        *config_lines(cfg),
        *unfinished,
        "",
        _layers_table(layer_widths(model), start, density, counts),
        f"\nparameters      {params}",
        f"final metrics   step {final.get('step', '-')}, epoch {final.get('epoch', '-')}, "
        f"val loss {final.get('val_loss', float('nan')):.4f}, "
        f"val acc {_pct(final.get('val_accuracy'))}"
        if final
        else "final metrics   none (no evaluation: train.max_steps ended the run mid-epoch)",
        *(
            [f"test acc        {_pct(test.get('val_accuracy'))} (scored once, at the end)"]
            if (test := summary.get("test"))
            else []
        ),
        *([_stopped_line(stop)] if (stop := summary.get("stopped_early")) else []),
        "",
        _events_table(event_rows(_read_lines(root / "events.jsonl"), metrics)),
    ]
    return "\n".join(parts)


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
    help="Override a config value, e.g. --set train.epochs=5; one --set per override.",
)


def _version() -> str:
    """The installed distribution's version; the package's own when it runs uninstalled
    (from a source tree on ``PYTHONPATH``)."""
    try:
        return version("dynarch")
    except PackageNotFoundError:
        from . import __version__

        return __version__


_EXTRA = {"allow_extra_args": True}  # extra arguments get a message of ours (_no_extra)


def _no_extra(ctx: click.Context) -> None:
    """Refuse leftover arguments; ``KEY=VALUE`` ones (``--set a=1 b=2``) are told that every
    override needs its own ``--set``."""
    if not ctx.args:
        return
    pairs = [a for a in ctx.args if "=" in a]
    if pairs:
        raise click.UsageError(
            f"unexpected argument {pairs[0]!r}: give each override its own --set, e.g. "
            + " ".join(f"--set {a}" for a in pairs),
            ctx,
        )
    raise click.UsageError(f"unexpected extra argument(s): {' '.join(ctx.args)}", ctx)


def _run_dir(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``--run-dir`` option of a command that writes ``what``."""
    return click.option(
        "--run-dir", type=click.Path(file_okay=False, path_type=Path),
        help=f"Where to write the {what} (default: runs/<config stem>-<timestamp>).",
    )  # fmt: skip


# keys the ladder and the rescue set for each run themselves: a sparsity: section given only
# for its other keys (--set sparsity.delta_t=20) need not name a density
_PER_RUN = {"sparsity.density": 1.0}


@click.group("dynarch", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), prog_name="dynarch")
def main() -> None:
    """dynarch: neural networks that grow, prune and rewire while they train."""


@main.command(context_settings=_EXTRA)
@click.argument("config", type=click.Path(path_type=Path))
@_overrides
@_run_dir("run")
@click.option("--no-progress", is_flag=True, help="Do not show a progress bar.")
@click.pass_context
def run(
    ctx: click.Context, config: Path, overrides: tuple[str, ...], run_dir: Path | None,
    no_progress: bool,
) -> None:  # fmt: skip
    """Train the experiment described by the YAML file CONFIG."""
    _no_extra(ctx)
    with _cli_errors():
        cfg = load_config(config, overrides)
        if run_dir is not None:
            cfg.run_dir = str(run_dir)
        execute(cfg, progress=not no_progress, echo=click.echo)


@main.command("resume", context_settings=_EXTRA)
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--no-progress", is_flag=True, help="Do not show a progress bar.")
@click.pass_context
def resume_cmd(ctx: click.Context, run_dir: Path, no_progress: bool) -> None:
    """Continue the interrupted run in RUN_DIR from its last checkpoint (saved every
    train.checkpoint_every epochs) to the end its config.json sets, as if never stopped."""
    _no_extra(ctx)
    with _cli_errors():
        resume(run_dir, progress=not no_progress, echo=click.echo)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def inspect(run_dir: Path) -> None:
    """Show the config, layer widths, events and final metrics of RUN_DIR."""
    from .checkpoint import CheckpointError

    try:
        click.echo(inspect_run(run_dir))
    except (ConfigError, CheckpointError, json.JSONDecodeError) as exc:
        raise UsageProblem(f"cannot inspect {str(run_dir)!r}: {exc}") from None


@main.command(context_settings=_EXTRA)
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
@click.option("--jobs", default=1, show_default=True, help="Worker processes (one thread each).")
@_overrides
@_run_dir("ladder")
@click.option("--no-progress", is_flag=True, help="Do not show progress bars.")
@click.pass_context
def ladder(
    ctx: click.Context, config: Path, densities: str, methods: tuple[str, ...], seeds: int,
    tolerance: float, jobs: int, overrides: tuple[str, ...], run_dir: Path | None,
    no_progress: bool,
) -> None:  # fmt: skip
    """Train CONFIG's architecture at each density and report where accuracy falls off."""
    import shlex

    from .ladder import parse_densities, run_ladder

    _no_extra(ctx)
    with _cli_errors():
        dens = parse_densities(densities)
        cfg = load_config(config, overrides, defaults=_PER_RUN)
        root = Path(run_dir if run_dir is not None else str(cfg.run_dir))
        argv = ["dynarch", "ladder", str(config), "--densities", densities]
        argv += [f"--method={m}" for m in methods] + [f"--seeds={seeds}"]
        argv += [f"--tolerance={tolerance:g}"] + ([f"--jobs={jobs}"] if jobs != 1 else [])
        argv += [f"--run-dir={root}"] + [f"--set={o}" for o in overrides]
        run_ladder(
            cfg, dens, methods or ("static",), seeds=seeds, tolerance=tolerance, run_dir=root,
            command=shlex.join(argv), progress=not no_progress and jobs == 1, echo=click.echo,
            jobs=jobs,
        )  # fmt: skip


@main.command(context_settings=_EXTRA)
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--methods", default=",".join(RESCUE_METHODS), show_default=True, metavar="M1,M2,...",
    help="Which of dense, static, set, patches, tournament, widen to run (dense is required).",
)  # fmt: skip
@click.option(
    "--density",
    default=0.01,
    show_default=True,
    help="Scaffold density (distributed as the config's sparsity.distribution says).",
)
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
@click.pass_context
def rescue(
    ctx: click.Context, config: Path, methods: str, density: float, budget: float, rewire: str,
    seeds: int, jobs: int, out: Path | None, overrides: tuple[str, ...], run_dir: Path | None,
) -> None:  # fmt: skip
    """Cliff rescue: train CONFIG's model as a sub-cliff sparse scaffold with and without
    growth, against the dense model."""
    import shlex

    from .rescue import run_rescue

    _no_extra(ctx)
    with _cli_errors():
        cfg = load_config(config, overrides, defaults=_PER_RUN)
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
