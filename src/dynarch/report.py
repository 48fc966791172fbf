"""Plain-text reports of runs: the tables ``dynarch run`` prints and ``dynarch inspect``.

Everything here reads a config, ``summary.json`` or a run directory and returns text; nothing
trains. :func:`dynarch.cli.inspect_run` puts them together for ``dynarch inspect``.

Example:
    >>> print(format_table(["op", "step"], [["widen", 120], ["prune", 80]]))
    op     step
    -----  ----
    widen   120
    prune    80
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from ._engine import count_params
from .config import RunConfig

__all__ = [
    "RUN_FILES",
    "UsageProblem",
    "active_params",
    "config_lines",
    "event_rows",
    "format_table",
    "mask_counts",
    "read_jsonl",
    "summary_text",
]

RUN_FILES = ("config.json", "metrics.jsonl", "events.jsonl", "checkpoint")
"""The files and folder whose presence makes a directory a run directory."""


class UsageProblem(click.ClickException):
    """A user-fixable problem (bad config, not a run dir): message and exit code 2, no traceback.

    Example:
        >>> UsageProblem("bad").exit_code
        2
    """

    exit_code = 2


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; numbers are right-aligned (``None`` cells print as ``-``).

    Example:
        >>> print(format_table(["layer", "width"], [["fc1", 32]]))
        layer  width
        -----  -----
        fc1       32
    """
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        any(r[i] is not None for r in rows) and all(r[i] is None or _is_number(r[i]) for r in rows)
        for i in range(len(headers))
    ]

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def _is_number(value: Any) -> bool:
    """True for ints and floats (right-aligned in tables), False for bools and the rest."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _pct(value: float | None) -> str | None:
    """``0.5`` -> ``"50.00%"``; None stays None (a table shows it as ``-``)."""
    return None if value is None else f"{100 * value:.2f}%"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file (``metrics.jsonl``, ``events.jsonl``), in order.

    Blank lines are skipped.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "metrics.jsonl"
        >>> _ = path.write_text('{"step": 1}\\n\\n{"step": 2}\\n')
        >>> read_jsonl(path)
        [{'step': 1}, {'step': 2}]
    """
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
        f"data       {d.name} ({d.n_train or 'all'} train / {d.n_test or 'all'} test samples"
        + (f"; the last {d.n_val} training samples are the validation split" if d.n_val else "")
        + ("; inputs standardised)" if d.normalize else ")"),
        f"model      {m.kind}, {shape}, {m.activation}",
        f"optimizer  {o.name}, lr {o.lr:g}"
        + (" (cosine decay per step)" if o.schedule == "cosine" else "")
        + f", weight decay {o.weight_decay:g}",
        f"train      {t.epochs} epochs, batch {t.batch_size}, seed {cfg.seed}, {cfg.device}"
        + (f", max {t.max_steps} steps" if t.max_steps else ""),
    ]
    if t.early_stopping:
        es = t.early_stopping
        lines.append(f"stopping   early on {es.monitor}, patience {es.patience}")
    if cfg.growth:
        lines.append("growth     " + _growth_line(cfg.growth))
    if (sp := cfg.sparsity) is not None:
        how = "static" if sp.algorithm == "static" else (
            f"{sp.algorithm} every {sp.delta_t} steps, drop fraction {sp.drop_fraction:g} "
            f"({sp.anneal} anneal)"
            + ("" if sp.t_end is None else f", until {_until(sp.t_end)}")
            + ("" if sp.regrow_init == "zero" else f", regrown weights {sp.regrow_init}")
        )  # fmt: skip
        lines.append(f"sparsity   density {sp.density:g} ({sp.distribution}), {how}")
    return lines


def _until(t_end: float) -> str:
    """``10`` -> ``"step 10"``, ``0.75`` -> ``"75% of the steps"`` (sparsity.t_end).

    Example:
        >>> _until(10), _until(0.75)
        ('step 10', '75% of the steps')
    """
    return f"step {t_end}" if isinstance(t_end, int) else f"{100 * t_end:g}% of the steps"


