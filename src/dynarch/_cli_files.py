"""Reading the JSON files of a run directory for ``dynarch inspect``
(:func:`dynarch.cli.inspect_run`): a damaged file is a :class:`~dynarch.report.UsageProblem`
naming it (and the line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .report import UsageProblem

__all__: list[str] = []


def _damaged(path: Path, exc: ValueError, line: int | None = None) -> UsageProblem:
    where = f" (line {line})" if line is not None else ""
    return UsageProblem(f"{str(path)!r} is damaged{where}: {exc}")


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a :class:`UsageProblem` naming the file when it is torn
    or holds something else."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(path, exc) from None
    if not isinstance(value, dict):
        raise UsageProblem(f"{str(path)!r} is damaged: it holds no JSON object")
    return value


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """:func:`dynarch.report.read_jsonl`, with a :class:`UsageProblem` naming the file and
    the line that does not parse."""
    rows = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _damaged(path, exc, i) from None
            if not isinstance(row, dict):
                raise UsageProblem(f"{str(path)!r} is damaged (line {i}): not a JSON object")
            rows.append(row)
    return rows
