"""Images of weight masks: heatmaps and kept / removed / added differences, as PNG files.

The pure functions (:func:`as_matrix`, :func:`block_average`, :func:`diff_rgb`) build the
arrays; :func:`save_mask_png` and :func:`save_diff_png` draw them on a
:class:`matplotlib.figure.Figure` rendered by the Agg canvas (no display, no pyplot state).
Large layers are shown block-averaged: a pixel is the active share of its block, so nothing is
silently dropped. :mod:`dynarch.plots` re-exports all of it.

Example:
    >>> import torch
    >>> before = torch.tensor([[True, True, False, False]])
    >>> after = torch.tensor([[True, False, True, False]])
    >>> diff_rgb(before, after)[0].tolist() == [
    ...     list(COLORS[k]) for k in ("kept", "removed", "added", "none")]
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

__all__ = [
    "COLORS", "as_matrix", "block_average", "diff_rgb", "save_diff_png", "save_figure",
    "save_mask_png",
]  # fmt: skip

COLORS: dict[str, tuple[float, float, float]] = {
    "none": (1.0, 1.0, 1.0),  # inactive before and after
    "kept": (0.25, 0.25, 0.25),
    "removed": (0.75, 0.0, 0.0),
    "added": (0.0, 0.5, 1.0),
}
"""RGB colours of a mask-difference image."""


def as_matrix(mask: Tensor) -> Tensor:
    """The 2-D matrix a weight (mask) is drawn as: ``(out, in)``; a conv weight
    ``(out, in, kh, kw)`` becomes ``(out, in * kh * kw)``.

    Example:
        >>> as_matrix(torch.ones(4, 3, 2, 2)).shape
        torch.Size([4, 12])
    """
    if mask.ndim < 2:
        raise ValueError(f"a weight mask has at least 2 dimensions, got shape {tuple(mask.shape)}")
    return mask.reshape(mask.shape[0], -1)


def block_average(x: Tensor, max_size: int = 256) -> Tensor:
    """Mean of ``x`` over blocks of its last two dims so that neither exceeds ``max_size``.

    Blocks are ``ceil(H / max_size)`` by ``ceil(W / max_size)``; the blocks of the last row
    or column may be smaller and are averaged over the elements they hold.

    Example:
        >>> block_average(torch.tensor([[1, 1, 0, 0, 1], [1, 0, 0, 0, 1]]), 3).tolist()
        [[1.0, 0.0, 1.0], [0.5, 0.0, 1.0]]
    """
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"max_size must be an int >= 1 (pixels), got {max_size!r}")
    if x.ndim < 2:
        raise ValueError(f"block_average needs at least 2 dimensions, got {tuple(x.shape)}")
    *lead, h, w = x.shape
    bh, bw = -(-h // max_size), -(-w // max_size)
    nh, nw = -(-h // bh), -(-w // bw)
    x = x.float()
    if bh == bw == 1:
        return x
    padded = F.pad(x, (0, nw * bw - w, 0, nh * bh - h))
    sums = padded.reshape(*lead, nh, bh, nw, bw).sum(dim=(-3, -1))
    rows = (h - torch.arange(nh) * bh).clamp(max=bh)
    cols = (w - torch.arange(nw) * bw).clamp(max=bw)
    return sums / (rows[:, None] * cols[None, :]).to(sums.device)


def diff_rgb(before: Tensor, after: Tensor, max_size: int = 256) -> np.ndarray:
    """An ``(H, W, 3)`` float image of two masks of one layer: each pixel mixes the
    :data:`COLORS` of kept, removed and added connections (and ``none``) by their shares.

    Example:
        >>> diff_rgb(torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)).shape
        (2, 2, 3)
    """
    if before.shape != after.shape:
        raise ValueError(
            f"masks to compare have shapes {tuple(before.shape)} and {tuple(after.shape)}; "
            "a difference needs the same shape (was the layer resized in between?)"
        )
    b, a = as_matrix(before.bool().cpu()), as_matrix(after.bool().cpu())
    shares = block_average(torch.stack([b & a, b & ~a, ~b & a]), max_size)  # (3, H', W')
    palette = torch.tensor([COLORS[k] for k in ("kept", "removed", "added")])
    none = torch.tensor(COLORS["none"])
    rgb = (1 - shares.sum(0))[..., None] * none + torch.einsum("khw,kc->hwc", shares, palette)
    return rgb.clamp(0, 1).numpy()


def _extent(shape: Sequence[int]) -> tuple[float, float, float, float]:
    """Axes in weight indices, whatever the block size of the image."""
    return (-0.5, shape[1] - 0.5, shape[0] - 0.5, -0.5)


def _label_axes(ax: Any, shape: Sequence[int], max_size: int) -> None:
    """``inputs (784)`` / ``outputs (300, 2 per pixel)`` axis labels of a drawn matrix."""
    for kind, n, set_label in (("outputs", shape[0], ax.set_ylabel),
                               ("inputs", shape[1], ax.set_xlabel)):  # fmt: skip
        block = -(-n // max_size)
        set_label(f"{kind} ({n}{f', {block} per pixel' if block > 1 else ''})")


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (creating its folder) and free its contents.

    Example:
        >>> import tempfile
        >>> save_figure(Figure(), tempfile.mkdtemp() + "/sub/empty.png").name
        'empty.png'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    fig.clf()
    return path


def save_mask_png(mask: Tensor, path: str | Path, *, title: str = "", max_size: int = 256) -> Path:
    """Write a heatmap of ``mask`` (black: active; grey: a block's active share).

    Example:
        >>> import tempfile
        >>> save_mask_png(torch.eye(4, dtype=torch.bool), tempfile.mkdtemp() + "/m.png").suffix
        '.png'
    """
    matrix = as_matrix(mask.detach().cpu())
    image = block_average(matrix, max_size)
    density = matrix.float().mean().item()
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    shown = ax.imshow(image.numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto",
                      interpolation="nearest", extent=_extent(matrix.shape))  # fmt: skip
    fig.colorbar(shown, ax=ax, label="active fraction")
    ax.set_title(f"{title}  density {density:.4f}".strip())
    _label_axes(ax, matrix.shape, max_size)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.12, top=0.92)
    return save_figure(fig, path)


def save_diff_png(
    before: Tensor, after: Tensor, path: str | Path, *, title: str = "", max_size: int = 256
) -> Path:
    """Write the :func:`diff_rgb` image of two masks, with a legend of the counts.

    Example:
        >>> import tempfile
        >>> a = torch.eye(3, dtype=torch.bool)
        >>> save_diff_png(a, a.flip(0), tempfile.mkdtemp() + "/d.png").name
        'd.png'
    """
    rgb = diff_rgb(before, after, max_size)
    b, a = before.detach().bool().cpu(), after.detach().bool().cpu()
    counts = torch.stack([(b & a).sum(), (b & ~a).sum(), (~b & a).sum()]).tolist()
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    ax.imshow(rgb, aspect="auto", interpolation="nearest", extent=_extent(as_matrix(b).shape))
    labels = [f"{k} ({n})" for k, n in zip(("kept", "removed", "added"), counts)]
    handles = [Patch(facecolor=COLORS[k], edgecolor="black", label=label)
               for k, label in zip(("kept", "removed", "added"), labels)]  # fmt: skip
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    ax.set_title(title)
    _label_axes(ax, as_matrix(b).shape, max_size)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.22, top=0.92)
    return save_figure(fig, path)
