"""The one training loop. Everything else (rewiring, growth, controllers) plugs in as callbacks.

    >>> import torch, torch.nn as nn
    >>> from dynarch.train import fit
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    >>> trainer = fit(model, opt, (x, y), eval=(x, y), epochs=2, batch_size=16, progress=False)
    >>> trainer.step, sorted(trainer.metrics)
    (8, ['val_accuracy', 'val_loss'])

Callbacks may replace modules and parameters (structural surgery), so the loop never caches
a parameter list across steps. Batches come from a per-epoch permutation seeded from
``(seed, epoch)``, so a run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import rng
from ._engine import count_params, engine_state, set_seed
from ._validate import check_int, check_model, check_optimizer
from .callbacks import Callback
from .events import Event
from .masks import enforce, is_sparse

__all__ = ["Trainer", "fit", "resolve_device"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (cuda when available) as a device.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device {device!r} is not supported; use 'cpu', 'cuda', 'cuda:N' or 'auto'"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {device!r} requested but CUDA is not available "
                "(torch.cuda.is_available() is False); use device='cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA "
                "device(s) exist; use 'cuda:0' or 'auto'"
            )
    return dev


def _as_pair(data: object, role: str, split: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from a tensor pair or from ``{split}_x``/``{split}_y`` attributes."""
    if hasattr(data, f"{split}_x") and hasattr(data, f"{split}_y"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
    elif isinstance(data, tuple | list) and len(data) == 2:
        x, y = data
    else:
        raise TypeError(
            f"{role} must be a pair (x, y) of tensors or an object with {split}_x/{split}_y "
            f"attributes (a dynarch.data.Dataset), got {type(data).__name__}"
        )
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"{role}: x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}"
        )
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{role}: x and y must have the same first dimension, got x shape "
            f"{tuple(x.shape)} and y shape {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{role} has no samples (x shape {tuple(x.shape)})")
    return x, y


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def _detached(out: Any) -> Any:
    """``out`` (a tensor, or tuples, lists and dicts of them) detached from the graph."""
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)


