"""The ``growth:`` config section (policies, triggers, budget), ``data.n_val`` and the test
score a run with a validation split reports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from dynarch.checkpoint import load
from dynarch.cli import _load_data, _splits, execute, main
from dynarch.config import ConfigError, GrowthConfig, validate_config
from dynarch.train import Trainer


def _exact(message: str) -> str:
    """A ``match=`` pattern for exactly ``message``."""
    return f"^{re.escape(message)}$"


def _refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=_exact(message)):
        validate_config(data)


# ------------------------------------------------------------------ policies and triggers


@pytest.mark.parametrize("policy", ["widen", "patches", "tournament"])
@pytest.mark.parametrize("trigger", ["plateau", "every"])
def test_every_policy_and_trigger_validates(policy: str, trigger: str) -> None:
    growth: dict[str, Any] = {"policy": policy, "trigger": trigger, "max_params": 0.5}
    if trigger == "every":
        growth["every"] = 3
    cfg = validate_config({"growth": growth}).growth
    assert cfg is not None
    assert (cfg.policy, cfg.trigger, cfg.max_params) == (policy, trigger, 0.5)
    assert cfg.every == (3 if trigger == "every" else 1)


def test_defaults() -> None:
    cfg = GrowthConfig()
    assert (cfg.policy, cfg.trigger, cfg.patience, cfg.threshold, cfg.every) == (
        "widen", "plateau", 2, 0.01, 1,
    )  # fmt: skip
    assert (cfg.cooldown, cfg.max_events, cfg.max_params, cfg.amount, cfg.patch_size) == (
        0, None, None, 0.5, 32,
    )  # fmt: skip
    assert cfg.candidates == ["patch", "insert", "widen", "skip"]
    assert (cfg.monitor, cfg.mode, GrowthConfig(monitor="val_accuracy").mode) == (
        "val_loss", "min", "max",
    )  # fmt: skip


# (key, a non-default value, the policies it applies to)
POLICY_KEYS: list[tuple[str, Any, tuple[str, ...]]] = [
    ("factor", 2.0, ("widen",)),
    ("max_width", 64, ("widen",)),
    ("init", "zero", ("widen",)),
    ("noise", 0.1, ("widen",)),
    ("targets", ["fc1"], ("widen",)),
    ("amount", 0.25, ("patches",)),
    ("patch_size", 8, ("patches", "tournament")),
    ("candidates", ["patch", "skip"], ("tournament",)),
    ("cooldown", 2, ("widen", "patches")),
]
REFUSALS = [
    (key, value, allowed, policy)
    for key, value, allowed in POLICY_KEYS
    for policy in ("widen", "patches", "tournament")
    if policy not in allowed
]


@pytest.mark.parametrize(("key", "value", "allowed", "policy"), REFUSALS)
def test_policy_key_refused_for_another_policy(
    key: str, value: Any, allowed: tuple[str, ...], policy: str
) -> None:
    names = " / ".join(repr(p) for p in allowed)
    _refused(
        {"growth": {"policy": policy, key: value}},
        f"config: growth: {key!r} applies to policy {names}, not {policy!r}; remove it or set "
        "growth.policy",
    )


@pytest.mark.parametrize(("key", "value", "allowed"), POLICY_KEYS)
def test_policy_key_accepted_for_its_policies(
    key: str, value: Any, allowed: tuple[str, ...]
) -> None:
    for policy in allowed:
        cfg = validate_config({"growth": {"policy": policy, key: value}}).growth
        assert getattr(cfg, key) == value


def test_policy_key_at_its_default_is_accepted_anywhere() -> None:
    # a dumped config carries every key at its default: it must validate again
    cfg = validate_config({"growth": {"policy": "patches", "factor": 1.5, "init": "net2net"}})
    assert cfg.growth is not None and cfg.growth.factor == 1.5


def test_the_first_refused_key_in_name_order_is_reported() -> None:
    _refused(
        {"growth": {"policy": "patches", "noise": 0.5, "factor": 2.0}},
        "config: growth: 'factor' applies to policy 'widen', not 'patches'; remove it or set "
        "growth.policy",
    )


def test_every_needs_trigger_every() -> None:
    message = "config: growth: 'every' applies to trigger 'every'; set growth.trigger: every"
    _refused({"growth": {"every": 3}}, message)
    _refused({"growth": {"policy": "patches", "trigger": "plateau", "every": 2}}, message)
    assert validate_config({"growth": {"every": 1}}).growth is not None  # the default is fine


@pytest.mark.parametrize(
    ("growth", "message"),
    [
        ({"policy": "grow"}, "growth.policy: 'grow' is not allowed; choose one of 'widen', "
         "'patches', 'tournament'"),
        ({"trigger": "evry"}, "growth.trigger: 'evry' is not allowed; choose one of 'plateau', "
         "'every' (did you mean 'every'?)"),
        ({"trigger": "every", "every": 0}, "growth.every: 0 is out of range; allowed: >= 1"),
        ({"policy": "patches", "amount": 5.0}, "growth.amount: 5.0 is out of range; allowed: "
         "a number in (0.0, 4.0]"),
        ({"policy": "tournament", "candidates": []}, "growth.candidates: [] has 0 items; "
         "expected at least 1"),
        ({"policy": "tournament", "candidates": ["pach"]}, "growth.candidates[0]: 'pach' is not "
         "allowed; choose one of 'patch', 'insert', 'widen', 'skip' (did you mean 'patch'?)"),
        ({"targets": []}, "growth.targets: [] is not allowed; use 'hidden' or a non-empty list "
         "of layer names"),
        ({"targets": "all"}, "growth.targets: 'all' is not allowed; use 'hidden' or a non-empty "
         "list of layer names"),
    ],
)  # fmt: skip
def test_bad_growth_values(growth: dict[str, Any], message: str) -> None:
    _refused({"growth": growth}, f"config: {message}")


# ------------------------------------------------------------------------------ budget


@pytest.mark.parametrize(
    ("max_params", "dense", "budget"),
    [
        (None, 1000, None),
        (0.05, 1000, 50),
        (0.333, 1000, 333),  # truncated
        (1, 1000, 1000),  # 1 is a fraction: the whole dense model
        (1.0, 7, 7),
        (300, 1, 300),  # > 1: an absolute count, whatever the model
        (300.0, 10**6, 300),
    ],
)
def test_budget_fraction_or_absolute(max_params: float | None, dense: int, budget: int) -> None:
    growth = {} if max_params is None else {"max_params": max_params}
    cfg = validate_config({"growth": growth}).growth
    assert cfg is not None and cfg.budget(dense) == budget


def test_integer_max_params_is_stored_as_float() -> None:
    cfg = validate_config({"growth": {"max_params": 1000}}).growth
    assert cfg is not None and cfg.max_params == 1000.0 and isinstance(cfg.max_params, float)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (2.5, "growth: max_params 2.5 is neither a fraction <= 1 nor a whole number of "
         "parameters"),
        (1.5, "growth: max_params 1.5 is neither a fraction <= 1 nor a whole number of "
         "parameters"),
        (0, "growth.max_params: 0.0 is out of range; allowed: > 0.0"),
        (-0.5, "growth.max_params: -0.5 is out of range; allowed: > 0.0"),
        (True, "growth.max_params: expected a number, got True (bool)"),
    ],
)  # fmt: skip
def test_bad_max_params(value: Any, message: str) -> None:
    _refused({"growth": {"max_params": value}}, f"config: {message}")


# ------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "growth",
    [
        {"policy": "widen", "trigger": "every", "every": 2, "factor": 2.0, "max_width": 64,
         "init": "zero", "noise": 0.01, "targets": ["fc1"], "cooldown": 1, "max_params": 5000},
        {"policy": "patches", "monitor": "val_accuracy", "amount": 0.25, "patch_size": 8,
         "max_params": 0.05, "max_events": 3},
        {"policy": "tournament", "trigger": "every", "candidates": ["patch", "skip"],
         "patch_size": 4, "max_params": 0.1},
    ],
)  # fmt: skip
def test_json_round_trip(growth: dict[str, Any]) -> None:
    cfg = validate_config({"data": {"n_val": 100}, "growth": growth})
    again = validate_config(json.loads(json.dumps(cfg.model_dump(mode="json"))))
    assert again == cfg
    assert again.growth is not None and again.growth.model_dump() == cfg.growth.model_dump()  # type: ignore[union-attr]


def test_patches_with_layernorm_validates() -> None:
    cfg = validate_config({"model": {"kind": "mlp", "layernorm": True},
                           "growth": {"policy": "patches"}})  # fmt: skip
    assert cfg.growth is not None and cfg.growth.policy == "patches"


# ------------------------------------------------------------------------------ n_val


def _tiny(tmp_path: Path, **data: Any) -> Any:
    return validate_config({
        "seed": 0, "threads": 1, "run_dir": str(tmp_path / "run"),
        "data": {"name": "mnist1d", "n_train": 300, "n_test": 100, **data},
        "model": {"kind": "mlp", "hidden": [16]}, "optimizer": {"name": "adam", "lr": 0.003},
        "train": {"epochs": 1, "batch_size": 64},
    })  # fmt: skip


def test_n_val_must_be_non_negative() -> None:
    _refused({"data": {"n_val": -1}}, "config: data.n_val: -1 is out of range; allowed: >= 0")


@pytest.mark.parametrize("n_val", [300, 301])
def test_n_val_leaving_no_training_samples_is_refused(tmp_path: Path, n_val: int) -> None:
    cfg = _tiny(tmp_path, n_val=n_val)
    message = (
        f"data.n_val: {n_val} leaves no training samples (the training set has 300); use fewer"
    )
    with pytest.raises(ConfigError, match=_exact(message)):
        _load_data(cfg, progress=False)
    with pytest.raises(ConfigError, match=_exact(message)):
        execute(cfg, progress=False, echo=lambda s: None)
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_splits_hold_out_the_last_n_val_training_samples(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path, n_val=299)
    data = _load_data(cfg, progress=False)
    (x, y), (vx, vy) = _splits(cfg, data)
    assert (x.shape[0], vx.shape[0]) == (1, 299)
    assert torch.equal(torch.cat([x, vx]), data.train_x)
    assert torch.equal(torch.cat([y, vy]), data.train_y)
    assert _splits(_tiny(tmp_path), data) == (data, None)  # n_val 0: evaluate on the test set


def test_normalize_standardises_by_the_training_split_only(tmp_path: Path) -> None:
    raw = _load_data(_tiny(tmp_path, n_val=100), progress=False)
    data = _load_data(_tiny(tmp_path, n_val=100, normalize=True), progress=False)
    fit = raw.train_x[:200]  # the validation split (last 100) is not looked at
    assert torch.equal(data.train_x, (raw.train_x - fit.mean()) / fit.std())
    assert torch.equal(data.test_x, (raw.test_x - fit.mean()) / fit.std())
    assert torch.equal(data.train_y, raw.train_y) and torch.equal(data.test_y, raw.test_y)
    whole = _load_data(_tiny(tmp_path, normalize=True), progress=False)
    assert torch.equal(whole.train_x, raw.standardize().train_x)
    assert _tiny(tmp_path).data.normalize is False  # off unless asked for
    message = (
        "data.normalize: the training split has 1 sample (after data.n_val 299); "
        "standardising needs at least 2, so use a smaller data.n_val"
    )
    with pytest.raises(ConfigError, match=_exact(message)):
        _load_data(_tiny(tmp_path, n_val=299, normalize=True), progress=False)
    from dynarch.report import config_lines

    assert config_lines(_tiny(tmp_path, n_val=100, normalize=True))[0] == (
        "data       mnist1d (300 train / 100 test samples; the last 100 training samples are "
        "the validation split; inputs standardised)"
    )
    assert config_lines(_tiny(tmp_path))[0] == "data       mnist1d (300 train / 100 test samples)"


def test_normalize_refuses_constant_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dynarch.data

    y = torch.zeros(300, dtype=torch.int64)
    flat = dynarch.data.Dataset("mnist1d", torch.ones(300, 40), y, torch.ones(100, 40), y[:100],
                                10, (40,))  # fmt: skip
    monkeypatch.setattr(dynarch.data, "load", lambda *a, **k: flat)
    message = (
        "data.normalize: standardize: the training inputs of 'mnist1d' are constant (std 0); "
        "nothing to scale"
    )
    with pytest.raises(ConfigError, match=_exact(message)):
        _load_data(_tiny(tmp_path, normalize=True), progress=False)


def test_run_with_n_val_scores_the_test_set_once(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(_tiny(tmp_path, n_val=100).model_dump(mode="json")))
    run_dir = tmp_path / "cli-run"
    result = CliRunner().invoke(
        main, ["run", str(config), "--run-dir", str(run_dir), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(summary["test"]) == ["val_accuracy", "val_loss"]
    acc = summary["test"]["val_accuracy"]
    assert f"test acc        {100 * acc:.2f}% (scored once, at the end)" in result.output
    assert summary["data"]["n_train"] == 300  # the training set before the split
    # the score is the final model's on the 100 test samples, not on the validation split
    model = load(run_dir / "checkpoint").model
    data = _load_data(_tiny(tmp_path, n_val=100), progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, opt, (data.train_x, data.train_y), progress=False)
    assert trainer.evaluate((data.test_x, data.test_y)) == pytest.approx(summary["test"])
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = trainer.evaluate((data.train_x[-100:], data.train_y[-100:]))
    assert [m["val_loss"] for m in evals if "val_loss" in m][-1] == pytest.approx(val["val_loss"])


def test_run_without_n_val_has_no_test_line(tmp_path: Path) -> None:
    lines: list[str] = []
    summary = execute(_tiny(tmp_path), progress=False, echo=lines.append)
    assert summary["test"] is None
    assert "test acc" not in "\n".join(lines)
