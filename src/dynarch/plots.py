"""Plots of sparse runs as PNG files: mask heatmaps, mask differences, density and rewiring.

* :class:`MaskSnapshots` (a training callback) writes ``masks/<layer>-step<k>.png`` heatmaps
  at chosen steps and ``masks/<layer>-diff-<a>-<b>.png`` images of what changed in between
  (kept / removed / added connections in the colours of :data:`COLORS`);
* :func:`plot_density` and :func:`plot_rewiring` draw the per-layer density and the
  connections changed per mask update from the events of ``events.jsonl``;
* :func:`write_run_plots` writes every plot a run directory supports.

Figures are :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas: no display
and no pyplot state are involved, and each figure is freed once written. The mask images
(:func:`block_average`, :func:`diff_rgb`, :func:`save_mask_png`, :func:`save_diff_png`) come
from ``dynarch._images``.

Example:
    >>> ev = {"step": 0, "op": "sparsify", "details": {"fc": {"density": 0.5}}}
    >>> density_series([ev])
    {'fc': ([0], [0.5])}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from ._images import (
    COLORS,
    as_matrix,
    block_average,
    diff_rgb,
    save_diff_png,
    save_figure,
    save_mask_png,
)
from .callbacks import Callback
from .masks import masked_modules
from .triggers import check_state

if TYPE_CHECKING:
    from .train import Trainer

__all__ = [
    "COLORS", "MASK_OPS", "MaskSnapshots", "as_matrix", "block_average", "density_series",
    "diff_rgb", "plot_density", "plot_rewiring", "rewiring_series", "save_diff_png",
    "save_mask_png", "write_run_plots",
]  # fmt: skip

MASK_OPS = ("sparsify", "rewire", "prune")
"""Event ops whose per-layer details describe masks."""

Events = str | Path | Sequence[dict[str, Any]]


def _mask(module: torch.nn.Module) -> Tensor:
    mask = module._buffers["weight_mask"]
    assert mask is not None
    return mask


class MaskSnapshots(Callback):
    """Keep the masks of every masked layer at chosen steps and draw them as PNG files.

    Choose the steps with exactly one of ``steps`` (a list; 0 is before the first step),
    ``every`` (steps 0, N, 2N, ...) or ``count`` (that many, evenly spaced from step 0 to the
    planned last step). The end of training is always included. Each snapshot is stored in
    :attr:`snapshots` (``{step: {layer: bool CPU tensor}}``) and, when ``out_dir`` is given
    or the trainer has a ``run_dir`` (then ``<run_dir>/masks``), drawn as
    ``<layer>-step<k>.png`` plus ``<layer>-diff-<a>-<b>.png`` against the previous snapshot.
    With ``draw=False`` nothing is drawn during training (which then times training alone);
    :meth:`write` draws everything afterwards.

    Example:
        >>> snaps = MaskSnapshots(count=5)
    """

    def __init__(
        self,
        steps: Sequence[int] | None = None,
        *,
        every: int | None = None,
        count: int | None = None,
        out_dir: str | Path | None = None,
        max_size: int = 256,
        diffs: bool = True,
        draw: bool = True,
    ) -> None:
        if sum(x is not None for x in (steps, every, count)) != 1:
            raise ValueError(
                f"MaskSnapshots needs exactly one of steps, every or count; got steps={steps!r}, "
                f"every={every!r}, count={count!r}"
            )
        if steps is not None and (
            isinstance(steps, str)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps)
        ):
            raise ValueError(f"steps must be a list of ints >= 0, got {steps!r}")
        for name, value, low in (("every", every, 1), ("count", count, 2)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < low):  # fmt: skip
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        block_average(torch.zeros(1, 1), max_size)  # validates max_size
        self.steps, self.every, self.count = steps, every, count
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.max_size, self.diffs, self.draw = max_size, diffs, draw
        self.snapshots: dict[int, dict[str, Tensor]] = {}
        self.files: list[Path] = []
        self._planned: set[int] = set(steps or ())
        self._dir: Path | None = self.out_dir

    def on_fit_start(self, trainer: Trainer) -> None:
        if self._dir is None and trainer.run_dir is not None:
            self._dir = trainer.run_dir / "masks"
        if self.count is not None:
            last = trainer.epochs * trainer.batches_per_epoch
            if trainer.max_steps is not None:
                last = min(last, trainer.max_steps)
            self._planned = {round(i * last / (self.count - 1)) for i in range(self.count)}
        if trainer.step == 0 and (self.every is not None or 0 in self._planned):
            self.take(trainer)

    def on_step_end(self, trainer: Trainer) -> None:
        step = trainer.step
        if step in self._planned or (self.every is not None and step % self.every == 0):
            self.take(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.step not in self.snapshots:
            self.take(trainer)

    def take(self, trainer: Trainer) -> dict[str, Tensor]:
        """Store the masks now, at ``trainer.step`` (and draw them, with ``draw``)."""
        step = trainer.step
        masks = {
            name: _mask(module).detach().to("cpu", copy=True)
            for name, module in masked_modules(trainer.model).items()
        }
        if masks:
            self.snapshots[step] = masks
            if self.draw and self._dir is not None:
                self.files += self._draw_step(step, self._dir)
        return masks

    def write(self, out_dir: str | Path) -> list[Path]:
        """Draw every stored snapshot (and the differences) into ``out_dir`` now.

        Example:
            >>> MaskSnapshots(count=2).write("/tmp/none-taken")
            []
        """
        files = [f for step in sorted(self.snapshots) for f in self._draw_step(step, Path(out_dir))]
        self.files += files
        return files

    def _draw_step(self, step: int, out: Path) -> list[Path]:
        previous = max((s for s in self.snapshots if s < step), default=None)
        old_masks = {} if previous is None else self.snapshots[previous]
        files = []
        for name, mask in self.snapshots[step].items():
            title = f"{name} step {step}"
            files.append(save_mask_png(mask, out / f"{name}-step{step}.png", title=title,
                                       max_size=self.max_size))  # fmt: skip
            old = old_masks.get(name)
            if self.diffs and old is not None and old.shape == mask.shape:
                path = out / f"{name}-diff-{previous}-{step}.png"
                title = f"{name} step {previous} -> {step}"
                files.append(save_diff_png(old, mask, path, title=title, max_size=self.max_size))
        return files

    def state_dict(self) -> dict[str, Any]:
        """Every snapshot's masks (bool tensors), so a resumed run draws them all."""
        last = max(self.snapshots, default=-1)
        return {"taken": sorted(self.snapshots), "last_step": last,
                "last": dict(self.snapshots.get(last, {})),
                "masks": {s: dict(m) for s, m in self.snapshots.items()}}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"taken", "last_step", "last"}
        if isinstance(state, dict) and "masks" in state:
            keys.add("masks")  # a state of an older version holds the last snapshot only
        check_state("MaskSnapshots", state, keys)
        self.snapshots = {int(s): {} for s in state["taken"]}
        if state["last_step"] >= 0:
            self.snapshots[int(state["last_step"])] = dict(state["last"])
        for s, masks in state.get("masks", {}).items():
            self.snapshots[int(s)] = dict(masks)


