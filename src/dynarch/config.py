"""Run configuration: YAML in, a validated :class:`RunConfig` out, before anything trains.

Every section is a strict pydantic model (unknown keys and wrong types are errors). Any
problem raises one :class:`ConfigError` whose message names the key path, the bad value and
what is allowed; pydantic's own error text never reaches the user.

Example:
    >>> cfg = validate_config({"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}})
    >>> cfg.optimizer.lr, cfg.model.kind, cfg.growth is None
    (0.1, 'mlp', True)
    >>> validate_config({"optimizer": {"lrr": 0.1}})
    Traceback (most recent call last):
    ...
    dynarch.config.ConfigError: config: unknown key 'optimizer.lrr' (did you mean 'lr'?); \
allowed keys in optimizer: name, lr, momentum, weight_decay, nesterov, betas, eps, schedule
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import torch
import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic import model_validator as _model_validator
from torch import nn

from . import models
from ._config_base import (
    ALGORITHMS,
    Activation,
    Algorithm,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    UnitFloat,
    _Monitored,
    _Section,
)
from ._config_errors import combine, problem, suggest
from ._config_growth import GrowthConfig

__all__ = [
    "ALGORITHMS", "CNNConfig", "ConfigError", "DataConfig", "EarlyStoppingConfig",
    "GrowthConfig", "MLPConfig", "OptimizerConfig", "RunConfig", "SparsityConfig",
    "TrainConfig", "apply_override", "build_optimizer", "growth_targets", "load_config",
    "validate_config",
]  # fmt: skip


class ConfigError(ValueError):
    """A config file, value or override is invalid; the message says where and how to fix it.

    Example:
        >>> issubclass(ConfigError, ValueError)
        True
    """


class DataConfig(_Section):
    """``data:``: which dataset and how much of it (``n_train``/``n_test``: first N samples).

    ``n_val > 0`` holds out the last ``n_val`` training samples as the evaluation set seen
    during training (triggers, early stopping); the test set is then scored once, at the end.
    ``normalize: true`` standardises every input by one mean and std of the training split
    (:meth:`dynarch.data.Dataset.standardize`).
    """

    name: str = "mnist1d"
    root: str | None = None
    download: bool = True
    n_train: PosInt | None = None
    n_test: PosInt | None = None
    n_val: NonNegInt = 0  # >0: last n_val training samples are the eval set; test is scored once
    normalize: bool = False  # standardise inputs by the training split's mean and std

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from .data import available

        if name not in available():
            names = available()
            hint = suggest(name, names)
            raise ValueError(f"{name!r} is not available{hint}; choose one of {', '.join(names)}")
        return name


class MLPConfig(_Section):
    """``model: {kind: mlp}``: see :func:`dynarch.models.mlp`."""

    kind: Literal["mlp"]
    hidden: list[PosInt] = Field(default_factory=lambda: [32, 32])
    activation: Activation = "relu"
    batchnorm: bool = False
    layernorm: bool = False
    dropout: UnitFloat = 0.0

    @_model_validator(mode="after")
    def _one_norm(self) -> MLPConfig:
        if self.batchnorm and self.layernorm:
            raise ValueError("model.batchnorm and model.layernorm are both true; choose one")
        return self


class CNNConfig(_Section):
    """``model: {kind: cnn}``: see :func:`dynarch.models.cnn`."""

    kind: Literal["cnn"]
    channels: Annotated[list[PosInt], Field(min_length=1)] = Field(default_factory=lambda: [16, 32])
    kernel_size: PosInt = 3
    batchnorm: bool = True
    hidden: NonNegInt = 64
    activation: Activation = "relu"


class OptimizerConfig(_Section):
    """``optimizer:``: a ``torch.optim`` optimizer; see :func:`build_optimizer`."""

    name: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad"] = "adam"
    lr: PosFloat = 1e-3
    momentum: UnitFloat = 0.0
    weight_decay: NonNegFloat = 0.0
    nesterov: bool = False
    betas: Annotated[list[UnitFloat], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.9, 0.999]
    )
    eps: PosFloat = 1e-8
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: per-step decay to 0

    @_model_validator(mode="after")
    def _coherent(self) -> OptimizerConfig:
        if self.momentum > 0 and self.name not in ("sgd", "rmsprop"):
            raise ValueError(
                f"optimizer.momentum={self.momentum} is not allowed with name {self.name!r}: "
                "only sgd and rmsprop use momentum (adam-style optimizers use betas)"
            )
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("optimizer.nesterov=true needs name: sgd and momentum > 0")
        return self


class EarlyStoppingConfig(_Monitored):
    """``train.early_stopping:``: stop after ``patience`` evaluations without improvement."""

    patience: PosInt = 5
    min_delta: NonNegFloat = 0.0


class TrainConfig(_Section):
    """``train:``: the loop of :class:`dynarch.train.Trainer`."""

    epochs: PosInt = 10
    batch_size: PosInt = 128
    eval_batch_size: PosInt = 1024
    max_steps: PosInt | None = None
    log_every: PosInt = 50
    eval_every_epochs: PosInt = 1
    early_stopping: EarlyStoppingConfig | None = None
    # save a resumable checkpoint every N epochs (None: only the final one); `dynarch resume`
    checkpoint_every: PosInt | None = None


class SparsityConfig(_Section):
    """``sparsity:``: masks applied when training starts (:func:`dynarch.masks.sparsify`),
    kept (``algorithm: static``) or rewired every ``delta_t`` steps by a dynamic sparse
    training algorithm (:func:`dynarch.sparse.make_rewirer`). ``snapshots``: how many mask
    heatmaps (first and last step included, so 1 means 2; 0: only the final masks are drawn)
    ``<run_dir>/masks`` gets.
    ``t_end``: the step from which the mask stays fixed, as a step count (an int >= 1) or a
    fraction of the run's optimizer steps (a number in (0, 1), e.g. 0.75 as in RigL); unset:
    rewiring goes on until training ends. ``anneal`` (``cosine``, ``linear``, ``constant``)
    decays ``drop_fraction`` to 0 at ``t_end``; ``regrow_init`` (``zero``, ``random``,
    ``gradient``) sets the regrown weights (:class:`dynarch.sparse.Rewirer`).

    Example:
        >>> SparsityConfig(density=0.05, algorithm="set", t_end=0.75).t_end
        0.75
    """

    density: Annotated[float, Field(gt=0.0, le=1.0)]
    distribution: Literal["uniform", "er", "erk"] = "erk"
    algorithm: Algorithm = "static"
    delta_t: PosInt = 100
    drop_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.3
    t_end: int | float | None = None
    anneal: Literal["cosine", "linear", "constant"] = "cosine"
    regrow_init: Literal["zero", "random", "gradient"] = "zero"
    snapshots: NonNegInt = 3

    @field_validator("t_end", mode="before")
    @classmethod
    def _t_end(cls, value: object) -> int | float | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if isinstance(value, float) and 0.0 < value < 1.0:
            return value
        raise ValueError(
            f"{value!r} is neither a step count (an int >= 1) nor a fraction of the run's "
            "optimizer steps (a number in (0, 1), e.g. 0.75)"
        )


class RunConfig(_Section):
    """The whole run; ``dynarch run`` writes it to ``<run_dir>/config.json``.

    Example:
        >>> RunConfig().train.epochs
        10
    """

    seed: NonNegInt = 0
    device: str = "cpu"
    threads: PosInt | None = None  # torch.set_num_threads; small models run fastest with 1
    run_dir: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: Annotated[Union[MLPConfig, CNNConfig], Field(discriminator="kind")] = Field(  # noqa: UP007
        default_factory=lambda: MLPConfig(kind="mlp")
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    growth: GrowthConfig | None = None
    sparsity: SparsityConfig | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from .train import resolve_device

        try:
            resolve_device(value)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return value

    @_model_validator(mode="after")
    def _growth_fits_model(self) -> RunConfig:
        layernorm = isinstance(self.model, MLPConfig) and self.model.layernorm
        widen = self.growth is not None and self.growth.policy == "widen"
        if self.growth and widen and self.growth.init != "random" and layernorm:
            raise ValueError(
                f"growth.init={self.growth.init!r} cannot keep the function of a layer followed "
                "by LayerNorm (model.layernorm: true); use growth.init: random, or "
                "model.batchnorm: true instead of layernorm"
            )
        return self


# ---------------------------------------------------------------- building from a config


_OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], tuple[str, ...]]] = {
    "sgd": (torch.optim.SGD, ("momentum", "weight_decay", "nesterov")),
    "adam": (torch.optim.Adam, ("betas", "eps", "weight_decay")),
    "adamw": (torch.optim.AdamW, ("betas", "eps", "weight_decay")),
    "rmsprop": (torch.optim.RMSprop, ("momentum", "eps", "weight_decay")),
    "adagrad": (torch.optim.Adagrad, ("eps", "weight_decay")),
}


def build_optimizer(cfg: OptimizerConfig, params: Iterable[Any]) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer described by ``cfg`` over ``params``.

    Example:
        >>> opt = build_optimizer(OptimizerConfig(name="sgd", lr=0.1), nn.Linear(2, 2).parameters())
        >>> type(opt).__name__, opt.defaults["lr"]
        ('SGD', 0.1)
    """
    cls, keys = _OPTIMIZERS[cfg.name]
    kwargs = {k: getattr(cfg, k) for k in keys}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(params, lr=cfg.lr, **kwargs)


