"""One way to register small classes by name (triggers, schedule actions, LR strategies).

>>> class Base:
...     name = ""
>>> REG: dict[str, type[Base]] = {}
>>> @registrar("thing", Base, REG)("a")
... class A(Base):
...     pass
>>> REG["a"] is A, A.name
(True, 'a')
>>> registrar("thing", Base, REG)("a")(A)
Traceback (most recent call last):
...
ValueError: thing name 'a' is already registered to A; choose another name
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["registrar"]

_C = TypeVar("_C", bound=type)


def registrar(
    kind: str, base: type, registry: dict[str, Any]
) -> Callable[[str], Callable[[_C], _C]]:
    """A ``register_<kind>(name)`` class decorator storing subclasses of ``base`` in
    ``registry`` under ``name`` (and setting their ``name``); a non-subclass or a taken
    name is refused with a message naming both."""

    def register(name: str) -> Callable[[_C], _C]:
        def decorate(cls: _C) -> _C:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                article = "an" if base.__name__[0] in "AEIOU" else "a"
                raise TypeError(
                    f"register_{kind}({name!r}) needs {article} {base.__name__} subclass, "
                    f"got {cls!r}"
                )
            if name in registry:
                raise ValueError(
                    f"{kind} name {name!r} is already registered to "
                    f"{registry[name].__name__}; choose another name"
                )
            setattr(cls, "name", name)  # noqa: B010 (the registered classes declare it)
            registry[name] = cls
            return cls

        return decorate

    return register
