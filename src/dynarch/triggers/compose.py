"""Composing triggers: ``all_of`` (every child fires) and ``any_of`` (some child fires)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .base import Trigger, check_state, make_trigger, register_trigger

__all__ = ["AllOf", "AnyOf", "Composite", "all_of", "any_of"]

_Spec = Trigger | Mapping[str, Any]


def _build(owner: str, spec: object, i: int) -> Trigger:
    if isinstance(spec, Trigger):
        return spec
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        return make_trigger(spec["name"], **kwargs)
    raise TypeError(
        f"{owner}: triggers[{i}] must be a Trigger or a mapping with a 'name' key "
        f"(e.g. {{'name': 'plateau', 'patience': 3}}), got {spec!r}"
    )


def _tree(triggers: list[Trigger], prefix: str = "") -> list[tuple[str, Trigger]]:
    """Every trigger under ``triggers`` with its path (``triggers[1].triggers[0]``), nested
    composites included, depth first."""
    found: list[tuple[str, Trigger]] = []
    for i, trigger in enumerate(triggers):
        path = f"{prefix}triggers[{i}]"
        found.append((path, trigger))
        if isinstance(trigger, Composite):
            found += _tree(trigger.triggers, path + ".")
    return found


class Composite(Trigger):
    """Several triggers asked together; :class:`AllOf` and :class:`AnyOf` say how to combine.

    ``update(value)`` feeds ``value`` to every child, always all of them (no short-circuit,
    so every child's state stays consistent; a trigger object may appear only once in the
    whole tree, nested composites included, or it would be updated twice), keeps their
    answers in :attr:`last` and combines them; :meth:`where` joins the places named by the
    children that fired. ``reset``, ``discard_pending``, ``state_dict`` and
    ``load_state_dict`` delegate to the children. Children are Trigger objects or config
    mappings such as ``{"name": "plateau", "patience": 3}`` (built with :func:`make_trigger`).

    Example:
        >>> from dynarch.triggers.plateau import Plateau
        >>> both = AllOf([Plateau(patience=1), Plateau(patience=2)])
        >>> [both.update(v) for v in (1.0, 1.0, 1.0)], both.last
        ([False, False, True], [True, True])
    """

    fire_on_any: ClassVar[bool] = False

    def __init__(self, triggers: Sequence[Trigger | Mapping[str, Any]]) -> None:
        owner = type(self).__name__
        if isinstance(triggers, Trigger | Mapping | str) or not isinstance(triggers, Sequence):
            raise TypeError(f"{owner} needs a list of triggers, got {triggers!r}")
        if not triggers:
            raise ValueError(f"{owner} needs at least one trigger, got none")
        self.triggers = [_build(owner, spec, i) for i, spec in enumerate(triggers)]
        seen: dict[int, str] = {}
        for path, trigger in _tree(self.triggers):
            first = seen.setdefault(id(trigger), path)
            if first != path:
                raise ValueError(
                    f"{owner}: {path} is the same object as {first} (it would be updated "
                    "twice per update); pass distinct trigger objects"
                )
        self.last = [False] * len(self.triggers)

    def update(self, value: Any = None) -> bool:
        """Feed ``value`` to every child; combine their answers."""
        self.last = [bool(trigger.update(value)) for trigger in self.triggers]
        return any(self.last) if self.fire_on_any else all(self.last)

    def fired(self) -> list[Trigger]:
        """The children whose last answer was True.

        Example:
            >>> from dynarch.triggers.plateau import Plateau
            >>> either = AnyOf([Plateau(patience=1), Plateau(patience=5)])
            >>> _ = [either.update(v) for v in (1.0, 1.0)]
            >>> [t.patience for t in either.fired()]
            [1]
        """
        return [t for t, fired in zip(self.triggers, self.last) if fired]

    def where(self) -> list[str]:
        """Places named by the children that fired (child order, no repeats; a child without
        ``where()`` names none).

        Example:
            >>> from dynarch.triggers.plateau import Plateau
            >>> any_of(Plateau()).where()
            []
        """
        places: list[str] = []
        for trigger in self.fired():
            where = getattr(trigger, "where", None)
            if callable(where):
                places.extend(p for p in where() if p not in places)
        return places

    def discard_pending(self) -> None:
        """Every child drops what it observed since its last update."""
        for trigger in self.triggers:
            trigger.discard_pending()

    def reset(self) -> None:
        """Reset every child."""
        for trigger in self.triggers:
            trigger.reset()
        self.last = [False] * len(self.triggers)

    def state_dict(self) -> dict[str, Any]:
        """``{"triggers": [child state, ...], "last": [bool, ...]}``."""
        return {"triggers": [t.state_dict() for t in self.triggers], "last": list(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (one child state per child, in order)."""
        owner = type(self).__name__
        check_state(owner, state, {"triggers", "last"})
        n = len(self.triggers)
        if len(state["triggers"]) != n or len(state["last"]) != n:
            raise ValueError(
                f"{owner} state holds {len(state['triggers'])} trigger states but this "
                f"composite has {n} triggers; load a state saved from the same composition"
            )
        for trigger, child in zip(self.triggers, state["triggers"]):
            trigger.load_state_dict(child)
        self.last = [bool(f) for f in state["last"]]


@register_trigger("all_of")
class AllOf(Composite):
    """Fires when every child fires (see :class:`Composite`).

    Example:
        >>> make_trigger("all_of", triggers=[{"name": "plateau", "patience": 1}]).update(1.0)
        False
    """


@register_trigger("any_of")
class AnyOf(Composite):
    """Fires when at least one child fires (see :class:`Composite`).

    Example:
        >>> make_trigger("any_of", triggers=[{"name": "plateau", "patience": 1}]).update(1.0)
        False
    """

    fire_on_any = True


def _children(triggers: tuple[Any, ...]) -> list[Any]:
    """The children given as arguments, or as one list/tuple argument."""
    if len(triggers) == 1 and isinstance(triggers[0], list | tuple):
        return list(triggers[0])
    return list(triggers)


def all_of(*triggers: _Spec | Sequence[_Spec]) -> AllOf:
    """A trigger firing when all ``triggers`` fire (every one is always updated); the
    triggers are separate arguments or one list.

    Example:
        >>> from dynarch.triggers.plateau import Plateau
        >>> t = all_of(Plateau(patience=1), Plateau(patience=1, mode="max"))
        >>> [t.update(v) for v in (1.0, 2.0, 0.5)]
        [False, False, False]
    """
    return AllOf(_children(triggers))


def any_of(*triggers: _Spec | Sequence[_Spec]) -> AnyOf:
    """A trigger firing when any of ``triggers`` fires (every one is always updated); the
    triggers are separate arguments or one list.

    Example:
        >>> from dynarch.triggers.plateau import Plateau
        >>> t = any_of(Plateau(patience=1), Plateau(patience=1, mode="max"))
        >>> [t.update(v) for v in (1.0, 2.0, 0.5)]
        [False, True, True]
    """
    return AnyOf(_children(triggers))
