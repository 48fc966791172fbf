"""The ``dynarch`` command line: run, inspect, the files of a run directory, error exits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from dynarch.checkpoint import load
from dynarch.cli import event_rows, format_table, main
from dynarch.config import load_config

TINY = """
seed: 0
threads: 1
data: {name: mnist1d, n_train: 512, n_test: 256}
model: {kind: mlp, hidden: [16, 12]}
optimizer: {name: adam, lr: 0.003}
train: {epochs: 2, batch_size: 64}
"""
# threshold 10: no evaluation counts as an improvement, so the plateau fires at the 2nd one
GROWTH = """
growth: {patience: 1, threshold: 10.0, factor: 1.5, max_events: 1, noise: 0.01}
"""


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _config(tmp_path: Path, text: str = TINY, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    tmp = tmp_path_factory.mktemp("cli")
    cfg = _config(tmp, TINY + GROWTH)
    run_dir = tmp / "run"
    result = _invoke("run", str(cfg), "--run-dir", str(run_dir), "--no-progress", "--set",
                     "train.epochs=3")  # fmt: skip
    return run_dir, result


def test_help_and_version() -> None:
    result = _invoke("--help")
    assert result.exit_code == 0
    assert "Usage: dynarch [OPTIONS] COMMAND" in result.output
    assert "run" in result.output and "inspect" in result.output
    run_help = _invoke("run", "--help")
    assert run_help.exit_code == 0 and "--set KEY=VALUE" in run_help.output
    assert "--run-dir" in run_help.output and "--no-progress" in run_help.output
    version = _invoke("--version")
    assert version.exit_code == 0 and version.output.startswith("dynarch, version 0.")


def test_run_writes_a_complete_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    threads = torch.get_num_threads()
    result = _invoke("run", str(_config(tmp_path)), "--run-dir", str(run_dir), "--no-progress")
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads  # the config's threads were restored
    for name in ("config.json", "metrics.jsonl", "events.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoint" / "arch.json").is_file()
    saved = load_config(run_dir / "config.json")
    assert saved == load_config(_config(tmp_path), [f"run_dir={run_dir}"])
    evals = [m for m in _jsonl(run_dir / "metrics.jsonl") if "val_loss" in m]
    assert [m["epoch"] for m in evals] == [0, 1]
    assert _jsonl(run_dir / "events.jsonl") == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["epochs"] == 2  # 512 / 64 = 8 steps an epoch
    assert summary["data"] == {
        "name": "mnist1d", "n_train": 512, "n_test": 256, "input_shape": [40], "num_classes": 10,
    }  # fmt: skip
    assert summary["widths"]["start"] == summary["widths"]["end"] == {
        "fc1": 16, "fc2": 12, "out": 10,
    }  # fmt: skip
    params = 40 * 16 + 16 + 16 * 12 + 12 + 12 * 10 + 10
    weights = 40 * 16 + 16 * 12 + 12 * 10
    assert summary["params"] == {
        "start": params, "end": params, "active": params, "weights": weights,
    }  # fmt: skip
    assert summary["test"] is None  # no data.n_val: the evaluation set is the test set
    assert summary["final"] == evals[-1] and summary["events"] == []
    model = load(run_dir / "checkpoint").model
    assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [16, 12, 10]
    out = result.output
    assert "fc1                16     16" in out and "no structural events" in out
    assert f"final val acc   {100 * evals[-1]['val_accuracy']:.2f}%" in out
    assert out.rstrip().endswith(f"run dir: {run_dir}")


def test_growth_run_records_and_reports_events(grown_run: tuple[Path, Result]) -> None:
    run_dir, result = grown_run
    assert result.exit_code == 0, result.output
    events = _jsonl(run_dir / "events.jsonl")
    assert [(e["op"], e["target"], e["reason"]) for e in events] == [
        ("widen", "fc1", "plateau(val_loss)"), ("widen", "fc2", "plateau(val_loss)"),
    ]  # fmt: skip
    assert [(e["details"]["old_width"], e["details"]["new_width"]) for e in events] == [
        (16, 24), (12, 18),
    ]  # fmt: skip
    evals = [m for m in _jsonl(run_dir / "metrics.jsonl") if "val_loss" in m]
    assert all(e["step"] == evals[1]["step"] == 16 for e in events)  # at the 2nd evaluation
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["widths"]["end"] == {"fc1": 24, "fc2": 18, "out": 10}
    rows = summary["events"]
    assert [r["change"] for r in rows] == ["16->24", "12->18"]
    assert rows[0]["acc_before"] == evals[1]["val_accuracy"]
    assert rows[0]["acc_after"] == evals[2]["val_accuracy"]
    assert rows[1]["params_before"] == rows[0]["params_after"] == events[0]["params_after"]
    assert summary["params"]["end"] == events[-1]["params_after"]
    before, after = (
        f"{100 * evals[1]['val_accuracy']:.2f}%",
        f"{100 * evals[2]['val_accuracy']:.2f}%",
    )
    p0, p1 = events[0]["params_before"], events[0]["params_after"]
    line = next(ln for ln in result.output.splitlines() if "16->24" in ln)
    assert line.split() == [
        "16", "widen", "fc1", "16->24", "plateau(val_loss)", str(p0), "->", str(p1), before, after,
    ]  # fmt: skip
    assert len(load(run_dir / "checkpoint").model[1].weight) == 24


def test_inspect_shows_widths_events_and_metrics(grown_run: tuple[Path, Result]) -> None:
    run_dir, _ = grown_run
    result = _invoke("inspect", str(run_dir))
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith(f"run {run_dir}\ndata       mnist1d (512 train / 256 test samples)")
    assert "growth     widen hidden x1.5 (net2net, noise 0.01)" in out
    assert "layer  width at start  width\n" in out
    assert "fc1                16     24" in out and "fc2                12     18" in out
    assert "out                10     10" in out
    final = [m for m in _jsonl(run_dir / "metrics.jsonl") if "val_loss" in m][-1]
    assert (
        f"final metrics   step 24, epoch 2, val loss {final['val_loss']:.4f}, "
        f"val acc {100 * final['val_accuracy']:.2f}%"
    ) in out
    rows = [r for r in map(str.split, out.splitlines()) if r[:1] == ["16"]]
    assert [r[:5] for r in rows] == [
        ["16", "widen", "fc1", "16->24", "plateau(val_loss)"],
        ["16", "widen", "fc2", "12->18", "plateau(val_loss)"],
    ]  # fmt: skip


def test_sparse_run_shows_density(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _invoke("run", str(_config(tmp_path)), "--run-dir", str(run_dir), "--no-progress",
                     "--set", "sparsity.density=0.5", "--set", "train.epochs=1")  # fmt: skip
    assert result.exit_code == 0, result.output
    events = _jsonl(run_dir / "events.jsonl")
    assert [(e["op"], e["step"], e["reason"]) for e in events] == [("sparsify", 0, "config")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["events"][0]["change"] == "density 0.500"
    assert set(summary["density"]) == {"fc1", "fc2", "out"}
    assert summary["params"]["active"] == summary["params"]["end"] - sum(
        d["total"] - d["active"] for d in events[0]["details"].values()
    )
    out = _invoke("inspect", str(run_dir)).output
    assert "layer  width at start  width  density  active  total" in out
    for name, d in events[0]["details"].items():  # the final checkpoint's masks
        row = next(r.split() for r in out.splitlines() if r.startswith(f"{name} "))
        assert row[3:] == [f"{d['density']:.3f}", str(d["active"]), str(d["total"])]
    active, total = (sum(d[k] for d in events[0]["details"].values()) for k in ("active", "total"))
    assert (
        f"parameters      {summary['params']['end']} ({summary['params']['active']} active; "
        f"masks keep {active} of {total} weights, density {active / total:.4f})"
    ) in out
    assert "sparsity   density 0.5 (erk), static" in out
    # plots: density over steps and mask heatmaps at steps 0, 4, 8 (3 snapshots) with diffs
    assert (run_dir / "density.png").is_file() and not (run_dir / "rewiring.png").exists()
    assert sorted(p.name for p in (run_dir / "masks").iterdir() if p.name.startswith("fc1")) == [
        "fc1-diff-0-4.png", "fc1-diff-4-8.png", "fc1-step0.png", "fc1-step4.png", "fc1-step8.png",
    ]  # fmt: skip


def test_rewiring_run_records_updates_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("dynarch.sparse", reason="dynarch.sparse not available yet")
    run_dir = tmp_path / "run"
    sparsity = "sparsity={density: 0.3, algorithm: set, delta_t: 3, snapshots: 2}"
    result = _invoke("run", str(_config(tmp_path)), "--run-dir", str(run_dir), "--no-progress",
                     "--set", sparsity)  # fmt: skip
    assert result.exit_code == 0, result.output
    events = _jsonl(run_dir / "events.jsonl")
    assert events[0]["op"] == "sparsify" and events[0]["step"] == 0
    rewires = [e for e in events if e["op"] == "rewire"]
    assert rewires and all(e["step"] % 3 == 0 for e in rewires)
    for e in rewires:
        for layer, d in e["details"].items():
            assert d["active"] == events[0]["details"][layer]["active"]  # counts preserved
    assert (run_dir / "density.png").is_file() and (run_dir / "rewiring.png").is_file()
    assert (run_dir / "masks" / "fc1-diff-0-16.png").is_file()
    out = _invoke("inspect", str(run_dir)).output
    assert "sparsity   density 0.3 (erk), set every 3 steps, drop fraction 0.3" in out
    dropped, regrown = (sum(d[k] for e in rewires for d in e["details"].values())
                        for k in ("dropped", "regrown"))  # fmt: skip
    row = next(r.split() for r in out.splitlines() if " rewire x" in r)  # updates in one row
    assert row[:5] == [
        f"{rewires[0]['step']}..{rewires[-1]['step']}", "rewire", f"x{len(rewires)}", "*",
        f"-{dropped}",
    ]  # fmt: skip
    assert row[5] == f"+{regrown}" and dropped == regrown > 0


def test_bad_config_exits_2_with_the_message(tmp_path: Path) -> None:
    cfg = _config(tmp_path, TINY.replace("lr: 0.003", "lr: -1"))
    result = _invoke("run", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert result.output == f"Error: {cfg}: optimizer.lr: -1 is out of range; allowed: > 0.0\n"
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "optimizer.lr"], "Error: bad override 'optimizer.lr': expected KEY=VALUE"),
        (
            ["--set", "model.kind=cnn", "--set", "model.hidden=0"],
            "Error: model: model kind 'cnn' needs image inputs",
        ),
        (["--set", "growth.targets=[fc9]"], "Error: growth.targets: 'fc9' is not a widenable"),
        (
            ["--set", "data.n_train=99999"],
            "Error: data.n_train: 99999 is more than the 4000 samples of mnist1d",
        ),
        (["--set", "modle.kind=mlp"], "unknown key 'modle' (did you mean 'model'?)"),
    ],
)
def test_problems_found_before_training_exit_2(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    result = _invoke("run", str(_config(tmp_path)), "--run-dir", str(tmp_path / "run"), *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing written before everything is checked


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = _invoke("run", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert result.output == f"Error: config file '{tmp_path / 'nope.yaml'}' does not exist\n"


def test_existing_run_dir_is_refused(grown_run: tuple[Path, Result], tmp_path: Path) -> None:
    run_dir, _ = grown_run
    result = _invoke("run", str(_config(tmp_path)), "--run-dir", str(run_dir))
    assert result.exit_code == 2
    assert f"run directory '{run_dir}' already holds a run (config.json)" in result.output


def test_inspect_rejects_a_non_run_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    result = _invoke("inspect", str(tmp_path))
    assert result.exit_code == 2
    assert result.output == (
        f"Error: '{tmp_path}' is not a run directory: missing metrics.jsonl, events.jsonl, "
        "checkpoint (a run directory is written by `dynarch run`)\n"
    )
    missing = _invoke("inspect", str(tmp_path / "absent"))
    assert missing.exit_code == 2 and "it does not exist" in missing.output


def test_inspect_reports_a_damaged_run_dir(grown_run: tuple[Path, Result], tmp_path: Path) -> None:
    run_dir, _ = grown_run
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"sed": 1}))
    result = _invoke("inspect", str(broken))
    assert result.exit_code == 2
    assert result.output.startswith(
        f"Error: cannot inspect '{broken}': config.json: unknown key 'sed' (did you mean 'seed'?)"
    )
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "checkpoint" / "arch.json").unlink()
    result = _invoke("inspect", str(broken))
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: cannot inspect '{broken}': ")
    assert "Traceback" not in result.output


def test_format_table() -> None:
    table = format_table(["name", "n", "note"], [["a", 1, None], ["bb", 100, "x"]])
    assert table == "name    n  note\n----  ---  ----\na       1  -\nbb    100  x"


def test_event_rows_pick_the_surrounding_evaluations() -> None:
    metrics = [
        {"step": 5, "loss": 1.0},
        {"step": 8, "val_loss": 1.0, "val_accuracy": 0.25},
        {"step": 16, "val_loss": 0.9, "val_accuracy": 0.5},
        {"step": 24, "val_loss": 0.8, "val_accuracy": 0.75},
    ]
    events = [
        {"step": 0, "op": "sparsify", "target": "*", "reason": "", "params_before": 9,
         "params_after": 9,
         "details": {"a": {"active": 1, "total": 4}, "b": {"active": 3, "total": 4}}},
        {"step": 16, "op": "widen", "target": "fc1", "reason": "plateau", "params_before": 9,
         "params_after": 12, "details": {"old_width": 2, "new_width": 3}},
        {"step": 24, "op": "widen", "target": "fc1", "reason": "plateau", "params_before": 12,
         "params_after": 15, "details": {}},
    ]  # fmt: skip
    rows = event_rows(events, metrics)
    assert [(r["acc_before"], r["acc_after"]) for r in rows] == [
        (None, 0.25), (0.5, 0.75), (0.75, None),
    ]  # fmt: skip
    assert [r["change"] for r in rows] == ["density 0.500", "2->3", None]
    assert [r["moved"] for r in rows] == [None, None, None]
    details = {"a": {"dropped": 2, "regrown": 2, "density": 0.25, "active": 1},
               "b": {"dropped": 1, "regrown": 1, "density": 0.75, "active": 3}}  # fmt: skip
    update = {"step": 20, "op": "rewire", "target": "*", "params_before": 9, "params_after": 9,
              "details": details}  # fmt: skip
    row = event_rows([update], metrics)[0]
    assert (row["change"], row["moved"], row["acc_before"]) == ("-3 +3", [3, 3], 0.5)
    assert [r["reason"] for r in rows] == [None, "plateau", "plateau"]


def test_version_falls_back_to_the_package_when_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.metadata

    import dynarch
    from dynarch import cli

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli, "version", missing)
    assert cli._version() == dynarch.__version__ == "0.1.0"
