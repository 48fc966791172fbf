"""Run configs: defaults, round trips, overrides and every validation message."""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dynarch.config import (
    ALGORITHMS,
    ConfigError,
    GrowthConfig,
    OptimizerConfig,
    RunConfig,
    apply_override,
    build_optimizer,
    growth_targets,
    load_config,
    validate_config,
)
from dynarch.models import cnn, mlp

CONFIGS = sorted(
    p.name for p in files("dynarch").joinpath("configs").iterdir() if p.name.endswith(".yaml")
)
DEMO = Path(str(files("dynarch") / "configs" / "demo.yaml"))
TOP_KEYS = "seed, device, threads, run_dir, data, model, optimizer, train, growth, sparsity"


def _write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    return str(info.value)


# ------------------------------------------------------------------ valid configs


def test_defaults() -> None:
    cfg = validate_config({})
    assert cfg == RunConfig()
    assert (cfg.seed, cfg.device, cfg.threads, cfg.run_dir) == (0, "cpu", None, None)
    assert cfg.data.name == "mnist1d" and cfg.data.n_train is None
    assert cfg.model.kind == "mlp" and cfg.model.hidden == [32, 32]
    assert (cfg.optimizer.name, cfg.optimizer.lr) == ("adam", 1e-3)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.early_stopping) == (10, 128, None)
    assert cfg.growth is None and cfg.sparsity is None


@pytest.mark.parametrize("name", CONFIGS)
def test_packaged_configs_validate(name: str) -> None:
    cfg = load_config(str(files("dynarch") / "configs" / name))
    assert re.fullmatch(rf"runs/{Path(name).stem}-\d{{8}}-\d{{6}}", str(cfg.run_dir))


def test_demo_config() -> None:
    cfg = load_config(DEMO)
    assert cfg.data.name == "mnist1d" and cfg.model.kind == "mlp" and cfg.model.hidden == [32, 32]
    assert cfg.optimizer.name == "adam"
    assert cfg.growth is not None and cfg.growth.init == "net2net" and cfg.growth.noise > 0
    assert cfg.growth.monitor == "val_loss" and cfg.growth.targets == "hidden"


