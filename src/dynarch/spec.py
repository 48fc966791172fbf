"""Architecture specs: standard-layer module trees as JSON, and back.

A checkpoint never pickles modules. A model made only of standard layers (``Sequential``,
``ModuleList``, ``ModuleDict``, ``Linear``, ``Conv2d``, norms, activations, dropout,
pooling, ``Flatten``, ``Identity`` and dynarch's own ``Residual`` and ``BranchableLayer``) is
described as a JSON tree of constructor arguments and rebuilt with no user code. Any other
model is recorded by its import path and must be supplied when loading.

Example:
    >>> import torch.nn as nn
    >>> spec = describe_model(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    >>> spec["kind"], type(build(spec["module"])).__name__
    ('spec', 'Sequential')
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .nn import BranchableLayer, Residual
from .sparse.layer import DynamicSparseLinear

__all__ = ["build", "class_path", "describe", "describe_model", "import_class"]

_SIMPLE_ARGS: dict[type[nn.Module], tuple[str, ...]] = {
    DynamicSparseLinear: ("in_features", "out_features", "density"),
    nn.Linear: ("in_features", "out_features"),
    nn.Conv2d: (
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
        "padding_mode",
    ),
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine"),
    nn.GroupNorm: ("num_groups", "num_channels", "eps", "affine"),
    nn.InstanceNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.InstanceNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.Conv1d: (
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
        "padding_mode",
    ),
    nn.Embedding: ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse"),
    nn.PReLU: ("num_parameters",), nn.Dropout1d: ("p", "inplace"),
    nn.ReLU: ("inplace",), nn.ReLU6: ("inplace",), nn.SiLU: ("inplace",), nn.Mish: ("inplace",),
    nn.LeakyReLU: ("negative_slope", "inplace"), nn.ELU: ("alpha", "inplace"),
    nn.CELU: ("alpha", "inplace"), nn.SELU: ("inplace",), nn.GELU: ("approximate",),
    nn.Tanh: (), nn.Sigmoid: (), nn.Hardswish: ("inplace",), nn.Hardsigmoid: ("inplace",),
    nn.Hardtanh: ("min_val", "max_val", "inplace"), nn.Softplus: ("beta", "threshold"),
    nn.Softsign: (), nn.Identity: (),
    nn.Dropout: ("p", "inplace"), nn.Dropout2d: ("p", "inplace"), nn.AlphaDropout: ("p", "inplace"),
    nn.Flatten: ("start_dim", "end_dim"),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"),
    nn.AvgPool2d: (
        "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override",
    ),
    nn.AdaptiveAvgPool2d: ("output_size",), nn.AdaptiveMaxPool2d: ("output_size", "return_indices"),
}  # fmt: skip
_BY_NAME = {cls.__name__: cls for cls in _SIMPLE_ARGS}
_CONTAINERS: dict[str, type[nn.Module]] = {
    "Sequential": nn.Sequential, "ModuleList": nn.ModuleList, "ModuleDict": nn.ModuleDict,
}  # fmt: skip


def class_path(obj: object) -> str:
    """``module.QualName`` of ``obj``'s class."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str) -> type:
    """Import ``module.QualName``; a clear error when it cannot be found."""
    for cut in range(path.count("."), 0, -1):
        module_name, qual = path.rsplit(".", cut)[0], ".".join(path.rsplit(".", cut)[1:])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for part in qual.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, type):
            return obj
    raise ImportError(f"cannot import class '{path}'; pass the class explicitly")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def describe(
    module: nn.Module, _seen: dict[int, str] | None = None, _path: str = ""
) -> dict[str, Any] | None:
    """JSON spec of a standard-layer tree, or ``None`` if it holds any other module.

    A module a container holds twice (one ``nn.ReLU`` reused, a tied ``nn.Linear``) is
    described once; its later places are ``{"ref": "<name of the first>"}``, so
    :func:`build` puts the same instance there again.

    Example:
        >>> relu = nn.ReLU()
        >>> describe(nn.Sequential(nn.Linear(2, 2), relu, nn.Linear(2, 2), relu))["children"][3]
        ['3', {'ref': '1'}]
    """
    seen: dict[int, str] = {} if _seen is None else _seen
    cls = type(module)
    if cls in _SIMPLE_ARGS:
        args = {a: _jsonable(getattr(module, a)) for a in _SIMPLE_ARGS[cls]}
        if isinstance(module, nn.Linear | nn.Conv2d | nn.Conv1d):
            args["bias"] = module.bias is not None
        if isinstance(module, nn.LayerNorm):
            args["bias"] = module.bias is not None
        return {"type": cls.__name__, "args": args}
    if isinstance(module, Residual) and cls is Residual:
        inner = describe(module.module)
        if inner is None:
            return None
        alpha = module.alpha
        return {
            "type": "Residual",
            "args": {"alpha": float(alpha.detach()), "trainable_alpha": alpha.requires_grad},
            "children": [["module", inner]],
        }
    if isinstance(module, BranchableLayer) and cls is BranchableLayer:
        branches = [describe(b) for b in module.branches]
        if any(b is None for b in branches):
            return None
        return {
            "type": "BranchableLayer",
            "args": {"max_branches": module.max_branches},
            "children": [[str(i), b] for i, b in enumerate(branches)],
        }
    if cls.__name__ in _CONTAINERS and cls is _CONTAINERS[cls.__name__]:
        children: list[list[Any]] = []
        for name, child in module._modules.items():
            if child is None:
                return None
            path = f"{_path}.{name}" if _path else name
            if id(child) in seen:  # named_children() would skip it
                children.append([name, {"ref": seen[id(child)]}])
                continue
            seen[id(child)] = path
            spec = describe(child, seen, path)
            if spec is None:
                return None
            children.append([name, spec])
        return {"type": cls.__name__, "children": children}
    return None


