"""Audit of the command line as a demanding user drives it: every shipped config, sparsity x
growth x model combinations, ``dynarch inspect`` on each run, ``dynarch ladder`` and
``dynarch rescue`` with tiny settings, and the errors of bad configs, options and paths
(one ``Error:`` line, exit code 2, no traceback, nothing written)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from dynarch.checkpoint import load
from dynarch.cli import main
from dynarch.config import ConfigError, GrowthConfig, load_config, validate_config
from dynarch.models import build_model
from dynarch.plots import write_run_plots as WRITE_RUN_PLOTS
from dynarch.policies import check_growth, start_active_params
from dynarch.report import format_table

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed"
)
# 256 training samples in batches of 32: 8 steps an epoch, 24 in 3 epochs, evaluations at
# steps 8, 16 and 24
BASE = """
seed: 0
threads: 1
data: {name: mnist1d, n_train: 256, n_test: 128}
model: {kind: mlp, hidden: [16, 16]}
optimizer: {name: adam, lr: 0.003}
train: {epochs: 3, batch_size: 32}
"""
PARAMS = 40 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10  # 1098
SPARSE = ["sparsity.density=0.3", "sparsity.snapshots=0"]
GROWTH_OPS = {"widen", "patch", "skip", "deepen"}


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _error(result: Result, message: str) -> None:
    """``result`` failed with exit code 2 and exactly the one-line ``message``."""
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == f"Error: {message}"
    assert "Traceback" not in result.output and result.exception is not None


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit-cli") / "base.yaml"
    path.write_text(BASE)
    return path


@pytest.fixture(scope="module")
def no_run_plots() -> Iterator[None]:
    """Sparse runs skip their density/rewiring plots (drawn by test_cli.py): keeps this fast."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dynarch.plots.write_run_plots", lambda run_dir: [])
        yield


class Runs:
    """Runs of the base config made once per module, by name."""

    def __init__(self, base: Path) -> None:
        self.base, self.done = base, dict[str, tuple[Path, Result]]()

    def get(self, name: str, *overrides: str) -> tuple[Path, Result]:
        if name not in self.done:
            run_dir = self.base.parent / name
            result = _invoke("run", str(self.base), "--run-dir", str(run_dir), "--no-progress",
                             *_sets(*overrides))  # fmt: skip
            self.done[name] = run_dir, result
        return self.done[name]


@pytest.fixture(scope="module")
def runs(base: Path, no_run_plots: None) -> Runs:
    return Runs(base)


def _summary(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "summary.json").read_text()))


def _complete(run_dir: Path, result: Result) -> dict[str, Any]:
    """The run finished and wrote its directory; its summary and events agree."""
    assert result.exit_code == 0, result.output
    for name in ("config.json", "metrics.jsonl", "events.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoint" / "arch.json").is_file()
    summary = _summary(run_dir)
    events = _jsonl(run_dir / "events.jsonl")
    assert [(r["step"], r["op"], r["target"], r["reason"] or "") for r in summary["events"]] == [
        (e["step"], e["op"], e["target"], e["reason"]) for e in events
    ]
    assert result.output.rstrip().endswith(f"run dir: {run_dir}")
    return summary


def _inspect(run_dir: Path) -> str:
    """``dynarch inspect`` succeeds and prints one row per layer, with its density when masked."""
    result = _invoke("inspect", str(run_dir))
    assert result.exit_code == 0, result.output
    model = load(run_dir / "checkpoint").model
    masked = {n for n, m in model.named_modules() if getattr(m, "weight_mask", None) is not None}
    table = result.output.split("\n\n")[1].splitlines()
    rows = {r.split()[0]: r.split() for r in table[2:]}
    summary = _summary(run_dir)
    assert set(rows) == set(summary["widths"]["end"])
    for name in masked:
        mask = model.get_submodule(name)._buffers["weight_mask"]
        assert mask is not None
        active, total = int(mask.sum()), mask.numel()
        assert rows[name][-3:] == [f"{active / total:.3f}", str(active), str(total)]
        assert summary["density"][name] == pytest.approx(active / total)
    return result.output


