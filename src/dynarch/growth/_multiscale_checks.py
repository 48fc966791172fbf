"""Model and shape checks of multi-scale initialisation (:mod:`dynarch.growth.multiscale`):
the Linear layers of an MLP, a dense (unmasked) network, the integer upscaling factor."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..masks import MASK

__all__: list[str] = []


def _linears(model: nn.Module, role: str) -> list[tuple[str, nn.Linear]]:
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            layers.append((name, mod))
        elif not isinstance(mod, nn.Linear) and any(True for _ in mod.parameters(recurse=False)):
            raise ValueError(
                f"{role} model has a {type(mod).__name__} ('{name}') with parameters; "
                "multi-scale initialisation supports MLPs of Linear layers and parameter-free "
                "modules (Flatten, activations, dropout)"
            )
    if not layers:
        raise ValueError(f"{role} model has no Linear layer")
    return layers


_DENSE_FIX = (
    "build that network dense (the smaller network's masked weights are copied as zeros) and "
    "sparsify it after initialisation if wanted"
)


def _check_dense(large: nn.Module, role: str = "large", fix: str = _DENSE_FIX) -> None:
    masked = [n for n, m in large.named_modules() if m._buffers.get(MASK) is not None]
    if masked:
        raise ValueError(
            f"the {role} model is masked ('{masked[0]}' has a {MASK}): multi-scale "
            "initialisation writes whole rows and blocks of its weights, which its mask would "
            f"forbid; {fix}"
        )


def _factor(small_shape: Sequence[int], large_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(small_shape) != 3 or len(large_shape) != 3 or small_shape[0] != large_shape[0]:
        raise ValueError(
            f"shapes must be (C, H, W) with the same C, got {tuple(small_shape)} and "
            f"{tuple(large_shape)}"
        )
    c, sh, sw = small_shape
    _, lh, lw = large_shape
    if lh % sh or lw % sw or lh // sh != lw // sw:
        raise ValueError(
            f"the large shape {tuple(large_shape)} must be the small shape {tuple(small_shape)} "
            "scaled by one integer factor"
        )
    return c, sh, lh // sh
