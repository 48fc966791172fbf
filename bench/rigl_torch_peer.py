"""The peer implementation for bench/dst.py: ``rigl-torch`` 0.5.2 (PyPI), wired as a callback.

How rigl-torch picks layers and densities (read from its source, ``rigl_torch/RigL.py`` and
``rigl_torch/util.py``), and how this module configures it so that its overall density over
the Linear weights equals ours:

* It walks ``model._modules`` and takes every module with a ``weight`` (Linear included,
  BatchNorm2d excluded) in registration order. ``ignore_linear_layers=True`` (the default)
  keeps every Linear dense, so we pass ``ignore_linear_layers=False``.
* Its only sparsity distribution is ``"uniform"`` (the constructor asserts it; no ERK), and
  under ``"uniform"`` the *first* weighted layer it finds is always kept dense. In
  LeNet-300-100 that is fc1 (235,200 of the 266,200 weights), so the overall density could
  never go below 88%. There is no option for it; what it sees as "the first layer" is the
  first weighted module of the ``model`` argument, so we hand it a container whose first
  entry is an *empty placeholder* (a 0-element ``weight`` buffer, not used in any forward)
  followed by the model's own Linear modules. The placeholder takes the "first layer stays
  dense" rule; fc1, fc2 and out each get ``dense_allocation = density`` (uniform), i.e. the
  overall density is ``density`` (each layer keeps ``n - int((1 - density) * n)`` weights).
* ``T_end``, ``delta`` and ``alpha`` (initial drop fraction, cosine-annealed) are passed the
  same values dynarch's RigL gets; ``grad_accumulation_n=1`` (the paper's RigL).
* Its training protocol is ``if pruner(): optimizer.step()``: on a topology update step the
  optimizer step is skipped. The callback calls ``pruner()`` after ``backward`` and, when it
  returns False, sets every gradient to None, so the trainer's ``optimizer.step()`` changes
  nothing (SGD skips parameters without a gradient).
* rigl-torch imports ``torchvision`` only for two ``isinstance`` checks (ResNet blocks).
  When torchvision is not installed, a stub package is written to a temporary directory,
  put on ``sys.path`` only for the import of rigl-torch, then removed again (from
  ``sys.path`` and ``sys.modules``; rigl-torch keeps its own reference). It is never
  installed. This happens only in the benchmark's worker processes.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> peer = RigLTorchPeer(model, opt, density=0.25, delta_t=10, alpha=0.3, t_end=100)
    >>> {k: round(v, 3) for k, v in peer.layer_density().items()}
    {'0': 0.25, '2': 0.25}
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynarch.callbacks import Callback

__all__ = ["PEER_VERSION", "RigLTorchPeer", "import_rigl_scheduler", "peer_available"]

PEER_VERSION = "0.5.2"

_STUB = {
    "torchvision/__init__.py": "from . import models\n",
    "torchvision/models/__init__.py": "from . import resnet\n",
    "torchvision/models/resnet.py": (
        '"""Stub for rigl-torch\'s isinstance checks; these classes are never instantiated."""\n'
        "class Bottleneck:\n    pass\n\n\nclass BasicBlock:\n    pass\n"
    ),
}


def peer_available() -> bool:
    """Whether ``rigl_torch`` can be imported here (without importing it).

    Example:
        >>> isinstance(peer_available(), bool)
        True
    """
    return importlib.util.find_spec("rigl_torch") is not None


def _import_with_stub(module: str) -> Any:
    """Import ``module`` with a temporary torchvision stub on ``sys.path`` (then removed)."""
    tmp = Path(tempfile.mkdtemp(prefix="dynarch-tv-stub-"))
    try:
        for rel, text in _STUB.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
        sys.path.insert(0, str(tmp))
        try:
            return importlib.import_module(module)
        finally:
            sys.path.remove(str(tmp))
            for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
                del sys.modules[name]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_rigl_scheduler() -> type:
    """``rigl_torch.RigL.RigLScheduler``; a clear ImportError says how to install it.

    Example:
        >>> import_rigl_scheduler().__name__
        'RigLScheduler'
    """
    if not peer_available():
        raise ImportError(
            f"the peer method 'rigl-torch' needs the PyPI package rigl-torch=={PEER_VERSION}; "
            f"install it with `pip install rigl-torch=={PEER_VERSION}` (or `pip install -e "
            "'.[bench]'`), or leave 'rigl-torch' out of --methods"
        )
    if "rigl_torch.RigL" in sys.modules:
        return sys.modules["rigl_torch.RigL"].RigLScheduler
    if importlib.util.find_spec("torchvision") is not None:
        module = importlib.import_module("rigl_torch.RigL")
    else:
        module = _import_with_stub("rigl_torch.RigL")
    return module.RigLScheduler


class _Placeholder(nn.Module):
    """A weighted module with 0 weights; rigl-torch keeps its "first layer" dense."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(0))


class _Layers(nn.Module):
    """What rigl-torch is given: the placeholder, then the model's Linear modules."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        super().__init__()
        self.add_module("placeholder", _Placeholder())
        for i, module in enumerate(linears.values()):
            self.add_module(f"layer{i}", module)


class RigLTorchPeer(Callback):
    """rigl-torch's ``RigLScheduler`` on every ``nn.Linear`` of ``model``, as a Trainer callback.

    All Linear weights get density ``density`` (uniform; rigl-torch has no ERK); see the
    module docstring for the configuration. ``masks()`` / ``layer_density()`` report its
    current masks by module name.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> peer = RigLTorchPeer(model, opt, density=0.5, delta_t=5, alpha=0.3, t_end=50)
        >>> sorted(peer.masks())
        ['0', '2']
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        density: float,
        delta_t: int,
        alpha: float,
        t_end: int,
    ) -> None:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        if delta_t < 2:
            raise ValueError(
                f"delta_t must be >= 2 for rigl-torch (it asserts 1 < delta), got {delta_t}"
            )
        scheduler_cls = import_rigl_scheduler()
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        if not self.linears:
            raise ValueError("model has no nn.Linear layer for rigl-torch to sparsify")
        self.params = [p for p in model.parameters()]
        self.scheduler = scheduler_cls(
            _Layers(self.linears),
            optimizer,
            dense_allocation=density,
            T_end=t_end,
            sparsity_distribution="uniform",
            ignore_linear_layers=False,
            delta=delta_t,
            alpha=alpha,
            static_topo=False,
            grad_accumulation_n=1,
        )
        self.updates = 0

    def on_after_backward(self, trainer: Any) -> None:
        """rigl-torch's ``if pruner(): optimizer.step()``: no step after a topology update."""
        if not self.scheduler():
            self.updates += 1
            for p in self.params:
                p.grad = None

    def masks(self) -> dict[str, Tensor]:
        """Current boolean mask of each Linear weight (all True where rigl-torch keeps it dense)."""
        out: dict[str, Tensor] = {}
        # backward_masks[0] belongs to the placeholder
        for (name, module), mask in zip(self.linears.items(), self.scheduler.backward_masks[1:]):
            out[name] = (
                torch.ones_like(module.weight, dtype=torch.bool) if mask is None else mask.bool()
            )
        return out

    def layer_density(self) -> dict[str, float]:
        """Active fraction of each Linear weight."""
        masks = self.masks()
        means = torch.stack([m.float().mean() for m in masks.values()]).tolist()
        return dict(zip(masks, means))