# --------------------------------------------------------------------------- shipped configs

CONFIGS = {
    "demo": ["sparsity.snapshots=0"],
    "mnist1d-ladder": ["sparsity.snapshots=0"],
    "mnist1d-sparse": ["sparsity.snapshots=0"],
    "fashion-cnn": [f"data.root={FASHION}"],
    "fashion-rescue": [f"data.root={FASHION}", "data.n_val=64"],
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=needs_fashion) if n.startswith("fashion") else n for n in CONFIGS],
)
def test_every_shipped_config_runs_and_inspects(
    name: str, tmp_path: Path, no_run_plots: None
) -> None:
    config = Path(str(files("dynarch") / "configs" / f"{name}.yaml"))
    tiny = ["data.n_train=256", "data.n_test=128", "train.epochs=2", "train.batch_size=64"]
    run_dir = tmp_path / "run"
    result = _invoke("run", str(config), "--run-dir", str(run_dir), "--no-progress",
                     *_sets(*tiny, *CONFIGS[name]))  # fmt: skip
    summary = _complete(run_dir, result)
    n_train = 256 - (64 if name == "fashion-rescue" else 0)
    assert summary["steps"] == 2 * math.ceil(n_train / 64) and summary["epochs"] == 2
    assert load_config(run_dir / "config.json") == load_config(
        config, [*tiny, *CONFIGS[name], f"run_dir={run_dir}"]
    )
    out = _inspect(run_dir)
    assert out.startswith(f"run {run_dir}\ndata       {summary['data']['name']} (256 train")
    assert bool(summary["density"]) == (name != "fashion-cnn")


def test_sparse_demo_run_draws_its_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dynarch.plots.write_run_plots", WRITE_RUN_PLOTS)  # the real one
    config = str(files("dynarch") / "configs" / "demo.yaml")
    run_dir = tmp_path / "run"
    sets = ["data.n_train=256", "data.n_test=128", "train.epochs=1", "train.batch_size=32",
            "sparsity.delta_t=4", "sparsity.snapshots=1"]  # fmt: skip
    _complete(run_dir, _invoke("run", config, "--run-dir", str(run_dir), *_sets(*sets)))
    assert (run_dir / "density.png").is_file() and (run_dir / "rewiring.png").is_file()
    assert sorted(p.name for p in (run_dir / "masks").iterdir() if p.name.startswith("fc2")) == [
        "fc2-diff-0-8.png", "fc2-step0.png", "fc2-step8.png",
    ]  # fmt: skip


# ------------------------------------------------------------------------------ sparsity

# (algorithm, t_end, anneal, regrow_init); delta_t 4 over 24 steps
SPARSITY = [
    ("static", None, "cosine", "zero"),
    ("set", 0.5, "cosine", "zero"),  # a fraction: until step round(0.5 * 24) = 12
    ("deep_r", 10, "linear", "random"),  # a step count
    ("rigl", 0.5, "constant", "gradient"),
    ("snfs", None, "cosine", "zero"),
]


