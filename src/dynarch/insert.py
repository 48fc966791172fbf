"""Insert modules into a model: ``deepen`` (identity layers), ``attach``/``detach`` (slots).

New modules are placed right after an *anchor* module. When the anchor's parent is an
``nn.Sequential`` that runs its modules only through its own ``forward`` (the model itself,
or a ``Sequential`` the traced graph shows is called as a whole) the new module becomes its
sibling under a fresh name (``"1_deep"``, ``"2_slot"``, …) and no existing name changes.
Otherwise (a ``Sequential`` that ``forward`` iterates or indexes, one with its own
``forward``, any other parent, or a model torch.fx cannot trace) the anchor is wrapped in an
``nn.Sequential`` holding it (as ``"0"``) and the new module, which renames the anchor's
parameters (``fc1.weight`` → ``fc1.0.weight``) but keeps the function of every use of it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import skip_init

from ._enforce import MASK, enforce
from ._engine import engine_state, transaction
from .events import Event
from .graph import (
    ACTIVATIONS,
    IDEMPOTENT,
    NORMS,
    PASS_MODULES,
    ModelGraph,
    UnsupportedModelError,
    analyse,
    resolve,
)
from .nn import Residual, _check_alpha, _float_param
from .optim import transplant

__all__ = ["attach", "deepen", "detach"]


def _split(name: str) -> tuple[str, str]:
    parent, _, last = name.rpartition(".")
    return parent, last


def _fresh(parent: nn.Module, base: str) -> str:
    taken = set(parent._modules)
    name, n = base, 2
    while name in taken:
        name, n = f"{base}{n}", n + 1
    return name


def _whole(model: nn.Module, parent_name: str, graph: ModelGraph | None) -> bool:
    """Whether the ``nn.Sequential`` ``parent_name`` runs its modules only through its own
    ``forward``, so a new sibling runs right after its predecessor and nowhere else.

    True for the model itself (when its ``forward`` is ``Sequential``'s) and for a nested one
    whose every use in the traced ``graph`` lies inside a call of it (``nn_module_stack``);
    false when ``forward`` iterates or indexes it (``for blk in self.blocks``,
    ``self.layers[0](x)``), when it overrides ``forward`` or when there is no graph.
    """
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
        return False
    if not parent_name:
        return True
    if graph is None:
        return False
    prefix = parent_name + "."
    for node in graph.graph.nodes:
        if node.op in ("call_module", "get_attr") and str(node.target).startswith(prefix):
            stack = node.meta.get("nn_module_stack") or {}
            if parent_name not in {entry[0] for entry in stack.values()}:
                return False
    return True


def insert_after(
    model: nn.Module,
    anchor: str,
    new: list[tuple[str, nn.Module]],
    graph: ModelGraph | None = None,
) -> tuple[list[str], bool]:
    """Place ``new`` (``(base name, module)`` pairs) right after ``anchor``.

    ``graph`` is the model's traced graph (``None``: untraceable); it tells whether the
    anchor's parent ``Sequential`` may take a sibling (see :func:`_whole`). Returns the new
    modules' full names and whether the anchor had to be wrapped.
    """
    parent_name, last = _split(anchor)
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential) and _whole(model, parent_name, graph):
        items = list(parent._modules.items())
        pos = [k for k, _ in items].index(last) + 1
        names = []
        for base, module in new:
            key = _fresh(parent, base)
            parent._modules[key] = module  # reserve the name
            names.append(key)
            items.insert(pos, (key, module))
            pos += 1
        parent._modules.clear()
        parent._modules.update(items)
        prefix = f"{parent_name}." if parent_name else ""
        return [prefix + k for k in names], False
    if anchor == "":
        raise UnsupportedModelError("cannot insert after the whole model")
    old = getattr(parent, last)
    wrapper = nn.Sequential(OrderedDict([("0", old), *new]))
    setattr(parent, last, wrapper)
    return [f"{anchor}.{base}" for base, _ in new], True


def _anchored(
    model: nn.Module,
    new_params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer | None = None,
) -> list[tuple[nn.Parameter, nn.Parameter | None]]:
    """Each new parameter with the parameter it follows in ``optimizer`` (see ``transplant``).

    A new parameter joins the group of the nearest *like* parameter the optimizer holds
    (same attribute name, e.g. ``weight``, and number of dims; the nearest before it, else
    after it), so with a weights/biases split (say weight decay on weights only) a new
    layer's weight joins the weights' group and its bias the biases'. Within the group it
    follows the nearest parameter before it in model order (or the like parameter, when
    none is before it). Without a like parameter it follows the parameter right before it
    in the model; with a single group the model's order is kept.
    """
    named = list(model.named_parameters())
    fresh = {id(p) for p in new_params}
    group_of = (
        {id(q): gi for gi, g in enumerate(optimizer.param_groups) for q in g["params"]}
        if optimizer is not None
        else {}
    )
    out: list[tuple[nn.Parameter, nn.Parameter | None]] = []
    for i, (_, p) in enumerate(named):
        if id(p) not in fresh:
            continue
        anchor = named[i - 1][1] if i > 0 else None
        like = _like(named, i, fresh, group_of)
        target = group_of.get(id(like)) if like is not None else None
        if target is not None:
            before = [q for _, q in named[:i] if group_of.get(id(q)) == target]
            anchor = before[-1] if before else like
        if anchor is not None and id(anchor) in group_of:
            group_of[id(p)] = group_of[id(anchor)]
        out.append((p, anchor))
    return out


def _like(
    named: list[tuple[str, nn.Parameter]], i: int, fresh: set[int], held: dict[int, int]
) -> nn.Parameter | None:
    """The nearest old parameter in ``held`` with the attribute name and dims of ``i``'s."""
    name, p = named[i]
    leaf = name.rsplit(".", 1)[-1]
    for j in [*range(i - 1, -1, -1), *range(i + 1, len(named))]:
        other, q = named[j]
        same = other.rsplit(".", 1)[-1] == leaf and q.dim() == p.dim()
        if same and id(q) in held and id(q) not in fresh:
            return q
    return None


def _single_call(calls: dict[str, list[fx.Node]], name: str) -> fx.Node:
    nodes = calls.get(name, [])
    if len(nodes) != 1:
        raise UnsupportedModelError(
            f"'{name}' is called {len(nodes)} times in forward; dynarch can only insert after a "
            "module called exactly once"
        )
    return nodes[0]


def _identity_layer(mod: nn.Module) -> nn.Linear | nn.Conv2d:
    # skip_init: no default init, so the global RNG is not consumed (engine contract).
    assert isinstance(mod, nn.Linear | nn.Conv2d)
    w = mod.weight
    layer: nn.Linear | nn.Conv2d
    if isinstance(mod, nn.Linear):
        n = mod.out_features
        layer = skip_init(nn.Linear, n, n, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            nn.init.eye_(layer.weight)
    else:
        k = (int(mod.kernel_size[0]), int(mod.kernel_size[-1]))
        if any(s % 2 == 0 for s in k):
            raise ValueError(
                f"cannot deepen after Conv2d with kernel_size {k}: an identity (Dirac) conv "
                "needs odd kernel sizes"
            )
        c = mod.out_channels
        pad = (k[0] // 2, k[1] // 2)
        layer = skip_init(nn.Conv2d, c, c, k, padding=pad, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            nn.init.dirac_(layer.weight)
    assert layer.bias is not None
    with torch.no_grad():
        layer.bias.zero_()
    return layer


def deepen(
    model: nn.Module,
    after: str,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    init: str = "identity",
    reason: str = "",
    record: bool = True,
) -> Event:
    """Insert a new layer of the same kind as ``after`` consuming its output, as identity.

    The insertion point follows ``after`` through BatchNorm to its activation when an
    activation module follows (called once). The new layer is a square ``Linear`` (identity
    weights, zero bias) or a ``Conv2d`` with the same odd kernel, "same" padding and a Dirac
    kernel. When the activation is ReLU-like (``a(a(x)) == a(x)``) a copy of it (without the
    hooks on it) follows the new layer, so the network really gets deeper and the function is
    unchanged; other activations are not repeated (a second one would change the function).

    The new parameters join the optimizer group of the parameter before them in the model.

    Example:
        >>> import torch, torch.nn as nn, dynarch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(3, 4); before = model(x)
        >>> event = dynarch.deepen(model, "0")
        >>> [type(m).__name__ for m in model]
        ['Linear', 'ReLU', 'Linear', 'ReLU', 'Linear']
        >>> torch.equal(model(x), before)
        True
    """
    if init != "identity":
        raise ValueError(
            f"unknown init '{init}' for deepen; allowed: identity (for a zero-initialised residual "
            "branch use dynarch.attach)"
        )
    mod = resolve(model, after, (nn.Linear, nn.Conv2d))
    graph = analyse(model)
    node = _single_call(graph.calls, after)
    anchor, act = after, None
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module" or len(graph.calls.get(str(user.target), [])) != 1:
            break
        m = graph.modules[str(user.target)]
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            anchor, node = str(user.target), user
            continue
        if isinstance(m, ACTIVATIONS):
            anchor, act = str(user.target), m
        break
    layer = _identity_layer(mod)
    base = _split(anchor)[1] + "_deep"
    new: list[tuple[str, nn.Module]] = [(base, layer)]
    if act is not None and isinstance(act, IDEMPOTENT):
        new.append((base + "_act", _copy_without_hooks(act)))
    with transaction(model, "deepen", after, reason=reason, record=record) as tx:
        names, _ = insert_after(model, anchor, new, graph)
        transplant(optimizer, added=_anchored(model, list(layer.parameters()), optimizer))
        tx.details = {
            "anchor": anchor,
            "inserted": names,
            "kind": type(layer).__name__,
            "activation": type(act).__name__ if act is not None and len(new) > 1 else None,
        }
        tx.replay = {"after": after}
    assert tx.event is not None
    return tx.event


def _copy_without_hooks(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its hooks (forward, backward, state-dict …).

    Hooks belong to whoever registered them on the original (a skip's tap, a monitor):
    copying them would run them twice per forward, and deep-copy the objects they are bound
    to (with any tensors those keep)."""
    memo: dict[int, Any] = {}
    for mod in module.modules():
        for key, value in vars(mod).items():
            if isinstance(value, dict) and (key.endswith("_hooks") or "_hooks_" in key):
                memo[id(value)] = type(value)()  # the copy gets a fresh, empty one
    return copy.deepcopy(module, memo)


def _canonical(slot: str) -> str:
    """``"fc1"`` and ``"after:fc1"`` name the same slot; the canonical key is the latter."""
    return "after:" + slot.removeprefix("after:")


def _slot_anchor(model: nn.Module, slot: str) -> str:
    name = slot.removeprefix("after:")
    try:
        resolve(model, name)
    except KeyError as exc:
        raise KeyError(
            f"unknown slot '{slot}': a slot is 'after:<module name>' naming a module of the model "
            f"({exc.args[0]})"
        ) from None
    return name


def attach(
    model: nn.Module,
    slot: str,
    module: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    alpha: float = 0.0,
    trainable_alpha: bool = True,
    reason: str = "",
    record: bool = True,
) -> Event:
    """Attach ``module`` at ``slot`` as a residual branch ``x + alpha * module(x)``.

    ``slot`` is ``"after:<module name>"`` (or just the module name): the branch reads that
    module's output, so ``forward`` must call that module exactly once. ``alpha`` is a finite
    0-dim parameter starting at 0 by default, so the function is unchanged; ``module`` must
    map its input to the same shape. ``module`` is moved (in place) to the device and
    floating dtype of the model where the slot reads (the layer producing it, else the
    model's first floating parameter), and ``alpha`` takes them too. The new parameters (the
    module's and ``alpha``) join the optimizer group of the parameter before them. A module
    that is already sparse (``weight_mask`` buffers) keeps its masks: they are enforced after
    every step of ``optimizer`` and rebuilt by :func:`dynarch.load`.

    Example:
        >>> import torch, torch.nn as nn, dynarch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = dynarch.attach(model, "after:1", nn.Linear(8, 8))
        >>> type(model[2]).__name__
        'Residual'
    """
    anchor = _slot_anchor(model, slot)
    slot = _canonical(slot)
    st = engine_state(model)
    if slot in st.slots:
        raise ValueError(f"slot '{slot}' is occupied by '{st.slots[slot]}'; detach it first")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    alpha = _check_alpha(alpha)
    try:
        graph: ModelGraph | None = analyse(model)
    except UnsupportedModelError:
        graph = None  # untraceable: nothing to count; insert by wrapping the anchor
    _check_called_once(graph, anchor)
    producer = _producer(model, anchor, graph)
    ref = _float_param(producer if producer is not None else model.get_submodule(anchor))
    ref = _float_param(model) if ref is None else ref
    if ref is not None:
        module = module.to(device=ref.device, dtype=ref.dtype)
    _check_shape(producer, module, slot)
    wrapper = Residual(module, alpha=alpha, trainable_alpha=trainable_alpha)
    if ref is not None:
        wrapper = wrapper.to(device=ref.device, dtype=ref.dtype)
    from .spec import class_path, describe

    with transaction(model, "attach", slot, reason=reason, record=record) as tx:
        base = _split(anchor)[1] + "_slot"
        (name,), wrapped = insert_after(model, anchor, [(base, wrapper)], graph)
        transplant(optimizer, added=_anchored(model, list(wrapper.parameters()), optimizer))
        if optimizer is not None and any(
            m._buffers.get(MASK) is not None for m in module.modules()
        ):
            enforce(model, optimizer)  # a module attached already sparse keeps its masks
        st.slots[slot] = name
        if wrapped:
            st.wrapped.add(name)
        tx.details = {"module": name, "alpha": alpha, "type": type(module).__name__}
        spec = describe(module) or {"class": class_path(module)}
        tx.replay = {"slot": slot, "module": spec, "alpha": alpha,
                     "trainable_alpha": trainable_alpha}  # fmt: skip
    assert tx.event is not None
    return tx.event


def _call_count(graph: ModelGraph, name: str) -> int:
    """How many times ``forward`` calls the module ``name`` (a leaf of the trace or not)."""
    calls: set[str] = set()
    for node in graph.graph.nodes:  # nn_module_stack keys: "name", "name@1", ... per call
        calls.update(k for k, v in (node.meta.get("nn_module_stack") or {}).items() if v[0] == name)
    return max(len(calls), len(graph.calls.get(name, [])))


def _check_called_once(graph: ModelGraph | None, anchor: str) -> None:
    """Refuse an anchor ``forward`` calls more than once (say a ``self.relu`` reused after
    the residual add: the attached branch would run at every call site) or never (say the
    ``linear1`` of an ``nn.TransformerEncoderLayer``, whose own forward uses its weights:
    the branch would never run, or break that forward). ``graph`` ``None``: untraceable,
    nothing to count."""
    if graph is None:
        return
    calls = _call_count(graph, anchor)
    if calls > 1:
        raise UnsupportedModelError(
            f"'{anchor}' is called {calls} times in forward, so a module attached after it "
            "would run at each call; attach after a module called once (give each use of "
            f"'{anchor}' its own module)"
        )
    if calls == 0:
        raise UnsupportedModelError(
            f"'{anchor}' is never called in forward as torch.fx traces it (it is unused, or "
            "used inside a library module's own forward, like the linear1 of an "
            "nn.TransformerEncoderLayer), so a module attached after it would never run; "
            "attach after a module that forward calls once"
        )


def _producer(
    model: nn.Module, anchor: str, graph: ModelGraph | None
) -> nn.Linear | nn.Conv2d | None:
    """The Linear/Conv2d whose units the output of ``anchor`` carries: ``anchor`` itself or
    the one it follows through shape-preserving modules (norms, activations, dropout,
    pooling); ``None`` when unknown (``graph`` ``None``: untraceable)."""
    name = anchor
    for _ in range(len(graph.modules) if graph else 1):
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Linear | nn.Conv2d):
            return mod
        if graph is None or not isinstance(mod, (*PASS_MODULES, *NORMS)):
            return None
        nodes = graph.calls.get(name, [])
        src = nodes[0].args[0] if len(nodes) == 1 and nodes[0].args else None
        if not isinstance(src, fx.Node) or src.op != "call_module":
            return None
        name = str(src.target)
    return None


def _check_shape(producer: nn.Linear | nn.Conv2d | None, module: nn.Module, slot: str) -> None:
    if producer is None:
        return
    spatial: tuple[int, ...] = ()
    if isinstance(producer, nn.Linear):
        width = producer.out_features
    else:  # a Conv2d: probe a small "same"-size feature map
        width, spatial = producer.out_channels, (8, 8)
    w = producer.weight
    probe = torch.zeros(2, width, *spatial, device=w.device, dtype=w.dtype)
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception as exc:
        raise ValueError(
            f"module cannot read the output of slot '{slot}' (width {width}): {exc}"
        ) from exc
    finally:
        module.train(was)
    if tuple(out.shape) != tuple(probe.shape):
        raise ValueError(
            f"module attached at '{slot}' maps width {width} to shape {tuple(out.shape)[1:]}; "
            "it must return its input's shape"
        )


def detach(
    model: nn.Module,
    slot: str,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    reason: str = "",
    record: bool = True,
) -> Event:
    """Remove the module attached at ``slot`` (its parameters leave the optimizer too).

    The function changes by ``alpha * module(x)`` (nothing when ``alpha`` is still 0).

    Example:
        >>> import torch.nn as nn, dynarch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = dynarch.attach(model, "after:1", nn.Linear(8, 8))
        >>> _ = dynarch.detach(model, "after:1")
        >>> len(model)
        3
    """
    st = engine_state(model)
    slot = _canonical(slot)
    if slot not in st.slots:
        occupied = sorted(st.slots) or "none"
        raise KeyError(f"nothing is attached at slot '{slot}'; occupied slots: {occupied}")
    name = st.slots[slot]
    parent_name, last = _split(name)
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapper = getattr(parent, last)
    with transaction(model, "detach", slot, reason=reason, record=record) as tx:
        params = list(wrapper.parameters())
        if name not in st.wrapped or len(parent._modules) != 2:
            del parent._modules[last]  # (a wrapper holding more than anchor + slot stays)
        else:  # undo the wrapper made by insert_after
            grand_name, plast = _split(parent_name)
            grand = model.get_submodule(grand_name) if grand_name else model
            setattr(grand, plast, parent._modules["0"])
        transplant(optimizer, removed=params)
        del st.slots[slot]
        st.wrapped.discard(name)
        tx.details = {"module": name}
        tx.replay = {"slot": slot}
    assert tx.event is not None
    return tx.event