def describe_model(model: nn.Module) -> dict[str, Any]:
    """``{"kind": "spec", "module": ...}`` for standard models, else ``{"kind": "class", ...}``
    (with ``"unknown"``: the first submodule no spec describes, e.g. ``"1 (MyBlock)"``)."""
    spec = describe(model)
    if spec is not None:
        return {"kind": "spec", "module": spec}
    out: dict[str, Any] = {"kind": "class", "class": class_path(model)}
    for name, sub in model.named_modules():
        if (
            sub is not model
            and describe(sub) is None
            and all(describe(c) is not None for c in sub.children())
        ):
            out["unknown"] = f"{name} ({type(sub).__name__})"
            break
    return out


def build(
    spec: dict[str, Any], _built: dict[str, nn.Module] | None = None, _path: str = ""
) -> nn.Module:
    """Rebuild a module from :func:`describe` output (fresh parameters, on the meta device
    is not used: ordinary CPU tensors, to be overwritten by a state dict)."""
    built: dict[str, nn.Module] = {} if _built is None else _built
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"not a module spec: {spec!r:.80}")
    kind = spec["type"]
    args = dict(spec.get("args", {}))
    if kind in _CONTAINERS:
        children: OrderedDict[str, nn.Module] = OrderedDict()
        for name, child in spec.get("children", []):
            path = f"{_path}.{name}" if _path else name
            if isinstance(child, dict) and "ref" in child:  # the same instance again
                if child["ref"] not in built:
                    raise ValueError(f"spec child {path!r} refers to unknown {child['ref']!r}")
                children[name] = built[child["ref"]]
                continue
            children[name] = built[path] = build(child, built, path)
        if kind == "Sequential":
            return nn.Sequential(children)
        if kind == "ModuleList":
            return nn.ModuleList(children.values())
        return nn.ModuleDict(children)
    if kind == "Residual":
        (_, inner), *_ = spec["children"]
        return Residual(build(inner), alpha=args["alpha"], trainable_alpha=args["trainable_alpha"])
    if kind == "BranchableLayer":
        first, *rest = (build(child) for _, child in spec["children"])
        layer = BranchableLayer(first, max_branches=args["max_branches"])
        for branch in rest:
            layer.grow(branch)
        return layer
    if kind not in _BY_NAME:
        raise ValueError(f"unknown module type '{kind}' in spec; known: {sorted(_BY_NAME)}")
    cls = _BY_NAME[kind]
    for key in ("kernel_size", "stride", "padding", "dilation", "normalized_shape", "output_size"):
        if isinstance(args.get(key), list):
            args[key] = tuple(args[key])
    with torch.no_grad():
        return cls(**args)
