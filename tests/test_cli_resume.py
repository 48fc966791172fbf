"""``train.checkpoint_every`` and ``dynarch resume``: a run interrupted after a checkpoint and
resumed from the command line ends exactly as the same run done in one go."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from dynarch.checkpoint import load
from dynarch.cli import main
from dynarch.runner import EpochCheckpoint

BASE = """
seed: 0
threads: 1
data: {name: mnist1d, n_train: 320, n_test: 128}
model: {kind: mlp, hidden: [16, 12], dropout: 0.1}
optimizer: {name: adam, lr: 0.003, schedule: cosine}
train: {epochs: 5, batch_size: 64, log_every: 2}
"""
CASES = {
    "plain": "",
    "set": "sparsity: {density: 0.5, algorithm: set, delta_t: 3, snapshots: 0}\n",
    # widen at every evaluation until the cap, a fraction of the dense count (a sparse scaffold)
    "widen": "sparsity: {density: 0.5, algorithm: static, snapshots: 0}\n"
    "growth: {trigger: every, every: 1, factor: 1.5, noise: 0.01, max_params: 0.9}\n",
    "patches": "sparsity: {density: 0.3, algorithm: static, snapshots: 0}\n"
    "growth: {policy: patches, trigger: plateau, patience: 1, threshold: 10.0,"
    " max_params: 0.6}\n",
    # its held-out batch is drawn once, when the run starts, never again on resume
    "tournament": "sparsity: {density: 0.3, algorithm: static, snapshots: 0}\n"
    "growth: {policy: tournament, trigger: every, every: 2, max_params: 0.6}\n",
}
OPS = {  # the structural events each run records
    "plain": [],
    "set": ["sparsify"] + ["rewire"] * 8,
    "widen": ["sparsify", "widen", "widen"],
    "patches": ["sparsify", "patch", "patch"],
    "tournament": ["sparsify", "skip", "tournament", "patch", "tournament"],
}
STOP = 2  # the interrupted run saves a checkpoint after epoch 2, dies during epoch 3


class Interrupted(Exception):
    pass


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run plots take seconds and are not what is tested here."""
    import dynarch.plots

    monkeypatch.setattr(dynarch.plots, "write_run_plots", lambda run_dir: [])


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _jsonl(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _events(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in _jsonl(run_dir / "events.jsonl")]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _run(tmp: Path, name: str, extra: str, interrupt: bool, mp: pytest.MonkeyPatch) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(BASE + extra)
    run_dir = tmp / name
    args = ["run", str(cfg), "--run-dir", str(run_dir), "--no-progress"]
    if not interrupt:
        result = _invoke(*args)
        assert result.exit_code == 0, result.output
        return run_dir
    original = EpochCheckpoint.on_epoch_end

    def dies(self: EpochCheckpoint, trainer: Any) -> None:
        if trainer.epoch == STOP:  # epoch 3 evaluated and logged, not checkpointed
            raise Interrupted
        original(self, trainer)

    with mp.context() as m:
        m.setattr(EpochCheckpoint, "on_epoch_end", dies)
        result = _invoke(*args, "--set", "train.checkpoint_every=1")
    assert isinstance(result.exception, Interrupted)
    assert not (run_dir / "summary.json").exists()
    assert load(run_dir / "checkpoint").state["trainer"]["epoch"] == STOP
    return run_dir


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_run_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    full = _run(tmp_path / "full", name, CASES[name], False, monkeypatch)
    cut = _run(tmp_path / "cut", name, CASES[name], True, monkeypatch)
    saved = load(cut / "checkpoint").state["run"]["lines"]
    # the dead run logged epoch 3 (and, where it grows, an event) after its checkpoint
    assert len(_jsonl(cut / "metrics.jsonl")) > saved["metrics"]
    result = _invoke("resume", str(cut), "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"resuming   {cut} at epoch {STOP}" in result.output
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, cut))
    assert b.pop("resumed")["epoch"] == STOP
    for key in ("steps", "epochs", "params", "widths", "density", "final", "best", "test"):
        assert a[key] == b[key], key
    assert len(a["events"]) == len(b["events"])
    assert _jsonl(full / "metrics.jsonl") == _jsonl(cut / "metrics.jsonl")
    assert _events(full) == _events(cut)  # all but the wall-clock "seconds" of each event
    assert len(_jsonl(cut / "metrics.jsonl")) > saved["metrics"]  # cut, then appended
    wa, wb = load(full / "checkpoint").model.state_dict(), load(cut / "checkpoint").model
    assert wa.keys() == wb.state_dict().keys()
    for key, value in wa.items():
        assert torch.equal(value, wb.state_dict()[key]), key
    ops = [e["op"] for e in _events(full)]
    assert ops == OPS[name]
    # the run changed structure after the checkpoint (step 10); widen's budget (a fraction of
    # the dense count it started with, not of the grown model's) stops it at the 2nd widening
    assert any(e["step"] > 10 for e in _events(full)) == (name not in ("plain", "widen"))


def test_resume_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope"
    result = _invoke("resume", str(missing))
    assert result.exit_code == 2
    assert f"cannot resume '{missing}': the directory does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = _invoke("resume", str(tmp_path / "empty"))
    assert "no config.json (give a directory `dynarch run` wrote)" in result.output
    done = _run(tmp_path, "done", "", False, monkeypatch)
    result = _invoke("resume", str(done))
    assert result.exit_code == 2
    assert "the run is complete (summary.json exists); nothing to resume" in result.output
    result = _invoke("resume", str(done / "config.json"))
    assert result.exit_code == 2 and result.output == (
        f"Error: cannot resume '{done / 'config.json'}': it is a file; give the run directory "
        "`dynarch run` wrote\n"
    )
    cut = _run(tmp_path / "cut", "cut", "", True, monkeypatch)
    shown = _invoke("inspect", str(cut))
    assert shown.exit_code == 0
    step = load(cut / "checkpoint").step
    assert (
        f"status          not finished (no summary.json): the model below is the last "
        f"checkpoint's, at step {step}; the metrics and events may go further; `dynarch resume "
        f"{cut}` continues the run"
    ) in shown.output.splitlines()
    assert "status" not in _invoke("inspect", str(done)).output
    config = json.loads((cut / "config.json").read_text())
    config["train"]["epochs"] = 0
    (cut / "config.json").write_text(json.dumps(config))
    result = _invoke("resume", str(cut))
    assert result.exit_code == 2
    assert "its config.json no longer validates" in result.output
    assert "train.epochs" in result.output
    (done / "summary.json").unlink()
    for path in (done / "checkpoint").iterdir():
        path.unlink()
    (done / "checkpoint").rmdir()
    result = _invoke("resume", str(done))
    assert result.exit_code == 2
    assert "it has no checkpoint/ (the run stopped before its first one" in result.output


def test_checkpoint_every_is_validated(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE)
    result = _invoke("run", str(cfg), "--set", "train.checkpoint_every=0",
                     "--run-dir", str(tmp_path / "r"))  # fmt: skip
    assert result.exit_code == 2
    assert "train.checkpoint_every" in result.output
