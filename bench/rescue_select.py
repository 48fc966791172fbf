"""Choosing the cliff-rescue growth settings on the validation split (never the test set).

Trains the rescue config (``src/dynarch/configs/fashion-rescue.yaml``: LeNet-300-100 on
Fashion-MNIST, scaffold at 1% ERK, budget 5% of the dense parameters) once per variant with
a seed that the benchmark does not use (100), and records each run's *validation* accuracy
(the last ``data.n_val`` training images) at the end of training. The variants differ in
the patches policy's ``amount`` and ``patch_size``, the scaffold's rewiring (algorithm,
``delta_t``, drop fraction; 100 and 0.3 unless a variant says otherwise, whatever the
config says) and the learning-rate schedule; dense runs give the reference for each
schedule. The config's ``delta_t: 50`` is this selection's outcome.

    python bench/rescue_select.py [--jobs 2] [--out bench/results/rescue_selection.json]
    python bench/rescue_select.py --extra --out bench/results/rescue_selection_extra.json

``--extra`` runs follow-ups of the chosen settings instead (``t_end``, regrowth init, a
uniform scaffold, a larger drop fraction) and fixed-density SET / static runs at the 5%
budget, with and without the cosine schedule.

Writes ``{"command", "seed", "results": [{"variant", "growth", "rewire", "schedule",
"val_accuracy", "best_val_accuracy", "weights", "seconds"}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shlex
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from dynarch.config import load_config, validate_config
from dynarch.rescue import RescueRun, _execute

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "src/dynarch/configs/fashion-rescue.yaml"
P = {"policy": "patches", "trigger": "every"}
# name: (growth section or None for dense, scaffold rewiring or None for dense, lr schedule,
#        overrides of the sparsity section)
VARIANTS: dict[str, tuple[dict[str, Any] | None, str | None, str, dict[str, Any]]] = {
    "dense": (None, None, "constant", {}),
    "patches a0.5 p32 set": ({**P, "amount": 0.5}, "set", "constant", {}),
    "patches a1.0 p32 set": ({**P, "amount": 1.0}, "set", "constant", {}),
    "patches a0.5 p64 set": ({**P, "amount": 0.5, "patch_size": 64}, "set", "constant", {}),
    "patches a0.5 p32 static": ({**P, "amount": 0.5}, "static", "constant", {}),
    "patches a0.5 p32 rigl": ({**P, "amount": 0.5}, "rigl", "constant", {}),
    "dense cosine": (None, None, "cosine", {}),
    "patches a0.5 p32 set cosine": ({**P, "amount": 0.5}, "set", "cosine", {}),
    "patches a0.5 p32 set dt50": ({**P, "amount": 0.5}, "set", "constant", {"delta_t": 50}),
    "patches a0.5 p32 set dt200": ({**P, "amount": 0.5}, "set", "constant", {"delta_t": 200}),
    "patches a0.5 p32 set df0.1": ({**P, "amount": 0.5}, "set", "constant", {"drop_fraction": 0.1}),
    "patches a0.25 p32 set": ({**P, "amount": 0.25}, "set", "constant", {}),
}
# follow-ups of the chosen "patches a0.5 p32 set dt50" (``--extra``), and fixed-density runs
# at the budget (5%) for reference
DT50 = {"delta_t": 50}
EXTRA: dict[str, tuple[dict[str, Any] | None, str | None, str, dict[str, Any]]] = {
    "patches dt50 t_end0.75": ({**P, "amount": 0.5}, "set", "constant", {**DT50, "t_end": 0.75}),
    "patches dt50 regrow-random": (
        {**P, "amount": 0.5}, "set", "constant", {**DT50, "regrow_init": "random"},
    ),
    "patches dt50 uniform": (
        {**P, "amount": 0.5}, "set", "constant", {**DT50, "distribution": "uniform"},
    ),
    "patches dt50 df0.5": ({**P, "amount": 0.5}, "set", "constant", {**DT50, "drop_fraction": 0.5}),
    "set 5% dt50": (None, "set", "constant", {**DT50, "density": 0.05}),
    "set 5% dt50 cosine": (None, "set", "cosine", {**DT50, "density": 0.05}),
    "static 5%": (None, "static", "constant", {"density": 0.05}),
    "static 5% cosine": (None, "static", "cosine", {"density": 0.05}),
}  # fmt: skip
ALL = {**VARIANTS, **EXTRA}
SEED = 100


def _row(item: tuple[str, RescueRun]) -> dict[str, Any]:
    name, run = item
    row = _execute(run)
    summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
    growth, rewire, schedule, sparsity = ALL[name]
    return {
        "variant": name, "growth": growth, "rewire": rewire, "schedule": schedule,
        "sparsity": sparsity,
        "val_accuracy": summary["final"]["val_accuracy"],
        "best_val_accuracy": summary["best"].get("val_accuracy"),
        "weights": row["weights"], "seconds": row["seconds"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run every variant (``--jobs`` spawn workers) and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/rescue_selection.json")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs (smoke)")
    p.add_argument("--n-train", type=int, default=None, help="override data.n_train (smoke)")
    p.add_argument("--extra", action="store_true", help="run the follow-up variants (EXTRA)")
    args = p.parse_args(argv)
    overrides = [f"train.epochs={args.epochs}"] if args.epochs else []
    overrides += [f"data.n_train={args.n_train}", "data.n_val=500"] if args.n_train else []
    base = load_config(CONFIG, overrides).model_dump(mode="json")
    tmp = Path(tempfile.mkdtemp(prefix="rescue-select-"))
    items = []
    chosen = EXTRA if args.extra else VARIANTS
    for i, (name, (growth, rewire, schedule, sparsity)) in enumerate(chosen.items()):
        run = {**base, "seed": SEED, "run_dir": str(tmp / f"v{i}")}
        run["optimizer"] = {**base["optimizer"], "schedule": schedule}
        run["growth"] = None if growth is None else {**growth, "max_params": 0.05}
        run["sparsity"] = None if rewire is None else {
            **base["sparsity"], "density": 0.01, "algorithm": rewire, "snapshots": 0,
            "delta_t": 100, "drop_fraction": 0.3, **sparsity,
        }  # fmt: skip
        items.append((name, RescueRun(name, SEED, name, validate_config(run, source=name))))
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        rows = list(pool.map(_row, items))
    for r in rows:
        print(f"{r['variant']:<30} val {100 * r['val_accuracy']:.2f}%  weights {r['weights']}")
    argv = sys.argv[1:] if argv is None else argv
    payload = {"command": shlex.join(["python", "bench/rescue_select.py", *argv]),
               "seed": SEED, "results": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
