"""The ``dynarch`` command line: ``dynarch run CONFIG`` and ``dynarch inspect RUN_DIR``.

``run`` validates the whole config before anything trains, then writes a run directory::

    <run_dir>/config.json      the validated config
    <run_dir>/metrics.jsonl    training and evaluation lines (the trainer)
    <run_dir>/events.jsonl     one structural event per line
    <run_dir>/checkpoint/      the final model and optimizer (dynarch.checkpoint)
    <run_dir>/summary.json     widths, parameters, final metrics, events with accuracies

Example:
    >>> from click.testing import CliRunner
    >>> CliRunner().invoke(main, ["--version"]).output.startswith("dynarch, version")
    True
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from ._engine import count_params, set_seed
from .callbacks import Callback, EarlyStopping, GrowOnPlateau
from .config import (
    ConfigError,
    RunConfig,
    build_optimizer,
    growth_targets,
    load_config,
    validate_config,
)
from .data import DataCorruptError, DataNotFoundError
from .models import build_model, layer_widths

__all__ = ["execute", "inspect_run", "main"]

RUN_FILES = ("config.json", "metrics.jsonl", "events.jsonl", "checkpoint")


class UsageProblem(click.ClickException):
    """A user-fixable problem (bad config, not a run dir): message and exit code 2, no traceback.

    Example:
        >>> UsageProblem("bad").exit_code
        2
    """

    exit_code = 2


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


# --------------------------------------------------------------------------- formatting


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; numbers are right-aligned.

    Example:
        >>> print(format_table(["layer", "width"], [["fc1", 32]]))
        layer  width
        -----  -----
        fc1       32
    """
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in rows) and bool(rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.2f}%"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def config_lines(cfg: RunConfig) -> list[str]:
    """A short human description of a run config, one aspect per line.

    Example:
        >>> config_lines(RunConfig())[0]
        'data       mnist1d (all train / all test samples)'
    """
    d, m, o, t = cfg.data, cfg.model, cfg.optimizer, cfg.train
    shape = f"hidden {m.hidden}" if m.kind == "mlp" else f"channels {m.channels}, fc {m.hidden}"
    lines = [
        f"data       {d.name} ({d.n_train or 'all'} train / {d.n_test or 'all'} test samples)",
        f"model      {m.kind}, {shape}, {m.activation}",
        f"optimizer  {o.name}, lr {o.lr:g}, weight decay {o.weight_decay:g}",
        f"train      {t.epochs} epochs, batch {t.batch_size}, seed {cfg.seed}, {cfg.device}"
        + (f", max {t.max_steps} steps" if t.max_steps else ""),
    ]
    if t.early_stopping:
        es = t.early_stopping
        lines.append(f"stopping   early on {es.monitor}, patience {es.patience}")
    if cfg.growth:
        g = cfg.growth
        lines.append(
            f"growth     widen {g.targets} x{g.factor:g} ({g.init}, noise {g.noise:g}) on a "
            f"{g.monitor} plateau (patience {g.patience}, threshold {g.threshold:g}), "
            f"max width {g.max_width or '-'}, max events {g.max_events or '-'}"
        )
    if cfg.sparsity:
        lines.append(f"sparsity   density {cfg.sparsity.density:g} ({cfg.sparsity.distribution})")
    return lines