class Trainer:
    """Trains ``model`` with ``optimizer`` on ``train``, calling ``callbacks`` at each hook.

    ``train``/``eval`` are ``(x, y)`` tensor pairs or objects with ``train_x, train_y`` /
    ``test_x, test_y`` attributes (a ``dynarch.data.Dataset`` given as ``train`` also provides
    the eval set). With ``run_dir``, ``metrics.jsonl`` and ``events.jsonl`` are written there.
    ``state_dict()``, :meth:`capture_rng` and the model/optimizer states make a run resume
    exactly (same batches, same dropout masks).

    Example:
        >>> import torch, torch.nn as nn
        >>> x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
        >>> model = nn.Linear(3, 2)
        >>> t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y),
        ...             batch_size=4, max_steps=2, progress=False)
        >>> t.fit().step, t.epoch, t.batch_in_epoch
        (2, 0, 2)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train: object,
        *,
        eval: object = None,
        epochs: int = 1,
        max_steps: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        loss_fn: LossFn | None = None,
        callbacks: Iterable[Callback] = (),
        run_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        progress: bool = True,
        log_every: int = 50,
        eval_every_epochs: int = 1,
    ) -> None:
        check_model(model)
        check_optimizer(optimizer)
        check_int("epochs", epochs, 0)
        if max_steps is not None:
            check_int("max_steps", max_steps, 1)
        for name, value in (
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("log_every", log_every),
            ("eval_every_epochs", eval_every_epochs),
        ):
            check_int(name, value, 1)
        check_int("seed", seed, 0)
        self.callbacks = list(callbacks)
        for i, cb in enumerate(self.callbacks):
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks[{i}] is a {type(cb).__name__}, not a dynarch.callbacks.Callback; "
                    "wrap functions with LambdaCallback(on_step_end=fn)"
                )
        self.train_data = _as_pair(train, "train", "train")
        if eval is None and hasattr(train, "test_x"):
            eval = train
        self.eval_data = None if eval is None else _as_pair(eval, "eval", "test")
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.loss_fn: LossFn = F.cross_entropy if loss_fn is None else loss_fn
        self.epochs, self.max_steps, self.seed = epochs, max_steps, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.progress, self.log_every = progress, log_every
        self.eval_every_epochs = eval_every_epochs
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.last_loss: Tensor | None = None
        # the last training batch's model output (detached) and targets, for callbacks
        self.last_output: Any = None  # a tensor, or what the model returns (tuple, dict)
        self.last_target: Tensor | None = None
        self.metrics: dict[str, float] = {}
        self.best: dict[str, float] = {}
        self.should_stop = False
        # the engine's step when this trainer's step was 0: events, unit ages and embargoes
        # count on the engine's clock, which goes on across fits of the same model
        self.step_offset = 0
        self._started = False
        self._restructured = False  # a structural event since the optimizer was checked
        self._files: dict[str, IO[str]] = {}
        self._bar: tqdm[Any] | None = None

    # ----------------------------------------------------------------------------- loop
    @property
    def batches_per_epoch(self) -> int:
        """Number of optimizer steps per epoch (the last partial batch is kept)."""
        return -(-self.train_data[0].shape[0] // self.batch_size)

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of the current epoch from ``batch_in_epoch`` on, moved to the device."""
        x, y = self.train_data
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(x.shape[0], generator=gen)
        bs = self.batch_size
        for i in range(self.batch_in_epoch, self.batches_per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            yield (
                x[idx.to(x.device)].to(self.device, non_blocking=True),
                y[idx.to(y.device)].to(self.device, non_blocking=True),
            )

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _out_of_steps(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def fit(self) -> Trainer:
        """Train until ``epochs`` epochs or ``max_steps`` steps are done or a callback stops it."""
        self._start()
        try:
            self._call("on_fit_start")
            while self.epoch < self.epochs and not (self.should_stop or self._out_of_steps()):
                self.model.train()
                if self.batch_in_epoch == 0:
                    self._call("on_epoch_start")
                for xb, yb in self._batches():
                    self._train_step(xb, yb)
                    if self.should_stop or self._out_of_steps():
                        break
                if self.batch_in_epoch < self.batches_per_epoch:
                    break  # stopped mid-epoch; a later fit() resumes here
                if (self.epoch + 1) % self.eval_every_epochs == 0 or self.epoch + 1 == self.epochs:
                    self._evaluate_and_log()
                self._call("on_epoch_end")
                self.epoch += 1
                self.batch_in_epoch = 0
            self._call("on_fit_end")
        finally:
            self._finish()
        return self

    @property
    def total_steps(self) -> int:
        """Steps this fit runs in all: ``epochs`` × batches per epoch, capped by ``max_steps``."""
        total = self.epochs * self.batches_per_epoch
        return total if self.max_steps is None else min(total, self.max_steps)

    def _train_step(self, xb: Tensor, yb: Tensor) -> None:
        if self._restructured:
            self._check_structure()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(xb)
        loss = self.loss_fn(out, yb)
        loss.backward()
        self._call("on_after_backward")
        self.optimizer.step()
        self.step += 1
        self.batch_in_epoch += 1
        engine_state(self.model).step = self.step_offset + self.step
        self.last_loss = loss.detach()
        self.last_output, self.last_target = _detached(out), yb
        self._call("on_step_end")
        if self._bar is not None:
            self._bar.update(1)
        if self.step % self.log_every == 0 and (self._files or self._bar is not None):
            self._log_train()

    def _start(self) -> None:
        self.should_stop = False
        if not self._started:
            # the engine's clock goes on across fits: a model trained (and grown) before
            # keeps its step count, so events, ages and embargoes never see time go back
            now = engine_state(self.model).step
            self.step_offset = now if self.step == 0 else max(0, now - self.step)
        if not self._started and self.step == 0:
            rng.seed_everything(self.seed)
            if not engine_state(self.model).history:
                set_seed(self.model, self.seed)
        self._started = True
        self.model.to(self.device)
        self._move_optimizer_state()
        self._check_structure()
        engine_state(self.model).add_listener(self._on_structure)
        from .sparse.layer import OWNER, DynamicSparseLinear

        for module in self.model.modules():  # their rewires are the model's events
            if isinstance(module, DynamicSparseLinear):
                module.__dict__[OWNER] = weakref.ref(self.model)
        engine_state(self.model).step = self.step_offset + self.step
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            mode = "a" if self.step > 0 else "w"
            for name in ("metrics", "events"):
                self._files[name] = open(self.run_dir / f"{name}.jsonl", mode)  # noqa: SIM115
            engine_state(self.model).add_listener(self._on_event)
        if self.progress and sys.stderr.isatty():
            total = self.total_steps
            self._bar = tqdm(total=total, initial=min(self.step, total), dynamic_ncols=True)

    def _on_structure(self, event: Event) -> None:
        self._restructured = True

    def _check_structure(self) -> None:
        """Before training, and before the step after any structural event: the optimizer
        must train the model's current parameters (a change made without ``optimizer=``
        leaves it stepping replaced tensors: the changed layers would silently stop
        training), and masks added without ``optimizer=`` are enforced from now on."""
        self._restructured = False
        live = {id(p) for p in self.model.parameters()}
        dead = [
            tuple(p.shape) for g in self.optimizer.param_groups for p in g["params"]
            if id(p) not in live
        ]  # fmt: skip
        if dead:
            raise ValueError(
                f"the optimizer holds {len(dead)} parameter(s) that are no longer in the model "
                f"(shapes {dead[:4]}): a structural change (widen, shrink, deepen, attach, "
                "prune, dynarch.load, ...) was made without optimizer=, so the changed layers "
                "would not train; pass optimizer= (inside a callback: trainer.optimizer) to it, "
                "or build the optimizer from model.parameters() after the change"
            )
        if is_sparse(self.model):  # e.g. a loaded sparse checkpoint with a new optimizer
            enforce(self.model, self.optimizer)

    def _finish(self) -> None:
        engine_state(self.model).remove_listener(self._on_structure)
        engine_state(self.model).remove_listener(self._on_event)
        for f in self._files.values():
            f.close()
        self._files = {}
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _move_optimizer_state(self) -> None:
        """Optimizer state loaded before the model moved follows its parameter's device."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if key != "step" and isinstance(value, Tensor) and value.device != p.device:
                        self.optimizer.state[p][key] = value.to(p.device)

    # -------------------------------------------------------------------------- logging
    def _write(self, name: str, line: str) -> None:
        f = self._files.get(name)
        if f is not None:
            f.write(line + "\n")
            f.flush()

    def _on_event(self, event: Event) -> None:
        self._write("events", event.to_json())

    def _log_train(self) -> None:
        assert self.last_loss is not None
        loss = self.last_loss.item()
        lr = float(self.optimizer.param_groups[0]["lr"])
        line = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr}
        self._write("metrics", json.dumps({**line, "params": count_params(self.model)}))
        if self._bar is not None:
            self._bar.set_postfix({"loss": f"{loss:.4f}", **self._bar_metrics()})

    def _bar_metrics(self) -> dict[str, str]:
        acc = self.metrics.get("val_accuracy")
        return {} if acc is None else {"val_acc": f"{acc:.4f}"}

    def _evaluate_and_log(self) -> None:
        if self.eval_data is None:
            return
        self.metrics = self.evaluate()
        for key, better in (("val_loss", min), ("val_accuracy", max)):
            if key in self.metrics:
                value = self.metrics[key]
                self.best[key] = better(self.best.get(key, value), value)
        line = {"step": self.step, "epoch": self.epoch, **self.metrics}
        self._write("metrics", json.dumps({**line, "params": count_params(self.model)}))
        if self._bar is not None:
            self._bar.set_postfix(self._bar_metrics())
        self._call("on_evaluate", self.metrics)

    def evaluate(self, data: object = None) -> dict[str, float]:
        """Mean loss (``val_loss``) and, for classification, ``val_accuracy`` on ``data``
        (default: the trainer's eval set), in ``no_grad`` and eval mode; modes are restored.

        Example:
            >>> import torch, torch.nn as nn
            >>> x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
            >>> m = nn.Linear(3, 2)
            >>> t = Trainer(m, torch.optim.SGD(m.parameters(), lr=0.1), (x, y), progress=False)
            >>> sorted(t.evaluate((x, y)))
            ['val_accuracy', 'val_loss']
        """
        if data is None:
            if self.eval_data is None:
                raise ValueError("no evaluation data: pass eval=... to Trainer or data=(x, y)")
            x, y = self.eval_data
        else:
            x, y = _as_pair(data, "data", "test")
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        classify, labels = not y.is_floating_point(), 0
        try:
            with torch.no_grad():
                for i in range(0, x.shape[0], self.eval_batch_size):
                    xb = x[i : i + self.eval_batch_size].to(self.device, non_blocking=True)
                    yb = y[i : i + self.eval_batch_size].to(self.device, non_blocking=True)
                    out = self.model(xb)
                    total += self.loss_fn(out, yb).double() * xb.shape[0]
                    classify = classify and isinstance(out, Tensor) and out.ndim == yb.ndim + 1 >= 2
                    if classify:
                        correct += (out.argmax(dim=1) == yb).sum()
                        labels += yb.numel()
        finally:
            for m, mode in modes:
                m.training = mode
        metrics = {"val_loss": total.item() / x.shape[0]}
        if classify:
            metrics["val_accuracy"] = correct.item() / labels
        return metrics

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Loop position, seed, metrics and callback states (plain data)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "metrics": dict(self.metrics),
            "best": dict(self.best),
            "callbacks": [
                {"class": type(cb).__name__, "state": cb.state_dict()} for cb in self.callbacks
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output: the next :meth:`fit` continues at
        ``step + 1`` with the same batches (and does not reseed any RNG)."""
        keys = {"step", "epoch", "batch_in_epoch", "seed", "metrics", "best", "callbacks"}
        if not isinstance(state, dict) or not keys <= set(state):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"trainer state must have keys {sorted(keys)}, got {got}")
        saved = [c["class"] for c in state["callbacks"]]
        have = [type(cb).__name__ for cb in self.callbacks]
        if saved != have:
            raise ValueError(
                f"saved trainer state has callbacks {saved} but this trainer has {have}; "
                "pass the same callbacks in the same order"
            )
        for cb, c in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(c["state"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch, self.seed = int(state["batch_in_epoch"]), int(state["seed"])
        self.metrics, self.best = dict(state["metrics"]), dict(state["best"])
        self.step_offset = max(0, engine_state(self.model).step - self.step)
        self._started = True

    # Global RNG states as tensors and plain data (``torch.load(weights_only=True)``).
    capture_rng = staticmethod(rng.capture_rng)
    restore_rng = staticmethod(rng.restore_rng)


def fit(
    model: nn.Module, optimizer: torch.optim.Optimizer, train: object, **kwargs: Any
) -> Trainer:
    """Build a :class:`Trainer` with ``kwargs`` and run :meth:`Trainer.fit`; returns the trainer.

    Example:
        >>> import torch, torch.nn as nn
        >>> m = nn.Linear(2, 2)
        >>> data = (torch.randn(8, 2), torch.randint(0, 2, (8,)))
        >>> fit(m, torch.optim.SGD(m.parameters(), lr=0.1), data, progress=False).step
        1
    """
    return Trainer(model, optimizer, train, **kwargs).fit()
