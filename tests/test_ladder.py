"""dynarch.ladder and ``dynarch ladder``: densities, the plan, the cliff, the written files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
from click.testing import CliRunner, Result

from dynarch.cli import main
from dynarch.config import ConfigError, RunConfig, validate_config
from dynarch.ladder import (
    find_cliff,
    ladder_markdown,
    ladder_rows,
    ladder_table,
    mean_accuracy,
    parse_densities,
    plan_ladder,
)

TINY = """
seed: 3
threads: 1
data: {name: mnist1d, n_train: 256, n_test: 128}
model: {kind: mlp, hidden: [16, 16]}
optimizer: {name: adam, lr: 0.003}
train: {epochs: 1, batch_size: 64}
sparsity: {density: 0.3, distribution: uniform}
"""


def _runs(method: str, pairs: list[tuple[float, float]]) -> list[dict[str, Any]]:
    return [{"method": method, "density": d, "accuracy": a} for d, a in pairs]


DENSE = _runs("dense", [(1.0, 0.90), (1.0, 0.92)])  # mean 0.91


def test_parse_densities() -> None:
    assert parse_densities("1,0.5,0.2,0.1,0.05,0.02,0.01,0.005,0.002")[-1] == 0.002
    assert parse_densities(" 0.1, 1 ,0.5") == [1.0, 0.5, 0.1]
    assert parse_densities([0.5, 1]) == [1.0, 0.5]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,0.5,0", r"--densities: 0 is not in \(0, 1\]; a density is the fraction"),
        ("1,1.5", r"--densities: 1.5 is not in \(0, 1\]"),
        ("1,-0.1", r"--densities: -0.1 is not in \(0, 1\]"),
        ("1,half", r"--densities: 'half' is not a number"),
        ("1,,0.5", r"--densities: '' is not a number"),
        ("1,nan", r"--densities: 'nan' is not a number"),
        ("0.5,0.1", r"--densities: '0.5,0.1' does not include 1, the dense model"),
        ("1,0.5,0.50", r"--densities: '1,0.5,0.50' lists 0.5 twice; give each density once"),
        (
            "1",
            r"--densities: '1' has no sparse rung, so there is no ladder to climb; add "
            r"densities below 1, e.g. 1,0.5,0.1",
        ),
    ],
)
def test_parse_densities_names_the_bad_value(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_densities(text)


def test_cliff_is_the_lowest_density_still_within_tolerance() -> None:
    runs = DENSE + _runs("static", [(0.5, 0.91), (0.2, 0.905), (0.1, 0.90), (0.05, 0.80)])
    runs += _runs("set", [(0.5, 0.92), (0.2, 0.91), (0.1, 0.91), (0.05, 0.90)])
    assert find_cliff(runs, 1.0) == {"static": 0.1, "set": 0.05}
    assert find_cliff(runs, 0.5) == {"static": 0.2, "set": 0.1}
    assert find_cliff(runs, 0.0) == {"static": 0.5, "set": 0.1}
    assert find_cliff(runs, 20) == {"static": 0.05, "set": 0.05}


def test_cliff_stops_at_the_first_fall() -> None:
    # a lucky rung below the fall does not count: the cliff is where accuracy first drops
    runs = DENSE + _runs("rigl", [(0.5, 0.91), (0.1, 0.85), (0.01, 0.91)])
    assert find_cliff(runs, 1.0) == {"rigl": 0.5}
    assert find_cliff(DENSE + _runs("rigl", [(0.5, 0.80)]), 1.0) == {"rigl": None}


def test_cliff_averages_seeds_and_is_inclusive() -> None:
    runs = DENSE + _runs("static", [(0.5, 0.89), (0.5, 0.91), (0.1, 0.90), (0.1, 0.89)])
    # 0.5: mean 0.90, 1 point below 0.91 (within, inclusive); 0.1: mean 0.895, 1.5 below
    assert find_cliff(runs, 1.0) == {"static": 0.5}
    assert find_cliff(runs, 1.5) == {"static": 0.1}
    assert mean_accuracy(runs)[("static", 0.1)] == pytest.approx((0.895, 0.0070710678, 2))


def test_cliff_needs_dense_runs_and_a_valid_tolerance() -> None:
    with pytest.raises(ValueError, match=r"needs dense runs \(density 1\).*got \[0.5, 0.1\]"):
        find_cliff(_runs("static", [(0.5, 0.9), (0.1, 0.8)]), 1.0)
    for bad in (-1, float("inf"), "1", True):
        with pytest.raises(ConfigError, match=r"--tolerance: .* is not allowed; give accuracy"):
            find_cliff(DENSE, bad)  # type: ignore[arg-type]


def test_plan_ladder_builds_every_config(tmp_path: Path) -> None:
    cfg = validate_config({"seed": 7, "sparsity": {"density": 0.3, "distribution": "er",
                                                   "snapshots": 5}})  # fmt: skip
    plan = plan_ladder(cfg, [1.0, 0.1], ["static"], 2, tmp_path)
    assert [(r.method, r.density, r.seed, r.name) for r in plan] == [
        ("dense", 1.0, 7, "dense-s7"), ("static", 0.1, 7, "static-d0.1-s7"),
        ("dense", 1.0, 8, "dense-s8"), ("static", 0.1, 8, "static-d0.1-s8"),
    ]  # fmt: skip
    dense, sparse = plan[0].config, plan[1].config
    assert dense.sparsity is None and dense.run_dir == str(tmp_path / "runs" / "dense-s7")
    assert sparse.sparsity is not None
    assert (sparse.sparsity.density, sparse.sparsity.distribution) == (0.1, "er")
    assert (sparse.sparsity.algorithm, sparse.sparsity.snapshots) == ("static", 0)
    assert sparse.model == cfg.model and sparse.optimizer == cfg.optimizer
    assert sparse.train == cfg.train and sparse.data == cfg.data


@pytest.mark.parametrize(
    ("methods", "seeds", "message"),
    [
        (["statc"], 1, r"--method: 'statc' is not a sparse training method \(did you mean "
                       r"'static'\?\); choose from static, set, deep_r, rigl, snfs"),
        (["static"], 0, r"--seeds: 0 is not allowed; give the number of seeds, >= 1"),
    ],
)  # fmt: skip
def test_plan_ladder_rejects_bad_methods_and_seeds(
    methods: list[str], seeds: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_ladder(RunConfig(), [1.0, 0.5], methods, seeds, Path("/tmp/x"))


LADDER = {
    "command": "dynarch ladder x.yaml --densities 1,0.5",
    "methods": ["static", "set"],
    "tolerance": 1.0,
    "dense_accuracy": 0.91,
    "cliff": {"static": 0.5, "set": None},
    "runs": [
        {"method": "dense", "density": 1.0, "accuracy": 0.91, "active_params": 100},
        {"method": "static", "density": 0.5, "accuracy": 0.9, "active_params": 60},
        {"method": "set", "density": 0.5, "accuracy": 0.85, "active_params": 60},
    ],
}


def test_tables() -> None:
    assert ladder_rows(LADDER) == (
        ["density", "active params", "static", "set"],
        [[1.0, 100, "91.00%", "91.00%"], [0.5, 60, "90.00%", "85.00%"]],
    )
    assert ladder_table(LADDER) == (
        "density  active params  static  set\n"
        "-------  -------------  ------  ------\n"
        "    1.0            100  91.00%  91.00%\n"
        "    0.5             60  90.00%  85.00%\n"
        "\n"
        "cliff: lowest density within 1 accuracy point of dense (91.00%)\n"
        "  static: 0.5\n"
        "  set: none"
    )
    md = ladder_markdown(LADDER)
    assert "| density | active params | static | set |\n|---:|---:|---:|---:|\n" in md
    assert "| 0.5 | 60 | 90.00% | 85.00% |\n" in md
    two_seeds = {**LADDER, "runs": [*LADDER["runs"], {**LADDER["runs"][1], "accuracy": 0.8}]}
    assert ladder_rows(two_seeds)[1][1][2] == "85.00% ± 7.07"


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_cli_ladder_end_to_end(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "ladder"
    result = _invoke("ladder", str(cfg), "--densities", "1,0.5,0.1", "--run-dir", str(out),
                     "--tolerance", "2", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    ladder = json.loads((out / "ladder.json").read_text())
    assert ladder["command"] == (
        f"dynarch ladder {cfg} --densities 1,0.5,0.1 --seeds=1 --tolerance=2 --run-dir={out}"
    )
    assert ladder["densities"] == [1.0, 0.5, 0.1] and ladder["methods"] == ["static"]
    assert ladder["seeds"] == [3] and ladder["tolerance"] == 2.0
    runs = ladder["runs"]
    assert [(r["method"], r["density"], r["seed"]) for r in runs] == [
        ("dense", 1.0, 3), ("static", 0.5, 3), ("static", 0.1, 3),
    ]  # fmt: skip
    assert [r["active_params"] for r in runs] == [1098, 42 + 528, 42 + 106]
    assert ladder["dense_accuracy"] == runs[0]["accuracy"]
    assert ladder["cliff"] == find_cliff(runs, 2.0)
    for r in runs:  # every rung is a complete run directory trained for the same steps
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert summary["final"]["val_accuracy"] == r["accuracy"] and summary["steps"] == 4
        assert summary["params"]["active"] == r["active_params"]
    assert ladder_table(ladder) in result.output
    assert result.output.startswith("[1/3] dense-s3")
    assert (out / "ladder.md").read_text() == ladder_markdown(ladder)
    assert (out / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.image.imread(out / "ladder.png").shape == (450, 700, 4)
    again = _invoke("ladder", str(cfg), "--densities", "1,0.5", "--run-dir", str(out))
    assert again.exit_code == 2
    assert f"Error: '{out}' already holds a ladder (ladder.json); choose another" in again.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--densities", "1,2"], "Error: --densities: 2 is not in (0, 1]"),
        (["--densities", "1,0.5", "--method", "magic"], "Error: --method: 'magic' is not a"),
        (["--densities", "1,0.5", "--tolerance", "-1"], "Error: --tolerance: -1.0 is not"),
        (["--densities", "1,0.5", "--set", "train.epochs=0"], "train.epochs: 0 is out of range"),
        (
            ["--densities", "1,0.5,0.0005"],
            "Error: --densities: 0.0005: layer 'fc2' (256 weights, "
            "shape (16, 16)) would get 0 active weights at density 0.0005 with distribution "
            "'uniform'; the minimal density that works is 0.00379\n",
        ),
    ],
)
def test_cli_ladder_errors_exit_2_before_training(
    tmp_path: Path, args: list[str], message: str
) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    result = _invoke("ladder", str(cfg), "--run-dir", str(tmp_path / "out"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_ladder_compares_methods(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "ladder"
    result = _invoke("ladder", str(cfg), "--densities", "0.2,1", "--method", "static",
                     "--method", "set", "--set", "sparsity.delta_t=2", "--seeds", "2",
                     "--run-dir", str(out), "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    ladder = json.loads((out / "ladder.json").read_text())
    assert ladder["methods"] == ["static", "set"] and ladder["seeds"] == [3, 4]
    assert [r["name"] for r in ladder["runs"]] == [
        "dense-s3", "static-d0.2-s3", "set-d0.2-s3", "dense-s4", "static-d0.2-s4", "set-d0.2-s4",
    ]  # fmt: skip
    active = {r["active_params"] for r in ladder["runs"] if r["density"] == 0.2}
    assert active == {42 + round(0.2 * 1056)}  # every method keeps the same budget
    for r in ladder["runs"][1:3]:
        ops = [e["op"] for e in map(json.loads, (Path(r["run_dir"]) / "events.jsonl").open())]
        assert ops == (["sparsify"] if r["method"] == "static" else ["sparsify", "rewire"])
    assert ladder["cliff"] == find_cliff(ladder["runs"], 1.0)
    assert set(ladder["cliff"]) == {"static", "set"}
    assert "density  active params  static" in result.output and " ± " in result.output
