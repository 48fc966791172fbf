"""bench/grow_vs_static.py and its gromo peer on tiny settings (the real run is `make bench`)."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gromo_peer  # noqa: E402
import grow_report  # noqa: E402
import grow_vs_static as gvs  # noqa: E402

PEER = gromo_peer.peer_available()
needs_gromo = pytest.mark.skipif(not PEER, reason="gromo (pip install -e '.[bench]') missing")
# 512 training samples, batch 128: 4 steps per epoch (also in a selection cell: 427 samples)
TINY = gvs.Config(epochs=1, hidden="16,16", start="4,4", schedules="0.25:net2net",
                  limit_train=512, limit_test=200, gromo_every=1, gromo_window=1.0,
                  gromo_samples=256)  # fmt: skip
WEIGHTS_16 = 784 * 16 + 16 * 16 + 16 * 10
TEST_KEYS = {"method", "seed", "accuracy", "seconds", "weights", "params", "hidden",
             "schedule", "growth_steps"}  # fmt: skip


def _weights(h1: int, h2: int) -> int:
    return 784 * h1 + h1 * h2 + h2 * 10


def test_docstring_examples_run() -> None:
    assert doctest.testmod(gvs).failed == 0
    assert doctest.testmod(grow_report).failed == 0


@needs_gromo
def test_peer_docstring_examples_run() -> None:
    assert doctest.testmod(gromo_peer).failed == 0


def test_schedules_parse_and_double_until_the_final_size() -> None:
    assert gvs.parse_schedule("2:zero") == (2.0, "zero")
    assert gvs.parse_schedule("0.01:random") == (0.01, "random")
    for bad in ("x:zero", "0:zero", "1:xavier", "1"):
        message = rf"schedule '{bad}': use 'K:init' with K > 0 epochs between doublings and "
        message += r"init one of net2net, zero, random \(e.g. '1:net2net'\)"
        with pytest.raises(ValueError, match=message):
            gvs.parse_schedule(bad)
    assert gvs.growth_steps(0.5, [32, 32], [256, 256], 469) == [234, 469, 704]
    # 32 -> 64 -> 100 (capped) and 32 -> 64 -> 128 -> 256: three rounds
    assert gvs.growth_steps(1.0, [32, 32], [100, 256], 10) == [10, 20, 30]
    assert gvs.growth_steps(0.1, [4, 4], [16, 16], 4) == [1, 1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "static,magic"], "'static,magic': allowed are static, grown, grown_plateau"),
        (["--schedules", "1:net2net,1:wide"], "schedule '1:wide': use 'K:init' with K > 0"),
        (["--hidden", "256,0"], "'256,0': give positive hidden widths like 256,256"),
        (["--start", "32,512"], "--start 32,512 must give one width <= --hidden 256,256"),
        (["--start", "32,64,64"], "--start 32,64,64 must give one width <= --hidden"),
        (["--start", "32,16"], "--start 32,16: gromo's GrowingMLP needs equal starting widths"),
        (["--schedules", "4:zero"], "schedule 4:zero reaches --hidden only after epoch 12; it "
                                    "must grow within the 10 epochs"),
        (["--shrink", "0"], "argument --shrink: '0' is not a factor in (0, 1]"),
        (["--shrink", "1.5"], "argument --shrink: '1.5' is not a factor in (0, 1]"),
        (["--shrink", "half"], "argument --shrink: 'half' is not a factor in (0, 1]"),
    ],
)  # fmt: skip
def test_bad_command_lines_are_refused(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        gvs.parse_args(args)
    assert message in capsys.readouterr().err


def test_static_and_grown_cells_end_at_the_same_size() -> None:
    static = gvs.run_cell(gvs.Cell("static", 0), TINY)
    assert set(static) == TEST_KEYS
    assert static["hidden"] == [16, 16] and static["weights"] == WEIGHTS_16
    assert static["params"] == WEIGHTS_16 + 16 + 16 + 10 and static["growth_steps"] == []
    for init in ("net2net", "zero"):
        grown = gvs.run_cell(gvs.Cell("grown", 0, f"0.25:{init}"), TINY)
        assert (grown["hidden"], grown["weights"]) == ([16, 16], WEIGHTS_16)
        assert grown["growth_steps"] == [1, 2]  # 4 -> 8 after step 1, 8 -> 16 after step 2
        assert grown["schedule"] == f"0.25:{init}" and 0 <= grown["accuracy"] <= 1
        assert grown["seconds"] > 0


def test_a_selection_cell_scores_on_the_held_out_training_samples() -> None:
    row = gvs.run_cell(gvs.Cell("grown", 100, "0.4:zero", "val"), TINY)
    assert set(row) == {"schedule", "seed", "val_accuracy", "seconds", "hidden"}
    assert (row["schedule"], row["seed"], row["hidden"]) == ("0.4:zero", 100, [16, 16])
    # 85 held-out samples (512 // 6): the accuracy is a multiple of 1/85
    assert round(row["val_accuracy"] * 85, 6) == round(row["val_accuracy"] * 85)


def test_normalize_standardises_by_the_training_part_alone() -> None:
    data = gvs._dataset(512, 200)
    (x, y), (ex, ey) = gvs._split(data, gvs.Cell("static", 0), normalize=True)
    mean, std = data.train_x.mean(), data.train_x.std()
    assert torch.equal(x, (data.train_x - mean) / std) and torch.equal(y, data.train_y)
    assert torch.equal(ex, (data.test_x - mean) / std) and torch.equal(ey, data.test_y)
    (vx, _), (hx, _) = gvs._split(data, gvs.Cell("grown", 100, "1:zero", "val"), normalize=True)
    part = data.train_x[:427]  # a selection cell: the held-out 85 samples are not looked at
    assert torch.equal(vx, (part - part.mean()) / part.std())
    assert torch.equal(hx, (data.train_x[427:] - part.mean()) / part.std())
    raw = gvs._split(data, gvs.Cell("static", 0))
    assert raw[0][0] is data.train_x and raw[1][0] is data.test_x  # off by default
    assert gvs.parse_args(["--normalize"]).normalize and not gvs.parse_args([]).normalize


def test_grown_plateau_doubles_when_the_training_subset_loss_stalls() -> None:
    # threshold 10: the second evaluation (step 8) cannot improve by 10 -> double once;
    # the trigger is reset, so the third evaluation (step 12) starts afresh
    config = replace(TINY, epochs=3, plateau_threshold=10.0)
    row = gvs.run_cell(gvs.Cell("grown_plateau", 0, "1:net2net"), config)
    assert (row["hidden"], row["growth_steps"]) == ([8, 8], [8])
    assert row["weights"] == _weights(8, 8)


@needs_gromo
def test_gromo_cell_grows_toward_but_never_beyond_the_final_size() -> None:
    config = replace(TINY, epochs=2)
    row = gvs.run_cell(gvs.Cell("gromo", 0), config)
    h1, h2 = row["hidden"]
    assert 4 <= h1 <= 16 and 4 <= h2 <= 16 and (h1, h2) != (4, 4)
    assert row["weights"] == _weights(h1, h2)
    assert row["params"] == row["weights"] + h1 + h2 + 10
    assert row["growth_steps"] and set(row["growth_steps"]) <= set(range(1, 9))


@needs_gromo
def test_gromo_growth_reaches_the_target_exactly_and_renews_the_optimizer() -> None:
    from dynarch.train import Trainer

    torch.manual_seed(0)
    x, y = torch.randn(256, 12), torch.randint(0, 3, (256,))
    model = gromo_peer.build_growing_mlp(12, [2, 2], 3)
    grow = gromo_peer.GromoGrowth(
        model, [5, 4], every=1, until=40, samples=128, seed=0,
        make_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = Trainer(model, opt, (x, y), batch_size=64, max_steps=40, epochs=10,
                      callbacks=[grow], progress=False)  # fmt: skip
    trainer.fit()
    assert grow.done and gromo_peer.hidden_widths(model) == [5, 4]
    assert all(a <= b for r in grow.log for a, b in zip(r["hidden"], [5, 4]))
    assert sum(r["added"] for r in grow.log) == (5 - 2) + (4 - 2)
    assert trainer.optimizer is not opt
    assert {id(p) for p in trainer.optimizer.param_groups[0]["params"]} == {
        id(p) for p in model.parameters()
    }
    assert trainer.optimizer.param_groups[0]["lr"] == 0.05
    assert grow.grow((x, y))["added"] == 0  # at the target: nothing more


@needs_gromo
def test_gromo_peer_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match=r"start widths \[8, 4\]: use equal widths such as"):
        gromo_peer.build_growing_mlp(784, [8, 4], 10)
    model = gromo_peer.build_growing_mlp(12, [4, 4], 3)
    with pytest.raises(ValueError, match=r"target widths \[8\] must give one width per hidden"):
        gromo_peer.GromoGrowth(model, [8], every=1, until=1, samples=1, seed=0,
                               make_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr))  # fmt: skip
    with pytest.raises(ValueError, match="every must be a positive int, got 0"):
        gromo_peer.GromoGrowth(model, [8, 8], every=0, until=1, samples=1, seed=0,
                               make_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr))  # fmt: skip


def _row(method: str, seed: int, acc: float, seconds: float, hidden: list[int]) -> dict:
    return {"method": method, "seed": seed, "accuracy": acc, "seconds": seconds,
            "weights": _weights(*hidden), "hidden": hidden}  # fmt: skip


def test_choice_summary_tables_and_checks() -> None:
    sel = [{"schedule": c, "seed": s, "val_accuracy": a, "seconds": 10.0, "hidden": [16, 16]}
           for c, s, a in [("1:zero", 100, 0.8), ("1:zero", 101, 0.9), ("2:zero", 100, 0.85),
                           ("2:zero", 101, 0.85)]]  # fmt: skip
    assert gvs.choose(sel, ["1:zero", "2:zero"]) == "1:zero"  # tie: the first
    assert gvs.choose([], ["2:zero"]) == "2:zero"  # one candidate: nothing to select
    results = [
        _row("static", 0, 0.88, 20.0, [16, 16]), _row("static", 1, 0.90, 22.0, [16, 16]),
        _row("grown", 0, 0.885, 24.0, [16, 16]), _row("grown", 1, 0.895, 26.0, [16, 16]),
        _row("gromo", 0, 0.87, 30.0, [16, 8]), _row("gromo", 1, 0.87, 30.0, [16, 16]),
    ]  # fmt: skip
    summary = gvs.summarize(results, [16, 16])
    assert summary["checks"] == {"accuracy_points": pytest.approx(0.0), "accuracy_met": True,
                                 "time_ratio": pytest.approx(25 / 21), "time_limit": 1.2,
                                 "time_met": True}  # fmt: skip
    assert summary["methods"]["gromo"]["hidden"] == [(16, 8), (16, 16)]
    assert summary["methods"]["gromo"]["reached_size"] == 1
    payload = {"selection": {"candidates": ["1:zero", "2:zero"], "chosen": "1:zero",
                             "results": sel}, "summary": summary}  # fmt: skip
    text = gvs.tables(payload)
    assert "| 1:zero (chosen) | 85.00 ± 7.07 | 10.0 |" in text
    assert "| 2:zero | 85.00 ± 0.00 | 10.0 |" in text
    assert "| static | 89.00 ± 1.41 | 21.0 ± 1.4 | 16-16 | 12,960 |" in text
    assert "| gromo | 87.00 ± 0.00 | 30.0 ± 0.0 | 16-8 / 16-16 | 12,856 |" in text
    assert gvs.checks(payload) == [
        "grown accuracy 89.00% vs static 89.00% (+0.00 points; target >= 0): met",
        "grown wall time 25.0 s vs static 21.0 s (1.19x; target <= 1.2x): met",
        "grown reached S in 2/2 seeds (final hidden 16-16, 12,960 weights)",
        "gromo reached S in 1/2 seeds (final hidden 16-8 / 16-16, 12,856 weights)",
    ]
    slow = gvs.summarize([*results[:2], _row("grown", 0, 0.85, 30.0, [16, 16])], [16, 16])
    assert gvs.checks({"summary": slow})[:2] == [
        "grown accuracy 85.00% vs static 89.00% (-4.00 points; target >= 0): MISSED",
        "grown wall time 30.0 s vs static 21.0 s (1.43x; target <= 1.2x): MISSED",
    ]


@pytest.mark.slow
def test_tiny_benchmark_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gvs.json"
    methods = "static,grown,grown_plateau" + (",gromo" if PEER else "")
    args = ["--limit-train", "512", "--limit-test", "200", "--epochs", "1", "--seeds", "1",
            "--select-seeds", "1", "--hidden", "16,16", "--start", "4,4", "--schedules",
            "0.25:net2net,0.4:zero", "--methods", methods, "--gromo-every", "1", "--jobs", "1",
            "--out", str(out)]  # fmt: skip
    run = subprocess.run([sys.executable, str(BENCH / "grow_vs_static.py"), *args],
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert run.returncode == 0, run.stderr
    payload = json.loads(out.read_text())
    assert set(payload) == {"command", "config", "machine", "selection", "results", "summary"}
    assert payload["command"] == "python bench/grow_vs_static.py " + " ".join(args)
    assert payload["config"]["schedules"] == "0.25:net2net,0.4:zero"
    sel = payload["selection"]
    assert sel["candidates"] == ["0.25:net2net", "0.4:zero"]
    assert sorted((r["schedule"], r["seed"]) for r in sel["results"]) == [
        ("0.25:net2net", 100),
        ("0.4:zero", 100),
    ]
    assert sel["chosen"] == gvs.choose(sel["results"], sel["candidates"])
    rows = payload["results"]
    assert [(r["method"], r["seed"]) for r in rows] == [(m, 0) for m in methods.split(",")]
    assert [r["schedule"] for r in rows[:3]] == ["", sel["chosen"], sel["chosen"]]
    assert rows[1]["hidden"] == [16, 16] and rows[1]["weights"] == WEIGHTS_16
    assert set(payload["summary"]["checks"]) == {
        "accuracy_points", "accuracy_met", "time_ratio", "time_limit", "time_met"
    }  # fmt: skip
    assert "| static | " in run.stdout and "(chosen)" in run.stdout
    assert "grown wall time" in run.stdout
    # --resume with everything done runs nothing and keeps the results
    assert gvs.main([*args, "--resume"]) == 0
    again = json.loads(out.read_text())
    assert again["results"] == rows and again["selection"] == sel
    assert "0 selection cells to run" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"other settings \(saved, now\): \{'epochs': \(1, 2\)\}"):
        gvs.main([*args[:5], "2", *args[6:], "--resume"])
    assert gvs.main(["--readme", "--out", str(out)]) == 0
    assert "| grown | " in capsys.readouterr().out


def test_shrink_scales_every_parameter_and_its_momentum() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    gvs.shrink_all(model, opt, 0.25)
    for p, b, m in zip(model.parameters(), before, bufs):
        assert torch.equal(p, b * 0.25)
        assert torch.equal(opt.state[p]["momentum_buffer"], m * 0.25)


def test_fanin_rescale_scales_only_the_kept_inputs_of_grown_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    gvs.rescale_kept_inputs(model, {"0": 3, "2": 2})  # "2" grew from 2 to 8 inputs: 1/2
    w0, b0, w2, b2 = before
    assert torch.equal(model[0].weight, w0) and torch.equal(model[0].bias, b0)  # same fan-in
    assert torch.equal(model[2].weight[:, :2], w2[:, :2] * 0.5)
    assert torch.equal(model[2].weight[:, 2:], w2[:, 2:]) and torch.equal(model[2].bias, b2)
    gvs.rescale_kept_inputs(model, {"": 1, "1": 1})  # not Linear modules: nothing to do
    assert torch.equal(model[2].weight[:, 2:], w2[:, 2:])
    assert gvs.parse_args(["--fanin-rescale"]).fanin_rescale
    assert not gvs.parse_args([]).fanin_rescale and not gvs.Config(epochs=1).fanin_rescale


def test_a_fanin_rescaled_grown_cell_rescales_after_every_doubling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[dict[str, int], dict[str, int]]] = []
    real = gvs.rescale_kept_inputs

    def record(model: nn.Module, fan_in: dict[str, int]) -> None:
        now = {n: m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        calls.append((dict(fan_in), now))
        real(model, fan_in)

    monkeypatch.setattr(gvs, "rescale_kept_inputs", record)
    config = replace(TINY, fanin_rescale=True, schedules="0.25:random")
    row = gvs.run_cell(gvs.Cell("grown", 0, "0.25:random"), config)
    assert row["hidden"] == [16, 16] and row["weights"] == WEIGHTS_16
    assert calls == [  # 4 -> 8 -> 16: the fan-ins before and after each doubling
        ({"fc1": 784, "fc2": 4, "out": 4}, {"fc1": 784, "fc2": 8, "out": 8}),
        ({"fc1": 784, "fc2": 8, "out": 8}, {"fc1": 784, "fc2": 16, "out": 16}),
    ]
    calls.clear()
    gvs.run_cell(gvs.Cell("grown", 0, "0.25:random"), replace(config, fanin_rescale=False))
    assert calls == []
