"""The ``growth:`` section of a run config: grow as needed, with one of three policies.

``policy`` says *what* grows, ``trigger`` *when*, ``max_params`` *how far*:

* ``widen`` — widen ``targets`` by ``factor`` (Net2Net / zero / random init) up to
  ``max_width`` (:class:`dynarch.schedules.WidenAction`);
* ``patches`` — turn on dense patches of connections around the dead and saturated units of
  masked layers, ``amount`` × the active connections per growth, ``patch_size`` wide
  (:class:`dynarch.growth.actions.PatchesAction`); needs ``sparsity:``;
* ``tournament`` — propose ``candidates`` (patch, insert, widen, skip), apply the best by
  ΔMI/ΔParams (:class:`dynarch.growth.Tournament`).

``trigger: plateau`` grows when ``monitor`` has not improved by more than ``threshold`` for
``patience`` evaluations; ``trigger: every`` grows every ``every`` evaluations (a key of
the other trigger, set to a value other than its default, is an error). After a growth
the trigger waits ``cooldown`` evaluations; at most ``max_events`` growths. ``max_params``
caps the *active* parameters (masked-off weights not counted): a number <= 1 is a fraction of
the model's dense parameter count when training starts, a larger one an absolute count.

    >>> GrowthConfig(policy="patches", amount=0.25).trigger
    'plateau'
    >>> from dynarch.config import validate_config
    >>> validate_config({"growth": {"policy": "patches", "factor": 2.0}})
    Traceback (most recent call last):
    ...
    dynarch.config.ConfigError: config: growth: 'factor' applies to policy 'widen', not \
'patches'; remove it or set growth.policy
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from ._config_base import NonNegFloat, NonNegInt, PosInt, _Monitored

__all__ = ["CANDIDATES", "POLICIES", "GrowthConfig"]

Policy = Literal["widen", "patches", "tournament"]
POLICIES: tuple[str, ...] = ("widen", "patches", "tournament")
Candidate = Literal["patch", "insert", "widen", "skip"]
CANDIDATES: tuple[str, ...] = ("patch", "insert", "widen", "skip")

# keys that only mean something for some policies (a user setting them elsewhere is told so)
_ONLY: dict[str, tuple[str, ...]] = {
    "factor": ("widen",),
    "max_width": ("widen",),
    "init": ("widen",),
    "noise": ("widen",),
    "targets": ("widen",),
    "amount": ("patches",),
    "patch_size": ("patches", "tournament"),
    "candidates": ("tournament",),
    "cooldown": ("widen", "patches"),
}


def _all_candidates() -> list[Candidate]:
    return ["patch", "insert", "widen", "skip"]


class GrowthConfig(_Monitored):
    """``growth:`` — see the module docstring.

    Example:
        >>> GrowthConfig().policy, GrowthConfig().targets
        ('widen', 'hidden')
    """

    policy: Policy = "widen"
    trigger: Literal["plateau", "every"] = "plateau"
    patience: PosInt = 2
    threshold: NonNegFloat = 0.01
    every: PosInt = 1
    cooldown: NonNegInt = 0
    max_events: PosInt | None = None
    max_params: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    factor: Annotated[float, Field(gt=1.0, allow_inf_nan=False)] = 1.5
    max_width: PosInt | None = None
    init: Literal["net2net", "zero", "random"] = "net2net"
    noise: NonNegFloat = 0.0
    targets: Union[Literal["hidden"], list[str]] = "hidden"  # noqa: UP007
    amount: Annotated[float, Field(gt=0.0, le=4.0)] = 0.5
    patch_size: PosInt = 32
    candidates: Annotated[list[Candidate], Field(min_length=1)] = Field(
        default_factory=_all_candidates
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        names = value if isinstance(value, list) else [None]
        if value != "hidden" and not (names and all(isinstance(v, str) and v for v in names)):
            raise ValueError(
                f"{value!r} is not allowed; use 'hidden' or a non-empty list of layer names"
            )
        return value

    @field_validator("max_params", mode="before")
    @classmethod
    def _max_params(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    @model_validator(mode="after")
    def _policy_keys(self) -> GrowthConfig:
        defaults = GrowthConfig.model_fields
        for key in sorted(self.model_fields_set):
            allowed = _ONLY.get(key)
            default = defaults[key].get_default(call_default_factory=True)
            if allowed is not None and self.policy not in allowed and getattr(self, key) != default:
                raise ValueError(
                    f"{key!r} applies to policy {' / '.join(map(repr, allowed))}, not "
                    f"{self.policy!r}; remove it or set growth.policy"
                )
        if self.every != 1 and self.trigger != "every":
            raise ValueError("'every' applies to trigger 'every'; set growth.trigger: every")
        for key in ("patience", "threshold"):
            changed = getattr(self, key) != defaults[key].get_default()
            if self.trigger != "plateau" and key in self.model_fields_set and changed:
                raise ValueError(
                    f"{key!r} applies to trigger 'plateau', not {self.trigger!r}; remove it or "
                    "set growth.trigger: plateau"
                )
        if self.max_params is not None and self.max_params > 1 and self.max_params % 1:
            raise ValueError(
                f"max_params {self.max_params!r} is neither a fraction <= 1 nor a whole "
                "number of parameters"
            )
        return self

    def budget(self, dense_params: int) -> int | None:
        """The active-parameter cap for a model with ``dense_params`` parameters (None: no cap).

        Example:
            >>> GrowthConfig(max_params=0.05).budget(1000), GrowthConfig(max_params=300).budget(1)
            (50, 300)
        """
        if self.max_params is None:
            return None
        if self.max_params <= 1:
            return int(self.max_params * dense_params)
        return int(self.max_params)
