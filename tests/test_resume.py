"""Exact resume across processes: widen at step 20, sparsify at step 40, stop/save at 30."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

JOB = Path(__file__).with_name("resume_job.py")


def _run(mode: str, work: Path) -> dict:
    subprocess.run([sys.executable, str(JOB), mode, str(work)], check=True, timeout=300)
    return torch.load(work / f"{mode}.pt", weights_only=True)


def test_stop_save_load_continue_is_bitwise_equal(tmp_path: Path) -> None:
    full = _run("full", tmp_path)
    first = _run("first", tmp_path)
    second = _run("second", tmp_path)
    assert full["step"] == second["step"] == 60 and first["step"] == 30
    assert len(full["losses"]) == 60
    assert first["losses"] + second["losses"] == full["losses"]  # exact float equality
    assert full["params"].keys() == second["params"].keys()
    for name, value in full["params"].items():
        assert torch.equal(value, second["params"][name]), name
    # the run really changed structure: widened to 48, then sparsified to half density (ERK)
    assert full["params"]["0.weight"].shape == (48, 20)
    masks = [v for k, v in full["params"].items() if k.endswith("weight_mask")]
    assert sum(int(m.sum()) for m in masks) == (48 * 20 + 16 * 48 + 3 * 16) // 2
    assert full["opt"].keys() == second["opt"].keys()
    for name, state in full["opt"].items():
        assert state.keys() == second["opt"][name].keys(), name
        for key, value in state.items():
            assert torch.equal(value, second["opt"][name][key]), (name, key)
