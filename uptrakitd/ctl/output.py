"""What `uptrakitctl` prints: tables sized to the terminal for people, JSON with sorted keys for scripts."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import click

GAP = 2
ELLIPSIS = "…"


@dataclass(frozen=True)
class Column:
    """A table column: its heading, how to get its text from a row, and whether it may be cut (ids never are:
    a cut id cannot be pasted into the next command)."""

    heading: str
    value: Callable[[dict[str, Any]], Any]
    cut: bool = False


def text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(text(v) for v in value) or "-"
    return " ".join(str(value).split())   # one line per row, whatever the field held


def terminal_width() -> int:
    return max(40, shutil.get_terminal_size((120, 24)).columns)


def table(rows: Iterable[dict[str, Any]], columns: list[Column], width: int | None = None) -> str:
    """Rows under headings, each column as wide as its widest cell; when that is wider than the terminal, the
    columns that may be cut give up width, widest first, down to 8 characters."""
    cells = [[text(c.value(r)) for c in columns] for r in rows]
    widths = [max([len(c.heading)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    room = (width or terminal_width()) - GAP * (len(columns) - 1)
    while sum(widths) > room:
        cuttable = [i for i, c in enumerate(columns) if c.cut and widths[i] > 8]
        if not cuttable:
            break
        widest = max(cuttable, key=lambda i: widths[i])
        widths[widest] -= min(widths[widest] - 8, sum(widths) - room)
    lines = [_line([c.heading.upper() for c in columns], widths)]
    lines += [_line(row, widths) for row in cells]
    return "\n".join(lines)


def _line(cells: list[str], widths: list[int]) -> str:
    shown = [c if len(c) <= w else c[:w - 1] + ELLIPSIS for c, w in zip(cells, widths)]
    return (" " * GAP).join(s.ljust(w) for s, w in zip(shown, widths)).rstrip()


def pairs(items: list[tuple[str, Any]]) -> str:
    """`label: value` lines, the values aligned."""
    width = max((len(label) for label, _ in items), default=0)
    return "\n".join(f"{label + ':':<{width + 1}} {text(value)}" for label, value in items)


def emit(fmt: str, data: Any, human: Callable[[Any], str]) -> None:
    """Print `data` as JSON (stable: sorted keys) or as `human(data)` says."""
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(human(data))
