"""Cliff rescue (dynarch.rescue and ``dynarch rescue``): the plan, its errors, the table, one
tiny end-to-end rescue on mnist1d."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from dynarch.cli import main
from dynarch.config import ConfigError, RunConfig, validate_config
from dynarch.rescue import GROWTH, METHODS, plan_rescue, rescue_markdown, run_rescue

ROOT = Path("/tmp/rescue-plan")


def _exact(message: str) -> str:
    return f"^{re.escape(message)}$"


def _plan(cfg: RunConfig | None = None, methods: Any = METHODS, **kw: Any) -> Any:
    args: dict[str, Any] = {"seeds": 1, "density": 0.01, "budget": 0.05, "root": ROOT} | kw
    return plan_rescue(cfg or RunConfig(), methods, **args)


# ---------------------------------------------------------------------------- the plan


def test_methods_and_growth_recipes() -> None:
    assert METHODS == ("dense", "static", "set", "patches", "tournament", "widen")
    assert GROWTH == {
        "patches": {"policy": "patches", "trigger": "every", "amount": 0.5},
        "tournament": {"policy": "tournament", "trigger": "every"},
        "widen": {"policy": "widen", "trigger": "plateau", "patience": 1, "factor": 1.5},
    }


def test_plan_names_seeds_and_run_dirs() -> None:
    cfg = validate_config({"seed": 3})
    plan = _plan(cfg, ["dense", "patches", "dense"], seeds=2)
    assert [(r.method, r.seed, r.name) for r in plan] == [
        ("dense", 3, "dense-s3"), ("patches", 3, "patches-s3"),
        ("dense", 4, "dense-s4"), ("patches", 4, "patches-s4"),
    ]  # fmt: skip
    assert [r.config.seed for r in plan] == [3, 3, 4, 4]
    assert [r.config.run_dir for r in plan] == [str(ROOT / "runs" / r.name) for r in plan]


def test_plan_sparsity_and_growth_per_method() -> None:
    base = validate_config({
        "sparsity": {"density": 0.5, "distribution": "uniform", "delta_t": 7, "snapshots": 2},
        "growth": {"policy": "widen", "factor": 3.0},
    })  # fmt: skip
    plan = {r.method: r.config for r in _plan(base, density=0.02, budget=0.1, rewire="rigl")}
    assert plan["dense"].sparsity is None and plan["dense"].growth is None
    algorithms = {m: c.sparsity.algorithm for m, c in plan.items() if c.sparsity is not None}
    assert algorithms == {"static": "static", "set": "set", "patches": "rigl",
                          "tournament": "rigl", "widen": "rigl"}  # fmt: skip
    for m, c in plan.items():
        if m != "dense":
            assert c.sparsity is not None
            # the config's sparsity settings are kept, density and snapshots are the rescue's
            assert (c.sparsity.density, c.sparsity.distribution, c.sparsity.delta_t) == (
                0.02, "uniform", 7,
            )  # fmt: skip
            assert c.sparsity.snapshots == 0
    assert plan["static"].growth is None and plan["set"].growth is None
    grown = {m: plan[m].growth for m in ("patches", "tournament", "widen")}
    assert {m: g.model_dump(exclude_defaults=True) for m, g in grown.items() if g} == {
        "patches": {"policy": "patches", "trigger": "every", "max_params": 0.1},
        "tournament": {"policy": "tournament", "trigger": "every", "max_params": 0.1},
        "widen": {"patience": 1, "factor": 3.0, "max_params": 0.1},  # the config's factor
    }


def test_plan_keeps_the_configs_own_growth_settings() -> None:
    base = validate_config(
        {"sparsity": {"density": 0.5}, "growth": {"policy": "patches", "amount": 0.1,
                                                   "patch_size": 4, "max_events": 1}}
    )  # fmt: skip
    plan = {r.method: r.config.growth for r in _plan(base, density=0.02, budget=0.1)}
    assert {m: g.model_dump(exclude_defaults=True) for m, g in plan.items() if g} == {
        "patches": {"policy": "patches", "trigger": "every", "max_events": 1,
                    "max_params": 0.1, "amount": 0.1, "patch_size": 4},
        "tournament": {"policy": "tournament", "trigger": "every", "max_events": 1,
                       "max_params": 0.1, "patch_size": 4},
        "widen": {"patience": 1, "max_events": 1, "max_params": 0.1},
    }  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=_exact("growth.amount: set in the config, but it applies to policy patches, which "
                     "none of --methods ['dense', 'widen'] runs; remove it or add that method"),
    ):  # fmt: skip
        _plan(base, ["dense", "widen"], density=0.02, budget=0.1)
    capped = validate_config({"growth": {"max_params": 0.2}})
    with pytest.raises(
        ConfigError,
        match=_exact("growth.max_params: 0.2 is not used by the rescue, whose growth budget is "
                     "--budget; remove it from the config and pass --budget"),
    ):  # fmt: skip
        _plan(capped, density=0.02, budget=0.1)


def test_plan_without_a_sparsity_section_uses_its_defaults() -> None:
    (run,) = _plan(RunConfig(), ["static"], density=0.2, budget=0.2)
    assert run.config.sparsity is not None
    assert run.config.sparsity.model_dump() == {
        "density": 0.2, "distribution": "erk", "algorithm": "static", "delta_t": 100,
        "drop_fraction": 0.3, "t_end": None, "anneal": "cosine", "regrow_init": "zero",
        "snapshots": 0,
    }  # fmt: skip


def test_plan_n_val_defaults_to_5000_unless_set() -> None:
    assert {r.config.data.n_val for r in _plan()} == {5000}
    cfg = validate_config({"data": {"n_val": 123}})
    assert {r.config.data.n_val for r in _plan(cfg)} == {123}


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": ["dense", "sett"]}, "--methods: 'sett' is not a rescue method (did you mean "
         "'set'?); choose from dense, static, set, patches, tournament, widen"),
        ({"methods": ["xyz"]}, "--methods: 'xyz' is not a rescue method; choose from dense, "
         "static, set, patches, tournament, widen"),
        ({"methods": []}, "--methods: give at least one of dense, static, set, patches, "
         "tournament, widen"),
        ({"density": 0.0}, "--density: 0.0 is not in (0, 1]; it is a fraction of weights"),
        ({"density": True}, "--density: True is not in (0, 1]; it is a fraction of weights"),
        ({"density": "0.1"}, "--density: '0.1' is not in (0, 1]; it is a fraction of weights"),
        ({"budget": 1.5}, "--budget: 1.5 is not in (0, 1]; it is a fraction of weights"),
        ({"budget": -1}, "--budget: -1 is not in (0, 1]; it is a fraction of weights"),
        ({"density": 0.1, "budget": 0.05}, "--budget 0.05 is below the scaffold --density 0.1: "
         "growth would have no room; give a budget above the density"),
        ({"rewire": "deep_r"}, "--rewire: 'deep_r' is not allowed; use static, set or rigl"),
        ({"seeds": 0}, "--seeds: 0 is not allowed; give the number of seeds, >= 1"),
        ({"seeds": True}, "--seeds: True is not allowed; give the number of seeds, >= 1"),
        ({"seeds": 1.0}, "--seeds: 1.0 is not allowed; give the number of seeds, >= 1"),
    ],
)  # fmt: skip
def test_plan_errors(kwargs: dict[str, Any], message: str) -> None:
    methods = kwargs.pop("methods", METHODS)
    with pytest.raises(ConfigError, match=_exact(message)):
        _plan(RunConfig(), methods, **kwargs)


def test_density_equal_to_budget_and_one_are_allowed() -> None:
    assert len(_plan(RunConfig(), ["static"], density=1, budget=1)) == 1
    assert len(_plan(RunConfig(), ["patches"], density=0.3, budget=0.3)) == 1


def test_run_rescue_errors(tmp_path: Path) -> None:
    cfg = RunConfig()
    with pytest.raises(
        ConfigError, match=_exact("--jobs: 0 is not allowed; give the number of processes, >= 1")
    ):
        run_rescue(cfg, ["dense"], jobs=0, run_dir=tmp_path)
    with pytest.raises(
        ConfigError, match=_exact("--jobs: True is not allowed; give the number of processes, >= 1")
    ):
        run_rescue(cfg, ["dense"], jobs=True, run_dir=tmp_path)
    with pytest.raises(
        ConfigError,
        match=_exact("--methods must include dense: the rescue is measured against it"),
    ):
        run_rescue(cfg, ["static", "patches"], seeds=1, run_dir=tmp_path)
    with pytest.raises(
        ConfigError, match=_exact("--seeds: 0 is not allowed; give the number of seeds, >= 1")
    ):
        run_rescue(cfg, ["dense"], seeds=0, run_dir=tmp_path)
    (tmp_path / "rescue.json").write_text("{}")
    with pytest.raises(
        ConfigError,
        match=_exact(f"{str(tmp_path)!r} already holds a rescue (rescue.json); choose another"),
    ):
        run_rescue(cfg, ["dense"], jobs=0, run_dir=tmp_path)  # checked first
    assert list(tmp_path.iterdir()) == [tmp_path / "rescue.json"]  # nothing was written


# ------------------------------------------------------------------------------ table


def test_rescue_markdown_one_seed() -> None:
    rows = [
        {"method": "dense", "seed": 0, "accuracy": 0.9, "weights": 100, "seconds": 2.0},
        {"method": "set", "seed": 0, "accuracy": 0.8, "weights": 5, "seconds": 3.04},
    ]
    table = rescue_markdown({"results": rows, "dense_accuracy": 0.9, "dense_weights": 100})
    assert table == (
        "| method | test accuracy (%) | Δ vs dense (points) | final weights | % of dense "
        "| wall time (s) |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        "| dense | 90.00 | 0.00 | 100 | 100.00 | 2.0 |\n"
        "| set | 80.00 | -10.00 | 5 | 5.00 | 3.0 |"
    )


def test_rescue_markdown_mean_and_std_over_seeds_in_first_seen_order() -> None:
    rows = [
        {"method": "patches", "seed": 0, "accuracy": 0.5, "weights": 30, "seconds": 1.0},
        {"method": "dense", "seed": 0, "accuracy": 0.8, "weights": 200, "seconds": 1.0},
        {"method": "patches", "seed": 1, "accuracy": 0.7, "weights": 41, "seconds": 2.0},
        {"method": "dense", "seed": 1, "accuracy": 0.9, "weights": 200, "seconds": 3.0},
    ]
    lines = rescue_markdown({"results": rows, "dense_accuracy": 0.85, "dense_weights": 200})
    assert lines.splitlines()[2:] == [
        "| patches | 60.00 ± 14.14 | -25.00 | 36 | 17.75 | 1.5 |",
        "| dense | 85.00 ± 7.07 | 0.00 | 200 | 100.00 | 2.0 |",
    ]


# ------------------------------------------------------------------------- end to end

TINY = """
seed: 0
threads: 1
data: {name: mnist1d}
model: {kind: mlp, hidden: [16]}
optimizer: {name: adam, lr: 0.003}
train: {epochs: 1, batch_size: 64}
"""
SETS = ["--set", "data.n_train=600", "--set", "data.n_test=200", "--set", "data.n_val=100",
        "--set", "model.hidden=[32,32]", "--set", "train.epochs=2"]  # fmt: skip


def _rescue(tmp: Path, *args: str) -> Result:
    config = tmp / "tiny.yaml"
    config.write_text(TINY)
    return CliRunner().invoke(main, ["rescue", str(config), *args])


@pytest.fixture(scope="module")
def rescued(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    tmp = tmp_path_factory.mktemp("rescue")
    result = _rescue(tmp, *SETS, "--seeds", "1", "--methods", "dense,static,patches",
                     "--density", "0.1", "--budget", "0.3", "--run-dir", str(tmp / "r"),
                     "--out", str(tmp / "out.json"))  # fmt: skip
    return tmp, result


def test_rescue_end_to_end(rescued: tuple[Path, Result]) -> None:
    tmp, result = rescued
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp / "r" / "rescue.json").read_text())
    assert json.loads((tmp / "out.json").read_text()) == payload
    assert list(payload) == ["command", "config", "density", "budget", "rewire",
                             "dense_accuracy", "dense_weights", "results"]  # fmt: skip
    config = tmp / "tiny.yaml"
    assert payload["command"] == (
        f"dynarch rescue {config} --methods=dense,static,patches --density=0.1 --budget=0.3 "
        f"--rewire=set --seeds=1 --jobs=1 --run-dir={tmp / 'r'} --out={tmp / 'out.json'} "
        "--set=data.n_train=600 --set=data.n_test=200 --set=data.n_val=100 "
        "'--set=model.hidden=[32,32]' --set=train.epochs=2"
    )
    assert (payload["density"], payload["budget"], payload["rewire"]) == (0.1, 0.3, "set")
    assert payload["config"]["data"]["n_val"] == 100
    assert payload["config"]["model"]["hidden"] == [32, 32]
    rows = {r["method"]: r for r in payload["results"]}
    assert [r["method"] for r in payload["results"]] == ["dense", "static", "patches"]
    for method, row in rows.items():
        assert list(row) == ["method", "seed", "accuracy", "weights", "params", "seconds",
                             "events", "run_dir"]  # fmt: skip
        assert row["seed"] == 0 and row["run_dir"] == str(tmp / "r" / "runs" / f"{method}-s0")
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert row["accuracy"] == summary["test"]["val_accuracy"]  # the test score, not val
        assert (row["weights"], row["params"]) == (
            summary["params"]["weights"], summary["params"]["active"],
        )  # fmt: skip
    dense = rows["dense"]
    assert (payload["dense_accuracy"], payload["dense_weights"]) == (
        dense["accuracy"], dense["weights"],
    )  # fmt: skip
    assert dense["weights"] == 40 * 32 + 32 * 32 + 32 * 10 and dense["params"] == 2698
    assert rows["static"]["events"] == 1  # the sparsify event
    assert rows["patches"]["events"] > 1  # and patches
    assert rows["static"]["weights"] < rows["patches"]["weights"]
    assert rows["patches"]["params"] <= int(0.3 * dense["params"])
    assert rows["patches"]["weights"] <= 0.3 * dense["params"]


def test_rescue_end_to_end_report(rescued: tuple[Path, Result]) -> None:
    tmp, result = rescued
    payload = json.loads((tmp / "r" / "rescue.json").read_text())
    table = rescue_markdown(payload)
    assert (tmp / "r" / "rescue.md").read_text() == (
        f"# Cliff rescue\n\n`{payload['command']}`\n\n{table}\n"
    )
    lines = result.output.splitlines()
    assert lines[0] == "3 runs, 1 worker process"
    assert [line.split()[:4] for line in lines[1:4]] == [
        ["[1/3]", "dense", "seed", "0"], ["[2/3]", "static", "seed", "0"],
        ["[3/3]", "patches", "seed", "0"],
    ]  # fmt: skip
    assert result.output.endswith(f"\n\n{table}\n\nrescue dir: {tmp / 'r'}\n")


def test_rescue_cli_refuses_a_used_directory(rescued: tuple[Path, Result]) -> None:
    tmp, _ = rescued
    again = _rescue(tmp, *SETS, "--seeds", "1", "--methods", "dense", "--run-dir", str(tmp / "r"))
    assert again.exit_code == 2
    assert f"Error: {str(tmp / 'r')!r} already holds a rescue (rescue.json); choose another" in (
        again.output
    )


def test_rescue_cli_usage_errors(tmp_path: Path) -> None:
    result = _rescue(tmp_path, "--methods", "dense,grow", "--run-dir", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert ("Error: --methods: 'grow' is not a rescue method; choose from dense, static, set, "
            "patches, tournament, widen") in result.output  # fmt: skip
    result = _rescue(tmp_path, "--density", "0.5", "--run-dir", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert ("Error: --budget 0.05 is below the scaffold --density 0.5: growth would have no "
            "room; give a budget above the density") in result.output  # fmt: skip
    result = _rescue(tmp_path, *SETS, "--density", "0.0005", "--methods", "dense,static",
                     "--run-dir", str(tmp_path / "r"))  # fmt: skip
    assert result.exit_code == 2 and result.output == (
        "Error: --density: 0.0005: layer 'fc2' (1024 weights, shape (32, 32)) would get 0 active "
        "weights at density 0.0005 with distribution 'erk'; the minimal density that works is "
        "0.00114\n"
    )
    result = _rescue(tmp_path, *SETS, "--density", "1", "--budget", "1", "--methods",
                     "dense,patches", "--run-dir", str(tmp_path / "r"))  # fmt: skip
    assert result.exit_code == 2 and result.output.endswith(
        "so growth would have no room; give a lower --density (this scaffold already has every "
        "parameter)\n"
    )
    assert not (tmp_path / "r").exists()
    result = _rescue(tmp_path, "--seeds", "1", "--methods", "dense", "--run-dir",
                     str(tmp_path / "r"))  # fmt: skip
    # the rescue's default n_val (5000) is more than mnist1d's 4000 training samples
    assert result.exit_code == 2
    assert result.output == (
        "Error: data.n_val: 5000 (the rescue's default validation split) leaves no training "
        "samples (the training set has 4000); use fewer, e.g. --set data.n_val=400\n"
    )
    assert not (tmp_path / "r" / "rescue.json").exists()