def _growth_line(g: Any) -> str:
    """What ``growth:`` does, in words: policy, trigger, budget.

    Example:
        >>> from dynarch.config import GrowthConfig
        >>> _growth_line(GrowthConfig(policy="patches", trigger="every", max_params=0.05))
        'patches (amount 0.5, patch size 32) every 1 evaluation(s), max params 0.05, max events -'
    """
    extra = ""
    if g.policy == "widen":
        what = f"widen {g.targets} x{g.factor:g} ({g.init}, noise {g.noise:g})"
        extra = f", max width {g.max_width or '-'}"
    elif g.policy == "patches":
        what = f"patches (amount {g.amount:g}, patch size {g.patch_size})"
    else:
        what = f"tournament of {', '.join(g.candidates)}"
    if g.trigger == "plateau":
        when = f"on a {g.monitor} plateau (patience {g.patience}, threshold {g.threshold:g})"
    else:
        when = f"every {g.every} evaluation(s)"
    cap = "" if g.max_params is None else f", max params {g.max_params:g}"
    return f"{what} {when}{extra}{cap}, max events {g.max_events or '-'}"


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
        change, moved = _growth_change(ev["op"], details), None
        if "old_width" in details and "new_width" in details:
            change = f"{details['old_width']}->{details['new_width']}"
        layers = [v for v in details.values() if isinstance(v, dict) and change is None]
        if any("dropped" in v or "regrown" in v for v in layers):  # a mask update
            moved = [sum(v.get(k, 0) for v in layers) for k in ("dropped", "regrown")]
            change = f"-{moved[0]} +{moved[1]}"
        elif layers and all("active" in v and "total" in v for v in layers):
            active, total = (sum(v[k] for v in layers) for k in ("active", "total"))
            change = f"density {active / max(total, 1):.3f}"
        row = {k: ev[k] for k in ("step", "op", "target", "params_before", "params_after")}
        row |= {"change": change, "reason": ev.get("reason") or None, "moved": moved}
        row |= {
            "acc_before": before[-1] if before else None,
            "acc_after": after[0] if after else None,
        }
        rows.append(row)
    return rows


def _growth_change(op: str, details: dict[str, Any]) -> str | None:
    """The change column of a growth event: connections a patch turned on, the path of a
    skip, the layer a deepen inserted, the candidate a tournament chose (None: another op).

    Example:
        >>> _growth_change("patch", {"added": 55, "layers": {}})
        '+55 connections'
        >>> _growth_change("tournament", {"chosen": "skip:act1->out", "candidates": [{}, {}]})
        'chose skip:act1->out of 2'
    """
    if op == "patch" and isinstance(details.get("added"), int):
        return f"+{details['added']} connections"
    if op == "skip" and "source" in details and "target" in details:
        return f"{details['source']}->{details['target']}"
    if op == "deepen" and details.get("inserted"):
        return f"inserted {details['inserted'][0]}"
    if op == "tournament" and details.get("chosen"):
        return f"chose {details['chosen']} of {len(details.get('candidates') or [])}"
    return None


def _collapse_updates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive mask updates (rows with ``moved`` counts) of one op as a single row."""
    out: list[dict[str, Any]] = []
    for row in rows:
        last = out[-1] if out else None
        if row["moved"] is None or last is None or last["moved"] is None or (
            last["op"].split(" ")[0] != row["op"]
        ):  # fmt: skip
            out.append(dict(row, n=1, first=row["step"]))
            continue
        moved = [a + b for a, b in zip(last["moved"], row["moved"])]
        n = last["n"] + 1
        out[-1] = dict(last, n=n, moved=moved, change=f"-{moved[0]} +{moved[1]}",
                       step=f"{last['first']}..{row['step']}", op=f"{row['op']} x{n}",
                       params_after=row["params_after"], acc_after=row["acc_after"])  # fmt: skip
    return out


def _events_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`event_rows` as a table (runs of mask updates collapsed into one
    row each), or a line saying there were none."""
    if not rows:
        return "no structural events"
    rows = _collapse_updates(rows)
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
    end: dict[str, int],
    start: dict[str, int] | None,
    density: dict[str, float],
    counts: dict[str, tuple[int, int]] | None = None,
) -> str:
    """Layer widths at the end (and at the start, if known), each layer's density and, with
    ``counts``, its active and total weights."""
    headers = ["layer", *(["width at start"] if start is not None else []), "width"]
    headers += (["density"] if density else []) + (["active", "total"] if counts else [])
    rows = []
    for name, width in end.items():
        row: list[Any] = [name]
        if start is not None:
            row.append(start.get(name))
        row.append(width)
        if density:
            row.append(f"{density[name]:.3f}" if name in density else "dense")
        if counts:
            row += list(counts.get(name, (None, None)))
        rows.append(row)
    return format_table(headers, rows)