def event_rows(events: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each event with the validation accuracy before it and at the next evaluation after it.

    Example:
        >>> ev = {"step": 10, "op": "widen", "target": "fc1", "reason": "plateau",
        ...       "params_before": 5, "params_after": 9, "details": {}}
        >>> evals = [{"step": 10, "val_accuracy": 0.5}, {"step": 20, "val_accuracy": 0.6}]
        >>> row = event_rows([ev], evals)[0]
        >>> row["acc_before"], row["acc_after"]
        (0.5, 0.6)
    """
    evals = [m for m in metrics if "val_accuracy" in m]
    rows = []
    for ev in events:
        before = [m["val_accuracy"] for m in evals if m["step"] <= ev["step"]]
        after = [m["val_accuracy"] for m in evals if m["step"] > ev["step"]]
        details = ev.get("details") or {}
        change = None
        if "old_width" in details and "new_width" in details:
            change = f"{details['old_width']}->{details['new_width']}"
        layers = [v for v in details.values() if isinstance(v, dict) and "active" in v]
        if layers:
            active, total = (sum(v[k] for v in layers) for k in ("active", "total"))
            change = f"density {active / max(total, 1):.3f}"
        row = {k: ev[k] for k in ("step", "op", "target", "params_before", "params_after")}
        row |= {"change": change, "reason": ev.get("reason") or None}
        row |= {
            "acc_before": before[-1] if before else None,
            "acc_after": after[0] if after else None,
        }
        rows.append(row)
    return rows


def _events_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no structural events"
    headers = ["step", "op", "target", "change", "trigger", "params", "val acc before", "after"]
    return format_table(
        headers,
        [
            [
                r["step"], r["op"], r["target"], r["change"], r["reason"],
                f"{r['params_before']} -> {r['params_after']}",
                _pct(r["acc_before"]), _pct(r["acc_after"]),
            ]
            for r in rows
        ],
    )  # fmt: skip


def _layers_table(
    end: dict[str, int], start: dict[str, int] | None, density: dict[str, float]
) -> str:
    headers = ["layer", *(["width at start"] if start is not None else []), "width"]
    headers += ["density"] if density else []
    rows = []
    for name, width in end.items():
        row: list[Any] = [name]
        if start is not None:
            row.append(start.get(name))
        row.append(width)
        if density:
            row.append(f"{density[name]:.3f}" if name in density else "dense")
        rows.append(row)
    return format_table(headers, rows)


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
    return data


def execute(
    cfg: RunConfig, *, progress: bool = True, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the experiment ``cfg`` describes; returns (and writes) its ``summary.json``.

    Everything that can be checked is checked before the run directory is created.

    Example:
        >>> cfg = validate_config({"data": {"n_train": 256, "n_test": 128},
        ...                        "train": {"epochs": 1}, "run_dir": "/tmp/dynarch-doc"})
        >>> import shutil; shutil.rmtree("/tmp/dynarch-doc", ignore_errors=True)
        >>> execute(cfg, progress=False, echo=lambda s: None)["steps"]
        2
    """
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
    callbacks: list[Callback] = []
    if cfg.sparsity is not None:
        callbacks.append(SparsifyAtStart(cfg.sparsity.density, cfg.sparsity.distribution))
    if cfg.growth is not None:
        g = cfg.growth
        callbacks.append(
            GrowOnPlateau(
                growth_targets(g, model), monitor=g.monitor, mode=g.mode, patience=g.patience,
                threshold=g.threshold, factor=g.factor, max_width=g.max_width, init=g.init,
                noise=g.noise, max_events=g.max_events, cooldown=g.cooldown,
            )
        )  # fmt: skip
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
            model, optimizer, data, epochs=t.epochs, max_steps=t.max_steps,
            batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, callbacks=callbacks,
            run_dir=run_dir, device=cfg.device, seed=cfg.seed, progress=progress,
            log_every=t.log_every, eval_every_epochs=t.eval_every_epochs,
        ).fit()  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    _save_checkpoint(run_dir / "checkpoint", trainer, cfg)
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
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
        "params": {"start": params_start, "end": count_params(trainer.model)},
        "widths": {"start": widths_start, "end": layer_widths(trainer.model)},
        "density": _density(trainer.model),
        "final": evals[-1] if evals else {},
        "best": dict(trainer.best),
        "events": event_rows(_read_jsonl(run_dir / "events.jsonl"), metrics),
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(_summary_text(summary))
    return summary


def _save_checkpoint(path: Path, trainer: Any, cfg: RunConfig) -> None:
    from .checkpoint import save

    config = cfg.model_dump(mode="json")
    save(path, trainer.model, trainer.optimizer, trainer=trainer.state_dict(), config=config)


def _density(model: nn.Module) -> dict[str, float]:
    from .masks import layer_density

    return layer_density(model)


def _summary_text(s: dict[str, Any]) -> str:
    final = s["final"]
    p = s["params"]
    lines = [
        _layers_table(s["widths"]["end"], s["widths"]["start"], s["density"]),
        "",
        f"parameters      {p['start']} -> {p['end']}",
        f"final val acc   {_pct(final.get('val_accuracy'))} "
        f"(val loss {final.get('val_loss', float('nan')):.4f}, step {final.get('step', '-')})",
        f"best val acc    {_pct(s['best'].get('val_accuracy'))}",
        f"trained         {s['steps']} steps in {s['seconds']:.1f} s",
        "",
        _events_table(s["events"]),
        "",
        f"run dir: {s['run_dir']}",
    ]
    return "\n".join(lines)


def inspect_run(run_dir: str | Path) -> str:
    """The report ``dynarch inspect`` prints for a run directory.

    Example:
        >>> inspect_run("/nonexistent")
        Traceback (most recent call last):
        ...
        dynarch.cli.UsageProblem: '/nonexistent' is not a run directory: it does not exist
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageProblem(f"{str(root)!r} is not a run directory: it does not exist")
    missing = [name for name in RUN_FILES if not (root / name).exists()]
    if missing:
        raise UsageProblem(
            f"{str(root)!r} is not a run directory: missing {', '.join(missing)} "
            "(a run directory is written by `dynarch run`)"
        )
    from .checkpoint import load

    cfg = validate_config(json.loads((root / "config.json").read_text()), source="config.json")
    model = load(root / "checkpoint").model
    summary_path = root / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    metrics = _read_jsonl(root / "metrics.jsonl")
    evals = [m for m in metrics if "val_loss" in m]
    final = evals[-1] if evals else {}
    start = summary.get("widths", {}).get("start")
    parts = [
        f"run {root}",
        *config_lines(cfg),
        "",
        _layers_table(layer_widths(model), start, _density(model)),
        f"\nparameters      {count_params(model)}",
        f"final metrics   step {final.get('step', '-')}, epoch {final.get('epoch', '-')}, "
        f"val loss {final.get('val_loss', float('nan')):.4f}, "
        f"val acc {_pct(final.get('val_accuracy'))}",
        "",
        _events_table(event_rows(_read_jsonl(root / "events.jsonl"), metrics)),
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------------- click


@click.group("dynarch", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("dynarch"), prog_name="dynarch")
def main() -> None:
    """dynarch: neural networks that grow, prune and rewire while they train."""


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config value, e.g. --set optimizer.lr=0.01 (repeatable).",
)  # fmt: skip
@click.option(
    "--run-dir", type=click.Path(file_okay=False, path_type=Path),
    help="Where to write the run (default: runs/<config stem>-<timestamp>).",
)  # fmt: skip
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


if __name__ == "__main__":
    main()