def test_json_round_trip(tmp_path: Path) -> None:
    cfg = load_config(DEMO, ["sparsity.density=0.5", "train.early_stopping.patience=3"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    again = load_config(path)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    assert again.sparsity is not None and again.sparsity.density == 0.5
    assert again.train.early_stopping is not None and again.train.early_stopping.patience == 3


def test_full_config_from_yaml(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
seed: 3
run_dir: out/x
data: {name: fashion-mnist, n_train: 100, n_test: 50, download: false}
model: {kind: cnn, channels: [4, 8], kernel_size: 5, hidden: 0, activation: elu}
optimizer: {name: sgd, lr: 1e-2, momentum: 0.9, nesterov: true, weight_decay: 5e-4}
train: {epochs: 2, max_steps: 7, early_stopping: {monitor: val_accuracy, patience: 2}}
growth: {monitor: val_accuracy, targets: [conv1], factor: 2, init: zero, max_width: 64}
sparsity: {density: 0.25, distribution: er}
""",
    )
    cfg = load_config(path)
    assert cfg.run_dir == "out/x" and cfg.seed == 3
    assert cfg.optimizer.lr == 0.01 and cfg.optimizer.weight_decay == 5e-4  # 1e-2 is a float
    assert cfg.model.kind == "cnn" and cfg.model.channels == [4, 8]
    assert cfg.train.early_stopping is not None and cfg.train.early_stopping.mode == "max"
    assert cfg.growth is not None and cfg.growth.mode == "max" and cfg.growth.factor == 2.0
    assert GrowthConfig().mode == "min"
    assert cfg.sparsity is not None and cfg.sparsity.distribution == "er"


def test_default_run_dir_is_unique(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, "seed: 1\n")
    first = load_config(path).run_dir
    assert first is not None and re.fullmatch(r"runs/exp-\d{8}-\d{6}", first)
    Path(first).mkdir(parents=True)
    second = load_config(path).run_dir
    assert second is not None and second != first
    assert re.fullmatch(r"runs/exp-\d{8}-\d{6}(-2)?", second)


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "# nothing\n")).model_dump(exclude={"run_dir"}) == (
        RunConfig().model_dump(exclude={"run_dir"})
    )


# ---------------------------------------------------------------------- overrides


def test_overrides(tmp_path: Path) -> None:
    cfg = load_config(
        DEMO,
        [
            "optimizer.lr=1e-4",
            "model.hidden=[8, 4]",
            "growth=null",
            "train.early_stopping.monitor=val_accuracy",
            "data.n_train=100",
            "run_dir=somewhere",
        ],
    )
    assert cfg.optimizer.lr == 1e-4 and cfg.model.hidden == [8, 4] and cfg.growth is None
    assert cfg.train.early_stopping is not None
    assert cfg.train.early_stopping.monitor == "val_accuracy"
    assert cfg.data.n_train == 100 and cfg.run_dir == "somewhere"


def test_apply_override_in_place() -> None:
    data: dict[str, Any] = {"growth": None}
    apply_override(data, "growth.patience=1")
    apply_override(data, "seed= 4")
    apply_override(data, "data.root=")
    assert data == {"growth": {"patience": 1}, "seed": 4, "data": {"root": None}}


@pytest.mark.parametrize("override", ["optimizer.lr", "=3", "a..b=1", "optimizer lr=1", ".x=1"])
def test_bad_override_syntax(override: str) -> None:
    with pytest.raises(
        ConfigError,
        match=rf"^bad override {re.escape(repr(override))}: expected KEY=VALUE with a dotted "
        r"key, e\.g\. optimizer\.lr=0\.01$",
    ):
        load_config(DEMO, [override])


def test_override_into_a_scalar() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^bad override 'seed\.x=1': 'seed' is 0, not a mapping, so it has no sub-keys$",
    ):
        load_config(DEMO, ["seed.x=1"])


def test_override_with_invalid_yaml_value() -> None:
    with pytest.raises(ConfigError, match=r"^bad override 'model\.hidden=\[1,': the value is not"):
        load_config(DEMO, ["model.hidden=[1,"])


def test_override_unknown_key_is_named() -> None:
    with pytest.raises(
        ConfigError, match=r"demo\.yaml: unknown key 'optimizer\.lrr' \(did you mean 'lr'\?\)"
    ):
        load_config(DEMO, ["optimizer.lrr=0.1"])


# ------------------------------------------------------------------ file problems


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(
        ConfigError, match=rf"^config file '{re.escape(str(path))}' does not exist$"
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=r"is a directory, not a file$"):
        load_config(tmp_path)


def test_broken_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "seed: 1\noptimizer:\n  lr: [0.1\n  name: adam\n")
    with pytest.raises(
        ConfigError,
        match=rf"^config file '{re.escape(str(path))}' is not valid YAML at line 4, column 7: ",
    ):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"exp\.yaml: expected a mapping of keys at the top level"
    ):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    assert _error([1]) == "config: expected a mapping of keys at the top level, got [1]"


# ------------------------------------------------------------------ value problems


def test_unknown_top_level_key() -> None:
    assert _error({"optimzer": {}}) == (
        f"config: unknown key 'optimzer' (did you mean 'optimizer'?); "
        f"allowed keys at the top level: {TOP_KEYS}"
    )
    assert _error({"zzz": 1}).startswith("config: unknown key 'zzz'; allowed keys at the top")


def test_unknown_nested_key_with_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path, "optimizer:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: unknown key 'optimizer.lrr' (did you mean 'lr'?); allowed keys in optimizer: "
        "name, lr, momentum, weight_decay, nesterov, betas, eps, schedule"
    )
    assert _error({"train": {"early_stopping": {"monitr": "val_loss"}}}) == (
        "config: unknown key 'train.early_stopping.monitr' (did you mean 'monitor'?); "
        "allowed keys in train.early_stopping: monitor, patience, min_delta"
    )
    assert _error({"model": {"kind": "cnn", "hiden": 3}}) == (
        "config: unknown key 'model.hiden' (did you mean 'hidden'?); allowed keys in model: "
        "kind, channels, kernel_size, batchnorm, hidden, activation"
    )


def test_bad_enum_values() -> None:
    assert _error({"optimizer": {"name": "sgdd"}}) == (
        "config: optimizer.name: 'sgdd' is not allowed; choose one of 'sgd', 'adam', 'adamw', "
        "'rmsprop', 'adagrad' (did you mean 'sgd'?)"
    )
    assert _error({"growth": {"init": "copy"}}) == (
        "config: growth.init: 'copy' is not allowed; choose one of 'net2net', 'zero', 'random'"
    )
    assert _error({"model": {"kind": "mlp", "activation": "Relu"}}).endswith(
        "'silu', 'tanh', 'elu' (did you mean 'relu'?)"
    )
    assert _error({"model": {"kind": "mlpp"}}) == (
        "config: model.kind: 'mlpp' is not allowed; choose one of 'mlp', 'cnn' "
        "(did you mean 'mlp'?)"
    )
    assert _error({"model": {"hidden": [3]}}) == (
        "config: model.kind is missing; set it to one of 'mlp', 'cnn'"
    )
    assert _error({"data": {"name": "mnist2d"}}) == (
        "config: data.name: 'mnist2d' is not available (did you mean 'mnist1d'?); "
        "choose one of fashion-mnist, mnist, mnist1d"
    )
    assert _error({"growth": {"targets": "all"}}) == (
        "config: growth.targets: 'all' is not allowed; use 'hidden' or a non-empty list of layer "
        "names"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"optimizer": {"lr": -1}}, "optimizer.lr: -1 is out of range; allowed: > 0.0"),
        (
            {"optimizer": {"name": "sgd", "momentum": 1.5}},
            "optimizer.momentum: 1.5 is out of range; allowed: a number in [0.0, 1.0)",
        ),
        ({"seed": -2}, "seed: -2 is out of range; allowed: >= 0"),
        ({"train": {"epochs": 0}}, "train.epochs: 0 is out of range; allowed: >= 1"),
        ({"data": {"n_train": 0}}, "data.n_train: 0 is out of range; allowed: >= 1"),
        ({"growth": {"factor": 1}}, "growth.factor: 1 is out of range; allowed: > 1.0"),
        (
            {"sparsity": {"density": 1.5}},
            "sparsity.density: 1.5 is out of range; allowed: a number in (0.0, 1.0]",
        ),
        (
            {"model": {"kind": "mlp", "hidden": [8, 0]}},
            "model.hidden[1]: 0 is out of range; allowed: >= 1",
        ),
        (
            {"optimizer": {"betas": [0.9, 1.0]}},
            "optimizer.betas[1]: 1.0 is out of range; allowed: a number in [0.0, 1.0)",
        ),
        (
            {"optimizer": {"betas": [0.9]}},
            "optimizer.betas: [0.9] has 1 items; expected exactly 2",
        ),
        (
            {"model": {"kind": "cnn", "channels": []}},
            "model.channels: [] has 0 items; expected at least 1",
        ),
    ],
)
def test_out_of_range(data: dict[str, Any], message: str) -> None:
    assert _error(data) == f"config: {message}"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"epochs": "ten"}}, "train.epochs: expected an integer, got 'ten' (str)"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer, got 2.5 (float)"),
        ({"train": {"log_every": True}}, "train.log_every: expected an integer, got True (bool)"),
        ({"optimizer": {"lr": "fast"}}, "optimizer.lr: expected a number, got 'fast' (str)"),
        (
            {"model": {"kind": "mlp", "batchnorm": "yes"}},
            "model.batchnorm: expected true or false, got 'yes' (str)",
        ),
        ({"model": {"kind": "mlp", "hidden": 32}}, "model.hidden: expected a list, got 32 (int)"),
        ({"data": {"name": 5}}, "data.name: expected a string, got 5 (int)"),
        ({"optimizer": "adam"}, "optimizer: expected a mapping of keys, got 'adam' (str)"),
        ({"sparsity": {}}, "sparsity.density: required key is missing"),
    ],
)
def test_wrong_types(data: dict[str, Any], message: str) -> None:
    assert _error(data) == f"config: {message}"


def test_sparsity_section() -> None:
    sp = validate_config({"sparsity": {"density": 0.1}}).sparsity
    assert sp is not None
    assert (sp.distribution, sp.algorithm, sp.delta_t, sp.drop_fraction, sp.snapshots) == (
        "erk", "static", 100, 0.3, 3,
    )  # fmt: skip
    sp = validate_config({"sparsity": {"density": 0.1, "algorithm": "rigl", "delta_t": 5,
                                       "drop_fraction": 0.5, "snapshots": 0}}).sparsity  # fmt: skip
    assert sp is not None and (sp.algorithm, sp.delta_t, sp.snapshots) == ("rigl", 5, 0)
    assert ALGORITHMS == ("static", "set", "deep_r", "rigl", "snfs")
    assert _error({"sparsity": {"density": 0.1, "algorithm": "rigll"}}) == (
        "config: sparsity.algorithm: 'rigll' is not allowed; choose one of 'static', 'set', "
        "'deep_r', 'rigl', 'snfs' (did you mean 'rigl'?)"
    )
    assert _error({"sparsity": {"density": 0.1, "drop_fraction": 1.0}}) == (
        "config: sparsity.drop_fraction: 1.0 is out of range; allowed: a number in (0.0, 1.0)"
    )
    assert _error({"sparsity": {"density": 0.1, "delta_t": 0}}) == (
        "config: sparsity.delta_t: 0 is out of range; allowed: >= 1"
    )


def test_sparsity_schedule_keys() -> None:
    sp = validate_config({"sparsity": {"density": 0.1, "algorithm": "set"}}).sparsity
    assert sp is not None and (sp.t_end, sp.anneal, sp.regrow_init) == (None, "cosine", "zero")
    keys = {"algorithm": "set", "t_end": 0.75, "anneal": "linear", "regrow_init": "gradient"}
    sp = validate_config({"sparsity": {"density": 0.1, **keys}}).sparsity
    assert sp is not None and (sp.t_end, sp.anneal, sp.regrow_init) == (0.75, "linear", "gradient")
    sp = validate_config({"sparsity": {"density": 0.1, "t_end": 300}}).sparsity
    assert sp is not None and sp.t_end == 300 and isinstance(sp.t_end, int)
    for bad in (0, -3, 1.0, 1.5, 2.0, True, "late"):
        assert _error({"sparsity": {"density": 0.1, "t_end": bad}}) == (
            f"config: sparsity.t_end: {bad!r} is neither a step count (an int >= 1) nor a "
            "fraction of the run's optimizer steps (a number in (0, 1), e.g. 0.75)"
        )
    assert _error({"sparsity": {"density": 0.1, "anneal": "cos"}}).startswith(
        "config: sparsity.anneal: 'cos' is not allowed; choose one of 'cosine', 'linear', "
        "'constant'"
    )


def test_rewire_from_start_resolves_a_fractional_t_end() -> None:
    from dynarch.runner import RewireFromStart
    from dynarch.train import Trainer

    torch.manual_seed(0)
    model = mlp(6, [8], 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = (torch.randn(40, 6), torch.randint(0, 3, (40,)))
    cb = RewireFromStart("set", 0.5, "uniform", delta_t=2, t_end=0.75, anneal="linear",
                         regrow_init="random")  # fmt: skip
    trainer = Trainer(model, opt, data, epochs=2, batch_size=10, callbacks=[cb], progress=False)
    trainer.fit()
    rewirer = cb.rewirer
    assert rewirer is not None and trainer.total_steps == 8
    assert (rewirer.t_end, rewirer.schedule.anneal, rewirer.regrow_init) == (6, "linear", "random")
    from dynarch._engine import engine_state

    # updates after steps 2 and 4; none at 6 = t_end (the mask stays fixed from there on)
    assert [(e.op, e.step) for e in engine_state(model).history] == [
        ("sparsify", 0), ("rewire", 2), ("rewire", 4),
    ]  # fmt: skip


def test_config_algorithms_are_the_registered_ones() -> None:
    sparse = pytest.importorskip("dynarch.sparse")
    assert set(ALGORITHMS) == set(sparse.ALGORITHMS)


def test_cross_field_checks() -> None:
    assert _error({"optimizer": {"name": "adam", "momentum": 0.9}}) == (
        "config: optimizer.momentum=0.9 is not allowed with name 'adam': only sgd and rmsprop use "
        "momentum (adam-style optimizers use betas)"
    )
    assert _error({"optimizer": {"name": "sgd", "nesterov": True}}) == (
        "config: optimizer.nesterov=true needs name: sgd and momentum > 0"
    )
    assert _error({"model": {"kind": "mlp", "batchnorm": True, "layernorm": True}}) == (
        "config: model.batchnorm and model.layernorm are both true; choose one"
    )
    assert _error({"model": {"kind": "mlp", "layernorm": True}, "growth": {}}) == (
        "config: growth.init='net2net' cannot keep the function of a layer followed by LayerNorm "
        "(model.layernorm: true); use growth.init: random, or model.batchnorm: true instead of "
        "layernorm"
    )
    ok = validate_config(
        {"model": {"kind": "mlp", "layernorm": True}, "growth": {"init": "random"}}
    )
    assert ok.growth is not None


def test_device_checks() -> None:
    assert _error({"device": "tpu"}) == (
        "config: device: device 'tpu' is not supported; use 'cpu', 'cuda', 'cuda:N' or 'auto'"
    )
    if not torch.cuda.is_available():
        assert _error({"device": "cuda"}).startswith(
            "config: device: device 'cuda' requested but CUDA is not available"
        )
    assert validate_config({"device": "auto"}).device == "auto"


def test_several_problems_in_one_message() -> None:
    assert _error({"optimizer": {"lr": 0, "name": "x"}, "seed": "a"}) == (
        "config: 3 problems:\n"
        "  - seed: expected an integer, got 'a' (str)\n"
        "  - optimizer.name: 'x' is not allowed; choose one of 'sgd', 'adam', 'adamw', 'rmsprop', "
        "'adagrad'\n"
        "  - optimizer.lr: 0 is out of range; allowed: > 0.0"
    )


# --------------------------------------------------------------- building from it


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [
        ("sgd", torch.optim.SGD, {"momentum": 0.5, "nesterov": True, "weight_decay": 0.1}),
        ("adam", torch.optim.Adam, {"betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1}),
        ("adamw", torch.optim.AdamW, {"betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1}),
        ("rmsprop", torch.optim.RMSprop, {"momentum": 0.5, "eps": 1e-6, "weight_decay": 0.1}),
        ("adagrad", torch.optim.Adagrad, {"eps": 1e-6, "weight_decay": 0.1}),
    ],
)
def test_build_optimizer(name: str, cls: type, expected: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"name": name, "lr": 0.05, "weight_decay": 0.1, "eps": 1e-6}
    if name in ("sgd", "rmsprop"):
        fields["momentum"] = 0.5
    if name == "sgd":
        fields["nesterov"] = True
        del fields["eps"]
    else:
        fields["betas"] = [0.8, 0.9]
    net = nn.Linear(2, 2)
    opt = build_optimizer(OptimizerConfig(**fields), net.parameters())
    assert type(opt) is cls
    assert opt.defaults["lr"] == 0.05
    assert {k: opt.defaults[k] for k in expected} == expected
    assert opt.param_groups[0]["params"] == list(net.parameters())


def test_growth_targets() -> None:
    net = mlp(40, [8, 8], 10)
    assert growth_targets(GrowthConfig(), net) == ["fc1", "fc2"]
    assert growth_targets(GrowthConfig(targets=["fc2"]), net) == ["fc2"]
    assert growth_targets(GrowthConfig(), cnn(1, 10)) == ["conv1", "conv2", "fc"]
    with pytest.raises(
        ConfigError,
        match=r"^growth\.targets: 'fc3' is not a widenable layer of this model "
        r"\(did you mean 'fc2'\?\); allowed: fc1, fc2 \(or 'hidden' for all\)$",
    ):
        growth_targets(GrowthConfig(targets=["fc3"]), net)
    with pytest.raises(ConfigError, match=r"'out' is not a widenable layer"):
        growth_targets(GrowthConfig(targets=["out"]), net)
