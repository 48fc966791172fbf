"""Where activity is read: graph helpers shared by :mod:`dynarch.activity` and the growth ops.

Example:
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> forward_layers(net, try_analyse(net))
    ['0', '2']
"""

from __future__ import annotations

from torch import fx, nn

from ..graph import ACTIVATIONS, NORMS, PASS_MODULES, ModelGraph, UnsupportedModelError, analyse

__all__ = ["activation_tap", "carrier", "forward_layers", "post_activation", "try_analyse"]

_LAYERS = (nn.Linear, nn.Conv2d)


def try_analyse(model: nn.Module) -> ModelGraph | None:
    """The traced graph of ``model``, or ``None`` when it cannot be traced.

    Example:
        >>> try_analyse(nn.Linear(2, 2)) is not None
        True
    """
    try:
        return analyse(model)
    except UnsupportedModelError:
        return None


def forward_layers(model: nn.Module, graph: ModelGraph | None) -> list[str]:
    """Linear/Conv2d names in forward (traced) order, else in registration order (skipping
    modules flagged ``is_dynarch_skip``, e.g. skip projections, and what they hold)."""
    if graph is not None:
        names = [str(n.target) for n in graph.graph.nodes if n.op == "call_module"]
        mods = graph.modules
        return list(dict.fromkeys(n for n in names if isinstance(mods[n], _LAYERS)))
    hidden = [n + "." for n, m in model.named_modules() if getattr(m, "is_dynarch_skip", False)]
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, _LAYERS) and not any(n.startswith(h) for h in hidden)
    ]


def post_activation(graph: ModelGraph | None, name: str) -> str:
    """Name of the module whose output is producer ``name``'s post-activation: the activation
    module following it (through norms; each called once), else ``name`` itself.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 1))
        >>> post_activation(analyse(net), "0"), post_activation(analyse(net), "3")
        ('2', '3')
    """
    nodes = graph.calls.get(name, []) if graph is not None else []
    if graph is None or len(nodes) != 1:
        return name
    node = nodes[0]
    while len(node.users) == 1:
        user = next(iter(node.users))
        target = str(user.target)
        if user.op != "call_module" or len(graph.calls.get(target, [])) != 1:
            break
        mod = graph.modules[target]
        if isinstance(mod, NORMS):
            node = user
            continue
        if isinstance(mod, ACTIVATIONS):
            return target
        break
    return name


def activation_tap(graph: ModelGraph | None, name: str) -> tuple[str, str | None]:
    """Where producer ``name``'s post-activation can be read: ``(module to hook, activation
    to apply to its output)``. The activation is ``None`` when the hooked module's output is
    the post-activation itself (as :func:`post_activation` finds it). When the activation
    module that follows ``name`` (through norms each called once) is *shared*, called at
    several places of the forward (one ``nn.ReLU`` reused, torchvision style), a hook on it
    would mix every call; the tap is then the module just before it (the norm, or ``name``)
    and the activation's own ``forward`` is applied to that output. ``(name, None)`` when no
    activation module follows.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b, self.relu = nn.Linear(2, 3), nn.Linear(3, 3), nn.ReLU()
        ...         self.bn = nn.BatchNorm1d(3)
        ...     def forward(self, x):
        ...         return self.relu(self.b(self.relu(self.bn(self.a(x)))))
        >>> activation_tap(analyse(Net()), "a"), activation_tap(analyse(Net()), "b")
        (('bn', 'relu'), ('b', 'relu'))
    """
    nodes = graph.calls.get(name, []) if graph is not None else []
    if graph is None or len(nodes) != 1:
        return name, None
    node, last = nodes[0], name
    while len(node.users) == 1:
        user = next(iter(node.users))
        target = str(user.target)
        if user.op != "call_module" or not user.args or user.args[0] is not node:
            break
        mod = graph.modules[target]
        shared = len(graph.calls.get(target, [])) != 1
        if isinstance(mod, NORMS) and not shared:
            node, last = user, target
            continue
        if isinstance(mod, ACTIVATIONS):
            return (last, target) if shared else (target, None)
        break
    return name, None


def carrier(graph: ModelGraph | None, name: str) -> str | None:
    """The Linear/Conv2d whose units the output of module ``name`` carries: ``name`` itself or
    the one it follows through activations, norms, dropout and pooling; ``None`` if unknown.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> carrier(analyse(net), "1")
        '0'
    """
    if graph is None or name not in graph.modules:
        return None
    for _ in range(len(graph.modules)):
        mod = graph.modules[name]
        if isinstance(mod, _LAYERS):
            return name
        nodes = graph.calls.get(name, [])
        if not isinstance(mod, (*PASS_MODULES, *NORMS)) or len(nodes) != 1 or not nodes[0].args:
            return None
        src = nodes[0].args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module":
            return None
        name = str(src.target)
    return None