# ------------------------------------------------------------------------ event plots


def _events(events: Events) -> list[dict[str, Any]]:
    if isinstance(events, str | Path):
        from .report import read_jsonl

        return read_jsonl(Path(events))
    return list(events)


def _layer_details(ev: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if ev.get("op") not in MASK_OPS:
        return {}
    details = ev.get("details") or {}
    return {k: v for k, v in details.items() if isinstance(v, dict)}


def density_series(events: Events) -> dict[str, tuple[list[int], list[float]]]:
    """Per layer, the steps of mask events and the layer's density after each.

    Example:
        >>> ev = {"step": 0, "op": "sparsify", "details": {"fc": {"density": 0.5}}}
        >>> density_series([ev, {**ev, "op": "rewire", "step": 9}])
        {'fc': ([0, 9], [0.5, 0.5])}
    """
    series: dict[str, tuple[list[int], list[float]]] = {}
    for ev in _events(events):
        for layer, d in _layer_details(ev).items():
            if "density" in d:
                steps, values = series.setdefault(layer, ([], []))
                steps.append(int(ev["step"]))
                values.append(float(d["density"]))
    return series


def rewiring_series(events: Events) -> dict[str, tuple[list[int], list[int]]]:
    """Per layer, the steps of mask updates and the connections changed (dropped + regrown).

    Example:
        >>> ev = {"step": 100, "op": "rewire", "details": {"fc": {"dropped": 3, "regrown": 3}}}
        >>> rewiring_series([ev])
        {'fc': ([100], [6])}
    """
    series: dict[str, tuple[list[int], list[int]]] = {}
    for ev in _events(events):
        for layer, d in _layer_details(ev).items():
            if "dropped" in d or "regrown" in d:
                steps, values = series.setdefault(layer, ([], []))
                steps.append(int(ev["step"]))
                values.append(int(d.get("dropped", 0)) + int(d.get("regrown", 0)))
    return series


def _line_plot(
    series: dict[str, tuple[list[int], list[Any]]], out_png: str | Path, ylabel: str,
    title: str, total: bool = False,
) -> Path:  # fmt: skip
    """Lines per layer; a density holds between events (a step line), an update count is
    one point per update (``total``: plus the sum over layers)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    style = "default" if total else "steps-post"
    for layer, (steps, values) in series.items():
        ax.plot(steps, values, marker="o", markersize=3, drawstyle=style, label=layer)
    if not total:
        ax.set_ylim(0, 1.05)
    if total and len(series) > 1:
        sums: dict[int, int] = {}
        for steps, values in series.values():
            for s, v in zip(steps, values):
                sums[s] = sums.get(s, 0) + v
        ax.plot(sorted(sums), [sums[s] for s in sorted(sums)], color="black", linestyle="--",
                marker="o", markersize=3, label="all layers")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, out_png)


def plot_density(events_jsonl: Events, out_png: str | Path) -> Path:
    """Draw each layer's density over the steps of the mask events (``events.jsonl`` path or
    event dicts).

    Example:
        >>> import tempfile
        >>> ev = {"step": 0, "op": "sparsify", "details": {"fc": {"density": 0.5}}}
        >>> plot_density([ev], tempfile.mkdtemp() + "/density.png").name
        'density.png'
    """
    series = density_series(events_jsonl)
    if not series:
        raise ValueError(
            f"no {'/'.join(MASK_OPS)} event with a per-layer density in {_source(events_jsonl)}; "
            "the run has no masks"
        )
    return _line_plot(series, out_png, "density (active fraction)", "density per layer")


def plot_rewiring(events_jsonl: Events, out_png: str | Path) -> Path:
    """Draw the connections changed (dropped + regrown) per mask update, per layer and in all.

    Example:
        >>> import tempfile
        >>> ev = {"step": 100, "op": "rewire", "details": {"fc": {"dropped": 3, "regrown": 3}}}
        >>> plot_rewiring([ev], tempfile.mkdtemp() + "/rewiring.png").name
        'rewiring.png'
    """
    series = rewiring_series(events_jsonl)
    if not series:
        raise ValueError(
            f"no mask update with dropped/regrown counts in {_source(events_jsonl)}; "
            "the masks were never rewired"
        )
    return _line_plot(
        series, out_png, "connections changed (dropped + regrown)", "rewiring per update",
        total=True,
    )  # fmt: skip


def _source(events: Events) -> str:
    return repr(str(events)) if isinstance(events, str | Path) else "the events given"


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """Write every plot a run directory supports; returns the files written (none if dense).

    ``density.png`` and ``rewiring.png`` come from ``events.jsonl``; when ``masks/`` holds
    no heatmap yet (no :class:`MaskSnapshots` ran), the final masks of ``checkpoint/`` are
    drawn as ``masks/<layer>-final.png``.

    Example:
        >>> write_run_plots("/nonexistent")
        Traceback (most recent call last):
        ...
        ValueError: '/nonexistent' is not a run directory: it has no events.jsonl
    """
    root = Path(run_dir)
    if not (root / "events.jsonl").is_file():
        raise ValueError(f"{str(root)!r} is not a run directory: it has no events.jsonl")
    events = _events(root / "events.jsonl")
    written = []
    if density_series(events):
        written.append(plot_density(events, root / "density.png"))
    if rewiring_series(events):
        written.append(plot_rewiring(events, root / "rewiring.png"))
    masks_dir = root / "masks"
    if written and (root / "checkpoint").is_dir() and not any(masks_dir.glob("*.png")):
        from .checkpoint import load

        model = load(root / "checkpoint").model
        for name, module in masked_modules(model).items():
            written.append(save_mask_png(_mask(module), masks_dir / f"{name}-final.png",
                                         title=f"{name} final"))  # fmt: skip
    return written
