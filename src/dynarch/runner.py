"""Running one experiment from a validated config: ``execute(cfg)`` (what ``dynarch run``,
``dynarch ladder`` and ``dynarch rescue`` do for each run).

It loads the data (with an optional validation split), builds the model and optimizer,
adds the callbacks the config asks for (masks and rewiring, growth policies, a cosine
schedule, early stopping), trains with :class:`~dynarch.train.Trainer`, and writes the run
directory: ``config.json``, ``metrics.jsonl``, ``events.jsonl``, ``checkpoint/``,
``summary.json`` and, for sparse runs, the plots. With ``train.checkpoint_every`` it also
saves a resumable checkpoint every N epochs (:class:`EpochCheckpoint`), from which
``resume(run_dir)`` (``dynarch resume``) continues an interrupted run exactly.
"""

from __future__ import annotations

import json
import os
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
from .policies import check_sparsity
from .report import config_lines, event_rows, read_jsonl, summary_text
from .run_callbacks import RewireFromStart, SparsifyAtStart, sparsity_callbacks

__all__ = [
    "EpochCheckpoint", "RewireFromStart", "SparsifyAtStart", "execute", "idle_settings",
    "make_run_dir", "resume",
]  # fmt: skip


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
    if d.normalize:
        n_fit = len(data.train_y) - d.n_val
        if n_fit < 2:
            raise ConfigError(
                f"data.normalize: the training split has {n_fit} sample (after data.n_val "
                f"{d.n_val}); standardising needs at least 2, so use a smaller data.n_val"
            )
        try:
            data = data.standardize(n_fit=n_fit)
        except ValueError as exc:
            raise ConfigError(f"data.normalize: {exc}") from None
    return data


def _splits(cfg: RunConfig, data: Any) -> tuple[Any, Any]:
    """(training data, evaluation data during training): with ``data.n_val`` the last
    ``n_val`` training samples are the evaluation set; otherwise the test set."""
    n = cfg.data.n_val
    if not n:
        return data, None
    x, y = data.train_x, data.train_y
    return (x[:-n], y[:-n]), (x[-n:], y[-n:])


class EpochCheckpoint(Callback):
    """Save a resumable checkpoint (model, optimizer, trainer and callback states, RNG states)
    to ``path`` atomically at the end of every ``every``-th epoch (``train.checkpoint_every``);
    the last callback of a run, so every other callback's epoch end is in it. It records the
    line counts of ``metrics.jsonl``/``events.jsonl`` (a resume cuts anything written later)
    and ``run`` (facts fixed at the start: dense parameter count, widths, ...).

    Example:
        >>> cb = EpochCheckpoint(2, Path("/tmp/run/checkpoint"), {}, {})
    """

    def __init__(self, every: int, path: Path, config: dict[str, Any], run: dict[str, Any]) -> None:
        self.every, self.path, self.config, self.run = every, path, config, run

    def on_epoch_end(self, trainer: Any) -> None:
        done = trainer.epoch + 1
        if done % self.every or done >= trainer.epochs or trainer.should_stop:
            return  # the run ends now: the final checkpoint follows
        state = trainer.state_dict()
        state.update(epoch=done, batch_in_epoch=0)  # where the next epoch starts
        _save_checkpoint(self.path, trainer, self.config, self.run, state)


