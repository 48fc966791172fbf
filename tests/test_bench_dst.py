"""Smoke test of bench/dst.py's plumbing on tiny settings (the real run is `make bench`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import dst  # noqa: E402
import dst_report  # noqa: E402

PEER = importlib.util.find_spec("rigl_torch") is not None
ROW_KEYS = {
    "method", "density", "seed", "accuracy", "seconds", "step_ms", "step_ms_mean", "updates",
    "density_measured", "nonzero_density", "layer_density",
}  # fmt: skip


def _row(method: str, density: float, seed: int, accuracy: float, step_ms: float = 1.0) -> dict:
    return {"method": method, "density": density, "seed": seed, "accuracy": accuracy,
            "step_ms": step_ms, "density_measured": density}  # fmt: skip


def test_plan_runs_dense_once_per_seed_and_every_other_method_per_density() -> None:
    cells = dst.plan(["dense", "static", "rigl"], [0.1, 0.05], 2)
    assert [(c.method, c.density, c.seed) for c in cells] == [
        ("dense", 1.0, 0), ("static", 0.1, 0), ("rigl", 0.1, 0),
        ("dense", 1.0, 1), ("static", 0.1, 1), ("rigl", 0.1, 1),
        ("static", 0.05, 0), ("rigl", 0.05, 0), ("static", 0.05, 1), ("rigl", 0.05, 1),
    ]  # fmt: skip


def test_bad_method_and_density_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        dst.parse_args(["--methods", "dense,magic"])
    assert "'dense,magic': allowed are dense, static, set" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dst.parse_args(["--densities", "0.1,1.5"])
    assert "densities must be in (0, 1), got '0.1,1.5'" in capsys.readouterr().err


def test_tables_and_checks_from_a_payload() -> None:
    payload = {"results": [
        _row("dense", 1.0, 0, 0.90), _row("dense", 1.0, 1, 0.88),
        _row("static", 0.05, 0, 0.86), _row("static", 0.05, 1, 0.86),
        _row("rigl", 0.05, 0, 0.89, 2.0), _row("rigl", 0.05, 1, 0.89, 2.0),
        _row("rigl-torch", 0.05, 0, 0.88, 3.0), _row("rigl-torch", 0.05, 1, 0.88, 3.0),
        _row("gmp", 0.05, 0, 0.885), _row("gmp", 0.05, 1, 0.885),
    ]}  # fmt: skip
    assert dst_report.checks(payload) == [
        "5%: best dynarch sparse training (rigl) is 0.00 points below dense (target <= 0.3): met",
        "5%: best dynarch dense-to-sparse (gmp) is 0.50 points below dense (target <= 0.3): MISSED",
        "5%: rigl - static = +3.00 points: met",
        "5%: rigl vs rigl-torch: +1.00 points, step 2.00 vs 3.00 ms: met",
    ]
    table = dst_report.tables(payload)
    assert "| dense | 89.00 ± 1.41 |" in table
    assert "| rigl-torch | 88.00 ± 0.00 |" in table
    assert "| rigl | 2.00 |" in table
    assert "| gmp | 88.50 ± 0.00 |" in table


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "dst.json"
    dst.write_atomic(out, dst._payload("cmd", dst.Config(epochs=2), []))
    with pytest.raises(SystemExit, match=r"other settings \(saved, now\): \{'epochs': \(2, 3\)\}"):
        dst._resumed(out, dst.Config(epochs=3))
    assert dst._resumed(out, dst.Config(epochs=2)) == []


def test_tiny_grid_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "dst.json"
    methods = "dense,static,set,gmp,granet" + (",rigl-torch" if PEER else "")
    args = ["--limit-train", "512", "--limit-test", "500", "--epochs", "1", "--seeds", "1",
            "--densities", "0.1", "--methods", methods, "--delta-t", "2", "--jobs", "1",
            "--out", str(out)]  # fmt: skip
    run = subprocess.run([sys.executable, str(BENCH / "dst.py"), *args],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    payload = json.loads(out.read_text())
    assert set(payload) == {"command", "dense_accuracy", "config", "machine", "results"}
    assert payload["command"] == "python bench/dst.py " + " ".join(args)
    rows = payload["results"]
    assert [(r["method"], r["density"], r["seed"]) for r in rows] == [
        ("dense", 1.0, 0), ("static", 0.1, 0), ("set", 0.1, 0), ("gmp", 0.1, 0),
        ("granet", 0.1, 0),
    ] + ([("rigl-torch", 0.1, 0)] if PEER else [])  # fmt: skip
    for r in rows:
        assert set(r) == ROW_KEYS
        assert 0.0 <= r["accuracy"] <= 1.0 and r["seconds"] > 0 and r["step_ms"] > 0
        assert set(r["layer_density"]) == {"fc1", "fc2", "out"}
    assert payload["dense_accuracy"] == rows[0]["accuracy"]
    assert rows[0]["density_measured"] == 1.0 and rows[0]["updates"] == 0
    assert [r["density_measured"] for r in rows[1:]] == [0.1] * (len(rows) - 1)
    assert rows[1]["updates"] == 0  # static
    assert rows[2]["updates"] == 1  # set: 4 steps, t_end 3, an update at step 2
    # gmp: dense until pruned at steps 2 (delta_t) and 3 (t_end, always pruned) to 10%
    assert rows[3]["updates"] == 2 and rows[3]["nonzero_density"] <= 0.1
    assert rows[4]["updates"] == 3  # granet: the same two prunings and a RigL update at 2
    assert "| set | " in run.stdout and "| dense | " in run.stdout
    # --resume with everything done runs nothing and keeps the results
    assert dst.main([*args, "--resume"]) == 0
    assert json.loads(out.read_text())["results"] == rows


def test_normalize_and_schedule_options() -> None:
    args = dst.parse_args(["--normalize", "--schedule", "constant"])
    assert args.normalize is True and args.schedule == "constant"
    defaults = dst.parse_args([])
    assert defaults.normalize is False and defaults.schedule == "cosine"
    raw = dst._dataset(256, 100)
    std = dst._dataset(256, 100, normalize=True)
    assert torch.equal(std.train_x, raw.standardize().train_x)
    assert torch.equal(std.test_x, raw.standardize().test_x)
    assert dst._dataset(256, 100, normalize=True) is std  # cached per setting
    assert dst.Config(epochs=1).normalize is False and dst.Config(epochs=1).schedule == "cosine"


def test_validation_split_scores_on_held_out_training_samples() -> None:
    raw = dst._dataset(300, 100)
    val = dst._dataset(300, 100, validation=50)
    assert torch.equal(val.train_x, raw.train_x[:250]) and torch.equal(
        val.test_y, raw.train_y[250:]
    )
    std = dst._dataset(300, 100, normalize=True, validation=50)
    assert torch.equal(std.train_x, val.standardize().train_x)  # statistics of the 250 only
    with pytest.raises(ValueError, match="--validation 299 leaves 1 training samples"):
        dst._dataset(300, 100, validation=299)


def test_gmp_window_is_checked() -> None:
    with pytest.raises(SystemExit, match=r"need 0 <= --gmp-start < --t-end <= 1, got 0.8 and 0.75"):
        dst.main(["--methods", "gmp", "--gmp-start", "0.8", "--out", "/nonexistent/x.json"])
