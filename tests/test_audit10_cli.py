"""Audit 10: checkpoints interrupted between their renames are recovered, summary.json is
written atomically, ``inspect`` names a damaged file, a ladder refuses a ``train.max_steps``
that ends without an evaluation before anything trains."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import dynarch.checkpoint as C
import dynarch.runner as R
from dynarch.checkpoint import load, recover, save
from dynarch.cli import main

BASE = """
seed: 0
threads: 1
data: {name: mnist1d, n_train: 320, n_test: 128}
model: {kind: mlp, hidden: [16, 12]}
optimizer: {name: adam, lr: 0.003}
train: {epochs: 2, batch_size: 64, checkpoint_every: 1}
"""


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    import dynarch.plots

    monkeypatch.setattr(dynarch.plots, "write_run_plots", lambda run_dir: [])


def _model(value: float) -> nn.Module:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def _hidden(root: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in root.iterdir() if p.name.startswith("."))


class Killed(BaseException):
    pass


def _interrupt_between_renames(monkeypatch: pytest.MonkeyPatch, error: type) -> None:
    real = os.replace

    def replace(a: object, b: object) -> None:
        real(a, b)
        if ".old-" in str(b):
            raise error()

    monkeypatch.setattr(C.os, "replace", replace)


def test_save_interrupted_between_renames_puts_the_new_checkpoint_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(tmp_path / "ck", _model(1.0), epoch=1)
    _interrupt_between_renames(monkeypatch, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        save(path, _model(2.0), epoch=2)
    monkeypatch.undo()
    ck = load(path)  # the complete new checkpoint was not deleted
    assert ck.state["epoch"] == 2 and bool((ck.model.weight == 2.0).all())
    save(path, _model(3.0), epoch=3)  # the next save clears the leftover old one
    assert _hidden(tmp_path) == [] and load(path).state["epoch"] == 3


def test_load_recovers_the_newest_complete_leftover(tmp_path: Path) -> None:
    path = save(tmp_path / "ck", _model(1.0), epoch=1)
    os.replace(path, tmp_path / ".ck.old-aaaa")  # killed between the renames (SIGKILL)
    newer = save(tmp_path / "new", _model(2.0), epoch=2)
    os.replace(newer, tmp_path / ".ck.tmp-bbbb")
    (tmp_path / ".ck.tmp-cccc").mkdir()  # a save killed while writing: no arch.json
    (tmp_path / ".ck.tmp-cccc" / "model.safetensors").write_bytes(b"x")
    ck = load(path)
    assert ck.state["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_recover_ignores_damaged_leftovers(tmp_path: Path) -> None:
    path = save(tmp_path / "ck", _model(1.0), epoch=1)
    os.replace(path, tmp_path / ".ck.tmp-aaaa")
    with open(tmp_path / ".ck.tmp-aaaa" / "state.pt", "ab") as fh:
        fh.write(b"torn")  # no longer matches the digest in arch.json
    assert recover(path) is False
    with pytest.raises(C.CheckpointError, match="no checkpoint directory at"):
        load(path)
    assert _hidden(tmp_path) == [".ck.tmp"]  # left for the user: nothing complete to use


def _run(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE)
    run_dir = tmp_path / "run"
    args = ["run", str(cfg), "--run-dir", str(run_dir), "--no-progress", *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return cfg, run_dir


def test_resume_after_a_kill_between_the_renames(tmp_path: Path) -> None:
    _, run_dir = _run(tmp_path)
    full = json.loads((run_dir / "summary.json").read_text())
    # the run as a kill between the renames of its last epoch's save leaves it
    (run_dir / "summary.json").unlink()
    os.replace(run_dir / "checkpoint", run_dir / ".checkpoint.old-0000")
    res = CliRunner().invoke(main, ["resume", str(run_dir), "--no-progress"])
    assert res.exit_code == 0, res.output
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["final"] == full["final"] and resumed["steps"] == full["steps"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]


def test_summary_is_written_atomically_and_a_torn_one_does_not_block_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def torn(path: Path, text: str) -> None:  # dies after the temporary file, before replace
        path.with_name(f".{path.name}.tmp").write_text(text[: len(text) // 2])
        raise Killed()

    monkeypatch.setattr(R, "write_atomic", torn)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE)
    run_dir = tmp_path / "run"
    with pytest.raises(Killed):
        CliRunner().invoke(main, ["run", str(cfg), "--run-dir", str(run_dir), "--no-progress"])
    assert not (run_dir / "summary.json").exists()  # the run is not marked complete
    monkeypatch.undo()
    # a summary.json torn by an older dynarch (written in place) does not block resume either
    (run_dir / "summary.json").write_text('{"run_dir": "x", "da')
    res = CliRunner().invoke(main, ["resume", str(run_dir), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 10
    res = CliRunner().invoke(main, ["resume", str(run_dir), "--no-progress"])
    assert res.exit_code == 2 and "the run is complete" in res.output


def test_write_atomic_leaves_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    R.write_atomic(path, "old\n")

    with pytest.raises(TypeError):
        R.write_atomic(path, 3)  # type: ignore[arg-type]
    assert path.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["summary.json"]


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("summary.json", '{"steps": 1', r"summary\.json' is damaged: Expecting"),
        ("config.json", "[1, 2]", r"config\.json' is damaged: it holds no JSON object"),
        (
            "metrics.jsonl",
            '{"step": 1}\n{"step": 2, "lo\n',
            r"metrics\.jsonl' is damaged \(line 2\)",
        ),
        ("events.jsonl", "3\n", r"events\.jsonl' is damaged \(line 1\): not a JSON object"),
    ],
)
def test_inspect_names_the_damaged_file(
    tmp_path: Path, name: str, damage: str, message: str
) -> None:
    shared = tmp_path.parent / "audit10-inspect-run"
    if not (shared / "summary.json").exists():
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir()
        _run(shared)
    run_dir = tmp_path / "run"
    shutil.copytree(shared / "run", run_dir)
    (run_dir / name).write_text(damage)
    res = CliRunner().invoke(main, ["inspect", str(run_dir)])
    assert res.exit_code == 2
    assert res.output.startswith(f"Error: {str(run_dir / name)!r} is damaged")
    assert re.search(message, res.output), res.output


def test_inspect_recovers_a_checkpoint_left_between_the_renames(tmp_path: Path) -> None:
    _, run_dir = _run(tmp_path)
    before = CliRunner().invoke(main, ["inspect", str(run_dir)]).output
    os.replace(run_dir / "checkpoint", run_dir / ".checkpoint.tmp-0000")
    res = CliRunner().invoke(main, ["inspect", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert res.output == before and (run_dir / "checkpoint").is_dir()


LADDER = ["--densities", "1,0.5", "--no-progress"]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["train.max_steps=7"],
            "train.max_steps 7 stops each ladder run mid-epoch (5 steps an epoch), where no "
            "evaluation is taken, but the ladder compares the final models' val accuracies; "
            "set it to 5 or 10, or remove it (--set train.max_steps=null)",
        ),
        (
            ["train.epochs=4", "train.eval_every_epochs=2", "train.max_steps=5"],
            "train.max_steps 5 stops each ladder run after epoch 1, which "
            "train.eval_every_epochs 2 does not evaluate, where no evaluation is taken, but the "
            "ladder compares the final models' val accuracies; set it to 10, or remove it",
        ),
    ],
)
def test_ladder_refuses_max_steps_without_a_final_evaluation_before_training(
    tmp_path: Path, sets: list[str], message: str
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE)
    root = tmp_path / "ladder"
    args = ["ladder", str(cfg), "--run-dir", str(root), *LADDER]
    res = CliRunner().invoke(main, args + [a for s in sets for a in ("--set", s)])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split()), res.output
    assert not root.exists()  # nothing trained, nothing written


def test_ladder_accepts_max_steps_at_an_evaluated_epoch(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BASE)
    root = tmp_path / "ladder"
    args = ["ladder", str(cfg), "--run-dir", str(root), *LADDER, "--set", "train.max_steps=5"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    runs = json.loads((root / "ladder.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["dense-s0", "static-d0.5-s0"]
