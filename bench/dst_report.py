"""Markdown tables and target checks for bench/dst.py results (``dst.json``).

>>> payload = {"results": [
...     {"method": "dense", "density": 1.0, "seed": 0, "accuracy": 0.9, "step_ms": 2.0,
...      "density_measured": 1.0},
...     {"method": "rigl", "density": 0.05, "seed": 0, "accuracy": 0.898, "step_ms": 2.5,
...      "density_measured": 0.05}]}
>>> checks(payload)
['5%: best dynarch (rigl) is 0.20 points below dense (target <= 0.3): met']
"""

from __future__ import annotations

import statistics
from typing import Any

METHODS = (
    "dense", "static", "set", "deep_r", "rigl", "snfs", "rigl_uniform", "gmp", "granet",
    "rigl-torch",
)  # fmt: skip
DYNARCH = ("static", "set", "deep_r", "rigl", "snfs", "rigl_uniform")  # sparse from the start
DENSE_TO_SPARSE = ("gmp", "granet")  # trains dense first, prunes to the density by the end
REWIRING = ("set", "deep_r", "rigl", "snfs")
TARGET_GAP = {0.05: 0.3, 0.02: 0.7, 0.01: 1.5}  # best dynarch method vs dense, points


def _stats(payload: dict[str, Any]) -> dict[tuple[str, float], dict[str, float]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in payload["results"]:
        groups.setdefault((r["method"], round(r["density"], 6)), []).append(r)
    out = {}
    for key, rows in groups.items():
        acc = [100 * r["accuracy"] for r in rows]
        out[key] = {
            "mean": statistics.fmean(acc),
            "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "n": len(acc),
            "step_ms": statistics.fmean(r["step_ms"] for r in rows),
            "density": statistics.fmean(r["density_measured"] for r in rows),
        }
    return out


def tables(payload: dict[str, Any]) -> str:
    """Markdown: accuracy (mean ± std over seeds, %) and median step time, method × density."""
    stats = _stats(payload)
    densities = sorted({d for m, d in stats if m != "dense"}, reverse=True)
    methods = [m for m in METHODS if any(k[0] == m for k in stats)]
    head = "| method | " + " | ".join(f"{100 * d:g}%" for d in densities) + " |"
    rule = "|---|" + "---:|" * len(densities)
    acc, step = [head, rule], [head, rule]
    for m in methods:
        cells = [stats.get((m, 1.0) if m == "dense" else (m, d)) for d in densities]
        acc.append(
            f"| {m} | "
            + " | ".join("–" if c is None else f"{c['mean']:.2f} ± {c['std']:.2f}" for c in cells)
            + " |"
        )
        step.append(
            f"| {m} | "
            + " | ".join("–" if c is None else f"{c['step_ms']:.2f}" for c in cells)
            + " |"
        )
    seeds = max((s["n"] for s in stats.values()), default=0)
    return (
        f"Test accuracy (%), mean ± std over {seeds} seeds:\n\n"
        + "\n".join(acc)
        + "\n\nMedian training-step time (ms, mean over seeds):\n\n"
        + "\n".join(step)
    )


def checks(payload: dict[str, Any]) -> list[str]:
    """The issue's targets, each marked met / MISSED, from the measured means."""
    stats, lines = _stats(payload), []
    dense = stats.get(("dense", 1.0))
    densities = sorted({d for m, d in stats if m != "dense"}, reverse=True)
    ours = [m for m in DYNARCH if m != "static"]
    for d in densities:
        for label, group in (("sparse training", ours), ("dense-to-sparse", DENSE_TO_SPARSE)):
            mine = {m: stats[(m, d)]["mean"] for m in group if (m, d) in stats}
            if dense and mine and d in TARGET_GAP:
                best = max(mine, key=lambda m: mine[m])
                gap = dense["mean"] - mine[best]
                ok = "met" if gap <= TARGET_GAP[d] else "MISSED"
                lines.append(
                    f"{100 * d:g}%: best dynarch {label} ({best}) is {gap:.2f} points below "
                    f"dense (target <= {TARGET_GAP[d]}): {ok}"
                )
        if ("static", d) in stats:
            for m in REWIRING:
                if (m, d) in stats:
                    diff = stats[(m, d)]["mean"] - stats[("static", d)]["mean"]
                    ok = "met" if diff > 0 else "MISSED"
                    lines.append(f"{100 * d:g}%: {m} - static = {diff:+.2f} points: {ok}")
        if ("rigl", d) in stats and ("rigl-torch", d) in stats:
            a, b = stats[("rigl", d)], stats[("rigl-torch", d)]
            ok = "met" if a["mean"] >= b["mean"] and a["step_ms"] < b["step_ms"] else "MISSED"
            lines.append(
                f"{100 * d:g}%: rigl vs rigl-torch: {a['mean'] - b['mean']:+.2f} points, "
                f"step {a['step_ms']:.2f} vs {b['step_ms']:.2f} ms: {ok}"
            )
    return lines