def growth_targets(cfg: GrowthConfig, model: nn.Module) -> list[str]:
    """The layer names ``cfg.targets`` means for ``model``; unknown names are a ConfigError.

    Example:
        >>> growth_targets(GrowthConfig(), models.mlp(40, [8, 8], 10))
        ['fc1', 'fc2']
    """
    hidden = models.hidden_layer_names(model)
    if cfg.targets == "hidden":
        return hidden
    for name in cfg.targets:
        if name not in hidden:
            raise ConfigError(
                f"growth.targets: {name!r} is not a widenable layer of this model"
                f"{suggest(name, hidden)}; allowed: {', '.join(hidden)} (or 'hidden' for all)"
            )
    return list(cfg.targets)


# ---------------------------------------------------------------- loading and validating


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.2), not as a string, and
    refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping (the first would "
                    "be ignored); merge the two", key_node.start_mark,
                )  # fmt: skip
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def validate_config(data: Any, *, source: str = "config") -> RunConfig:
    """Validate a plain mapping (as read from YAML/JSON) into a :class:`RunConfig`.

    Example:
        >>> validate_config({"train": {"epochs": 3}}).train.epochs
        3
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {data!r}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = [problem(e, RunConfig) for e in exc.errors()]
        raise ConfigError(combine(source, problems)) from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``key.sub=value`` in ``data`` in place; the value is parsed as a YAML scalar.

    Example:
        >>> d = {"optimizer": {"lr": 0.1}}
        >>> apply_override(d, "optimizer.lr=1e-3"); d
        {'optimizer': {'lr': 0.001}}
    """
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise ConfigError(
            f"bad override {override!r}: expected KEY=VALUE with a dotted key, "
            "e.g. optimizer.lr=0.01"
        )
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"bad override {override!r}: the value is not valid YAML ({exc})"
        ) from None
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"bad override {override!r}: {'.'.join(parts[: i + 1])!r} is {child!r}, "
                "not a mapping, so it has no sub-keys"
            )
        node = child
    node[parts[-1]] = value


