"""Tables, target checks and the schedule choice of bench/grow_vs_static.py (its JSON)."""

from __future__ import annotations

import statistics
from typing import Any

METHODS = ("static", "grown", "grown_plateau", "gromo")
TIME_LIMIT = 1.2  # grown wall time / static wall time, issue 4 §6


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def choose(selection: list[dict[str, Any]], candidates: list[str]) -> str:
    """The candidate schedule with the best mean validation accuracy (first on a tie).

    >>> choose([{"schedule": "1:zero", "val_accuracy": 0.8},
    ...         {"schedule": "2:zero", "val_accuracy": 0.9}], ["1:zero", "2:zero"])
    '2:zero'
    """
    if len(candidates) == 1:
        return candidates[0]
    acc = {c: [r["val_accuracy"] for r in selection if r["schedule"] == c] for c in candidates}
    return max(candidates, key=lambda c: statistics.fmean(acc[c]))


def summarize(results: list[dict[str, Any]], hidden: list[int]) -> dict[str, Any]:
    """Per-method means ± std (accuracy in %) and the issue's two checks for ``grown``."""
    stats: dict[str, Any] = {}
    for m in METHODS:
        if rows := [r for r in results if r["method"] == m]:
            acc, sec = (
                _mean_std([100 * r["accuracy"] for r in rows]),
                _mean_std([r["seconds"] for r in rows]),
            )
            stats[m] = {"n": len(rows), "accuracy": acc[0], "accuracy_std": acc[1],
                        "seconds": sec[0], "seconds_std": sec[1],
                        "weights": statistics.fmean(r["weights"] for r in rows),
                        "hidden": sorted({tuple(r["hidden"]) for r in rows}),
                        "reached_size": sum(r["hidden"] == hidden for r in rows)}  # fmt: skip
    checks: dict[str, Any] = {}
    if "grown" in stats and "static" in stats:
        g, s = stats["grown"], stats["static"]
        diff, ratio = g["accuracy"] - s["accuracy"], g["seconds"] / s["seconds"]
        checks = {"accuracy_points": diff, "accuracy_met": diff >= 0, "time_ratio": ratio,
                  "time_limit": TIME_LIMIT, "time_met": ratio <= TIME_LIMIT}  # fmt: skip
    return {"methods": stats, "checks": checks}


def _dash(hidden: Any) -> str:
    return " / ".join("-".join(str(w) for w in h) for h in hidden)


def tables(payload: dict[str, Any]) -> str:
    """Markdown: the schedule selection (if any), then accuracy, time and size per method."""
    out, sel = [], payload.get("selection") or {}
    if len(sel.get("candidates", [])) > 1:
        out += ["Schedule selection (validation split, never the test set):", "",
                "| schedule (K:init) | val accuracy (%) | seconds |",
                "|---|---:|---:|"]  # fmt: skip
        for c in sel["candidates"]:
            if rows := [r for r in sel["results"] if r["schedule"] == c]:
                a, sa = _mean_std([100 * r["val_accuracy"] for r in rows])
                mark, sec = (
                    " (chosen)" * (c == sel["chosen"]),
                    _mean_std([r["seconds"] for r in rows]),
                )
                out.append(f"| {c}{mark} | {a:.2f} ± {sa:.2f} | {sec[0]:.1f} |")
        out.append("")
    stats = payload["summary"]["methods"]
    out += [f"Test accuracy and wall time, mean ± std over "
            f"{max((s['n'] for s in stats.values()), default=0)} seeds:", "",
            "| method | test accuracy (%) | wall time (s) | final hidden | weights |",
            "|---|---:|---:|---|---:|"]  # fmt: skip
    for m, s in stats.items():
        out.append(
            f"| {m} | {s['accuracy']:.2f} ± {s['accuracy_std']:.2f} | {s['seconds']:.1f} ± "
            f"{s['seconds_std']:.1f} | {_dash(s['hidden'])} | {s['weights']:,.0f} |"
        )
    return "\n".join(out)


def checks(payload: dict[str, Any]) -> list[str]:
    """The issue's targets (grown vs static), each marked met / MISSED, and the sizes reached."""
    c, stats = payload["summary"]["checks"], payload["summary"]["methods"]
    lines = []
    if c:
        g, s = stats["grown"], stats["static"]
        lines += [
            f"grown accuracy {g['accuracy']:.2f}% vs static {s['accuracy']:.2f}% "
            f"({c['accuracy_points']:+.2f} points; target >= 0): "
            + ("met" if c["accuracy_met"] else "MISSED"),
            f"grown wall time {g['seconds']:.1f} s vs static {s['seconds']:.1f} s "
            f"({c['time_ratio']:.2f}x; target <= {c['time_limit']}x): "
            + ("met" if c["time_met"] else "MISSED"),
        ]
    for m in ("grown", "grown_plateau", "gromo"):
        if st := stats.get(m):
            lines.append(f"{m} reached S in {st['reached_size']}/{st['n']} seeds (final hidden "
                         f"{_dash(st['hidden'])}, {st['weights']:,.0f} weights)")  # fmt: skip
    return lines


# ------------------------------------------------------------------------------ CLI