def mask_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``(active, total)`` weights of each masked layer of ``model`` (one host sync).

    Example:
        >>> from dynarch.masks import sparsify
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> _ = sparsify(model, 0.25, distribution="uniform")
        >>> mask_counts(model)
        {'0': (4, 16)}
    """
    from .masks import masked_modules

    mods = masked_modules(model)
    masks = [mask for m in mods.values() if (mask := m._buffers["weight_mask"]) is not None]
    if not masks:
        return {}
    sums = [mask.sum() for mask in masks]
    active = torch.stack([x.to(sums[0].device) for x in sums]).tolist()
    return dict(zip(mods, zip(active, [mask.numel() for mask in masks]), strict=True))


def active_params(model: nn.Module) -> int:
    """Parameters of ``model`` minus the weights its masks switch off.

    Example:
        >>> active_params(nn.Linear(4, 4))
        20
    """
    return count_params(model) - sum(t - a for a, t in mask_counts(model).values())


def active_weights(model: nn.Module) -> int:
    """Weights of every Linear/Conv2d of ``model`` that its masks keep (biases, norms and
    other parameters not counted): the "weights" a sparse network is measured by.

    Example:
        >>> from dynarch.masks import sparsify
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> _ = sparsify(model, 0.5, distribution="uniform")
        >>> active_weights(model)
        12
    """
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    return total - sum(t - a for a, t in mask_counts(model).values())


def summary_text(s: dict[str, Any]) -> str:
    """The report ``dynarch run`` prints at the end, from its ``summary.json`` dict ``s``.

    Example:
        >>> s = {"run_dir": "runs/x", "steps": 20, "seconds": 1.25, "best": {}, "events": [],
        ...      "params": {"start": 10, "end": 14}, "density": {},
        ...      "widths": {"start": {"fc1": 2}, "end": {"fc1": 3}},
        ...      "final": {"step": 20, "val_loss": 0.5, "val_accuracy": 0.75}}
        >>> print(summary_text(s))
        layer  width at start  width
        -----  --------------  -----
        fc1                 2      3
        <BLANKLINE>
        parameters      10 -> 14
        final val acc   75.00% (val loss 0.5000, step 20)
        best val acc    -
        trained         20 steps in 1.2 s
        <BLANKLINE>
        no structural events
        <BLANKLINE>
        run dir: runs/x
    """
    final = s["final"]
    p = s["params"]
    active = f" ({p['active']} active)" if p.get("active", p["end"]) != p["end"] else ""
    lines = [
        _layers_table(s["widths"]["end"], s["widths"]["start"], s["density"]),
        "",
        f"parameters      {p['start']} -> {p['end']}{active}",
        f"final val acc   {_pct(final.get('val_accuracy'))} "
        f"(val loss {final.get('val_loss', float('nan')):.4f}, step {final.get('step', '-')})"
        if final
        else "final val acc   - (no evaluation: train.max_steps ended the run mid-epoch)",
        f"best val acc    {_pct(s['best'].get('val_accuracy')) or '-'}",
        *(
            [f"test acc        {_pct(s['test'].get('val_accuracy'))} (scored once, at the end)"]
            if s.get("test")
            else []
        ),
        f"trained         {s['steps']} steps in {s['seconds']:.1f} s",
        *([_stopped_line(stop)] if (stop := s.get("stopped_early")) else []),
        "",
        _events_table(s["events"]),
        "",
        f"run dir: {s['run_dir']}",
    ]
    return "\n".join(lines)


def _stopped_line(stop: dict[str, Any]) -> str:
    """The summary line of a run that early stopping ended.

    Example:
        >>> _stopped_line({"epoch": 1, "of": 5, "monitor": "val_loss", "patience": 1})
        'stopped early   after epoch 2 of 5: val_loss did not improve for 1 evaluation'
    """
    n = stop["patience"]
    return (
        f"stopped early   after epoch {stop['epoch'] + 1} of {stop['of']}: {stop['monitor']} "
        f"did not improve for {n} evaluation{'' if n == 1 else 's'}"
    )
