"""dynarch.plots: block averaging, difference colours, event series, PNG files, MaskSnapshots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from dynarch.callbacks import At, Callback
from dynarch.checkpoint import save
from dynarch.masks import sparsify
from dynarch.plots import (
    COLORS,
    MaskSnapshots,
    as_matrix,
    block_average,
    density_series,
    diff_rgb,
    plot_density,
    plot_rewiring,
    rewiring_series,
    save_diff_png,
    save_mask_png,
    write_run_plots,
)
from dynarch.train import Trainer

PNG = b"\x89PNG\r\n\x1a\n"
COLORS_ORDER = ("kept", "removed", "added", "none")

EVENTS = [
    {"step": 0, "op": "sparsify", "target": "*",
     "details": {"fc1": {"density": 0.5, "active": 8, "total": 16},
                 "out": {"density": 0.25, "active": 2, "total": 8}}},
    {"step": 3, "op": "widen", "target": "fc1", "details": {"old_width": 4, "new_width": 6}},
    {"step": 10, "op": "rewire", "target": "*",
     "details": {"fc1": {"dropped": 2, "regrown": 2, "density": 0.5, "active": 8},
                 "out": {"dropped": 1, "regrown": 1, "density": 0.25, "active": 2}}},
    {"step": 20, "op": "rewire", "target": "*",
     "details": {"fc1": {"dropped": 1, "regrown": 1, "density": 0.5, "active": 8},
                 "out": {"dropped": 0, "regrown": 0, "density": 0.25, "active": 2}}},
    {"step": 30, "op": "prune", "target": "*",
     "details": {"fc1": {"density": 0.25, "active": 4, "total": 16}}},
]  # fmt: skip


def _check_png(path: Path, shape: tuple[int, int] = (450, 600)) -> None:
    assert path.read_bytes()[:8] == PNG
    assert matplotlib.image.imread(path).shape == (*shape, 4)


def test_block_average_is_exact_with_partial_blocks() -> None:
    x = torch.arange(15.0).reshape(3, 5)  # blocks of 2 x 3; the last row/column are partial
    assert block_average(x, 2).tolist() == [[3.5, 6.0], [11.0, 13.5]]
    assert block_average(x, 5).tolist() == x.tolist()  # small enough: unchanged
    stacked = torch.stack([x, 2 * x])
    assert block_average(stacked, 2).tolist() == [[[3.5, 6.0], [11.0, 13.5]],
                                                  [[7.0, 12.0], [22.0, 27.0]]]  # fmt: skip
    assert block_average(torch.ones(1000, 7, dtype=torch.bool), 256).shape == (250, 7)


def test_block_average_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"max_size must be an int >= 1 \(pixels\), got 0"):
        block_average(torch.ones(2, 2), 0)
    with pytest.raises(ValueError, match=r"needs at least 2 dimensions, got \(4,\)"):
        block_average(torch.ones(4), 2)


def test_as_matrix_flattens_conv_kernels() -> None:
    w = torch.arange(48).reshape(4, 3, 2, 2)
    assert torch.equal(as_matrix(w), torch.arange(48).reshape(4, 12))
    with pytest.raises(ValueError, match=r"at least 2 dimensions, got shape \(5,\)"):
        as_matrix(torch.ones(5))


def test_diff_colours_encode_kept_removed_added() -> None:
    before = torch.tensor([[True, True, False, False]])
    after = torch.tensor([[True, False, True, False]])
    rgb = diff_rgb(before, after)
    assert rgb.shape == (1, 4, 3)
    expected = [list(COLORS[k]) for k in COLORS_ORDER]
    np.testing.assert_array_equal(rgb[0], np.array(expected, dtype=np.float32))
    assert len(set(COLORS.values())) == 4  # four distinct colours
    mixed = diff_rgb(before, after, max_size=2)  # blocks (kept, removed) and (added, none)
    kept, removed, added, none = (np.array(COLORS[k]) for k in COLORS_ORDER)
    np.testing.assert_allclose(mixed[0], [(kept + removed) / 2, (added + none) / 2], atol=1e-7)


def test_diff_needs_equal_shapes() -> None:
    with pytest.raises(ValueError, match=r"shapes \(2, 3\) and \(3, 3\); a difference needs"):
        diff_rgb(torch.ones(2, 3, dtype=torch.bool), torch.ones(3, 3, dtype=torch.bool))


def test_mask_and_diff_pngs_are_valid(tmp_path: Path) -> None:
    mask = torch.rand(20, 3, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.3
    _check_png(save_mask_png(mask, tmp_path / "m.png", title="conv"))
    other = mask.clone()
    other[0] = ~other[0]
    path = save_diff_png(mask, other, tmp_path / "sub" / "d.png", title="conv 0 -> 1")
    assert path == tmp_path / "sub" / "d.png"
    _check_png(path)
    _check_png(save_mask_png(torch.ones(600, 700, dtype=torch.bool), tmp_path / "big.png"))


def test_density_and_rewiring_series_from_events() -> None:
    assert density_series(EVENTS) == {
        "fc1": ([0, 10, 20, 30], [0.5, 0.5, 0.5, 0.25]),
        "out": ([0, 10, 20], [0.25, 0.25, 0.25]),
    }
    assert rewiring_series(EVENTS) == {"fc1": ([10, 20], [4, 2]), "out": ([10, 20], [2, 0])}
    assert density_series(EVENTS[1:2]) == {} and rewiring_series(EVENTS[:2]) == {}


def test_plot_density_and_rewiring_write_pngs(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    _check_png(plot_density(events, tmp_path / "density.png"), (450, 700))
    _check_png(plot_rewiring(str(events), tmp_path / "rewiring.png"), (450, 700))
    with pytest.raises(
        ValueError,
        match=r"no sparsify/rewire/prune event with a per-layer "
        r"density in the events given; the run has no masks",
    ):
        plot_density(EVENTS[1:2], tmp_path / "x.png")
    with pytest.raises(
        ValueError,
        match=r"no mask update with dropped/regrown counts in '.*"
        r"events.jsonl'; the masks were never rewired",
    ):
        events.write_text(json.dumps(EVENTS[0]) + "\n")
        plot_rewiring(events, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _fit(model: nn.Module, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify(model, 0.5, distribution="uniform", optimizer=opt)
    return Trainer(model, opt, (x, y), batch_size=8, epochs=2, callbacks=callbacks,
                   progress=False, **kwargs).fit()  # fmt: skip


def test_mask_snapshots_store_and_draw_changes(tmp_path: Path) -> None:
    model = _model()
    seen: dict[str, torch.Tensor] = {}

    def lower(trainer: Trainer) -> None:  # masks change between the snapshots at 0 and 2
        sparsify(trainer.model, 0.25, distribution="uniform", optimizer=trainer.optimizer)
        seen["mask"] = trainer.model[0].weight_mask.clone()

    snaps = MaskSnapshots([0, 2], out_dir=tmp_path / "masks")
    _fit(model, [At(1, lower), snaps], max_steps=5)
    assert sorted(snaps.snapshots) == [0, 2, 5]  # the end of training is always included
    assert sorted(snaps.snapshots[2]) == ["0", "2"]
    assert torch.equal(snaps.snapshots[2]["0"], seen["mask"])
    assert snaps.snapshots[0]["0"].sum().item() == 24 and seen["mask"].sum().item() == 12
    assert snaps.snapshots[5]["0"].device.type == "cpu"
    names = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert names == sorted(p.name for p in snaps.files) == [
        "0-diff-0-2.png", "0-diff-2-5.png", "0-step0.png", "0-step2.png", "0-step5.png",
        "2-diff-0-2.png", "2-diff-2-5.png", "2-step0.png", "2-step2.png", "2-step5.png",
    ]  # fmt: skip
    _check_png(tmp_path / "masks" / "0-diff-0-2.png")


def test_mask_snapshots_every_count_and_run_dir(tmp_path: Path) -> None:
    every = MaskSnapshots(every=3, diffs=False)
    _fit(_model(), [every], run_dir=tmp_path / "run")
    assert sorted(every.snapshots) == [0, 3, 6, 8]
    assert sorted(p.name for p in (tmp_path / "run" / "masks").iterdir())[:2] == [
        "0-step0.png", "0-step3.png",
    ]  # fmt: skip
    count = MaskSnapshots(count=3, draw=False)
    _fit(_model(), [count], run_dir=tmp_path / "run2")
    assert sorted(count.snapshots) == [0, 4, 8] and count.files == []
    assert not (tmp_path / "run2" / "masks").exists()
    files = count.write(tmp_path / "later")
    assert len(files) == 10 and all(p.parent == tmp_path / "later" for p in files)


def test_mask_snapshots_state_round_trip() -> None:
    snaps = MaskSnapshots(count=2, draw=False)
    _fit(_model(), [snaps])
    state = snaps.state_dict()
    assert state["taken"] == [0, 8] and state["last_step"] == 8
    fresh = MaskSnapshots(count=2)
    fresh.load_state_dict(state)
    assert sorted(fresh.snapshots) == [0, 8]
    for step in (0, 8):  # every snapshot comes back: a resumed run draws them all
        assert all(torch.equal(fresh.snapshots[step][k], snaps.snapshots[step][k]) for k in "02")
    old = {k: v for k, v in state.items() if k != "masks"}  # an older version's state
    fresh.load_state_dict(old)
    assert fresh.snapshots[0] == {} and torch.equal(
        fresh.snapshots[8]["0"], snaps.snapshots[8]["0"]
    )
    with pytest.raises(ValueError, match=r"MaskSnapshots state must have keys"):
        fresh.load_state_dict({"taken": []})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs exactly one of steps, every or count; got steps=None"),
        ({"steps": [1], "every": 2}, "needs exactly one of steps, every or count"),
        ({"steps": [1, -1]}, r"steps must be a list of ints >= 0, got \[1, -1\]"),
        ({"every": 0}, "every must be an int >= 1, got 0"),
        ({"count": 1}, "count must be an int >= 2, got 1"),
        ({"count": 3, "max_size": 0}, "max_size must be an int >= 1"),
    ],
)
def test_mask_snapshots_validate_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MaskSnapshots(**kwargs)


def test_write_run_plots(tmp_path: Path) -> None:
    model = _model()
    sparsify(model, 0.5, distribution="uniform")
    save(tmp_path / "checkpoint", model)
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    written = write_run_plots(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "density.png", "rewiring.png", "masks/0-final.png", "masks/2-final.png",
    ]  # fmt: skip
    for path in written:
        assert path.read_bytes()[:8] == PNG
    (tmp_path / "events.jsonl").write_text(json.dumps(EVENTS[1]) + "\n")  # dense: nothing
    assert write_run_plots(tmp_path) == []
    with pytest.raises(ValueError, match=r"is not a run directory: it has no events\.jsonl"):
        write_run_plots(tmp_path / "nope")