@pytest.mark.parametrize(("algorithm", "t_end", "anneal", "regrow"), SPARSITY)
def test_sparsity_algorithms_with_t_end_anneal_and_regrow_init(
    runs: Runs, algorithm: str, t_end: float | None, anneal: str, regrow: str
) -> None:
    run_dir, result = runs.get(
        f"sparse-{algorithm}", *SPARSE, f"sparsity.algorithm={algorithm}", "sparsity.delta_t=4",
        f"sparsity.t_end={'null' if t_end is None else t_end}", f"sparsity.anneal={anneal}",
        f"sparsity.regrow_init={regrow}",
    )  # fmt: skip
    summary = _complete(run_dir, result)
    events = _jsonl(run_dir / "events.jsonl")
    sparsify = events[0]
    assert (sparsify["op"], sparsify["step"]) == ("sparsify", 0)
    assert sparsify["reason"] == ("config" if algorithm == "static" else algorithm)
    rewires = [e["step"] for e in events if e["op"] == "rewire"]
    last = {None: 20, 0.5: 8, 10: 8}[t_end]  # updates at multiples of 4 before t_end
    assert rewires == ([] if algorithm == "static" else list(range(4, last + 1, 4)))
    saved = json.loads((run_dir / "config.json").read_text())["sparsity"]
    assert (saved["t_end"], saved["anneal"], saved["regrow_init"]) == (t_end, anneal, regrow)
    assert type(saved["t_end"]) is type(t_end)  # a fraction stays a float, a count an int
    active = sum(d["active"] for d in sparsify["details"].values())
    assert active == round(0.3 * (PARAMS - 42))  # weights kept; the 42 biases are not masked
    assert summary["params"]["active"] == active + 42  # every update keeps the count
    out = _inspect(run_dir)
    line = next(x for x in out.splitlines() if x.startswith("sparsity   "))
    if algorithm == "static":
        assert line == "sparsity   density 0.3 (erk), static"
    else:
        until = {None: "", 0.5: ", until 50% of the steps", 10: ", until step 10"}[t_end]
        regrown = "" if regrow == "zero" else f", regrown weights {regrow}"
        assert line == (
            f"sparsity   density 0.3 (erk), {algorithm} every 4 steps, drop fraction 0.3 "
            f"({anneal} anneal){until}{regrown}"
        )


# -------------------------------------------------------------------------------- growth

