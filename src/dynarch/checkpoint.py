"""Checkpoints as data: a replayable architecture, safetensors weights, tensor-only state.

A checkpoint is a directory, written atomically (temporary directory, fsync, ``os.replace``)::

    arch.json          format, version, base architecture, ordered structural events,
                       engine state, slot states (if a slot topology is registered),
                       SHA-256 and size of every other file
    model.safetensors  weights, buffers and masks
    optimizer.pt       optimizer state dict (params in model order, with their names)
    state.pt           step, RNG states (torch/CUDA/NumPy/Python), engine generator, user state

``optimizer.pt`` and ``state.pt`` load with ``torch.load(weights_only=True)``; nothing is
pickled. :func:`load` rebuilds the base model (from its JSON spec, or from the class you
pass for a custom model), replays the structural events, then loads the weights strictly.
To resume exactly, build the optimizer from :meth:`Checkpoint.param_groups`, then
:meth:`Checkpoint.load_optimizer`.

Example:
    >>> import tempfile, torch, torch.nn as nn, dynarch
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> _ = dynarch.widen(model, "0", 16)
    >>> path = dynarch.save(tempfile.mkdtemp() + "/ckpt", model, epoch=3)
    >>> ckpt = dynarch.load(path)
    >>> ckpt.model[0].out_features, ckpt.state["epoch"]
    (16, 3)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._engine import _ATTR as _ENGINE_ATTR
from ._engine import engine_state
from .events import Event
from .replay import register_replay, replay_function
from .rng import capture_rng, restore_rng
from .slots.topology import SlotTopology, register_topology, topology_of
from .spec import build, class_path, describe_model

__all__ = ["Checkpoint", "CheckpointError", "load", "recover", "register_replay", "save"]

FORMAT = "dynarch-checkpoint"
VERSION = 1
FILES = ("model.safetensors", "optimizer.pt", "state.pt")
WEIGHT_BUFFERS = ("weight_mask", "weight_patch")  # per-weight bool buffers (masks, patches)


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, truncated, foreign or does not fit the model."""


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "bytes": path.stat().st_size}


