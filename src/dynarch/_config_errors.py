"""Turn pydantic validation errors into the one-line messages :mod:`dynarch.config` raises.

Each message names the key path as the user wrote it, the bad value and what is allowed;
pydantic's own error text never reaches the user. :func:`problem` handles one error of
``Model.model_validate``; :func:`suggest` adds a "did you mean" hint.

Example:
    >>> from dynarch.config import RunConfig
    >>> from pydantic import ValidationError
    >>> try:
    ...     RunConfig.model_validate({"train": {"epochs": 0}})
    ... except ValidationError as exc:
    ...     print(problem(exc.errors()[0], RunConfig))
    train.epochs: 0 is out of range; allowed: >= 1
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

__all__ = ["combine", "problem", "suggest"]


def combine(source: str, problems: list[str]) -> str:
    """One message for all ``problems`` found in ``source`` (a list when more than one).

    Example:
        >>> print(combine("run.yaml", ["a: bad", "b: worse"]))
        run.yaml: 2 problems:
          - a: bad
          - b: worse
    """
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{source}: {len(problems)} problems:\n{lines}"


def suggest(value: object, choices: Sequence[str]) -> str:
    """A ``" (did you mean 'x'?)"`` hint for the choice closest to ``value``, else ``""``.

    Example:
        >>> suggest("adm", ["sgd", "adam"])
        " (did you mean 'adam'?)"
        >>> suggest("zzz", ["sgd", "adam"])
        ''
    """
    lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(lower), n=1)
    return f" (did you mean {lower[close[0]]!r}?)" if close else ""


def _unwrap(ann: Any) -> Any:
    """``X | None`` -> ``X``; ``Annotated[X, ...]`` -> ``X``."""
    if get_origin(ann) is Annotated:
        return _unwrap(get_args(ann)[0])
    args = [a for a in get_args(ann) if a is not type(None)]
    if get_origin(ann) in (Union, type(int | None)) and len(args) == 1:
        return _unwrap(args[0])
    return ann


def _walk(
    loc: tuple[int | str, ...], root: type[BaseModel]
) -> tuple[list[str], type[BaseModel] | None, Any, Any]:
    """Follow a pydantic error location through the config classes from ``root``: the
    user-facing key path (union tags dropped), the section holding the last key, that key's
    FieldInfo (None when the path ends inside a list) and the annotation at the end of the path."""
    path: list[str] = []
    ann: Any = root
    section: type[BaseModel] | None = None
    field = None
    for item in loc:
        ann = _unwrap(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            section, field = ann, ann.model_fields.get(str(item))
            path.append(str(item))
            ann = field.annotation if field is not None else None
            continue
        members = [_unwrap(m) for m in get_args(ann)]
        if members and all(isinstance(m, type) and issubclass(m, BaseModel) for m in members):
            tagged = {get_args(m.model_fields["kind"].annotation)[0]: m for m in members}
            ann = tagged.get(item)  # a discriminated union's tag is not a key of the file
            continue
        path.append(f"[{item}]" if isinstance(item, int) else str(item))
        args, field = get_args(ann), None
        ann = args[0] if get_origin(ann) in (list, tuple) and args else None
    return path, section, field, ann


def _dotted(path: list[str]) -> str:
    """``["model", "hidden", "[0]"]`` -> ``"model.hidden[0]"``."""
    return ".".join(path).replace(".[", "[")


def _bounds(field: Any, ann: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    """Constraints (gt, ge, lt, le, min_length, max_length) of a field, else from ``ctx``."""
    keys = ("gt", "ge", "lt", "le", "min_length", "max_length")
    if field is not None:
        meta = field.metadata
    else:  # a list item: the constraints sit in its Annotated[...] type
        meta = [m for a in get_args(ann)[1:] for m in getattr(a, "metadata", [a])]
    found = {k: getattr(m, k) for m in meta for k in keys if getattr(m, k, None) is not None}
    return found or {k: ctx[k] for k in keys if k in ctx}


def _range_text(b: dict[str, Any]) -> str:
    """Bounds as words: ``a number in [0, 1)``, ``>= 1``, ``> 0 and <= 1``."""
    lo, hi = b.get("gt", b.get("ge")), b.get("lt", b.get("le"))
    if lo is not None and hi is not None:
        left, right = "(" if "gt" in b else "[", ")" if "lt" in b else "]"
        return f"a number in {left}{lo}, {hi}{right}"
    sign = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return " and ".join(f"{sign[op]} {v}" for op, v in b.items() if op in sign)


_MAPPING = "a mapping of keys"
_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string"}
_TYPES |= {"list": "a list", "tuple": "a list", "dict": _MAPPING, "model": _MAPPING}
_TYPES |= {"model_attributes": _MAPPING, "int_from_float": "an integer"}


def problem(err: Any, root: type[BaseModel]) -> str:
    """One line for one pydantic error of ``root.model_validate``: key path, bad value, what
    is allowed.

    Example:
        >>> from dynarch.config import RunConfig
        >>> err = {"type": "missing", "loc": ("sparsity", "density"), "msg": "", "input": {}}
        >>> problem(err, RunConfig)
        'sparsity.density: required key is missing'
    """
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    path, section, field, ann = _walk(tuple(err["loc"]), root)
    where = _dotted(path) or "config"
    if kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err["msg"]))
        return msg if not path or msg.startswith(f"{where}.") else f"{where}: {msg}"
    if kind == "extra_forbidden" and section is not None:
        allowed = list(section.model_fields)
        scope = f"in {_dotted(path[:-1])}" if len(path) > 1 else "at the top level"
        hint = suggest(path[-1], allowed)
        return f"unknown key {where!r}{hint}; allowed keys {scope}: {', '.join(allowed)}"
    if kind == "union_tag_not_found":
        tags = [get_args(m.model_fields["kind"].annotation)[0] for m in get_args(_unwrap(ann))]
        return f"{where}.kind is missing; set it to one of {', '.join(map(repr, tags))}"
    if kind == "union_tag_invalid":
        tags = ctx["expected_tags"]
        hint = suggest(ctx["tag"], re.findall(r"'([^']*)'", tags))
        return f"{where}.kind: {ctx['tag']!r} is not allowed; choose one of {tags}{hint}"
    if kind == "literal_error":
        lit = _unwrap(ann)
        choices = [str(c) for c in get_args(lit)] if get_origin(lit) is Literal else []
        listed = ", ".join(map(repr, choices)) if choices else str(ctx.get("expected", ""))
        hint = suggest(value, choices)
        return f"{where}: {value!r} is not allowed; choose one of {listed}{hint}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return (
            f"{where}: {value!r} is out of range; allowed: {_range_text(_bounds(field, ann, ctx))}"
        )
    if kind in ("too_short", "too_long"):
        b = _bounds(field, ann, ctx)
        lo, hi = b.get("min_length"), b.get("max_length")
        need = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"at most {hi}"
        return f"{where}: {value!r} has {ctx.get('actual_length')} items; expected {need}"
    if kind == "missing":
        return f"{where}: required key is missing"
    base = kind.rsplit("_", 1)[0] if kind.endswith(("_type", "_parsing")) else kind
    if base in _TYPES:
        return f"{where}: expected {_TYPES[base]}, got {value!r} ({type(value).__name__})"
    return f"{where}: {err['msg']} (got {value!r})"
