"""Mutual information between a layer's activations and the labels, on a held-out batch.

Two estimators, both deterministic, vectorised and in **bits**:

``method="binned"`` (default): per-unit equal-frequency discretisation, plug-in MI,
averaged over units. For each unit ``j`` (a column of the ``(N, D)`` activations), sample
``i`` goes to bin ``floor(bins * #{k : a_kj < a_ij} / N)``: bins hold about ``N / bins``
samples each and tied values always share a bin (a dead unit is one bin: MI exactly 0). The
plug-in estimate ``I_j = sum_{b,y} p(b, y) log2(p(b, y) / (p(b) p(y)))`` is computed for all
units at once from one ``bincount``; the result is ``mean_j I_j``. The plug-in estimate is
biased upwards, by about ``(B - 1)(C - 1) / (2 N ln 2)`` bits for independent variables
(``B`` occupied bins, ``C`` classes); with ``bias_correction=True`` (default) each unit gets
the Miller–Madow correction ``((B_j - 1) + (C - 1) - (K_j - 1)) / (2 N ln 2)`` (``K_j``
occupied (bin, class) cells), which removes that first-order bias; each unit's estimate is
capped at ``log2(min(B_j, C))``, the most that ``B_j`` bins and ``C`` classes can share (the
correction overshoots it on tiny samples or exact copies), and the mean is clamped at 0.
The score measures how much label information single units carry (redundant copies of a
unit do not add to it); it is at most ``log2(min(bins, C))``.

``method="probe"``: a linear-probe (Barber–Agakov) lower bound on the *joint* information
``I(A; Y) >= H(Y) - CE``: features are standardised, a softmax regression (zero-initialised,
L2 ``1e-3``, ``steps`` full-batch L-BFGS iterations) is fitted on a fixed random half of the
samples (``randperm`` seeded with 0) and its cross-entropy ``CE`` (bits) measured on the other
half, with ``H(Y)`` that half's plug-in label entropy; the result is clamped to ``[0, H(Y)]``.
Being a bound through a restricted, regularised decoder evaluated out of sample, it is biased
*low* (up to sampling noise of the held-out half).

    >>> import torch
    >>> y = torch.arange(4).repeat(25)
    >>> round(mutual_information(y.float().unsqueeze(1), y, bias_correction=False), 4)
    2.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["METHODS", "layer_mi", "mutual_information", "probe_mi"]

METHODS = ("binned", "probe")
_LN2 = math.log(2.0)


def _check_inputs(activations: object, labels: object) -> tuple[Tensor, Tensor, int]:
    if not isinstance(activations, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(
            "activations and labels must be torch tensors, got "
            f"{type(activations).__name__} and {type(labels).__name__}"
        )
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be a 1-D integer tensor of class indices, got dtype {labels.dtype} "
            f"and shape {tuple(labels.shape)}"
        )
    if activations.ndim < 1 or activations.shape[0] != labels.shape[0]:
        raise ValueError(
            f"activations (shape {tuple(activations.shape)}) and labels (shape "
            f"{tuple(labels.shape)}) must have the same first dimension"
        )
    n = labels.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples to estimate mutual information, got {n}")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got a minimum of {int(labels.min())}")
    acts = activations.detach().reshape(n, -1).double().cpu()
    if acts.shape[1] == 0:
        raise ValueError(f"activations have no features (shape {tuple(activations.shape)})")
    if not bool(torch.isfinite(acts).all()):
        raise ValueError("activations contain NaN or infinite values")
    return acts, labels.detach().long().cpu(), int(labels.max()) + 1


def _binned(acts: Tensor, y: Tensor, classes: int, bins: int, correct: bool) -> float:
    n, d = acts.shape
    cols = acts.t().contiguous()  # (D, N)
    ordered = cols.sort(dim=1).values
    below = torch.searchsorted(ordered, cols)  # #values strictly below, per unit
    b = torch.div(below * bins, n, rounding_mode="floor").clamp_(max=bins - 1)
    unit = torch.arange(d).unsqueeze(1)
    idx = (unit * bins + b) * classes + y.unsqueeze(0)
    joint = torch.bincount(idx.reshape(-1), minlength=d * bins * classes)
    p = joint.view(d, bins, classes).double() / n
    pb = p.sum(2, keepdim=True)
    py = p.sum(1, keepdim=True)
    ratio = torch.where(p > 0, p / (pb * py).clamp_min(1e-300), torch.ones_like(p))
    mi = (p * torch.log(ratio)).sum((1, 2)) / _LN2  # bits per unit
    if correct:
        occupied_b = (pb.squeeze(2) > 0).sum(1)
        occupied_y = (py.squeeze(1) > 0).sum(1)
        cells = (p > 0).sum((1, 2))
        mi = mi + ((occupied_b - 1) + (occupied_y - 1) - (cells - 1)) / (2 * n * _LN2)
        # the correction can overshoot what B_j bins and C classes can hold at all
        mi = torch.minimum(mi, torch.minimum(occupied_b, occupied_y).double().log2())
    return max(0.0, float(mi.mean()))


def _entropy_bits(y: Tensor, classes: int) -> float:
    p = torch.bincount(y, minlength=classes).double() / y.numel()
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


def _probe(acts: Tensor, y: Tensor, classes: int, steps: int) -> float:
    perm = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(0))
    fit, ev = perm[: acts.shape[0] // 2], perm[acts.shape[0] // 2 :]
    fit_x, fit_y, ev_x, ev_y = acts[fit], y[fit], acts[ev], y[ev]
    mean, std = fit_x.mean(0), fit_x.std(0, unbiased=False).clamp_min(1e-6)
    fit_x, ev_x = (fit_x - mean) / std, (ev_x - mean) / std
    w = torch.zeros(acts.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(fit_x @ w + b, fit_y) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        ce = float(F.cross_entropy(ev_x @ w + b, ev_y)) / _LN2
    h = _entropy_bits(ev_y, classes)
    return min(h, max(0.0, h - ce))


def mutual_information(
    activations: Tensor,
    labels: Tensor,
    *,
    bins: int = 10,
    method: str = "binned",
    bias_correction: bool = True,
    steps: int = 50,
) -> float:
    """Estimate ``I(activations; labels)`` in bits (see the module docstring for the estimators).

    ``activations`` is ``(N, ...)`` (flattened to ``N`` rows of features), ``labels`` ``(N,)``
    class indices. ``bins`` and ``bias_correction`` belong to ``"binned"``, ``steps`` (L-BFGS
    iterations) to ``"probe"``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.randint(0, 2, (2000,), generator=g)
        >>> noise = torch.randn(2000, 3, generator=g)
        >>> mutual_information(noise, y) < 0.01
        True
        >>> round(mutual_information(y.float().unsqueeze(1), y, method="probe"), 1)
        1.0
    """
    if method not in METHODS:
        raise ValueError(f"unknown MI method {method!r}; allowed: {', '.join(METHODS)}")
    for name, value, low in (("bins", bins, 2), ("steps", steps, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    acts, y, classes = _check_inputs(activations, labels)
    if method == "probe":
        return _probe(acts, y, classes, steps)
    return _binned(acts, y, classes, bins, bool(bias_correction))


def _pooled(out: Tensor) -> Tensor:
    """Channel units: 4-D conv maps ``(N, C, H, W)`` are averaged over space."""
    return out.mean((2, 3)) if out.ndim == 4 else out.reshape(out.shape[0], -1)


def layer_mi(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    layers: Sequence[str] | None = None,
    *,
    bins: int = 10,
    method: str = "binned",
    bias_correction: bool = True,
) -> dict[str, float]:
    """MI (bits) between each named module's output and ``y`` on the batch ``x``.

    One forward pass (eval mode, no grad; modes restored) with forward hooks. ``layers``
    defaults to every ``Linear``/``Conv2d`` (their pre-activation outputs; name activation
    modules to measure post-activations). Conv feature maps are averaged over space, so a
    unit is a channel. ``""`` names the model output.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> sorted(layer_mi(model, x, y))
        ['0', '2']
    """
    modules = dict(model.named_modules())
    if layers is None:
        names = [n for n, m in modules.items() if isinstance(m, nn.Linear | nn.Conv2d)]
    else:
        if isinstance(layers, str):
            raise TypeError(f"layers must be a list of module names, got the string {layers!r}")
        names = list(layers)
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ValueError(
                f"layers {unknown} are not modules of the model; available: "
                f"{[n for n in modules if n]} ('' is the model output)"
            )
    if not names:
        raise ValueError("the model has no Linear/Conv2d layer; pass layers=[module names]")
    outputs: dict[str, list[Tensor]] = {n: [] for n in names}

    def hook(name: str) -> object:
        def fn(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, Tensor):
                outputs[name].append(out.detach())

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    result = {}
    for n in names:
        if len(outputs[n]) != 1:
            raise ValueError(
                f"module {n!r} produced {len(outputs[n])} tensor outputs in one forward pass; "
                "layer_mi needs modules called exactly once"
            )
        result[n] = mutual_information(
            _pooled(outputs[n][0]), y, bins=bins, method=method, bias_correction=bias_correction
        )
    return result


def probe_mi(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    held_out: tuple[Tensor, Tensor],
    *,
    steps: int = 20,
    lr: float = 0.05,
    seed: int = 0,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    monitor: str | None = None,
    method: str = "binned",
    bins: int = 10,
) -> float:
    """Train ``model`` **in place** for ``steps`` full-batch SGD steps (momentum 0.9) on
    ``train``, then return the MI (bits) between its output (or the module ``monitor``'s) and
    the labels of ``held_out``.

    Masks are enforced during the steps; global RNG (dropout) is seeded with ``seed`` and
    restored afterwards, so the result is deterministic. This is the look-ahead the growth
    tournament scores candidates with (give it a copy of the model).

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(128, 4); y = (x[:, 0] > 0).long()
        >>> probe_mi(net, (x[:64], y[:64]), (x[64:], y[64:]), steps=50, lr=0.2) > 0.5
        True
    """
    from ..masks import enforce, is_sparse

    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    if steps:
        x, y = train
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
            if is_sparse(model):
                enforce(model, opt)
            model.train()
            with torch.enable_grad():
                for _ in range(steps):
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model(x), y).backward()
                    opt.step()
    hx, hy = held_out
    if monitor is not None:
        return layer_mi(model, hx, hy, [monitor], bins=bins, method=method)[monitor]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(hx)
    finally:
        model.train(was)
    return mutual_information(out, hy, bins=bins, method=method)