def _check_state_values(value: Any, key: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(
                    f"state '{key}' has a key of type {type(k).__name__}; use str or int keys"
                )
            _check_state_values(v, f"{key}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_state_values(v, f"{key}[{i}]")
    elif not isinstance(value, torch.Tensor | str | int | float | bool | type(None)):
        raise TypeError(
            f"state '{key}' is a {type(value).__name__}; checkpoints hold only tensors, numbers, "
            "strings, None, lists and dicts (no pickled objects)"
        )


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with each group's params in model order, plus their names."""
    order = {id(p): (i, n) for i, (n, p) in enumerate(model.named_parameters())}
    sd = optimizer.state_dict()
    new_groups, new_state, counter = [], {}, 0
    for group, live in zip(sd["param_groups"], optimizer.param_groups, strict=True):
        pairs = list(zip(group["params"], live["params"], strict=True))
        for _, p in pairs:
            if id(p) not in order:
                raise CheckpointError(
                    f"optimizer holds a parameter of shape {tuple(p.shape)} "
                    "that the model does not have"
                )
        pairs.sort(key=lambda pair: order[id(pair[1])][0])
        ids, names = [], []
        for old_id, p in pairs:
            ids.append(counter)
            names.append(order[id(p)][1])
            if old_id in sd["state"]:
                new_state[counter] = sd["state"][old_id]
            counter += 1
        new_groups.append({**group, "params": ids, "param_names": names})
    return {"state": new_state, "param_groups": new_groups}


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    **state: Any,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically; returns the path.

    ``state`` holds extra values (tensors, numbers, strings, lists, dicts) returned by
    :func:`load` as ``.state``; RNG states and the engine's step and generator are saved too.
    An existing checkpoint at ``path`` is replaced only once the new one is complete; an
    interruption between the renames leaves a complete one that :func:`load` recovers
    (:func:`recover`). Leftovers of earlier interrupted saves are removed.
    """
    for key, value in state.items():
        _check_state_values(value, key)
    path = Path(path)
    st = engine_state(model)
    _check_no_lost_events(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, value in model.state_dict(keep_vars=False).items():
            t = value.detach().cpu().contiguous()
            if t.data_ptr() in seen and t.numel():
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[key] = t
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        opt_state = _optimizer_state(model, optimizer) if optimizer is not None else {}
        torch.save(opt_state, tmp / "optimizer.pt")
        torch.save(
            {
                "step": st.step,
                "rng": capture_rng(),
                "engine_generator": st.generator.get_state(),
                "user": state,
            },
            tmp / "state.pt",
        )
        for name in FILES:
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
        arch = {
            "format": FORMAT,
            "version": VERSION,
            "base": st.base_spec or describe_model(model),
            "events": [e.to_dict() for e in st.history],
            "engine": {"seed": st.seed, "step": st.step},
            "model_class": class_path(model),
            "optimizer_class": class_path(optimizer) if optimizer is not None else None,
            "files": {name: _digest(tmp / name) for name in FILES},
        }
        topology = topology_of(model)
        if topology is not None:
            arch["slots"] = topology.state_dict()
        _fsync_write(tmp / "arch.json", json.dumps(arch, indent=1).encode())
        _fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if old is not None and not path.exists():
            # interrupted between the renames: the new checkpoint is complete, so put it in
            # place (never delete it); should that fail too, load() recovers it
            with contextlib.suppress(OSError):
                os.replace(tmp, path)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_leftovers(path)
    return path


def _leftovers(path: Path) -> list[Path]:
    """The hidden temporary (``.NAME.tmp-*``) and replaced (``.NAME.old-*``) directories
    :func:`save` leaves beside ``path`` when it is interrupted."""
    if not path.parent.is_dir():
        return []
    return [
        p
        for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*")
        for p in path.parent.glob(pattern)
        if p.is_dir()
    ]


def _remove_leftovers(path: Path) -> None:
    for p in _leftovers(path):
        shutil.rmtree(p, ignore_errors=True)


def recover(path: str | os.PathLike[str]) -> bool:
    """Put back the checkpoint at ``path`` when an interrupted :func:`save` left it only in
    a hidden ``.NAME.tmp-*``/``.NAME.old-*`` directory beside it: the newest complete one
    (its ``arch.json``, written last, present and every file matching its digest) is renamed
    to ``path`` and the other leftovers removed. Returns whether ``path`` holds a checkpoint
    directory afterwards. :func:`load` calls it.

    Example:
        >>> import os, tempfile, torch.nn as nn, dynarch
        >>> root = tempfile.mkdtemp()
        >>> path = dynarch.save(root + "/ckpt", nn.Linear(2, 2))
        >>> os.replace(path, root + "/.ckpt.old-0000")  # as if killed between the renames
        >>> recover(path), sorted(os.listdir(root))
        (True, ['ckpt'])
    """
    path = Path(path)
    if path.is_dir():
        return True
    complete = []
    for candidate in _leftovers(path):
        try:
            _read_arch(candidate)
        except (CheckpointError, OSError):
            continue
        complete.append((candidate.joinpath("arch.json").stat().st_mtime_ns, candidate))
    if not complete:
        return False
    os.replace(max(complete)[1], path)
    _fsync_dir(path.parent)
    _remove_leftovers(path)
    return True


def _check_no_lost_events(model: nn.Module) -> None:
    """Refuse a model with changes recorded on a submodule's own history after the model's
    architecture was captured: its checkpoint could not be rebuilt by replaying events."""
    st = engine_state(model)
    if st.base_spec is None:
        return  # nothing recorded on the model: its current architecture is the base
    lost = []
    for name, sub in model.named_modules():
        sub_st = sub.__dict__.get(_ENGINE_ATTR) if sub is not model else None
        if sub_st is None:
            continue
        orders = sub_st.orders or [sub_st.last_order] * len(sub_st.history)
        ops = [  # structural changes (with a replay) the model's base does not hold
            e.op
            for e, order in zip(sub_st.history, orders)
            if order > st.base_order and replay_function(e.op) is not None
        ]
        if ops:
            lost.append((name, ops))
    if lost:
        name, ops = lost[0]
        raise CheckpointError(
            f"submodule '{name}' has structural changes {ops} recorded on its own history, not "
            "on the model's, so the checkpoint could not rebuild them; make changes through the "
            f"model (e.g. BranchableLayer.add_branch(..., model=model), or an op on the model "
            f"with target '{name}...')"
        )


@dataclass
class Checkpoint:
    """What :func:`load` returns."""

    model: nn.Module
    optimizer_state: dict[str, Any]
    state: dict[str, Any]
    step: int
    rng: dict[str, Any]
    events: list[Event] = field(default_factory=list)

    def restore_rng(self) -> None:
        """Put the global RNGs back where they were at save time (for exact resume)."""
        restore_rng(self.rng)

    def param_groups(self) -> list[dict[str, Any]]:
        """The saved optimizer's param groups on :attr:`model` (parameters found by their
        saved names, hyperparameters): build the optimizer to resume with them, then
        :meth:`load_optimizer`. Works for any grouping (e.g. :class:`dynarch.lr.LRPlan`'s, or
        one holding parameters a structural op added while frozen).

        Example:
            >>> import tempfile, torch, torch.nn as nn, dynarch
            >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
            >>> opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
            ...                        {"params": model[2].parameters()}], lr=0.01)
            >>> ck = dynarch.load(dynarch.save(tempfile.mkdtemp() + "/ck", model, opt))
            >>> opt2 = ck.load_optimizer(torch.optim.SGD(ck.param_groups(), lr=1.0))
            >>> [g["lr"] for g in opt2.param_groups]
            [0.1, 0.01]
        """
        if not self.optimizer_state:
            raise CheckpointError("this checkpoint was saved without an optimizer")
        params = dict(self.model.named_parameters())
        groups = []
        for gi, saved in enumerate(self.optimizer_state["param_groups"]):
            missing = [n for n in saved["param_names"] if n not in params]
            if missing:
                raise CheckpointError(
                    f"optimizer group {gi} of the checkpoint holds {missing[:4]}, which the "
                    "loaded model does not have"
                )
            group = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            groups.append({**group, "params": [params[n] for n in saved["param_names"]]})
        return groups

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Load the saved state into ``optimizer`` (built on ``self.model``'s parameters in
        model order), checking the parameter names line up; returns it. When the model has
        weight masks, they are enforced on ``optimizer``'s steps from now on (as
        :func:`dynarch.masks.enforce` does), so a hand-written loop keeps them too."""
        if not self.optimizer_state:
            raise CheckpointError("this checkpoint was saved without an optimizer")
        saved_groups = self.optimizer_state["param_groups"]
        if len(saved_groups) != len(optimizer.param_groups):
            raise CheckpointError(
                f"the optimizer has {len(optimizer.param_groups)} param groups but the "
                f"checkpoint saved {len(saved_groups)}; build it with the same groups"
            )
        names = {id(p): n for n, p in self.model.named_parameters()}
        for gi, (saved, live) in enumerate(
            zip(self.optimizer_state["param_groups"], optimizer.param_groups, strict=False)
        ):
            have = [names.get(id(p), "?") for p in live["params"]]
            if have != saved["param_names"]:
                raise CheckpointError(
                    f"optimizer group {gi} holds {have[:4]}… but the checkpoint saved "
                    f"{saved['param_names'][:4]}…; "
                    "build it on the loaded model's parameters in order"
                )
        # The names only check the order: they are not put into the live optimizer's groups
        # (torch would then refuse groups added later without names).
        groups = [{k: v for k, v in g.items() if k != "param_names"} for g in saved_groups]
        optimizer.load_state_dict({"state": self.optimizer_state["state"], "param_groups": groups})
        from .masks import enforce, masked_modules

        if masked_modules(self.model):
            enforce(self.model, optimizer)
        return optimizer