# name: (overrides, the cap on active parameters, the growth events' reason)
GROWTH: dict[str, tuple[list[str], int, str]] = {
    "widen-plateau": (
        ["growth.policy=widen", "growth.patience=1", "growth.threshold=10",
         "growth.max_params=3000"],
        3000, "plateau(val_loss)",
    ),
    "widen-every-sparse": (
        [*SPARSE, "sparsity.algorithm=rigl", "sparsity.delta_t=4", "growth.trigger=every",
         "growth.max_params=0.8"],
        int(0.8 * PARAMS), "every(val_loss)",
    ),
    "patches-every": (
        [*SPARSE, "sparsity.algorithm=set", "sparsity.delta_t=4", "growth.policy=patches",
         "growth.trigger=every", "growth.patch_size=4", "growth.max_params=0.5"],
        int(0.5 * PARAMS), "every(val_loss)",
    ),
    "patches-plateau": (
        [*SPARSE, "growth.policy=patches", "growth.patience=1", "growth.threshold=10",
         "growth.max_params=500"],
        500, "plateau(val_loss)",
    ),
    "tournament-every": (
        [*SPARSE, "growth.policy=tournament", "growth.trigger=every", "growth.max_params=0.6"],
        int(0.6 * PARAMS), "tournament:every(val_loss)",
    ),
    "tournament-plateau": (
        ["growth.policy=tournament", "growth.patience=1", "growth.threshold=10",
         "growth.candidates=[widen,insert]", "growth.max_params=1500"],
        1500, "tournament:plateau(val_loss)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(GROWTH))
def test_growth_policy_x_trigger_names_every_event_and_its_trigger(runs: Runs, name: str) -> None:
    overrides, cap, reason = GROWTH[name]
    run_dir, result = runs.get(name, *overrides)
    summary = _complete(run_dir, result)
    grown = [r for r in summary["events"] if r["op"] in GROWTH_OPS | {"tournament"}]
    assert grown and all(r["reason"] == reason for r in grown)
    assert {r["step"] for r in grown} <= {8, 16, 24}  # at evaluations
    if "plateau" in name:  # patience 1, threshold 10: the 2nd evaluation is a plateau
        assert {r["step"] for r in grown} == {16}
    lines = result.output.splitlines()
    for row in grown:  # the printed table names each event, its change and its trigger
        assert any(
            ln.split()[:3] == [str(row["step"]), row["op"], row["target"]] and reason in ln
            for ln in lines
        ), row
    assert summary["params"]["active"] <= cap  # the budget holds
    max_params = next(o.split("=")[1] for o in overrides if o.startswith("growth.max_params="))
    assert f", max params {max_params}, max events -" in _inspect(run_dir)


def test_growth_rows_say_what_changed(runs: Runs) -> None:
    widen = _summary(runs.get("widen-plateau", *GROWTH["widen-plateau"][0])[0])
    assert [(r["op"], r["target"], r["change"]) for r in widen["events"]] == [
        ("widen", "fc1", "16->24"), ("widen", "fc2", "16->24"),
    ]  # fmt: skip
    assert widen["widths"]["end"] == {"fc1": 24, "fc2": 24, "out": 10}
    patches_dir = runs.get("patches-every", *GROWTH["patches-every"][0])[0]
    events = {e["step"]: e for e in _jsonl(patches_dir / "events.jsonl") if e["op"] == "patch"}
    rows = [r for r in _summary(patches_dir)["events"] if r["op"] == "patch"]
    assert [r["change"] for r in rows] == [
        f"+{events[r['step']]['details']['added']} connections" for r in rows
    ]
    tour_dir = runs.get("tournament-every", *GROWTH["tournament-every"][0])[0]
    for event, row in zip(_jsonl(tour_dir / "events.jsonl"), _summary(tour_dir)["events"]):
        if event["op"] == "tournament":
            n = len(event["details"]["candidates"])
            assert row["change"] == f"chose {event['details']['chosen']} of {n}"


@needs_fashion
def test_widen_a_cnn(runs: Runs) -> None:
    run_dir, result = runs.get(
        "cnn-widen", "model={kind: cnn, channels: [4, 8], hidden: 16}", "data.name=fashion-mnist",
        f"data.root={FASHION}", *SPARSE, "growth.trigger=every", "growth.targets=[conv2, fc]",
        "growth.max_params=0.9",
    )  # fmt: skip
    summary = _complete(run_dir, result)
    widened = [
        (r["step"], r["target"], r["change"]) for r in summary["events"] if r["op"] == "widen"
    ]
    assert widened[:2] == [(8, "conv2", "8->12"), (8, "fc", "16->24")]
    assert summary["widths"]["start"] == {"conv1": 4, "conv2": 8, "fc": 16, "out": 10}
    assert summary["widths"]["end"]["conv2"] > 8 and summary["widths"]["end"]["conv1"] == 4
    out = _inspect(run_dir)  # densities of the widened, still masked, conv and fc layers
    row = next(x.split() for x in out.splitlines() if x.startswith("conv2 "))
    assert row[1:3] == ["8", str(summary["widths"]["end"]["conv2"])]


def test_cosine_schedule_validation_split_and_early_stopping(runs: Runs) -> None:
    run_dir, result = runs.get(
        "cosine-val-stop", "optimizer.schedule=cosine", "data.n_val=64", "train.epochs=5",
        "train.early_stopping={patience: 1, min_delta: 10}",
    )  # fmt: skip
    summary = _complete(run_dir, result)
    # 192 training samples: 6 steps an epoch; no improvement > 10 at the 2nd evaluation
    assert (summary["steps"], summary["epochs"]) == (12, 2)
    assert summary["stopped_early"] == {"epoch": 1, "of": 5, "monitor": "val_loss", "patience": 1}
    line = "stopped early   after epoch 2 of 5: val_loss did not improve for 1 evaluation"
    assert line in result.output.splitlines()
    assert summary["test"] is not None and summary["data"]["n_train"] == 256
    lr = load(run_dir / "checkpoint").optimizer_state["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.003 * 0.5 * (1 + math.cos(math.pi * 12 / 30)))  # of 30 steps
    out = _inspect(run_dir)
    assert line in out.splitlines()
    assert f"test acc        {100 * summary['test']['val_accuracy']:.2f}% (scored once" in out
    assert "optimizer  adam, lr 0.003 (cosine decay per step), weight decay 0" in out


# ------------------------------------------------------------------------------- inspect


def test_inspect_bad_paths(tmp_path: Path) -> None:
    _error(_invoke("inspect", str(tmp_path / "nope")),
           f"{str(tmp_path / 'nope')!r} is not a run directory: it does not exist")  # fmt: skip
    (tmp_path / "notes.txt").write_text("x")
    _error(
        _invoke("inspect", str(tmp_path / "notes.txt")),
        f"{str(tmp_path / 'notes.txt')!r} is a file, not a run directory (give the directory "
        "`dynarch run` wrote, e.g. runs/demo-20250101-120000)",
    )
    _error(
        _invoke("inspect", str(tmp_path)),
        f"{str(tmp_path)!r} is not a run directory: missing config.json, metrics.jsonl, "
        "events.jsonl, checkpoint (a run directory is written by `dynarch run`)",
    )
    (tmp_path / "ladder.json").write_text("{}")
    for name in ("dense-s0", "set-d0.5-s0"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    _error(
        _invoke("inspect", str(tmp_path)),
        f"{str(tmp_path)!r} is a ladder directory (ladder.md has its table); inspect one of its "
        f"runs: {tmp_path / 'runs' / 'dense-s0'}, {tmp_path / 'runs' / 'set-d0.5-s0'}",
    )


# -------------------------------------------------------------------------------- ladder


def test_ladder_tiny_with_jobs_1(base: Path, no_run_plots: None) -> None:
    root = base.parent / "ladder"
    result = _invoke("ladder", str(base), "--densities", "1,0.5", "--method", "set", "--jobs",
                     "1", "--run-dir", str(root), "--no-progress",
                     *_sets("train.epochs=1", "sparsity.delta_t=4"))  # fmt: skip
    assert result.exit_code == 0, result.output
    ladder = json.loads((root / "ladder.json").read_text())
    assert [r["name"] for r in ladder["runs"]] == ["dense-s0", "set-d0.5-s0"]
    assert ladder["command"] == (
        f"dynarch ladder {base} --densities 1,0.5 --method=set --seeds=1 --tolerance=1 "
        f"--run-dir={root} --set=train.epochs=1 --set=sparsity.delta_t=4"
    )
    assert (root / "ladder.md").is_file() and (root / "ladder.png").is_file()
    sparse = root / "runs" / "set-d0.5-s0"
    assert load_config(sparse / "config.json").sparsity.delta_t == 4  # type: ignore[union-attr]
    assert "sparsity   density 0.5 (erk), set every 4 steps" in _inspect(sparse)
    assert result.output.rstrip().endswith(f"ladder dir: {root}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--densities", "1,0.5", "--method", "sett"], "--method: 'sett' is not a sparse "
         "training method (did you mean 'set'?); choose from static, set, deep_r, rigl, snfs"),
        (["--densities", "1,1.5"], "--densities: 1.5 is not in (0, 1]; a density is the "
         "fraction of weights kept, e.g. 1,0.5,0.1"),
        (["--densities", "1,0.5,0.2,0.5"], "--densities: '1,0.5,0.2,0.5' lists 0.5 twice; give "
         "each density once"),
        (["--densities", "0.5,0.1"], "--densities: '0.5,0.1' does not include 1, the dense "
         "model the ladder and its cliff are measured against; e.g. 1,0.5,0.1"),
        (["--densities", "1,0.5", "--jobs", "0"], "--jobs: 0 is not allowed; give the number of "
         "processes, >= 1"),
        (["--densities", "1,0.5", "--seeds", "0"], "--seeds: 0 is not allowed; give the number "
         "of seeds, >= 1"),
        (["--densities", "1,0.5", "--set", "growth.trigger=every"], "growth: the ladder trains "
         "one fixed architecture at each density, but the config has a growth: section; remove "
         "it (e.g. --set growth=null)"),
    ],
)  # fmt: skip
def test_ladder_bad_arguments(base: Path, tmp_path: Path, args: list[str], message: str) -> None:
    _error(_invoke("ladder", str(base), *args, "--run-dir", str(tmp_path / "l")), message)
    assert not (tmp_path / "l").exists()


def test_unwritable_directories_are_refused(base: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    bad = tmp_path / "afile" / "sub"
    _error(_invoke("ladder", str(base), "--densities", "1,0.5", "--run-dir", str(bad)),
           f"--run-dir: cannot create {str(bad)!r}: Not a directory; choose a writable "
           "directory")  # fmt: skip
    _error(
        _invoke("run", str(base), "--run-dir", str(bad)),
        f"run_dir: cannot create {str(bad)!r}: Not a directory; choose a writable directory",
    )
    result = _invoke(
        "rescue",
        str(base),
        "--methods",
        "dense",
        "--seeds",
        "1",
        "--run-dir",
        str(tmp_path / "r"),
        "--out",
        str(bad / "r.json"),
        "--set",
        "data.n_val=64",
    )
    _error(result, f"--out: cannot create {str(bad)!r}: Not a directory; choose a writable "
           "directory")  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_each_override_needs_its_own_set(base: Path, tmp_path: Path) -> None:
    result = _invoke("run", str(base), "--run-dir", str(tmp_path / "r"), "--set",
                     "data.n_train=128", "data.n_test=64", "train.epochs=1")  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines()[-1] == (
        "Error: unexpected argument 'data.n_test=64': give each override its own --set, e.g. "
        "--set data.n_test=64 --set train.epochs=1"
    )
    extra = _invoke("ladder", str(base), "other.yaml", "--densities", "1,0.5")
    assert extra.exit_code == 2
    assert extra.output.splitlines()[-1] == "Error: unexpected extra argument(s): other.yaml"


# -------------------------------------------------------------------------------- rescue


def test_rescue_tiny_with_jobs_1(base: Path, no_run_plots: None) -> None:
    root, out = base.parent / "rescue", base.parent / "results" / "rescue.json"
    result = _invoke("rescue", str(base), "--methods", "dense,static,patches", "--density",
                     "0.3", "--budget", "0.6", "--seeds", "1", "--jobs", "1", "--run-dir",
                     str(root), "--out", str(out),
                     *_sets("data.n_val=64", "train.epochs=2", "sparsity.delta_t=4"))  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload == json.loads((root / "rescue.json").read_text())
    assert [r["method"] for r in payload["results"]] == ["dense", "static", "patches"]
    rows = {r["method"]: r for r in payload["results"]}
    assert rows["dense"]["params"] == PARAMS and rows["static"]["params"] == 359
    assert 359 < rows["patches"]["params"] <= int(0.6 * PARAMS)  # grew, within the budget
    patched = _summary(Path(rows["patches"]["run_dir"]))["events"]
    assert {r["reason"] for r in patched if r["op"] == "patch"} == {"every(val_loss)"}
    for row in payload["results"]:
        _inspect(Path(row["run_dir"]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "dense,sett"], "--methods: 'sett' is not a rescue method (did you mean "
         "'set'?); choose from dense, static, set, patches, tournament, widen"),
        (["--density", "0"], "--density: 0.0 is not in (0, 1]; it is a fraction of weights"),
        (["--budget", "1.5"], "--budget: 1.5 is not in (0, 1]; it is a fraction of weights"),
        (["--density", "0.3", "--budget", "0.2"], "--budget 0.2 is below the scaffold --density "
         "0.3: growth would have no room; give a budget above the density"),
        # above the density, but the scaffold's biases already take more than the budget
        (["--density", "0.3", "--budget", "0.3", "--set", "data.n_val=64"], "--budget 0.3 "
         "allows 329 active parameters, but the scaffold at --density 0.3 starts with 359 "
         "(biases and norms count), so growth would have no room; give a budget above 0.327"),
        (["--methods", "dense", "--jobs", "0"], "--jobs: 0 is not allowed; give the number of "
         "processes, >= 1"),
        (["--methods", "dense"], "data.n_val: 5000 (the rescue's default validation split) "
         "leaves no training samples (the training set has 256); use fewer, e.g. --set "
         "data.n_val=25"),
    ],
)  # fmt: skip
def test_rescue_bad_arguments(base: Path, tmp_path: Path, args: list[str], message: str) -> None:
    _error(_invoke("rescue", str(base), "--seeds", "1", *args, "--run-dir", str(tmp_path / "r")),
           message)  # fmt: skip
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------- configs