def _callbacks(
    cfg: RunConfig, model: Any, data: Any, run: dict[str, Any], fresh: bool
) -> tuple[list[Callback], EarlyStopping | None]:
    """The run's callbacks (the checkpoint one excepted); ``run["generator"]`` is the engine
    generator state they were first built with (the tournament draws its batch from it)."""
    from ._engine import engine_state

    callbacks = sparsity_callbacks(cfg)
    train_data, eval_data = _splits(cfg, data)
    if cfg.growth is not None:
        from .policies import check_growth, growth_callbacks

        if fresh:
            check_growth(cfg, model)
        train_pair = train_data if eval_data is not None else (data.train_x, data.train_y)
        gen = engine_state(model).generator
        now = gen.get_state()
        gen.set_state(run["generator"].cpu())  # a checkpoint loaded on cuda moved it
        try:
            # resumed: a fractional budget stays a fraction of the dense count it started with
            extra = {} if fresh else {"dense_params": run["dense_params"]}
            callbacks += growth_callbacks(cfg.growth, model, train_pair, **extra)
        finally:
            if not fresh:
                gen.set_state(now)
    if cfg.optimizer.schedule == "cosine":
        callbacks.append(CosineLR())
    stopper = None
    if (es := cfg.train.early_stopping) is not None:
        stopper = EarlyStopping(es.monitor, patience=es.patience, min_delta=es.min_delta,
                                mode=es.mode)  # fmt: skip
        callbacks.append(stopper)
    return callbacks, stopper


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
    ``train.checkpoint_every`` saves a checkpoint :func:`resume` continues from.

    Example:
        >>> from dynarch.config import validate_config
        >>> cfg = validate_config({"data": {"n_train": 256, "n_test": 128},
        ...                        "train": {"epochs": 1}, "run_dir": "/tmp/dynarch-doc"})
        >>> import shutil; shutil.rmtree("/tmp/dynarch-doc", ignore_errors=True)
        >>> execute(cfg, progress=False, echo=lambda s: None)["steps"]
        2
    """
    from ._engine import engine_state

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
    check_sparsity(cfg, model)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    run = {
        "dense_params": count_params(model), "widths": layer_widths(model),
        "generator": engine_state(model).generator.get_state(),
    }  # fmt: skip
    callbacks, stopper = _callbacks(cfg, model, data, run, fresh=True)
    config_json = json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n"
    make_run_dir(run_dir, "run_dir")
    (run_dir / "config.json").write_text(config_json)
    echo("\n".join(config_lines(cfg)))
    n_train = len(data.train_y) - cfg.data.n_val  # the training split
    batches = -(-n_train // cfg.train.batch_size)
    for line in idle_settings(cfg, batches):
        echo(f"note       {line}")
    echo(f"run dir    {run_dir}\n")
    return _train(cfg, data, model, optimizer, callbacks, stopper, run, None, echo, plots,
                  progress)  # fmt: skip


def resume(
    run_dir: str | Path,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    plots: bool = True,
) -> dict[str, Any]:
    """Continue the interrupted run in ``run_dir`` from its checkpoint (``dynarch resume``)
    to the end its ``config.json`` sets, exactly as if it had not stopped: lines written
    after the checkpoint are cut from ``metrics.jsonl``/``events.jsonl``, then appended anew;
    returns (and writes) ``summary.json``.

    Example:
        >>> resume("/nonexistent")
        Traceback (most recent call last):
        ...
        dynarch.config.ConfigError: cannot resume '/nonexistent': the directory does not exist
    """
    from .checkpoint import CheckpointError, load, recover
    from .config import validate_config

    root = Path(run_dir)
    what = f"cannot resume {str(root)!r}"
    if root.is_file():
        raise ConfigError(f"{what}: it is a file; give the run directory `dynarch run` wrote")
    if not root.is_dir():
        raise ConfigError(f"{what}: the directory does not exist")
    if not (root / "config.json").is_file():
        raise ConfigError(f"{what}: no config.json (give a directory `dynarch run` wrote)")
    if (root / "summary.json").is_file() and _complete_summary(root / "summary.json"):
        raise ConfigError(f"{what}: the run is complete (summary.json exists); nothing to resume")
    if not recover(root / "checkpoint"):  # (a save interrupted between its renames)
        raise ConfigError(
            f"{what}: it has no checkpoint/ (the run stopped before its first one; "
            "set train.checkpoint_every to save them during a run)"
        )
    try:
        cfg = validate_config(json.loads((root / "config.json").read_text()))
    except (ConfigError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what}: its config.json no longer validates: {exc}") from None
    cfg.run_dir = str(root)
    try:
        ck = load(root / "checkpoint")
    except CheckpointError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    if not {"trainer", "run"} <= set(ck.state):
        raise ConfigError(f"{what}: its checkpoint was not saved by `dynarch run`")
    data = _load_data(cfg, progress)
    optimizer = ck.load_optimizer(build_optimizer(cfg.optimizer, ck.param_groups()))
    run = ck.state["run"]
    callbacks, stopper = _callbacks(cfg, ck.model, data, run, fresh=False)
    for name, n in run["lines"].items():  # cut lines written after the checkpoint
        path = root / f"{name}.jsonl"
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        path.write_text("".join(lines[:n]))
    echo("\n".join(config_lines(cfg)))
    echo(f"resuming   {root} at epoch {ck.state['trainer']['epoch']}, step {ck.step}\n")
    return _train(cfg, data, ck.model, optimizer, callbacks, stopper, run, ck, echo, plots,
                  progress)  # fmt: skip


def _train(
    cfg: RunConfig, data: Any, model: Any, optimizer: torch.optim.Optimizer,
    callbacks: list[Callback], stopper: EarlyStopping | None, run: dict[str, Any],
    ck: Any, echo: Callable[[str], None], plots: bool, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """Train (from the start, or from checkpoint ``ck``), then write the summary."""
    from .masks import layer_density
    from .train import Trainer

    run_dir = Path(str(cfg.run_dir))
    config = cfg.model_dump(mode="json")
    t = cfg.train
    if t.checkpoint_every is not None:
        callbacks = [*callbacks, EpochCheckpoint(t.checkpoint_every, run_dir / "checkpoint",
                                                 config, run)]  # fmt: skip
    train_data, eval_data = _splits(cfg, data)
    started, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        trainer = Trainer(
            model, optimizer, train_data, eval=eval_data, epochs=t.epochs, max_steps=t.max_steps,
            batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, callbacks=callbacks,
            run_dir=run_dir, device=cfg.device, seed=cfg.seed, progress=progress,
            log_every=t.log_every, eval_every_epochs=t.eval_every_epochs,
        )  # fmt: skip
        if ck is not None:
            trainer.load_state_dict(ck.state["trainer"])
            ck.restore_rng()
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    # with a validation split, the test set is scored once, after training
    test = trainer.evaluate((data.test_x, data.test_y)) if eval_data is not None else None
    _save_checkpoint(run_dir / "checkpoint", trainer, config, run, trainer.state_dict())
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
            "start": run["dense_params"], "end": count_params(trainer.model),
            "active": report.active_params(trainer.model),
            "weights": report.active_weights(trainer.model),
        },
        "widths": {"start": run["widths"], "end": layer_widths(trainer.model)},
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
    if ck is not None:
        summary["resumed"] = {"epoch": ck.state["trainer"]["epoch"], "step": ck.step}
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if plots and summary["density"]:
        from .plots import MaskSnapshots, write_run_plots

        for cb in callbacks:
            if isinstance(cb, MaskSnapshots):
                cb.write(run_dir / "masks")
        write_run_plots(run_dir)
    echo(summary_text(summary))
    return summary


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one,
    never a torn one (temporary file, fsync, ``os.replace``).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "summary.json"
        >>> write_atomic(path, "{}\\n")
        >>> path.read_text(), [p.name for p in path.parent.iterdir()]
        ('{}\\n', ['summary.json'])
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _complete_summary(path: Path) -> bool:
    """Whether ``summary.json`` is whole (a JSON object); one torn by an interrupted write
    (before writes were atomic) does not mark the run complete."""
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


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
        >>> cfg = validate_config({"sparsity": {"density": 0.5, "delta_t": 50}})
        >>> idle_settings(cfg, 30)[0].split(";")[0]
        'sparsity.delta_t: no effect, as sparsity.algorithm is static (the mask is never rewired)'
    """
    t, notes = cfg.train, []
    steps = t.epochs * batches if t.max_steps is None else min(t.epochs * batches, t.max_steps)
    epochs = t.epochs if t.max_steps is None else min(t.epochs, t.max_steps // batches)
    evals = sum((e + 1) % t.eval_every_epochs == 0 or e + 1 == t.epochs for e in range(epochs))
    sp = cfg.sparsity
    rewiring = ("delta_t", "drop_fraction", "t_end", "anneal", "regrow_init")
    unused = [k for k in rewiring if sp is not None and k in sp.model_fields_set]
    if sp is not None and sp.algorithm == "static" and unused:
        notes.append(
            f"sparsity.{', sparsity.'.join(unused)}: no effect, as sparsity.algorithm is static "
            "(the mask is never rewired); set it to set, deep_r, rigl or snfs to rewire"
        )
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


def _save_checkpoint(
    path: Path, trainer: Any, config: dict[str, Any], run: dict[str, Any],
    state: dict[str, Any],
) -> None:  # fmt: skip
    """A resumable checkpoint: ``state`` is the trainer state to resume from."""
    from .checkpoint import save

    lines = {}
    for name in ("metrics", "events"):
        file = trainer.run_dir / f"{name}.jsonl"
        lines[name] = len(file.read_text().splitlines()) if file.exists() else 0
    save(path, trainer.model, trainer.optimizer, trainer=state, config=config,
         run={**run, "lines": lines})  # fmt: skip