def _fill(data: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """Set each dotted key of ``defaults`` whose section exists in ``data`` but lacks it."""
    for dotted, value in defaults.items():
        *parents, key = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key not in node:
            node[key] = value


def load_config(
    path: str | Path, overrides: Sequence[str] = (), *, defaults: Mapping[str, Any] | None = None
) -> RunConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides, validate everything.

    ``run_dir`` defaults to ``runs/<config stem>-<timestamp>`` (``-2``, … if that exists).
    ``defaults`` (dotted keys) fill keys missing from sections that are present, e.g.
    ``{"sparsity.density": 1.0}`` for a command that sets the density of each run itself.

    Example:
        >>> from importlib.resources import files
        >>> cfg = load_config(str(files("dynarch") / "configs/demo.yaml"), ["train.epochs=2"])
        >>> cfg.train.epochs, cfg.run_dir.startswith("runs/demo-")
        (2, True)
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {str(path)!r} {what}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        why = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}: {why}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {data!r}")
    for override in overrides:
        apply_override(data, override)
    _fill(data, defaults or {})
    cfg = validate_config(data, source=str(path))
    if cfg.run_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.run_dir, n = f"runs/{path.stem}-{stamp}", 1
        while Path(cfg.run_dir).exists():  # two runs started in the same second
            n += 1
            cfg.run_dir = f"runs/{path.stem}-{stamp}-{n}"
    return cfg
