"""The building blocks of every config section (strict pydantic models, shared types)."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ALGORITHMS", "Activation", "Algorithm", "Monitor", "NonNegFloat", "NonNegInt", "PosFloat",
    "PosInt", "UnitFloat",
]  # fmt: skip

Monitor = Literal["val_loss", "val_accuracy"]
Algorithm = Literal["static", "set", "deep_r", "rigl", "snfs"]  # dynarch.sparse.ALGORITHMS
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
Activation = Literal["relu", "leaky_relu", "gelu", "silu", "tanh", "elu"]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
PosFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
UnitFloat = Annotated[float, Field(ge=0.0, lt=1.0)]  # in [0, 1)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


class _Monitored(_Section):
    monitor: Monitor = "val_loss"

    @property
    def mode(self) -> str:
        """``"max"`` for accuracy, ``"min"`` for losses."""
        return "max" if "accuracy" in self.monitor else "min"