# (overrides, the message after "Error: "; {cfg} is the config file)
BAD_CONFIGS = [
    (["optimizer.lrr=0.1"], "{cfg}: unknown key 'optimizer.lrr' (did you mean 'lr'?); allowed "
     "keys in optimizer: name, lr, momentum, weight_decay, nesterov, betas, eps, schedule"),
    (["growht.policy=widen"], "{cfg}: unknown key 'growht' (did you mean 'growth'?); allowed "
     "keys at the top level: seed, device, threads, run_dir, data, model, optimizer, train, "
     "growth, sparsity"),
    (["train.epochs=abc"], "{cfg}: train.epochs: expected an integer, got 'abc' (str)"),
    (["growth.max_params=much"], "{cfg}: growth.max_params: expected a number, got 'much' (str)"),
    (["growth.policy=patches", "growth.factor=2"], "{cfg}: growth: 'factor' applies to policy "
     "'widen', not 'patches'; remove it or set growth.policy"),
    (["growth.policy=widen", "growth.candidates=[skip]"], "{cfg}: growth: 'candidates' applies "
     "to policy 'tournament', not 'widen'; remove it or set growth.policy"),
    (["growth.trigger=every", "growth.patience=3"], "{cfg}: growth: 'patience' applies to "
     "trigger 'plateau', not 'every'; remove it or set growth.trigger: plateau"),
    (["model.layernorm=true", "growth.policy=widen"], "{cfg}: growth.init='net2net' cannot keep "
     "the function of a layer followed by LayerNorm (model.layernorm: true); use growth.init: "
     "random, or model.batchnorm: true instead of layernorm"),
    (["optimizer.lr=.inf"], "{cfg}: optimizer.lr: Input should be a finite number (got inf)"),
    (["growth.factor=.inf"], "{cfg}: growth.factor: Input should be a finite number (got inf)"),
    (["model.layernorm=true", "growth.policy=tournament", "growth.candidates=[widen, patch]"],
     "growth.candidates: ['widen', 'patch'] has no candidate this model can use ('widen' cannot "
     "keep the function of a layer followed by LayerNorm; 'patch' needs masks (a sparsity: "
     "section)); add 'insert' or 'skip'"),
    (["growth.policy=patches"], "growth.policy: 'patches' turns on connections in the masks of "
     "a sparse model, but this model has no masks; add a sparsity: section (e.g. sparsity: "
     "{{density: 0.1}}) or use policy widen or tournament"),
    (["growth.max_params=0.9"], "growth.max_params: 0.9 caps the active parameters at 988, but "
     "the model starts with 1098 (dense), so it could never grow; a fraction (<= 1) of a dense "
     "model leaves no room: give a count above 1098 (e.g. 2196) or add a sparsity: section"),
    ([*SPARSE, "growth.policy=patches", "growth.max_params=0.3"], "growth.max_params: 0.3 caps "
     "the active parameters at 329, but the model starts with 359 (at sparsity.density 0.3), so "
     "it could never grow; give a fraction above 0.327 or a count above 359"),
    ([*SPARSE, "growth.max_params=359"], "growth.max_params: 359 caps the active parameters at "
     "359, but the model starts with 359 (at sparsity.density 0.3), so it could never grow; "
     "give a fraction above 0.327 or a count above 359"),
    (["sparsity.density=0.001"], "sparsity.density: layer 'fc2' (256 weights, shape (16, 16)) "
     "would get 0 active weights at density 0.001 with distribution 'erk'; the minimal density "
     "that works is 0.00284"),
    (["model.hidden=[]", "growth.policy=tournament"], "growth: the model has no hidden layer to "
     "grow (model.hidden is empty); add one (e.g. --set model.hidden=[64]) or remove the growth: "
     "section (--set growth=null)"),
    (["growth.max_width=16", "growth.targets=[fc2]"], "growth.max_width: 16 is not above the "
     "width of any layer to widen (fc2: 16), so it could never grow; give a max_width above 16"),
    (["sparsity.density=0.3", "sparsity.t_end=1.0"], "{cfg}: sparsity.t_end: 1.0 is neither a "
     "step count (an int >= 1) nor a fraction of the run's optimizer steps (a number in (0, 1), "
     "e.g. 0.75)"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS)
def test_bad_configs_exit_2_with_one_line(
    base: Path, tmp_path: Path, overrides: list[str], message: str
) -> None:
    run_dir = tmp_path / "run"
    result = _invoke("run", str(base), "--run-dir", str(run_dir), *_sets(*overrides))
    _error(result, message.format(cfg=base))
    assert len(result.output.splitlines()) == 1 and not run_dir.exists()


def test_start_active_params_is_what_the_run_starts_with(runs: Runs) -> None:
    run_dir, _ = runs.get("sparse-static", *SPARSE, "sparsity.algorithm=static",
                          "sparsity.delta_t=4", "sparsity.t_end=null", "sparsity.anneal=cosine",
                          "sparsity.regrow_init=zero")  # fmt: skip
    cfg = load_config(run_dir / "config.json")
    model = build_model(cfg.model, (40,), 10)
    assert start_active_params(cfg, model) == _summary(run_dir)["params"]["active"] == 359
    assert start_active_params(validate_config({}), model) == PARAMS

    def with_cap(cap: int) -> Any:
        return cfg.model_copy(update={"growth": GrowthConfig(max_params=cap)})

    check_growth(with_cap(360), model)  # one parameter of room is room
    with pytest.raises(ConfigError, match=re.escape("caps the active parameters at 359, but")):
        check_growth(with_cap(359), model)


def test_format_table_aligns_numbers_around_missing_cells() -> None:
    table = format_table(["layer", "width at start", "width"], [["fc", 16, 24], ["skip", None, 8]])
    assert table.splitlines()[2:] == [
        f"{'fc':<5}  {16:>14}  {24:>5}", f"{'skip':<5}  {'-':>14}  {8:>5}",
    ]  # fmt: skip


def test_settings_that_can_never_act_are_noted(runs: Runs) -> None:
    run_dir, result = runs.get(
        "idle", *SPARSE, "sparsity.algorithm=set", "sparsity.delta_t=24", "growth.trigger=every",
        "growth.every=4",
    )  # fmt: skip
    summary = _complete(run_dir, result)
    assert [x for x in result.output.splitlines() if x.startswith("note")] == [
        "note       sparsity.delta_t 24 >= the run's 24 optimizer steps: the set mask is never "
        "rewired",
        "note       growth.every 4 is more than the run's 3 evaluations: the every trigger never "
        "fires",
    ]  # fmt: skip
    assert [r["op"] for r in summary["events"]] == ["sparsify"]  # indeed
    _, stopped = runs.get("fraction-t-end", *SPARSE, "sparsity.algorithm=set", "sparsity.delta_t=8",
                          "sparsity.t_end=0.25", "growth.patience=2")  # fmt: skip
    assert [x for x in stopped.output.splitlines() if x.startswith("note")] == [
        "note       sparsity.t_end 0.25 (6 steps) is not after the first update at step 8: the set "
        "mask is never rewired",
    ]  # patience 2 fires at the 3rd evaluation: no note


def test_rewiring_keys_set_under_a_static_mask_are_noted() -> None:
    from dynarch.config import validate_config
    from dynarch.runner import idle_settings

    sparsity = {"density": 0.5, "delta_t": 50, "anneal": "linear", "snapshots": 1}
    assert idle_settings(validate_config({"sparsity": sparsity}), 30) == [
        "sparsity.delta_t, sparsity.anneal: no effect, as sparsity.algorithm is static (the mask "
        "is never rewired); set it to set, deep_r, rigl or snfs to rewire"
    ]
    assert idle_settings(validate_config({"sparsity": {"density": 0.5}}), 30) == []  # defaults


def test_a_run_cut_mid_epoch_says_it_was_not_evaluated(runs: Runs) -> None:
    run_dir, result = runs.get("cut", "train.max_steps=5")
    summary = _complete(run_dir, result)
    assert (summary["steps"], summary["final"], summary["best"]) == (5, {}, {})
    lines = result.output.splitlines()
    assert "final val acc   - (no evaluation: train.max_steps ended the run mid-epoch)" in lines
    assert "best val acc    -" in lines
    assert "final metrics   none (no evaluation: train.max_steps ended the run mid-epoch)" in (
        _inspect(run_dir).splitlines()
    )
