"""Multi-scale bootstrapping: train on downsampled images first, then grow the resolution.

:class:`MultiScale` trains one network per scale (e.g. 7×7 → 14×14 → 28×28 inputs, made by
average pooling with :func:`downsample`) and initialises each scale's network from the
previous one:

* **hierarchical** (:func:`hierarchical_init`): with ``f = L / s`` the upscaling factor, the
  first layer's weights are upsampled spatially (nearest neighbour) and divided by ``f²``:
  ``W_L[j, c, y, x] = W_s[j, c, y // f, x // f] / f²``. Then for *any* large input ``x``,
  ``W_L · x = W_s · avgpool_f(x)``: the large network computes exactly what the small one
  computes on the downsampled input (and on a nearest-upsampled small input it gives the
  small network's output). Later Linear layers are copied into the top-left block; a unit
  the larger network has in addition keeps its own random incoming weights and gets zero
  outgoing weights, so wider scales preserve the function too.
* **decisive** (:func:`decisive_init`, the data-driven variant): hierarchical, then the
  large first layer is masked to the children (the ``f²`` large pixels) of each unit's
  ``top_k`` *decisive features* — its largest ``|weight|`` inputs in the small network;
  additional units get the ``top_k`` features with the largest total ``|weight|``. The large
  network then equals the small one with its first layer pruned to those features.

Models are MLPs over images (``Flatten`` first, then ``Linear`` layers and parameter-free
modules such as activations and dropout). The network initialised (the larger one) must be
dense: its weights are written as whole rows and blocks, which a mask of its own would
contradict, so a masked one is refused (:class:`MultiScale` checks every scale's network before
any training). The smaller network may be masked: its masked weights are zero and are copied
as zeros, so the larger network equals it as a dense network; sparsify it afterwards if wanted
(that changes its function).

    >>> import torch
    >>> from dynarch.models import mlp
    >>> small, large = mlp(4 * 4, [8], 3), mlp(8 * 8, [8], 3)
    >>> hierarchical_init(small, large, (1, 4, 4), (1, 8, 8))
    >>> x = torch.randn(5, 1, 8, 8)
    >>> torch.allclose(large(x), small(downsample(x, 4)), atol=1e-6)
    True
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._engine import set_seed, transaction
from .._validate import check_int
from ..masks import MASK, apply_masks
from ._multiscale_checks import _check_dense, _factor, _linears
from .candidates import active_params

__all__ = [
    "INITS", "MultiScale", "MultiScaleResult", "decisive_init", "downsample",
    "hierarchical_init", "upsample",
]  # fmt: skip

INITS = ("hierarchical", "decisive", "none")


def _images(x: object, what: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} must be images of shape (N, C, H, W), got {got}")
    return x


def downsample(x: Tensor, size: int) -> Tensor:
    """Average-pool images ``(N, C, H, W)`` to ``(N, C, size, size)`` (``size`` must divide
    ``H`` and ``W``).

    Example:
        >>> downsample(torch.arange(16.0).view(1, 1, 4, 4), 2).flatten().tolist()
        [2.5, 4.5, 10.5, 12.5]
    """
    x = _images(x, "x")
    h, w = x.shape[-2:]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1 or h % size or w % size:
        raise ValueError(
            f"size must be a positive int dividing the image size {h}x{w}, got {size!r}"
        )
    if (h, w) == (size, size):
        return x
    return F.avg_pool2d(x, kernel_size=(h // size, w // size))


def upsample(x: Tensor, size: int) -> Tensor:
    """Nearest-neighbour upsample square images ``(N, C, s, s)`` to ``(N, C, size, size)``.

    Example:
        >>> upsample(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), 4)[0, 0, 0].tolist()
        [1.0, 1.0, 2.0, 2.0]
    """
    x = _images(x, "x")
    s = x.shape[-1]
    if x.shape[-2] != s or not isinstance(size, int) or size < s or size % s:
        raise ValueError(f"size must be a multiple of the square image side {s}, got {size!r}")
    f = size // s
    return x.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)


def hierarchical_init(
    small: nn.Module,
    large: nn.Module,
    small_shape: Sequence[int],
    large_shape: Sequence[int],
) -> None:
    """Initialise ``large`` (inputs ``large_shape``) from ``small`` (``small_shape``) in place
    so that ``large(x) == small(downsample(x))`` (see the module docstring).

    Both are MLPs with the same number of Linear layers; each large layer is at least as wide
    as the small one and the output widths are equal. Masked weights of ``small`` are zero and
    copied as zeros; ``large`` must be dense (a masked one is refused, unchanged).

    Example:
        >>> from dynarch.models import mlp
        >>> small, large = mlp(4, [3], 2), mlp(16, [5], 2)
        >>> hierarchical_init(small, large, (1, 2, 2), (1, 4, 4))
        >>> bool((large.out.weight[:, 3:] == 0).all())
        True
    """
    c, s, f = _factor(small_shape, large_shape)
    pairs = list(zip(_linears(small, "small"), _linears(large, "large")))
    if len(_linears(small, "small")) != len(_linears(large, "large")):
        raise ValueError("small and large models must have the same number of Linear layers")
    (sn, first_s), (ln, first_l) = pairs[0]
    if first_s.in_features != c * s * s or first_l.in_features != c * s * s * f * f:
        raise ValueError(
            f"first layers '{sn}'/'{ln}' take {first_s.in_features}/{first_l.in_features} "
            f"inputs, expected {c * s * s}/{c * s * s * f * f} from the shapes"
        )
    for (sn, ls), (ln, ll) in pairs:
        if ll.out_features < ls.out_features or (ls.bias is None) != (ll.bias is None):
            raise ValueError(
                f"large layer '{ln}' ({ll.out_features} units) must be at least as wide as "
                f"small layer '{sn}' ({ls.out_features}) and match its bias"
            )
    if pairs[-1][1][1].out_features != pairs[-1][0][1].out_features:
        raise ValueError("small and large models must have the same number of outputs")
    _check_dense(large)
    with torch.no_grad():
        for i, ((_, ls), (_, ll)) in enumerate(pairs):
            h = ls.out_features
            w = ls.weight.detach()
            if i == 0:
                grid = w.reshape(h, c, s, s).repeat_interleave(f, 2).repeat_interleave(f, 3)
                ll.weight[:h] = grid.reshape(h, -1) / (f * f)
            else:
                ll.weight[:h, : ls.in_features] = w
                ll.weight[:, ls.in_features :] = 0.0
            if ls.bias is not None and ll.bias is not None:
                ll.bias[:h] = ls.bias


def decisive_init(
    small: nn.Module,
    large: nn.Module,
    small_shape: Sequence[int],
    large_shape: Sequence[int],
    *,
    top_k: int,
    reason: str = "multiscale decisive features",
) -> None:
    """:func:`hierarchical_init`, then mask ``large``'s first layer to the children of each
    unit's ``top_k`` decisive features of ``small`` (largest ``|weight|``; additional units:
    the ``top_k`` features with the largest total ``|weight|``). The mask is recorded as a
    ``"sparsify"`` event of ``large`` (checkpoints rebuild it).

    Example:
        >>> from dynarch.models import mlp
        >>> small, large = mlp(4, [3], 2), mlp(16, [3], 2)
        >>> decisive_init(small, large, (1, 2, 2), (1, 4, 4), top_k=1)
        >>> large.fc1.weight_mask.sum(1).tolist()
        [4, 4, 4]
    """
    hierarchical_init(small, large, small_shape, large_shape)
    c, s, f = _factor(small_shape, large_shape)
    (_, first_s), (name, first_l) = _linears(small, "small")[0], _linears(large, "large")[0]
    n_in = first_s.in_features
    check_int("top_k", top_k, 1)
    if top_k > n_in:
        raise ValueError(f"top_k must be at most the {n_in} small-scale inputs, got {top_k}")
    w = first_s.weight.detach().abs()
    chosen = torch.zeros(first_l.out_features, n_in, dtype=torch.bool)
    rows = torch.arange(w.shape[0]).unsqueeze(1)
    chosen[rows, w.topk(top_k, dim=1).indices.cpu()] = True
    chosen[w.shape[0] :, w.sum(0).topk(top_k).indices.cpu()] = True
    grid = chosen.view(-1, c, s, s).repeat_interleave(f, 2).repeat_interleave(f, 3)
    mask = grid.reshape(first_l.out_features, -1).to(first_l.weight.device)
    with transaction(large, "sparsify", "*", reason=reason) as tx:
        old = first_l._buffers.get(MASK)
        if old is None:
            first_l.register_buffer(MASK, mask, persistent=True)
        else:
            old.copy_(mask)
        apply_masks(large)
        active, total = int(mask.sum()), mask.numel()
        tx.details[name] = {"density": active / total, "active": active, "total": total}
        tx.details["top_k"] = top_k
        tx.replay = {"layers": [name], "density": active / total, "distribution": "uniform"}


def _splits(data: object) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if all(hasattr(data, a) for a in ("train_x", "train_y", "test_x", "test_y")):
        d: Any = data
        return d.train_x, d.train_y, d.test_x, d.test_y
    if isinstance(data, tuple | list) and len(data) == 2 and all(len(p) == 2 for p in data):
        (x, y), (tx, ty) = data
        return x, y, tx, ty
    raise TypeError(
        "data must be a dynarch.data.Dataset (train_x/train_y/test_x/test_y) or a pair "
        f"((train_x, train_y), (test_x, test_y)), got {type(data).__name__}"
    )


@dataclass
class MultiScaleResult:
    """The final model and one row per scale: ``scale``, ``init``, ``params`` (active),
    ``accuracy_at_init`` (before training at that scale), ``accuracy``, ``epochs``,
    ``seconds``."""

    model: nn.Module
    rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """The rows as a markdown table.

        Example:
            >>> print(MultiScaleResult(nn.Identity()).table().splitlines()[0])
            | scale | init | params | accuracy at init | accuracy | epochs | seconds |
        """
        lines = ["| scale | init | params | accuracy at init | accuracy | epochs | seconds |",
                 "|---" * 7 + "|"]  # fmt: skip
        for r in self.rows:
            lines.append(
                f"| {r['scale']} | {r['init']} | {r['params']} | {r['accuracy_at_init']:.4f} | "
                f"{r['accuracy']:.4f} | {r['epochs']} | {r['seconds']:.2f} |"
            )
        return "\n".join(lines)


class MultiScale:
    """Train ``build(scale)`` networks on increasingly fine images, each initialised from the
    previous scale's (``init``: ``"hierarchical"``, ``"decisive"`` with ``top_k``, or
    ``"none"`` for an independent baseline).

    ``scales`` are increasing image sides, each dividing the next and the data's. Each scale
    trains ``epochs_per_scale`` epochs (an int or one per scale) with Adam (``lr``) or
    ``optimizer_fn(model)``. Models are built under ``torch.manual_seed(seed)`` with the global
    RNG restored afterwards; the engine and trainer are seeded with ``seed``.

    Example:
        >>> import torch
        >>> from dynarch.models import mlp
        >>> x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 2, (64,))
        >>> ms = MultiScale([2, 4, 8], lambda s: mlp(s * s, [8], 2), epochs_per_scale=1)
        >>> [r["scale"] for r in ms.run(((x, y), (x, y))).rows]
        [2, 4, 8]
    """

    def __init__(
        self,
        scales: Sequence[int],
        build: Callable[[int], nn.Module],
        *,
        init: str = "hierarchical",
        top_k: int = 16,
        epochs_per_scale: int | Sequence[int] = 1,
        lr: float = 1e-3,
        batch_size: int = 128,
        seed: int = 0,
        optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    ) -> None:
        if isinstance(scales, int | str) or not scales:
            raise ValueError(f"scales must be a non-empty list of image sides, got {scales!r}")
        scales = [check_int("scale", s, 1) for s in scales]
        for a, b in itertools.pairwise(scales):
            if b <= a or b % a:
                raise ValueError(
                    f"scales must increase, each dividing the next, got {scales} ({a} -> {b})"
                )
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INITS)}")
        if not callable(build):
            raise TypeError(f"build must be callable (scale) -> nn.Module, got {build!r}")
        epochs = (
            [epochs_per_scale] * len(scales)
            if isinstance(epochs_per_scale, int)
            else list(epochs_per_scale)
        )
        if len(epochs) != len(scales):
            raise ValueError(f"epochs_per_scale has {len(epochs)} entries for {len(scales)} scales")
        self.epochs = [check_int("epochs_per_scale", e, 0) for e in epochs]
        self.scales, self.build, self.init = scales, build, init
        self.top_k = check_int("top_k", top_k, 1)
        self.lr, self.batch_size = float(lr), check_int("batch_size", batch_size, 1)
        self.seed, self.optimizer_fn = check_int("seed", seed, 0), optimizer_fn

    def _build(self, scale: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self.build(scale)
        if not isinstance(model, nn.Module):
            raise TypeError(f"build({scale}) returned {type(model).__name__}, not an nn.Module")
        set_seed(model, self.seed)
        return model

    def run(self, data: object) -> MultiScaleResult:
        """Train every scale on ``data`` (a Dataset or ``((x, y), (x_test, y_test))``)."""
        from ..train import Trainer

        x, y, tx, ty = _splits(data)
        channels, side = _images(x, "data inputs").shape[1], x.shape[-1]
        if side % self.scales[-1]:
            raise ValueError(f"the largest scale {self.scales[-1]} must divide the images' {side}")
        result = MultiScaleResult(nn.Identity())
        prev: nn.Module | None = None
        models = [self._build(scale) for scale in self.scales]  # (deterministic per scale)
        if len(self.scales) > 1 and self.init != "none":  # unsupported models fail up front
            _linears(models[0], "small")
            for scale, model in zip(self.scales[1:], models[1:], strict=True):
                _check_dense(
                    model,
                    f"scale-{scale}",
                    "let build() return dense networks for every scale after the first (only "
                    "the first may be masked), or use init='none'",
                )
        for i, scale in enumerate(self.scales):
            t0 = time.perf_counter()
            model = models[i]
            init = "none" if prev is None else self.init
            shapes = ((channels, self.scales[i - 1], self.scales[i - 1]), (channels, scale, scale))
            if prev is not None and init == "hierarchical":
                hierarchical_init(prev, model, *shapes)
            elif prev is not None and init == "decisive":
                decisive_init(prev, model, *shapes, top_k=self.top_k)
            opt = (self.optimizer_fn or (lambda m: torch.optim.Adam(m.parameters(), lr=self.lr)))(
                model
            )
            train, held = (downsample(x, scale), y), (downsample(tx, scale), ty)
            trainer = Trainer(model, opt, train, eval=held, epochs=self.epochs[i],
                              batch_size=self.batch_size, seed=self.seed,
                              progress=False)  # fmt: skip
            at_init = trainer.evaluate(held).get("val_accuracy", float("nan"))
            trainer.fit()
            acc = trainer.evaluate(held).get("val_accuracy", float("nan"))
            result.rows.append({
                "scale": scale, "init": init, "params": active_params(model)[0],
                "accuracy_at_init": at_init, "accuracy": acc, "epochs": self.epochs[i],
                "seconds": time.perf_counter() - t0,
            })  # fmt: skip
            prev = result.model = model
        return result
