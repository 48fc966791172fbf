"""Which operations of a traced forward can change a feature map's spatial size (a 1x1
skip needs both ends at the same size).

>>> import torch.nn as nn
>>> from dynarch.graph import analyse
>>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
...                     nn.Conv2d(2, 2, 3, padding=1))
>>> _resizers(analyse(net), "1", "3")
["'2' (MaxPool2d)"]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..graph import ModelGraph

__all__: list[str] = []

_RESIZE_MODULES = (
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.FractionalMaxPool2d,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ConvTranspose2d, nn.Flatten, nn.Unflatten,
)  # fmt: skip
_RESIZE_FUNCTIONS = {
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate,
    F.pixel_shuffle, F.pixel_unshuffle, F.conv2d, F.conv_transpose2d, torch.flatten,
}  # fmt: skip
_RESIZE_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose"}


def _same_size(mod: nn.Module) -> bool:
    """Whether a Conv2d / MaxPool2d / AvgPool2d keeps the spatial size (stride 1, 'same' pad)."""
    if isinstance(mod, nn.Conv2d):
        if mod.padding == "same":
            return True
        k, d, st, p = mod.kernel_size, mod.dilation, mod.stride, mod.padding
    elif isinstance(mod, nn.MaxPool2d | nn.AvgPool2d):
        k, st, p = _pair(mod.kernel_size), _pair(mod.stride), _pair(mod.padding)
        d = _pair(getattr(mod, "dilation", 1))
    else:
        return True
    if isinstance(p, str):  # "valid"
        p = (0, 0)
    return all(s == 1 and 2 * q == e * (kk - 1) for kk, e, s, q in zip(k, d, st, p))


def _resizers(graph: ModelGraph, source: str, target: str) -> list[str]:
    """Operations run after ``source`` and up to ``target`` that may resize feature maps."""
    order = list(graph.graph.nodes)
    start, end = order.index(graph.calls[source][0]), order.index(graph.calls[target][0])
    found = []
    for node in order[start + 1 : end + 1]:
        if node.op == "call_module":
            mod = graph.modules.get(str(node.target))
            if isinstance(mod, _RESIZE_MODULES) or (mod is not None and not _same_size(mod)):
                found.append(f"'{node.target}' ({type(mod).__name__})")
        elif node.op == "call_function" and node.target in _RESIZE_FUNCTIONS:
            found.append(f"{getattr(node.target, '__name__', node.target)}()")
        elif node.op == "call_method" and node.target in _RESIZE_METHODS:
            found.append(f".{node.target}()")
    return found