def _read_arch(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at '{path}'")
    arch_file = path / "arch.json"
    if not arch_file.is_file():
        raise CheckpointError(f"'{path}' is not a dynarch checkpoint: arch.json is missing")
    try:
        arch = json.loads(arch_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"'{arch_file}' is damaged: {exc}") from None
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a dynarch checkpoint (format is not '{FORMAT}')")
    if arch.get("version") != VERSION:
        raise CheckpointError(
            f"'{path}' has checkpoint format version {arch.get('version')!r}; "
            f"this dynarch reads {VERSION}"
        )
    shapes = {"base": dict, "events": list, "engine": dict, "files": dict}
    bad = [k for k, t in shapes.items() if not isinstance(arch.get(k), t)]
    if bad or not isinstance(arch["engine"].get("seed"), int):
        raise CheckpointError(
            f"'{arch_file}' is damaged: missing or malformed entries {bad or ['engine.seed']}"
        )
    for name in FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint '{path}' is incomplete: {name} is missing")
        expected = arch.get("files", {}).get(name)
        actual = _digest(file)
        if expected != actual:
            raise CheckpointError(
                f"checkpoint file '{file}' is damaged or truncated: "
                f"expected {expected}, found {actual}"
            )
    return arch


def _base_model(
    arch: dict[str, Any], model: type[nn.Module] | Callable[[], nn.Module] | nn.Module | None
) -> nn.Module:
    base = arch["base"]
    if base.get("kind") == "spec":
        try:
            return build(base["module"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"cannot build the base architecture: {exc}") from exc
    wanted = base.get("class", "?")
    if model is None:
        if wanted.startswith("torch.nn.") and base.get("unknown"):
            raise CheckpointError(
                f"this checkpoint holds a {wanted.rsplit('.', 1)[-1]} with a module dynarch "
                f"cannot rebuild by itself ({base['unknown']}); pass a factory that builds the "
                "model, or a fresh instance: dynarch.load(path, model=make_model)"
            )
        raise CheckpointError(
            f"this checkpoint was made from the custom class '{wanted}'; pass it: "
            f"dynarch.load(path, model={wanted.rsplit('.', 1)[-1]}) "
            "(the class, a factory or a fresh instance)"
        )
    # (engine state is read without creating it: the instance given is never modified)
    if isinstance(model, nn.Module) and getattr(model.__dict__.get(_ENGINE_ATTR), "history", None):
        raise CheckpointError(
            "the model instance given was already changed by dynarch; "
            "pass a freshly constructed one, the class or a factory"
        )
    instance = copy.deepcopy(model) if isinstance(model, nn.Module) else model()
    if class_path(instance) != wanted:
        raise CheckpointError(
            f"checkpoint was made from '{wanted}', but the model given is '{class_path(instance)}'"
        )
    return instance


def _rebuild(
    path: Path,
    arch: dict[str, Any],
    model: type[nn.Module] | Callable[[], nn.Module] | nn.Module | None,
    modules: dict[str, type[nn.Module]],
) -> tuple[nn.Module, list[Event]]:
    """The base model with the structure of every recorded event replayed (fresh weights)."""
    try:
        events = [Event.from_dict(e) for e in arch["events"]]
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"'{path}/arch.json' holds a malformed event: {exc}") from None
    net = _base_model(arch, model)
    engine_state(net).seed = int(arch["engine"]["seed"])
    for event in events:
        if not event.replay:
            continue  # not structural (e.g. a rewiring of masks: their values are in the weights)
        fn = replay_function(event.op)
        if fn is None:
            raise CheckpointError(
                f"checkpoint holds a '{event.op}' event this dynarch cannot rebuild"
            )
        try:
            fn(net, event.replay, modules)
        except Exception as exc:
            raise CheckpointError(f"cannot replay event {event.summary()!r}: {exc}") from exc
    return net, events


def _add_weight_buffers(
    net: nn.Module, own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Create the mask/patch buffers (:data:`WEIGHT_BUFFERS`) the checkpoint holds but the
    rebuilt model lacks (a module attached or branched in already sparse: replays rebuild
    modules, not their masks) on the Linear/Conv2d whose weight has their shape; returns the
    state dict of ``net`` afterwards (anything else stays a mismatch)."""
    modules, added = dict(net.named_modules()), False
    for key in set(tensors) - set(own):
        owner, _, attr = key.rpartition(".")
        mod, value = modules.get(owner), tensors[key]
        if (
            attr in WEIGHT_BUFFERS
            and value.dtype == torch.bool
            and isinstance(mod, nn.Linear | nn.Conv2d)
            and mod.weight.shape == value.shape
        ):
            mod.register_buffer(attr, torch.zeros_like(value), persistent=True)
            added = True
    return net.state_dict() if added else own


def load(
    path: str | os.PathLike[str],
    model: type[nn.Module] | Callable[[], nn.Module] | nn.Module | None = None,
    *,
    modules: dict[str, type[nn.Module]] | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Load a checkpoint written by :func:`save`.

    Args:
        path: the checkpoint directory.
        model: for a custom model class, the class (called with no arguments), a factory, or a
            freshly constructed instance (copied; never modified). Standard-layer models need none.
        modules: classes of custom modules that were attached, by ``module.QualName``.
        map_location: device for the loaded tensors.

    Raises:
        CheckpointError: missing, damaged, truncated or foreign checkpoint, or a model that does
            not match it. Nothing is partially loaded.
    """
    path = Path(path)
    recover(path)
    arch = _read_arch(path)
    topology = None
    if "slots" in arch:
        try:
            topology = SlotTopology.from_state_dict(arch["slots"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"'{path}/arch.json' holds malformed slot states: {exc}"
            ) from None
    with torch.random.fork_rng(devices=[]):  # building layers must not move the global RNG
        net, events = _rebuild(path, arch, model, modules or {})
    st = engine_state(net)
    try:
        tensors = load_file(str(path / "model.safetensors"), device=str(map_location))
        user = torch.load(path / "state.pt", weights_only=True, map_location=map_location)
        opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location=map_location)
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{path}' cannot be read: {exc}") from exc
    own = _add_weight_buffers(net, net.state_dict(), tensors)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit the rebuilt model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}"
        )
    for key in [k for k in own if own[k].dtype != tensors[k].dtype]:  # keep saved dtypes
        owner, _, attr = key.rpartition(".")
        mod = net.get_submodule(owner)
        if attr in mod._parameters:
            param = mod._parameters[attr]
            assert param is not None
            param.data = param.data.to(tensors[key].dtype)  # same Parameter object (ties kept)
        else:
            mod._buffers[attr] = tensors[key].clone()  # overwritten below
    net.load_state_dict(tensors, strict=True)
    net.to(map_location)
    st.history = events
    st.step = int(user["step"])
    st.base_spec = arch["base"]
    st.generator.set_state(user["engine_generator"].cpu())  # map_location moved it
    st.version += 1
    if topology is not None:
        register_topology(net, topology)
    return Checkpoint(net, opt_state, dict(user["user"]), st.step, user["rng"], events)
